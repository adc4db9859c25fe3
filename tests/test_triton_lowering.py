"""Every Triton kernel of the engine compiles for the GPUs we serve on, here, with no GPU.

The kernels otherwise first compile on a lent GPU, where a front-end error costs a whole device
run (FP8 KV's store kernel did: an early return inside a constexpr ``if``). Each wrapper is
called with CPU tensors of the engine's shapes, the launches are recorded instead of run, and
each one's exact signature goes through ``triton.compile`` for Hopper (sm_90: every kernel, FP8
included) and the A10 (sm_86: the bf16 engine's kernels) down to a cubin
(``benchmarks/_triton_aot.py``). Nothing runs, so values are not checked here; the GPU tests do
that."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import _triton_aot as aot  # noqa: E402


def _compile_all(seen: dict, capability: int) -> set[str]:
    names = set()
    for fn, sig, const, opts, attrs in seen.values():
        assert aot.compile_launch(fn, sig, const, opts, capability, attrs).asm.get("cubin"), fn.__name__
        names.add(fn.__name__)
    return names


def test_bf16_engine_kernels_compile_for_hopper_and_a10():
    with aot.recorded_launches() as seen:
        aot.bf16_engine_launches()
    assert len(seen) >= 15, sorted(k[0] for k in seen)
    for cap in (90, 86):
        names = _compile_all(seen, cap)
        assert {"_rms_kernel", "_qk_norm_rope_kernel", "_silu_mul_kernel", "kernel", "_pick_kernel"} <= names


@pytest.mark.slow
def test_fp8_engine_kernels_compile_for_hopper():
    with aot.recorded_launches() as seen:
        aot.fp8_engine_launches()
    names = _compile_all(seen, 90)
    assert {"_quant_rows_kernel", "_silu_mul_quant_kernel", "_w8a16_kernel", "_w8a8_swap_kernel"} <= names
    assert any(fn.__name__ == "_qk_norm_rope_kernel" and const[(fn.arg_names.index("KV_FP8"),)]
               for fn, _sig, const, _opts, _attrs in seen.values()), "the FP8 KV store variant was not launched"


def test_resources_reads_registers_and_spills():
    """The report ``benchmarks/kernel_resources.py`` prints: registers, stack (spills), shared."""
    with aot.recorded_launches() as seen:
        aot.bf16_engine_launches()
    fn, sig, const, opts, attrs = next(v for v in seen.values() if v[0].__name__ == "_silu_mul_kernel")
    r = aot.resources(aot.compile_launch(fn, sig, const, opts, 90, attrs))
    assert 0 < r["registers"] <= 255 and r["stack_bytes"] >= 0 and r["shared_bytes"] >= 0


def test_pdl_variants_compile_for_hopper(monkeypatch):
    """engine.pdl: every taking-part kernel with its griddepcontrol wait/launch (sm_90 PTX) and
    the launch attribute; both FP8 decode GEMM kinds, attention and the row kernels."""
    from serve_app.engine._private import kernels
    monkeypatch.setattr(kernels, "PDL", True)
    with aot.recorded_launches() as seen:
        aot.fp8_engine_launches()
    pdl = {fn.__name__ for fn, _sig, const, opts, _attrs in seen.values()
           if opts.get("launch_pdl") and const.get((fn.arg_names.index("PDL"),)) is True}
    assert {"_rms_kernel", "_qk_norm_rope_kernel", "kernel", "_merge_splits_kernel", "_silu_mul_quant_kernel",
            "_quant_rows_kernel", "_w8a8_swap_kernel", "_w8a16_kernel"} <= pdl, pdl
    for fn, sig, const, opts, attrs in seen.values():
        k = aot.compile_launch(fn, sig, const, opts, 90, attrs)
        if fn.__name__ in pdl:
            assert "griddepcontrol.wait" in k.asm["ptx"], fn.__name__



def test_launches_are_specialised_as_the_jit_does():
    """Aligned pointers and integers divisible by 16 are marked as ``JITFunction.run`` marks them,
    so the compiler vectorises as on the GPU: the decode attention over a 16-bit cache then loads
    K/V 16 bytes at a time and does not spill (unspecialised, it loaded 2 bytes at a time and
    spilled at 255 registers, a figure the GPU never ran)."""
    import torch
    from serve_app.engine._private import attention

    with aot.recorded_launches() as seen:
        ck = torch.zeros(4, aot.HK, aot.PAGE, aot.D, dtype=torch.bfloat16)
        attention.decode_attention_triton(torch.zeros(10, aot.HQ, aot.D, dtype=torch.bfloat16), ck, ck.clone(),
                                          torch.zeros(10, 4, dtype=torch.int32), torch.ones(10, dtype=torch.int32),
                                          aot.D ** -0.5, 4, aot.PAGE, (64, 4))
    (fn, sig, const, opts, attrs), = [v for v in seen.values() if v[0].__name__ == "kernel"]
    q_index = fn.arg_names.index("Q")
    assert ["tt.divisibility", 16] in attrs[(q_index,)], attrs
    k = aot.compile_launch(fn, sig, const, opts, 90, attrs)
    assert aot.resources(k)["stack_bytes"] == 0
    assert "cp.async.cg.shared.global [" in k.asm["ptx"] and ", 16;" in k.asm["ptx"]   # 16-byte copies
