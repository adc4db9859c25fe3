"""The LM head in FP8 (``engine.lm_head_quantization: fp8``): every logits path (prefill, the
decode step, the engine end to end) is the per-vocab-row x per-token scaled product, the head the
embedding lookup ties to stays, and on a GPU each start-up kernel choice gives the same logits.

Random weights say nothing about the head's quality on a trained model; what these pin down is
where the FP8 head is used and that it is exactly the product it claims to be."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from serve_app.engine._private import fp8
from serve_app.engine._private.runner import ModelRunner, PrefillChunk
from serve_app.engine.config import EngineConfig
from serve_app.engine.continuous import ContinuousEngine

from test_engine import DEVICE, _burst_cpu_tokens, _collect, _request, model_dir  # noqa: F401  (fixture)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _fake_head(weight: torch.Tensor):
    """The FP8 head emulated in fp32: dequantised rows times dequantised activations."""
    qw = fp8.quantize_weight(weight)
    deq = qw.q.float() * qw.scale.reshape(-1, 1)

    def head(x):
        q, s = fp8.quantize_rows_torch(x)
        return ((q.float() * s) @ deq.t()).to(weight.dtype)
    return head


def _rel(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _prefill_then_decode(r: ModelRunner) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of a 40-token prompt's last token, then of one decode step after it."""
    torch.manual_seed(0)
    ids = torch.randint(100, 5000, (40,))
    pos = torch.arange(40).view(1, -1).expand(3, -1)
    r.allocate_kv(1024)
    pages = [0, 1, 2, 3]
    r.set_block_table(0, pages)
    chunk = PrefillChunk(ids=ids, positions=pos, start=0, pages=torch.tensor(pages), want_logits=True)
    first = r.prefill([chunk])
    step = r.decode([int(first.argmax(-1)[0])], [40], [pages[40 // r.page_size]], [40 % r.page_size], [41], [0])
    return first, step


def test_runner_logits_are_the_fp8_head_product(tiny_model_path):
    """Prefill and decode logits with the FP8 head equal a plain runner whose head is the
    emulated FP8 product, and differ from the plain head's. The tied bf16/fp32 head stays (the
    embedding lookup reads it); an untied one is freed, with the same logits."""
    from serve_app.models import load_model

    cpu = torch.device("cpu")
    out = {}
    for mode in ("fp8", "fake", "plain", "untied"):
        model = load_model(tiny_model_path, dtype=torch.float32, device="cpu").eval()
        if mode == "untied":
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        r = ModelRunner(model, cpu, 4, 512, lm_head_quantization=None if mode in ("fake", "plain") else "fp8")
        if mode == "fake":
            r.lm_head = _fake_head(model.lm_head.weight.detach())
        if mode == "fp8":
            assert r.head8.q.dtype == fp8.FP8 and r.head8.scale.shape == (1, r.vocab)
            assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
            assert model.lm_head.weight.numel() == r.vocab * r.hidden      # tied: kept
        if mode == "untied":
            assert model.lm_head.weight.numel() == 0                        # untied: freed
        out[mode] = _prefill_then_decode(r)
    for i in range(2):
        assert torch.allclose(out["fp8"][i], out["fake"][i], rtol=1e-4, atol=1e-4)
        assert torch.allclose(out["untied"][i], out["fp8"][i], rtol=1e-5, atol=1e-5)
        assert 1e-4 < _rel(out["fp8"][i], out["plain"][i]) < 0.1            # FP8's own error, no more


def test_engine_fp8_head_equals_fake_quantised_head(model_dir, monkeypatch):  # noqa: F811
    """Requests with images arriving together, chunked prompts, batched decode: the engine's
    greedy tokens with the FP8 head equal those of an engine whose head emulates it (CPU)."""
    if DEVICE != "cpu":
        pytest.skip("exact emulation holds on the CPU (the GPU writes bf16 GEMM outputs)")
    rng = np.random.default_rng(4)
    reqs = [_request(i, rng, i % 3, int(rng.integers(4, 20))) for i in range(6)]
    got, health = _burst_cpu_tokens(model_dir, reqs, lm_head_quantization="fp8")
    assert health.get("lm_head_quantization") == "fp8"

    def fake_logits(self, x):
        head = self.__dict__.get("_fake") or self.__dict__.setdefault("_fake", _fake_head(self.lm_head.weight.detach()))
        return head(x).float()
    monkeypatch.setattr(ModelRunner, "_logits", fake_logits)
    ref, _ = _burst_cpu_tokens(model_dir, reqs)
    assert got == ref and all(len(t) > 0 for t in got)


def test_config_rejects_lm_head_quantization_without_continuous_engine():
    from serve_app.config import AppConfig

    assert AppConfig(engine={"lm_head_quantization": "fp8"}).engine.lm_head_quantization == "fp8"
    with pytest.raises(ValueError, match="continuous"):
        EngineConfig(engine="hf-generate", lm_head_quantization="fp8")
    with pytest.raises(ValueError):
        EngineConfig(lm_head_quantization="int8")


@cuda
def test_fp8_head_on_gpu_each_kernel_kind(model_dir):  # noqa: F811
    """The fused decode step's logits with the head on each kind: "swap8" computes cuBLASLt
    W8A8's product (the same e4m3 operands), "a16" keeps the activations in bf16, "bf16" is the
    model's own head (bit-equal to a runner without the FP8 head)."""
    from test_kv_fp8 import _runner_with_random_kv

    r, args = _runner_with_random_kv(model_dir, quantization="fp8", lm_head_quantization="fp8")
    got = {}
    for kind, cfg in {"swap8": (64, 128, 1, 4, 3, "swap8"), "a16": (32, 128, 1, 4, 3), "w8a8": None,
                      "bf16": "bf16"}.items():
        r.head_plan = {16: cfg}
        got[kind] = r.decode(*args)
        assert torch.isfinite(got[kind]).all() and got[kind].dtype == torch.float32
    head8, r.head8 = r.head8, None
    plain = r.decode(*args)
    r.head8 = head8
    assert torch.equal(got["bf16"], plain)
    assert _rel(got["swap8"], got["w8a8"]) < 1e-2
    for kind in ("swap8", "a16", "w8a8"):
        assert _rel(got[kind], plain) < 0.1, kind


@cuda
def test_fp8_head_engine_plans_and_serves(model_dir):  # noqa: F811
    """bf16 engine with FP8 layers and head on the GPU: the head's kernel is timed per row tile,
    graph steps and prefill run with it, requests finish."""
    rng = np.random.default_rng(6)
    reqs = [_request(i, rng, i % 2, 12) for i in range(6)]

    async def main():
        cfg = EngineConfig(model=model_dir, engine="continuous", device="cuda", dtype="bfloat16",
                           max_num_seqs=4, max_model_len=512, max_prefill_tokens=64, quantization="fp8",
                           lm_head_quantization="fp8")
        engine = ContinuousEngine(cfg)
        await engine.start()
        try:
            res = await asyncio.gather(*[_collect(engine, r, 0.02 * i) for i, r in enumerate(reqs)])
            return [t for t, _, _ in res], engine.health(), engine._sched.runner
        finally:
            await engine.shutdown()

    toks, health, runner = asyncio.run(main())
    assert all(len(t) == 12 for t in toks)
    assert health["lm_head_quantization"] == "fp8"
    assert "lm_head@16" in health["fp8_decode_plan"] and set(runner.head_plan) == {16}
