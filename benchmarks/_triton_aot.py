"""The engine's Triton kernels compiled ahead of time for a chosen GPU, on any machine.

Triton's compiler needs no GPU: each kernel wrapper is called with CPU tensors of the engine's
shapes while ``JITFunction.run`` is replaced by a recorder, and every recorded launch (argument
types, constexprs, the JIT's specialisations, warps, stages) goes through ``triton.compile`` for
a ``GPUTarget`` down to a cubin via ptxas. ``tests/test_triton_lowering.py`` compiles them all; ``kernel_resources.py``
reports each one's registers and spills.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime import jit as triton_jit

from serve_app.engine._private import attention, fp8_gemv, kernels as K, sampling_kernel

E4M3 = torch.float8_e4m3fn
BF16 = torch.bfloat16
# Qwen3-VL-4B's text model (hidden 2560, 32 q / 8 kv heads x 128, MLP 9728, vocab 151936) and
# vision tower (16 heads x 64); small row counts: a signature does not depend on them
HIDDEN, HQ, HK, D, MLP, VOCAB, PAGE = 2560, 32, 8, 128, 9728, 151936, 16


_OPTIONS = ("num_warps", "num_stages", "launch_pdl")


def _signature(fn, args, kwargs):
    """The launch's ``(signature, constexprs, options, attrs)`` as ``JITFunction.run`` derives
    them for an sm_90 target: the same binder, so the same specialisations. Pointers that are
    16-byte aligned and integers divisible by 16 are marked so (``tt.divisibility``), and the
    compiler vectorises loads with that knowledge. Without it the code here is not the code the
    GPU runs."""
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    backend = make_backend(GPUTarget("cuda", 90, 32))
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    options = {k: kwargs[k] for k in _OPTIONS if k in kwargs}
    bound, specialization, _ = binder(*args, **{**kwargs, "debug": False, "instrumentation_mode": ""})
    _, signature, constexprs, attrs = fn._pack_args(backend, dict(kwargs), bound, specialization, options)
    return signature, constexprs, options, attrs


@contextlib.contextmanager
def recorded_launches():
    """Inside: kernel launches run nothing and are recorded, one entry per distinct variant:
    ``{key: (jit_fn, signature, constexprs, options)}``."""
    seen: dict = {}

    def run(self, *args, grid, warmup, **kwargs):
        sig, const, opts, attrs = _signature(self, args, kwargs)
        key = (self.__name__, tuple(sig.items()), tuple(sorted(map(str, const.items()))), tuple(opts.items()),
               tuple(sorted(map(str, attrs.items()))))
        seen.setdefault(key, (self, sig, const, opts, attrs))
        return None

    real = triton_jit.JITFunction.run
    triton_jit.JITFunction.run = run
    try:
        yield seen
    finally:
        triton_jit.JITFunction.run = real


def compile_launch(fn, sig: dict, const: dict, opts: dict, capability: int, attrs: dict | None = None):
    """One recorded launch compiled for sm_``capability``; raises with the kernel's name."""
    try:
        return triton.compile(ASTSource(fn, sig, const, attrs or {}), target=GPUTarget("cuda", capability, 32),
                              options=opts)
    except Exception as e:  # noqa: BLE001 - name the kernel and its variant in the failure
        raise AssertionError(f"{fn.__name__} {const} {opts} does not compile for sm_{capability}: {e}") from e


def resources(compiled) -> dict:
    """Registers per thread, stack bytes (spills) and shared memory of a compiled kernel, from
    ``cuobjdump -res-usage`` (shipped with Triton) on its cubin."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:     # cuobjdump reads files only
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return {"registers": int(m.group(1)) if m else None, "stack_bytes": int(m.group(2)) if m else None,
            "shared_bytes": compiled.metadata.shared}


def sass_counts(compiled) -> dict:
    """The cubin's SASS instructions: their total, the format conversions (``F2F*``) and the
    global loads by width (``cuobjdump -sass``). A vectorised 16-bit load is ``LDG.E.128`` or
    ``LDGSTS.E.BYPASS.128``; ``.U16``/``.U8`` loads move one element each."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        out = subprocess.run([str(tool), "-sass", f.name], capture_output=True, text=True).stdout
    ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", out)
    loads: dict[str, int] = {}
    for op in ops:
        if op.startswith("LDG") and op != "LDGDEPBAR":
            loads[op] = loads.get(op, 0) + 1
    return {"instructions": len(ops), "conversions": sum(op.startswith("F2F") for op in ops), "loads": loads}


