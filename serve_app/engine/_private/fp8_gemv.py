"""Decode-sized FP8-weight GEMMs (Triton; imported only on CUDA).

A decode step multiplies a few rows by every weight, so it is bound by reading the weights.
cuBLASLt's row-wise scaled FP8 GEMM is tuned for large M: at M <= 64 it reads FP8 weights at
~0.8-2 TB/s on an H200 (slower than bf16 cuBLAS on the same shapes). Two Triton kernels:

* "swap8" (``_w8a8_swap_kernel``): FP8 activations (per-row scales, quantised by the norm or
  SiLU kernel that produces them) times FP8 weights, with the roles swapped (``y.T = w @ x.T``)
  so that 64 weight rows fill the MMA's M side and the few activation rows its N side: no
  conversion of the weight tile, and a small activation tile per large weight tile. 2.1-3.3 TB/s
  on an H200 with weights cycled as a step reads them (RESULTS.md, "GPU: FP8 decode kernels
  with swapped roles").
* "a16" (``_w8a16_kernel``): bf16 activations; each FP8 weight tile is converted to bf16 in
  registers. Kept for inputs no kernel quantises (the o projection), where it can beat
  quantising first.

Both split K over several programs when N alone gives too few programs to keep the memory
system busy; the split partials are fp32 rows ``[S, M, N]`` that the next RMSNorm sums
(``kernels.rms_norm`` accepts them), so the split costs no extra kernel. Which kernel and config
each projection uses per row tile is timed at start-up (:func:`plan_decode`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from serve_app.engine._private import cuda_graphs
from serve_app.engine._private.kernels import _pdl, _pdl_enter


@triton.jit
def _tile(N, K, k_per_split, BM: tl.constexpr, BN: tl.constexpr):
    """This program's weight rows ``rn`` (and their mask), all activation rows ``rm``, and its
    K range ``[k0, k1)``."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * k_per_split
    return rn, rn < N, tl.arange(0, BM), k0, tl.minimum(k0 + k_per_split, K)


