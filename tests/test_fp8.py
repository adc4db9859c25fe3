"""FP8 linears (``quantization: fp8``): the quantisation's error bound, the GEMM's plumbing, and the
engine end to end against a fake-quantised full-precision run (same math, fp32 emulation).

Random weights say nothing about FP8's quality on a trained model (each FP8 GEMM is ~3.5 % off
in norm on random data, and a random network amplifies that); what these pin down is that every
decoder linear, in prefill and decode, is exactly the per-channel x per-token scaled product.
The Triton quantisation kernels are checked against the torch reference on a GPU."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from serve_app.engine._private import fp8
from serve_app.engine._private.runner import ModelRunner, PrefillChunk
from serve_app.engine.config import EngineConfig
from serve_app.engine.continuous import ContinuousEngine

from test_engine import DEVICE, _collect, _request, _burst_cpu_tokens, model_dir  # noqa: F401  (fixture)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _dequant_weight(w: fp8.Fp8Weight) -> torch.Tensor:
    return w.q.float() * w.scale.reshape(-1, 1)


def _fake_lin(self, x, w):
    """The FP8 product emulated in fp32: dequantised weights times dequantised activations."""
    if not isinstance(w, fp8.Fp8Weight):
        cache = self.__dict__.setdefault("_fake_w", {})
        key = w.data_ptr()
        if key not in cache:
            cache[key] = fp8.quantize_weight(w)
        w = cache[key]
    q, s = x if isinstance(x, tuple) else fp8.quantize_rows_torch(x)
    return ((q.float() * s) @ _dequant_weight(w).t()).to(self.dtype)


def test_weight_quantisation_error_bound():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g) * torch.logspace(-3, 1, 96)[:, None]   # rows of any scale
    w[5] = 0.0                                                                    # a dead channel
    qw = fp8.quantize_weight(w)
    assert qw.q.dtype == torch.float8_e4m3fn and qw.scale.shape == (1, 96)
    deq = _dequant_weight(qw)
    assert torch.isfinite(deq).all() and (deq[5] == 0).all()
    # e4m3: 3 mantissa bits (relative step 2^-3, rounding error <= 2^-4) down to the subnormal
    # step 2^-9 of the row's scale.
    bound = w.abs() * 2.0 ** -4 + qw.scale.reshape(-1, 1) * 2.0 ** -10 + 1e-12
    assert ((deq - w).abs() <= bound * 1.0001).all()
    assert (deq.abs().amax(dim=1)[w.abs().amax(dim=1) > 0] > 0).all()


def test_linear_is_the_scaled_product():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(9, 128, generator=g) * 4, torch.randn(80, 128, generator=g) * 0.05
    x[3] = 0.0
    qw = fp8.quantize_weight(w)
    xq, xs = fp8.quantize_rows_torch(x)
    ref = (xq.float() * xs) @ _dequant_weight(qw).t()
    y = fp8.linear(x, qw, torch.float32)
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    assert (y[3] == 0).all()
    assert torch.equal(fp8.linear((xq, xs), qw, torch.float32), y)       # pre-quantised input
    rel = ((y - x @ w.t()).norm() / (x @ w.t()).norm()).item()
    assert 0 < rel < 0.06                                                 # FP8's own error


def test_runner_quantises_every_decoder_linear(tiny_model_path):
    from serve_app.models import load_model

    torch.manual_seed(0)
    ids = torch.randint(100, 5000, (40,))
    pos = torch.arange(40).view(1, -1).expand(3, -1)
    chunk = PrefillChunk(ids=ids, positions=pos, start=0, pages=torch.arange(4), want_logits=True)
    out = {}
    for mode in ("fp8", "fake"):
        model = load_model(tiny_model_path, dtype=torch.float32, device="cpu").eval()
        r = ModelRunner(model, torch.device("cpu"), 4, 512, quantization="fp8" if mode == "fp8" else None)
        if mode == "fp8":
            lin = {k for w in r.w for k, v in w.items() if isinstance(v, fp8.Fp8Weight)}
            assert lin == {"q", "k", "v", "o", "gate", "up", "down"}
            assert all(m.weight.numel() == 0 for m in (model.model.language_model.layers[0].mlp.down_proj,))
        else:
            r._lin = _fake_lin.__get__(r)
        r.allocate_kv(1024)
        out[mode] = r.prefill([chunk])
    assert torch.allclose(out["fp8"], out["fake"], rtol=1e-4, atol=1e-4)


def test_config_rejects_quantization_without_continuous_engine():
    from serve_app.config import AppConfig

    assert AppConfig(engine={"quantization": "fp8"}).engine.quantization == "fp8"   # app args
    with pytest.raises(ValueError, match="continuous"):
        EngineConfig(engine="hf-generate", quantization="fp8")
    with pytest.raises(ValueError, match="fp8"):
        AppConfig(engine={"quantization": "int4"})


def test_fp8_needs_fp8_tensor_cores(monkeypatch):
    """An older GPU fails the start-up with a message naming its compute capability."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A10")
    why = fp8.supported(torch.device("cuda", 0))
    assert "8.6" in why and "A10" in why
    assert fp8.supported(torch.device("cpu")) is None