def _cpu(*shape, dtype=BF16):
    return torch.zeros(*shape, dtype=dtype)


def bf16_engine_launches(kv_dtype=BF16) -> None:
    """Call the kernels of one fused decode and prefill step of the bf16 engine."""
    for rows in (1, 300):                                   # decode rows, prefill rows
        x = _cpu(rows, HIDDEN)
        w = _cpu(HIDDEN)
        K.rms_norm(x, w, 1e-6)
        K.rms_norm(x, w, 1e-6, residual=_cpu(rows, HIDDEN))
        K.rms_norm(_cpu(4, rows, HIDDEN, dtype=torch.float32), w, 1e-6, residual=_cpu(rows, HIDDEN))
        qkv = _cpu(rows, (HQ + 2 * HK) * D)
        ck, cv = _cpu(4, HK, PAGE, D, dtype=kv_dtype), _cpu(4, HK, PAGE, D, dtype=kv_dtype)
        idx = torch.zeros(rows, dtype=torch.int32)
        for k_out in (None, _cpu(rows, HK, D)):
            K.qk_norm_rope_store(qkv, _cpu(D), _cpu(D), _cpu(8192, D // 2, dtype=torch.float32),
                                 _cpu(8192, D // 2, dtype=torch.float32), torch.zeros(rows, dtype=torch.int64),
                                 idx, idx, ck, cv, HQ, HK, D, 1e-6, k_out=k_out)
        K.silu_mul(_cpu(rows, 2 * MLP))
    K.vision_rope_(_cpu(64, 3 * 16 * 64), _cpu(64, 64, dtype=torch.float32), _cpu(64, 64, dtype=torch.float32), 16, 64)
    ck, cv = _cpu(4, HK, PAGE, D, dtype=kv_dtype), _cpu(4, HK, PAGE, D, dtype=kv_dtype)
    for config in attention.DECODE_CONFIGS:
        for batch, splits, balanced in ((4, 4, 0), (64, 1, 0), (12, 12, 528)):   # 528: engine.decode_balance 4
            attention.decode_attention_triton(_cpu(batch, HQ, D), ck, cv, torch.zeros(batch, 4, dtype=torch.int32),
                                              torch.ones(batch, dtype=torch.int32), D ** -0.5, splits, PAGE, config,
                                              balanced)
    for b in (1, 5, 64):                                    # the split count changes with the batch
        ones = torch.ones(b)
        sampling_kernel.sample_rows(_cpu(b, VOCAB, dtype=torch.float32), 0.7 * ones, 0.9 * ones,
                                    torch.full((b,), float("-inf")), torch.arange(b), torch.zeros(b, dtype=torch.int64))


def fp8_engine_launches() -> None:
    """The FP8 engine's kernels besides the bf16 ones: row quantisation, the quantising norms and
    SiLU, every decode GEMM config the start-up plan times, and the e4m3 KV cache's store and
    attention."""
    bf16_engine_launches(kv_dtype=E4M3)
    K.quantize_rows(_cpu(64, 1024))                        # the vision tower's linears (vision_quantization)
    K.quantize_rows(_cpu(64, 4096))
    for rows in (1, 300):
        K.quantize_rows(_cpu(rows, HIDDEN))
        K.rms_norm(_cpu(rows, HIDDEN), _cpu(HIDDEN), 1e-6, residual=_cpu(rows, HIDDEN), quant=True)
        K.silu_mul(_cpu(rows, 2 * MLP), quant=True)
    q, scale = _cpu(4096, HIDDEN, dtype=E4M3), _cpu(1, 4096, dtype=torch.float32)
    for m in (16, 32, 64):                                  # the plan's row tiles
        for config in fp8_gemv.candidates(HIDDEN):
            x = (_cpu(m, HIDDEN, dtype=E4M3), _cpu(m, 1, dtype=torch.float32)) if fp8_gemv.takes_fp8(config) \
                else _cpu(m, HIDDEN)
            fp8_gemv.linear(x, q, scale, config, partial=True)