@triton.jit
def _w8a16_kernel(X, W, WS, Y, M, N, K, s_xm, s_wn, s_ys, s_ym, k_per_split,
                  BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PARTIAL: tl.constexpr,
                  PDL: tl.constexpr = False):
    _pdl_enter(PDL)
    rn, nmask, rm, k0, k1 = _tile(N, K, k_per_split, BM, BN)
    acc = tl.zeros([BM, BN], dtype=tl.float32)
    for kk in range(0, k_per_split, BK):      # (not range(k0, k1): the interpreter wants scalars)
        rk = k0 + kk + tl.arange(0, BK)
        kmask = rk < k1
        x = tl.load(X + rm[:, None] * s_xm + rk[None, :], mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
        w = tl.load(W + rn[:, None] * s_wn + rk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    acc = acc * tl.load(WS + rn, mask=nmask, other=0.0)[None, :]
    ptr = Y + tl.program_id(1) * s_ys + rm[:, None] * s_ym + rn[None, :]
    mask = (rm[:, None] < M) & nmask[None, :]
    if PARTIAL:
        tl.store(ptr, acc, mask=mask)
    else:
        tl.store(ptr, acc.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _w8a8_swap_kernel(X, XS, W, WS, Y, M, N, K, s_xm, s_wn, s_ys, s_ym, k_per_split,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PARTIAL: tl.constexpr,
                      PDL: tl.constexpr = False):
    """``y.T = (w @ xq.T) * ws * xs.T`` with e4m3 ``w`` and ``xq``: weight rows on the MMA's M side."""
    _pdl_enter(PDL)
    rn, nmask, rm, k0, k1 = _tile(N, K, k_per_split, BM, BN)
    mmask = rm < M
    acc = tl.zeros([BN, BM], dtype=tl.float32)
    for kk in range(0, k_per_split, BK):
        rk = k0 + kk + tl.arange(0, BK)
        kmask = rk < k1
        w = tl.load(W + rn[:, None] * s_wn + rk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0)
        xt = tl.load(X + rm[None, :] * s_xm + rk[:, None], mask=mmask[None, :] & kmask[:, None], other=0.0)
        acc += tl.dot(w, xt)
    acc = acc * tl.load(WS + rn, mask=nmask, other=0.0)[:, None]
    acc = acc * tl.load(XS + rm, mask=mmask, other=0.0)[None, :]
    ptr = Y + tl.program_id(1) * s_ys + rm[None, :] * s_ym + rn[:, None]
    mask = mmask[None, :] & nmask[:, None]
    if PARTIAL:
        tl.store(ptr, acc, mask=mask)
    else:
        tl.store(ptr, acc.to(Y.dtype.element_ty), mask=mask)


MAX_ROWS = 64       # the kernel holds all rows in one tile: decode batches only


def row_tile(m: int) -> int:
    """Rows the kernel's tile holds for ``m`` rows (tl.dot needs >= 16): configs are per tile."""
    return max(16, triton.next_power_of_2(m))


def takes_fp8(config: tuple | None) -> bool:
    """Whether a planned decode kernel wants e4m3 activations: cuBLASLt's W8A8 (``None``) and
    "swap8" do, "a16" takes bf16."""
    return config is None or kind_of(config) == "swap8"


def kind_of(config: tuple) -> str:
    return config[5] if len(config) > 5 else "a16"


def linear(x, q: torch.Tensor, scale: torch.Tensor, config: tuple, partial: bool = False,
           out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``x [M, K] @ (q [N, K] e4m3 * scale [1, N]).T`` for M <= 64; ``x`` is bf16 rows ("a16")
    or an e4m3 ``(xq, xs [M, 1])`` pair ("swap8"). Returns ``[M, N]`` in ``out_dtype``, or with
    more than one K split and ``partial``, fp32 ``[S, M, N]`` partials (their sum is the
    product; without ``partial`` they are summed here). ``config``: (BN, BK, splits, num_warps,
    num_stages[, kind]) from :func:`plan_decode`; kind "a16" when left out."""
    kind = kind_of(config)
    if kind not in ("a16", "swap8"):
        raise ValueError(f"unknown decode kernel {kind!r} (a16, swap8)")
    xs = None
    if isinstance(x, tuple):
        x, xs = x
    if (kind == "swap8") != (xs is not None):
        raise ValueError(f"kernel {kind!r} takes " + ("an e4m3 (xq, xs) pair" if xs is None else "bf16 rows"))
    m, k = x.shape
    n = q.shape[0]
    bm = row_tile(m)
    bn, bk, splits, warps, stages = config[:5]
    k_per = triton.cdiv(triton.cdiv(k, splits), bk) * bk
    splits = triton.cdiv(k, k_per)
    if splits > 1:
        y = torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    else:
        y = torch.empty(1, m, n, dtype=out_dtype, device=x.device)
    grid = (triton.cdiv(n, bn), splits)
    common = dict(BM=bm, BN=bn, BK=bk, PARTIAL=splits > 1, num_warps=warps, num_stages=stages, **_pdl())
    if kind == "swap8":
        _w8a8_swap_kernel[grid](x, xs, q, scale, y, m, n, k, x.stride(0), q.stride(0), y.stride(0),
                                y.stride(1), k_per, **common)
    else:
        _w8a16_kernel[grid](x, q, scale, y, m, n, k, x.stride(0), q.stride(0), y.stride(0),
                            y.stride(1), k_per, **common)
    if splits == 1:
        return y[0]
    return y if partial else y.sum(0).to(out_dtype)


def _graph_time_us(fns: list) -> float:
    """GPU time per call of ``fns`` run in turn, from a CUDA graph (launch costs excluded, as in
    the captured decode step). Each should read a different layer's weight: a decode step reads
    every weight once from HBM, while one weight called in a loop would sit in L2 (an FP8 qkv is
    16 MB, an H200's L2 50 MB)."""
    g, _ = cuda_graphs.capture(lambda _: [fn() for fn in fns], [0])[0]
    g.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(3):
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        best = min(best, a.elapsed_time(b) * 1000 / len(fns))
    del g
    return best


def candidates(k: int) -> list[tuple]:
    """Configs timed at start-up: "a16" (the kernel's first configs) and "swap8" (the winners
    of ``benchmarks/fp8_probe.py decode`` on an H200, and their neighbours)."""
    out = [(bn, 128, s, 4, 3) for bn in (32, 64) for s in (1, 2, 4, 8)]
    if k >= 8192:
        out += [(32, 256, s, 4, 3) for s in (4, 8)]
    out += [(64, bk, s, 4, st, "swap8") for bk in (128, 256) for s in (1, 2, 4, 8) for st in (3, 4)]
    return [c for c in out if -(-k // c[1]) >= c[2]]


def _times(ws: list, bm: int, dtype: torch.dtype, partial: bool, fp8_in_costs: bool) -> dict:
    """GPU us per call of each way to multiply ``bm`` random rows by the FP8 weights ``ws``:
    cuBLASLt's W8A8 ("w8a8") and every :func:`candidates` config. With ``fp8_in_costs`` the
    e4m3 kernels pay for quantising their input (no norm or SiLU kernel writes it for them)."""
    from serve_app.engine._private import fp8
    from serve_app.engine._private.kernels import quantize_rows

    k = ws[0].q.shape[1]
    x = torch.randn(bm, k, dtype=dtype, device=ws[0].q.device)
    xq = quantize_rows(x)
    fp8_in = (lambda: quantize_rows(x)) if fp8_in_costs else (lambda: xq)
    times = {"w8a8": _graph_time_us([lambda w=w: fp8.linear(fp8_in(), w, dtype) for w in ws])}
    for cfg in candidates(k):
        src = fp8_in if takes_fp8(cfg) else (lambda: x)
        times[cfg] = _graph_time_us([lambda w=w: linear(src(), w.q, w.scale, cfg, partial, dtype) for w in ws])
    return times


def _timing_row(best, times: dict) -> dict:
    return {"pick": str(best), **{str(c): round(t, 2) for c, t in times.items()}}


@torch.inference_mode()
def plan_decode(layers: list[dict], row_tiles: list[int], dtype: torch.dtype) -> tuple[dict, dict]:
    """For each decode projection and row tile (16/32/64 rows): this kernel's fastest config, or
    None where cuBLASLt's W8A8 GEMM (its activation quantisation included where no norm kernel
    fuses it: the o projection) is faster on this GPU. Returns (plan, timings in us)."""
    layers = layers[:12]
    plan, timings = {}, {}
    for bm in row_tiles:
        for name in ("qkv", "o", "gu", "down"):
            # The o projection's input comes from attention in bf16: a kernel that takes e4m3
            # pays for quantising it here (the other inputs come quantised from a norm or SiLU);
            # o and down hand their partials to a norm that sums them.
            times = _times([lw[name] for lw in layers], bm, dtype, name in ("o", "down"), name == "o")
            best = min(times, key=times.get)
            plan[(name, bm)] = None if best == "w8a8" else best
            timings[f"{name}@{bm}"] = _timing_row(best, times)
    torch.cuda.empty_cache()         # the timing graphs' pools: back before KV is sized
    return plan, timings


@torch.inference_mode()
def plan_head(head, bf16_weight: torch.Tensor | None, row_tiles: list[int],
              dtype: torch.dtype) -> tuple[dict, dict]:
    """The FP8 LM head's kernel per row tile, as :func:`plan_decode` picks the projections';
    ``"bf16"`` where the model's own head (``bf16_weight``, when it is kept) is faster. One
    weight of ~390 MB: far past L2, so timing it in a loop reads it from HBM as a step does."""
    plan, timings = {}, {}
    for bm in row_tiles:
        times = _times([head], bm, dtype, False, True)
        if bf16_weight is not None:
            x = torch.randn(bm, bf16_weight.shape[1], dtype=dtype, device=bf16_weight.device)
            times["bf16"] = _graph_time_us([lambda: torch.nn.functional.linear(x, bf16_weight)])
        best = min(times, key=times.get)
        plan[bm] = None if best == "w8a8" else best
        timings[f"lm_head@{bm}"] = _timing_row(best, times)
    torch.cuda.empty_cache()
    return plan, timings