def test_engine_fp8_equals_fake_quantised_engine(model_dir, monkeypatch):  # noqa: F811
    """Requests with images arriving together, chunked prompts, decode in batches: the FP8
    engine's greedy tokens equal those of a full-precision engine whose linears emulate FP8 in
    fp32 (CPU)."""
    if DEVICE != "cpu":
        pytest.skip("exact emulation holds on the CPU (the GPU writes bf16 GEMM outputs)")
    rng = np.random.default_rng(3)
    reqs = [_request(i, rng, i % 3, int(rng.integers(4, 20))) for i in range(6)]

    def run(quant):
        return _burst_cpu_tokens(model_dir, reqs, quantization=quant)

    got, health = run("fp8")
    assert health.get("quantization") == "fp8"
    monkeypatch.setattr(ModelRunner, "_lin", _fake_lin)
    ref, _ = run(None)
    assert got == ref
    assert all(len(t) > 0 for t in got)


@cuda
def test_triton_quantisation_matches_torch():
    from serve_app.engine._private import kernels as K

    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(300, 4096, device="cuda", generator=g, dtype=torch.bfloat16) * 3
    x[7] = 0
    r = torch.randn(300, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.rand(4096, device="cuda", generator=g, dtype=torch.bfloat16) + 0.5
    gu = torch.randn(300, 2 * 9728, device="cuda", generator=g, dtype=torch.bfloat16) * 2

    def same(got, want_rows):
        (q, s), (qr, sr) = got, fp8.quantize_rows_torch(want_rows)
        assert torch.allclose(s, sr, rtol=1e-6, atol=0)
        diff = (q.float() - qr.float()).abs()
        # Triton's fp32 division may differ from torch's in the last bit: at most one e4m3 step
        assert (diff <= qr.float().abs() * 2.0 ** -3 + 2.0 ** -9).all()
        assert (diff > 0).float().mean().item() < 1e-3

    same(K.quantize_rows(x), x)
    same(K.rms_norm(x, w, 1e-6, quant=True), K.rms_norm(x, w, 1e-6))
    (q, s), ro = K.rms_norm(x, w, 1e-6, residual=r, quant=True)
    y, ro2 = K.rms_norm(x, w, 1e-6, residual=r)
    assert torch.equal(ro, ro2)
    same((q, s), y)
    same(K.silu_mul(gu, quant=True), K.silu_mul(gu))


@cuda
def test_cuda_linear_close_to_bf16():
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(37, 2560, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.randn(6144, 2560, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    qw = fp8.quantize_weight(w)
    y = fp8.linear(x, qw, torch.bfloat16)
    xq, xs = fp8.quantize_rows_torch(x)
    ref = (xq.float() * xs) @ _dequant_weight(qw).t()
    assert y.dtype == torch.bfloat16
    assert ((y.float() - ref).norm() / ref.norm()).item() < 5e-3      # bf16 output rounding
    assert fp8.linear(x, qw, torch.float32).dtype == torch.float32


@cuda
@pytest.mark.parametrize("m", [1, 5, 16, 33, 64])
def test_decode_kernels_match_dequantised_product(m):
    """Every start-up candidate of both Triton kernels ("a16": bf16 rows; "swap8": e4m3 rows)."""
    from serve_app.engine._private import fp8_gemv
    from serve_app.engine._private import kernels as K

    g = torch.Generator(device="cuda").manual_seed(m)
    x = torch.randn(m, 4096, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.randn(2560, 4096, device="cuda", generator=g, dtype=torch.bfloat16) * 0.02
    qw = fp8.quantize_weight(w)
    xq = K.quantize_rows(x)
    refs = {"a16": x.float() @ _dequant_weight(qw).t(),
            "swap8": (xq[0].float() * xq[1]) @ _dequant_weight(qw).t()}
    kinds = set()
    for cfg in fp8_gemv.candidates(4096):
        kind = fp8_gemv.kind_of(cfg)
        kinds.add(kind)
        src, ref = (xq if kind == "swap8" else x), refs[kind]
        y = fp8_gemv.linear(src, qw.q, qw.scale, cfg)
        assert y.shape == (m, 2560) and y.dtype == torch.bfloat16 and torch.isfinite(y).all()
        assert ((y.float() - ref).norm() / ref.norm()).item() < 5e-3, cfg
        parts = fp8_gemv.linear(src, qw.q, qw.scale, cfg, partial=True)
        if cfg[2] > 1:
            assert parts.dtype == torch.float32 and parts.shape[1:] == (m, 2560)
            if kind == "a16":
                assert torch.allclose(parts.sum(0), ref, rtol=1e-3, atol=1e-3), cfg
            else:   # FP8 tensor-core sums are not fp32-exact (~1e-3 here): a norm bound instead
                assert ((parts.sum(0) - ref).norm() / ref.norm()).item() < 5e-3, cfg
    assert kinds == {"a16", "swap8"}
    with pytest.raises(ValueError):
        fp8_gemv.linear(x, qw.q, qw.scale, (64, 128, 1, 4, 3, "swap8"))
    # the next RMSNorm takes the partials: same as norming their bf16 sum
    parts = fp8_gemv.linear(x, qw.q, qw.scale, (32, 128, 4, 4, 3), partial=True)
    res = torch.randn(m, 2560, device="cuda", generator=g, dtype=torch.bfloat16)
    nw = torch.rand(2560, device="cuda", generator=g, dtype=torch.bfloat16) + 0.5
    y1, r1 = K.rms_norm(parts, nw, 1e-6, residual=res)
    y2, r2 = K.rms_norm(parts.sum(0).to(torch.bfloat16), nw, 1e-6, residual=res)
    assert torch.equal(r1, r2) and torch.equal(y1, y2)


@cuda
def test_fp8_engine_decode_plan_and_graphs(model_dir):  # noqa: F811
    """bf16 engine with FP8 on the GPU: the decode plan is tuned, graph steps run, requests finish."""
    rng = np.random.default_rng(5)
    reqs = [_request(i, rng, i % 2, 12) for i in range(6)]

    async def main():
        cfg = EngineConfig(model=model_dir, engine="continuous", device="cuda", dtype="bfloat16",
                           max_num_seqs=4, max_model_len=512, max_prefill_tokens=64, quantization="fp8")
        engine = ContinuousEngine(cfg)
        await engine.start()
        try:
            res = await asyncio.gather(*[_collect(engine, r, 0.02 * i) for i, r in enumerate(reqs)])
            runner = engine._sched.runner
            return [t for t, _, _ in res], engine.health(), runner
        finally:
            await engine.shutdown()

    toks, health, runner = asyncio.run(main())
    assert all(len(t) == 12 for t in toks)
    assert health["quantization"] == "fp8" and health.get("fp8_decode_plan")
    assert set(k for k, _ in runner.fp8_plan) == {"qkv", "o", "gu", "down"}


@cuda
def test_fp8_decode_step_with_each_kernel_kind(model_dir):  # noqa: F811
    """The fused decode step with every projection on one kernel kind, on the same KV state:
    "swap8" computes cuBLASLt W8A8's products (e4m3 x e4m3, the same scales), so their logits
    agree closely; "a16" keeps activations in bf16. All stay near the plain torch path (this
    sharp random model amplifies rounding: W8A8 itself is ~0.13 off it in norm)."""
    from test_kv_fp8 import _runner_with_random_kv

    r, args = _runner_with_random_kv(model_dir, quantization="fp8")
    ref = r.decode(*args, reference=True)
    got = {}
    for kind, cfg in {"swap8": (64, 128, 2, 4, 3, "swap8"), "a16": (32, 128, 2, 4, 3), "w8a8": None}.items():
        r.fp8_plan = {(n, 16): cfg for n in ("qkv", "o", "gu", "down")}
        got[kind] = r.decode(*args)
        assert got[kind].shape == ref.shape and torch.isfinite(got[kind]).all()

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(got["swap8"], got["w8a8"]) < 1e-2
    for kind in got:
        assert rel(got[kind], ref) < 0.3, kind
    assert rel(got["a16"], got["w8a8"]) < 0.3
