"""engine.vision_quantization 'fp8': the vision tower's block linears as FP8 GEMMs.

On the CPU ``fp8.linear`` computes the product of the dequantised e4m3 values in fp32, so these
tests check the wiring (every block linear quantised and used, biases and GELU kept, originals
freed) and that the tower's output moves by quantisation noise only. The GPU test (cuda) checks
cuBLASLt's FP8 GEMMs inside the tower and a captured vision graph."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from serve_app.engine._private import fp8
from serve_app.engine._private.runner import ModelRunner
from serve_app.engine.config import EngineConfig

from test_engine import DEVICE, _collect, _config, _image_request, _run, model_dir  # noqa: F401  (fixture)

GRIDS = [(1, 6, 8), (1, 4, 4)]


def _runner(model_dir: str, vision_quantization=None, dtype=None) -> ModelRunner:  # noqa: F811
    from serve_app.models import load_model
    dt = dtype or (torch.float32 if DEVICE == "cpu" else torch.bfloat16)
    model = load_model(model_dir, dtype=dt, device="cpu").eval()
    return ModelRunner(model, torch.device(DEVICE), 2, 256, vision_quantization=vision_quantization)


def _pixels(seed: int = 5) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((t * h * w, 1536)).astype(np.float32) for t, h, w in GRIDS]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_config_and_runner_checks():
    assert EngineConfig(vision_quantization="fp8").vision_quantization == "fp8"
    with pytest.raises(ValueError, match="needs engine='continuous'"):
        EngineConfig(engine="hf-generate", vision_quantization="fp8")
    with pytest.raises(ValueError):
        EngineConfig(vision_quantization="int8")


def test_fp8_tower_quantises_every_block_linear_and_stays_close(model_dir):  # noqa: F811
    """Every block's qkv/proj/fc1/fc2 is an e4m3 weight with per-channel scales and its bf16
    original is freed; the patch embedding and mergers are untouched; embeddings and deepstack
    levels move by quantisation noise (measured 2-4 % on this sharp random model), not by a
    wiring error (order 1), and they do move (the FP8 path is the one that ran)."""
    full = _runner(model_dir)
    q = _runner(model_dir, "fp8")
    enc = q.vision
    assert enc.fp8 and len(enc._fp8_w) == len(q.visual.blocks)
    for blk, w in zip(q.visual.blocks, enc._fp8_w):
        for name, lin in enc._linears(blk).items():
            assert w[name].q.dtype == torch.float8_e4m3fn and w[name].q.shape[0] == lin.out_features
            assert w[name].scale.shape == (1, lin.out_features)
            assert lin.weight.numel() == 0 and lin.bias is not None
    assert q.visual.patch_embed.proj.weight.numel() > 0 and q.visual.merger.linear_fc1.weight.numel() > 0
    want = full.encode_images(_pixels(), GRIDS)
    got = q.encode_images(_pixels(), GRIDS)
    errs = []
    for (e, ds), (we, wds) in zip(got, want):
        assert e.shape == we.shape and torch.isfinite(e).all()
        errs.append(_rel(e, we))
        errs += [_rel(a, b) for a, b in zip(ds, wds)]
    print("fp8 vision tower vs fp32, relative errors:", [round(x, 4) for x in errs])
    assert 0 < max(errs) < 0.1, errs


def test_fp8_tower_equals_fake_quantised_linears(model_dir, monkeypatch):  # noqa: F811
    """The FP8 tower equals the full-precision tower whose four block linears are replaced by
    per-token-quantised inputs times the dequantised e4m3 weights, plus bias: the GELU, norms,
    attention and residuals around them are the unquantised ones (CPU: exact)."""
    if DEVICE != "cpu":
        pytest.skip("exact on the CPU (cuBLASLt rounds its bf16 output)")
    from serve_app.engine._private.vision import VisionEncoder
    q = _runner(model_dir, "fp8")
    weights = q.vision._fp8_w
    full = _runner(model_dir)

    def fake(self, x, i, name, lin):
        xq, xs = fp8.quantize_rows_torch(x)
        w = weights[i][name]
        return (xq.float() * xs) @ (w.q.float() * w.scale.reshape(-1, 1)).t() + lin.bias

    monkeypatch.setattr(VisionEncoder, "_lin", fake)
    want = full.encode_images(_pixels(), GRIDS)
    monkeypatch.undo()
    got = q.encode_images(_pixels(), GRIDS)
    for (e, ds), (we, wds) in zip(got, want):
        torch.testing.assert_close(e, we, rtol=1e-5, atol=1e-5)
        for a, b in zip(ds, wds):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_engine_serves_images_with_fp8_tower(model_dir):  # noqa: F811
    """The engine with vision_quantization fp8 (and without) serves image requests to the end;
    start-up reports the setting."""
    rng = np.random.default_rng(2)
    reqs = [_image_request(i, rng, [4, 6], 6) for i in range(3)]

    async def scenario(engine):
        res = await asyncio.gather(*[_collect(engine, r) for r in reqs])
        return [t for t, _, _ in res], engine.health()

    toks, health = _run(_config(model_dir, vision_quantization="fp8"), scenario)
    assert health["vision_quantization"] == "fp8"
    assert all(len(t) == 6 for t in toks)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs ENGINE_TEST_DEVICE=cuda")
def test_fp8_tower_on_gpu_and_in_a_vision_graph(model_dir):  # noqa: F811
    """bf16 on the GPU: the FP8 tower (Triton row quantisation + cuBLASLt FP8 GEMMs) stays near the
    bf16 tower, and a captured vision graph replays the eager FP8 tower's embeddings."""
    full = _runner(model_dir)
    q = _runner(model_dir, "fp8")
    want = full.encode_images(_pixels(), GRIDS)
    got = q.encode_images(_pixels(), GRIDS)
    errs = [_rel(e, we) for (e, _), (we, _) in zip(got, want)]
    print("fp8 vision tower vs bf16, relative error per image:", [round(x, 4) for x in errs])
    assert max(errs) < 0.15, errs
    q.setup_vision_graphs(max_grids=4, max_patches=64)
    for _ in range(2):
        q.encode_images(_pixels()[:1], GRIDS[:1])
    assert q.capture_pending_vision_graph()
    replayed = q.encode_images(_pixels()[:1], GRIDS[:1])
    assert q._vg.replays == 1
    assert _rel(replayed[0][0], got[0][0]) < 1e-2
