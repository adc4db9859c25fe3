"""Every Triton kernel of the engine compiles for the GPUs we serve on, here, with no GPU.

The kernels otherwise first compile on a lent GPU, where a front-end error costs a whole device
run (FP8 KV's store kernel did: an early return inside a constexpr ``if``). Triton's compiler
runs without a driver: each wrapper is called with CPU tensors of the engine's shapes, the launch
is intercepted, and its exact signature (argument types, constexprs, warps, stages) goes through
``triton.compile`` for Hopper (sm_90: every kernel, FP8 included) and the A10 (sm_86: the bf16
engine's kernels) down to a cubin via ptxas. Nothing runs, so values are not checked here; the
GPU tests do that."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime import jit as triton_jit  # noqa: E402

from serve_app.engine._private import attention, fp8_gemv, kernels as K, sampling_kernel  # noqa: E402

E4M3 = torch.float8_e4m3fn
BF16 = torch.bfloat16
# Qwen3-VL-4B's text model (hidden 2560, 32 q / 8 kv heads x 128, MLP 9728, vocab 151936) and
# vision tower (16 heads x 64); small row counts: a signature does not depend on them
HIDDEN, HQ, HK, D, MLP, VOCAB, PAGE = 2560, 32, 8, 128, 9728, 151936, 16


def _signature(fn, args, kwargs):
    """The launch's ``(signature, constexprs, options)`` as ``JITFunction.run`` derives them."""
    kwargs = dict(kwargs)
    options = {k: kwargs.pop(k) for k in ("num_warps", "num_stages") if k in kwargs}
    signature, constexprs = {}, {}
    for i, p in enumerate(fn.params):
        if i < len(args):
            value = args[i]
        elif p.name in kwargs:
            value = kwargs[p.name]
        else:
            assert p.has_default, f"{fn.__name__}: no value for {p.name}"
            value = p.default
        if p.is_constexpr:
            signature[p.name], constexprs[(i,)] = "constexpr", value
        else:
            signature[p.name] = triton_jit.mangle_type(value)
    return signature, constexprs, options


@pytest.fixture
def launches(monkeypatch):
    """Intercept every kernel launch: record what it would compile, run nothing."""
    seen = {}

    def run(self, *args, grid, warmup, **kwargs):
        sig, const, opts = _signature(self, args, kwargs)
        key = (self.__name__, tuple(sig.items()), tuple(sorted(map(str, const.items()))), tuple(opts.items()))
        seen.setdefault(key, (self, sig, const, opts))
        return None

    monkeypatch.setattr(triton_jit.JITFunction, "run", run)
    return seen


def _compile_all(seen: dict, capability: int) -> list[str]:
    names = []
    for fn, sig, const, opts in seen.values():
        try:
            k = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", capability, 32), options=opts)
        except Exception as e:  # noqa: BLE001 - name the kernel and its variant in the failure
            raise AssertionError(f"{fn.__name__} {const} {opts} does not compile for sm_{capability}: {e}") from e
        assert k.asm.get("cubin"), fn.__name__
        names.append(fn.__name__)
    return names


def _cpu(*shape, dtype=BF16):
    return torch.zeros(*shape, dtype=dtype)


def _kv_cache(dtype):
    return _cpu(4, HK, PAGE, D, dtype=dtype), _cpu(4, HK, PAGE, D, dtype=dtype)


def _bf16_engine_launches(kv_dtype=BF16):
    """The kernels of one fused decode and prefill step of the bf16 engine."""
    for rows in (1, 300):                                   # decode rows, prefill rows
        x = _cpu(rows, HIDDEN)
        w = _cpu(HIDDEN)
        K.rms_norm(x, w, 1e-6)
        K.rms_norm(x, w, 1e-6, residual=_cpu(rows, HIDDEN))
        K.rms_norm(_cpu(4, rows, HIDDEN, dtype=torch.float32), w, 1e-6, residual=_cpu(rows, HIDDEN))
        qkv = _cpu(rows, (HQ + 2 * HK) * D)
        ck, cv = _kv_cache(kv_dtype)
        idx = torch.zeros(rows, dtype=torch.int32)
        for k_out in (None, _cpu(rows, HK, D)):
            K.qk_norm_rope_store(qkv, _cpu(D), _cpu(D), _cpu(8192, D // 2, dtype=torch.float32),
                                 _cpu(8192, D // 2, dtype=torch.float32), torch.zeros(rows, dtype=torch.int64),
                                 idx, idx, ck, cv, HQ, HK, D, 1e-6, k_out=k_out)
        K.silu_mul(_cpu(rows, 2 * MLP))
    K.vision_rope_(_cpu(64, 3 * 16 * 64), _cpu(64, 64, dtype=torch.float32), _cpu(64, 64, dtype=torch.float32), 16, 64)
    ck, cv = _kv_cache(kv_dtype)
    for batch, splits in ((4, 4), (64, 1)):
        attention.decode_attention_triton(_cpu(batch, HQ, D), ck, cv, torch.zeros(batch, 4, dtype=torch.int32),
                                          torch.ones(batch, dtype=torch.int32), D ** -0.5, splits, PAGE)
    for b in (1, 5, 64):                                    # the split count changes with the batch
        ones = torch.ones(b)
        sampling_kernel.sample_rows(_cpu(b, VOCAB, dtype=torch.float32), 0.7 * ones, 0.9 * ones,
                                    torch.full((b,), float("-inf")), torch.arange(b), torch.zeros(b, dtype=torch.int64))


def _fp8_engine_launches():
    """The FP8 engine's own kernels: row quantisation, the quantising norms and SiLU, the decode
    GEMM kinds, and the e4m3 KV cache's store and attention."""
    _bf16_engine_launches(kv_dtype=E4M3)
    for rows in (1, 300):
        K.quantize_rows(_cpu(rows, HIDDEN))
        K.rms_norm(_cpu(rows, HIDDEN), _cpu(HIDDEN), 1e-6, residual=_cpu(rows, HIDDEN), quant=True)
        K.silu_mul(_cpu(rows, 2 * MLP), quant=True)
    q, scale = _cpu(4096, HIDDEN, dtype=E4M3), _cpu(1, 4096, dtype=torch.float32)
    for m in (1, 16, 64):
        for config in fp8_gemv.candidates(HIDDEN):
            x = (_cpu(m, HIDDEN, dtype=E4M3), _cpu(m, 1, dtype=torch.float32)) if fp8_gemv.takes_fp8(config) \
                else _cpu(m, HIDDEN)
            fp8_gemv.linear(x, q, scale, config, partial=True)


def test_bf16_engine_kernels_compile_for_hopper_and_a10(launches):
    _bf16_engine_launches()
    assert len(launches) >= 15, sorted(k[0] for k in launches)
    for cap in (90, 86):
        names = _compile_all(launches, cap)
        assert {"_rms_kernel", "_qk_norm_rope_kernel", "_silu_mul_kernel", "kernel", "_pick_kernel"} <= set(names)


@pytest.mark.slow
def test_fp8_engine_kernels_compile_for_hopper(launches):
    _fp8_engine_launches()
    names = _compile_all(launches, 90)
    assert {"_quant_rows_kernel", "_silu_mul_quant_kernel", "_w8a16_kernel", "_w8a8_swap_kernel"} <= set(names)
    assert any(fn.__name__ == "_qk_norm_rope_kernel" and const[(fn.arg_names.index("KV_FP8"),)]
               for fn, _sig, const, _opts in launches.values()), "the FP8 KV store variant was not launched"
