"""Fused Triton kernels for the GPU decode/prefill step (imported only on CUDA).

A decode step at small batch is bound by kernel count, not bytes: HF's RMSNorm alone is ~7 kernels,
q/k-norm + M-RoPE + cache write ~30 per layer. These fuse each group into one launch, so a layer is
about ten kernels (4 GEMMs, attention, 5 of these).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

# Programmatic dependent launch (Hopper+): a kernel of the step may be scheduled while the one
# before it drains, and waits (griddepcontrol.wait) before it touches memory. A decode step is
# ~400 small kernels, each with a launch and a tail. Set by the runner (engine.pdl).
PDL = False


def _pdl() -> dict:
    """Launch arguments of a kernel that takes part: its PDL constexpr and the launch attribute."""
    return {"PDL": True, "launch_pdl": True} if PDL else {}


@triton.jit
def _pdl_enter(PDL: tl.constexpr):
    """First statement of a taking-part kernel: wait for the kernel before (all its writes are
    then visible, and it no longer reads what this one writes), then let the next one launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def row_warps(elements: int) -> int:
    """Warps for a kernel that holds one whole row per program: ~16 elements per thread (a
    decode step has a few rows, so one program per row must be wide; 4 warps over 2560 x 8
    split-K partials left each thread 160 loads)."""
    return max(4, min(16, triton.next_power_of_2(elements) // 512))


@triton.jit
def _rms_kernel(X, R, W, Y, RO, S, stride_x, stride_r, stride_y, stride_ro, stride_part, n, eps,
                HAS_RES: tl.constexpr, QUANT: tl.constexpr, NPART: tl.constexpr, BLOCK: tl.constexpr,
                PDL: tl.constexpr = False):
    _pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < n
    if NPART > 0:      # fp32 split-K partials of a GEMM: their sum, rounded as the GEMM's output
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for p in tl.static_range(NPART):
            acc += tl.load(X + p * stride_part + row * stride_x + cols, mask=m, other=0.0)
        x = acc.to(W.dtype.element_ty)
    else:
        x = tl.load(X + row * stride_x + cols, mask=m, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(R + row * stride_r + cols, mask=m, other=0.0).to(tl.float32)).to(x.dtype)
        tl.store(RO + row * stride_ro + cols, x, mask=m)
    xf = x.to(tl.float32)
    var = tl.sum(xf * xf, axis=0) / n
    h = (xf * tl.rsqrt(var + eps)).to(x.dtype)
    w = tl.load(W + cols, mask=m, other=0.0)
    y = (w.to(tl.float32) * h.to(tl.float32)).to(x.dtype)
    if QUANT:
        _store_fp8_row(Y + row * stride_y, S + row, cols, m, y.to(tl.float32))
    else:
        tl.store(Y + row * stride_y + cols, y, mask=m)


@triton.jit
def _store_fp8_row(Q, S, cols, m, y):
    """One row (fp32, masked lanes 0) as e4m3 with its per-row scale amax/448 (FP8 GEMM input)."""
    scale = tl.maximum(tl.max(tl.abs(y), axis=0), 1e-12) / 448.0
    q = tl.minimum(tl.maximum(y / scale, -448.0), 448.0)
    tl.store(Q + cols, q.to(Q.dtype.element_ty), mask=m)
    tl.store(S, scale)


def _fp8_out(rows: int, n: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(rows, n, dtype=torch.float8_e4m3fn, device=device),
            torch.empty(rows, 1, dtype=torch.float32, device=device))


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             quant: bool = False):
    """``rms(x)``, or with ``residual``: ``(rms(x + residual), x + residual)`` (HF numerics).
    ``x`` may be fp32 split-K partials ``[S, rows, n]`` of a GEMM (``fp8_gemv``): they are summed
    and rounded to ``w``'s dtype first. ``quant``: the normed rows come back as an FP8 GEMM input
    ``(e4m3 [rows, n], scale [rows, 1])``."""
    nparts = x.shape[0] if x.dim() == 3 else 0
    rows, n = x.shape[-2:]
    dt = w.dtype if nparts else x.dtype
    if quant:
        y, s = _fp8_out(rows, n, x.device)
    else:
        y = torch.empty(rows, n, dtype=dt, device=x.device)
        s = y
    ro = torch.empty(rows, n, dtype=dt, device=x.device) if residual is not None else y
    r = residual if residual is not None else y
    _rms_kernel[(rows,)](x, r, w, y, ro, s, x.stride(-2), r.stride(0), y.stride(0), ro.stride(0),
                         x.stride(0) if nparts else 0, n, eps, HAS_RES=residual is not None,
                         QUANT=quant, NPART=nparts, BLOCK=triton.next_power_of_2(n),
                         **_pdl(), num_warps=row_warps(n * max(1, nparts)))
    out = (y, s) if quant else y
    return (out, ro) if residual is not None else out


@triton.jit
def _quant_rows_kernel(X, Q, S, stride_x, stride_q, n, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    _pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < n
    x = tl.load(X + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    _store_fp8_row(Q + row * stride_q, S + row, cols, m, x)


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantisation: ``(q [rows, n], scale [rows, 1] float32)``, q = x / scale."""
    rows, n = x.shape
    q, s = _fp8_out(rows, n, x.device)
    _quant_rows_kernel[(rows,)](x, q, s, x.stride(0), q.stride(0), n,
                                BLOCK=triton.next_power_of_2(n), **_pdl(), num_warps=row_warps(n))
    return q, s


@triton.jit
def _to_kv(x, PTR, KV_FP8: tl.constexpr):
    """A K/V row as the cache stores it (``attention.to_cache_dtype``): FP8 clamped to +-448."""
    # One return: Triton also compiles the statements after a constexpr-taken early return, and
    # rejects the function for returning two types.
    if KV_FP8:
        y = tl.clamp(x.to(tl.float32), -448.0, 448.0).to(PTR.dtype.element_ty)
    else:
        y = x
    return y


@triton.jit
def _qk_norm_rope_kernel(QKV, QN, KN, COS, SIN, POS, PAGE, OFF, QO, KC, VC, KO,
                         s_qkv, s_qo_b, s_qo_h, s_kp, s_kh, s_ks, s_cos, s_ko_b, s_ko_h, eps,
                         HQ: tl.constexpr, HK: tl.constexpr, D: tl.constexpr, HB: tl.constexpr,
                         WRITE_K: tl.constexpr, KV_FP8: tl.constexpr, PDL: tl.constexpr = False):
    _pdl_enter(PDL)
    # One program: HB heads of one token (all q or all k: HB divides HQ and HK), so the token's
    # cos/sin rows and the norm weight are loaded once and each load is HB rows wide.
    b = tl.program_id(0).to(tl.int64)
    h0 = tl.program_id(1) * HB
    half = tl.arange(0, D // 2)
    hh = tl.arange(0, HB)
    pos = tl.load(POS + b)
    c1 = tl.load(COS + pos * s_cos + half).to(tl.float32)[None, :]
    c2 = tl.load(COS + pos * s_cos + D // 2 + half).to(tl.float32)[None, :]
    s1 = tl.load(SIN + pos * s_cos + half).to(tl.float32)[None, :]
    s2 = tl.load(SIN + pos * s_cos + D // 2 + half).to(tl.float32)[None, :]
    is_q = h0 < HQ
    base = QKV + b * s_qkv + (h0 + hh)[:, None] * D + half[None, :]
    x1 = tl.load(base)
    x2 = tl.load(base + D // 2)
    dt = x1.dtype
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    var = (tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)) / D
    r = tl.rsqrt(var + eps)[:, None]
    if is_q:
        w1 = tl.load(QN + half).to(tl.float32)[None, :]
        w2 = tl.load(QN + D // 2 + half).to(tl.float32)[None, :]
    else:
        w1 = tl.load(KN + half).to(tl.float32)[None, :]
        w2 = tl.load(KN + D // 2 + half).to(tl.float32)[None, :]
    n1 = (w1 * (f1 * r).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    n2 = (w2 * (f2 * r).to(dt).to(tl.float32)).to(dt).to(tl.float32)
    o1 = (n1 * c1 - n2 * s1).to(dt)
    o2 = (n2 * c2 + n1 * s2).to(dt)
    if is_q:
        qo = QO + b * s_qo_b + (h0 + hh)[:, None] * s_qo_h + half[None, :]
        tl.store(qo, o1)
        tl.store(qo + D // 2, o2)
    else:
        kh = h0 - HQ + hh
        page = tl.load(PAGE + b)
        off = tl.load(OFF + b)
        dst = page * s_kp + kh[:, None] * s_kh + off * s_ks + half[None, :]
        tl.store(KC + dst, _to_kv(o1, KC, KV_FP8))
        tl.store(KC + dst + D // 2, _to_kv(o2, KC, KV_FP8))
        if WRITE_K:
            ko = KO + b * s_ko_b + kh[:, None] * s_ko_h + half[None, :]
            tl.store(ko, o1)
            tl.store(ko + D // 2, o2)
        vsrc = QKV + b * s_qkv + (HQ + HK + kh)[:, None] * D + half[None, :]
        tl.store(VC + dst, _to_kv(tl.load(vsrc), VC, KV_FP8))
        tl.store(VC + dst + D // 2, _to_kv(tl.load(vsrc + D // 2), VC, KV_FP8))


def _heads_per_program(hq: int, hk: int, rows: int) -> int:
    """8 heads a program for prefill-sized inputs; one (more, smaller programs) for decode."""
    hb = 8 if rows >= 128 else 1
    while hq % hb or hk % hb:
        hb //= 2
    return hb


def qk_norm_rope_store(qkv: torch.Tensor, qn: torch.Tensor, kn: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, pos: torch.Tensor, page: torch.Tensor, off: torch.Tensor,
                       cache_k: torch.Tensor, cache_v: torch.Tensor, hq: int, hk: int, d: int,
                       eps: float, k_out: torch.Tensor | None = None) -> torch.Tensor:
    """From fused qkv rows [B, (hq+2hk)*d]: q/k RMS norm, RoPE from row ``pos`` of the cos/sin
    tables (decode: the 1-D table, all three M-RoPE components being equal; prefill: per-token
    M-RoPE rows with ``pos = arange``), K/V written to the cache at (page, off), and the rotated
    k also to ``k_out`` [B, hk, d] when given (prefill attends to it directly). Returns q [B, hq, d]."""
    b = qkv.shape[0]
    q = torch.empty(b, hq, d, dtype=qkv.dtype, device=qkv.device)
    ko = k_out if k_out is not None else q
    hb = _heads_per_program(hq, hk, b)
    _qk_norm_rope_kernel[(b, (hq + hk) // hb)](
        qkv, qn, kn, cos, sin, pos, page, off, q, cache_k, cache_v, ko,
        qkv.stride(0), q.stride(0), q.stride(1), cache_k.stride(0), cache_k.stride(1), cache_k.stride(2),
        cos.stride(0), ko.stride(0), ko.stride(1), eps, HQ=hq, HK=hk, D=d, HB=hb,
        WRITE_K=k_out is not None, KV_FP8=cache_k.dtype == torch.float8_e4m3fn,
        **_pdl(), num_warps=max(1, min(4, hb // 2)))
    return q


@triton.jit
def _vision_rope_kernel(QKV, COS, SIN, s_row, s_cos, H2: tl.constexpr, D: tl.constexpr):
    """In place on one token's q and k heads (the first 2*H*D of the row): HF's fp32 rotation."""
    t = tl.program_id(0).to(tl.int64)
    hh = tl.arange(0, H2)
    half = tl.arange(0, D // 2)
    c1 = tl.load(COS + t * s_cos + half)[None, :]
    c2 = tl.load(COS + t * s_cos + D // 2 + half)[None, :]
    s1 = tl.load(SIN + t * s_cos + half)[None, :]
    s2 = tl.load(SIN + t * s_cos + D // 2 + half)[None, :]
    p1 = QKV + t * s_row + hh[:, None] * D + half[None, :]
    p2 = p1 + D // 2
    x1 = tl.load(p1)
    x2 = tl.load(p2)
    f1, f2 = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(p1, (f1 * c1 - f2 * s1).to(x1.dtype))
    tl.store(p2, (f2 * c2 + f1 * s2).to(x1.dtype))


def vision_rope_(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, d: int) -> None:
    """Rotate q and k in fused vision ``qkv`` rows [N, 3*heads*d] in place (cos/sin [N, d] fp32)."""
    n = qkv.shape[0]
    assert (2 * heads) & (2 * heads - 1) == 0 and d & (d - 1) == 0, "power-of-two heads/head_dim"
    _vision_rope_kernel[(n,)](qkv, cos, sin, qkv.stride(0), cos.stride(0), H2=2 * heads, D=d,
                              num_warps=4)


@triton.jit
def _silu_mul_kernel(GU, Y, s_gu, s_y, n, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    _pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = cols < n
    g = tl.load(GU + row * s_gu + cols, mask=m, other=0.0)
    u = tl.load(GU + row * s_gu + n + cols, mask=m, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    tl.store(Y + row * s_y + cols, (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype), mask=m)


@triton.jit
def _silu_mul_quant_kernel(GU, Q, S, s_gu, s_q, n, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """One whole row per program, in one pass: the row's absolute maximum needs all of it, and
    a decode step has only a few rows, so each program must not loop over its row twice (a
    two-pass version took 6.5 us per call at 8 rows on an H200)."""
    _pdl_enter(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    m = cols < n
    g = tl.load(GU + row * s_gu + cols, mask=m, other=0.0)
    u = tl.load(GU + row * s_gu + n + cols, mask=m, other=0.0)
    gf = g.to(tl.float32)
    act = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
    y = (act.to(tl.float32) * u.to(tl.float32)).to(g.dtype).to(tl.float32)
    _store_fp8_row(Q + row * s_q, S + row, cols, m, y)


def silu_mul(gu: torch.Tensor, quant: bool = False):
    """``silu(gate) * up`` for fused [rows, 2n] gate/up rows; ``quant``: as an FP8 GEMM input
    ``(e4m3 [rows, n], scale [rows, 1])``."""
    rows, two_n = gu.shape
    n = two_n // 2
    block = 1024
    if quant:
        q, s = _fp8_out(rows, n, gu.device)
        _silu_mul_quant_kernel[(rows,)](gu, q, s, gu.stride(0), q.stride(0), n,
                                        BLOCK=triton.next_power_of_2(n), **_pdl(), num_warps=row_warps(n))
        return q, s
    y = torch.empty(rows, n, dtype=gu.dtype, device=gu.device)
    _silu_mul_kernel[(rows, triton.cdiv(n, block))](gu, y, gu.stride(0), y.stride(0), n, BLOCK=block,
                                                    **_pdl(), num_warps=4)
    return y


@triton.jit
def _merge_splits_kernel(O, LSE, Y, s_ob, s_oh, s_os, s_lb, s_lh, s_yb, s_yh,
                         S: tl.constexpr, S_PAD: tl.constexpr, D: tl.constexpr, PDL: tl.constexpr = False):
    _pdl_enter(PDL)
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    sp = tl.arange(0, S_PAD)
    d = tl.arange(0, D)
    lse = tl.load(LSE + b * s_lb + h * s_lh + sp, mask=sp < S, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m)
    # a split with no tokens has lse -inf and may not have written its output (balanced splits)
    valid = (sp < S) & (lse > float("-inf"))
    o = tl.load(O + b * s_ob + h * s_oh + sp[:, None] * s_os + d[None, :], mask=valid[:, None], other=0.0)
    tot = tl.sum(w, axis=0)
    out = tl.sum(o * w[:, None], axis=0) / tl.where(tot > 0, tot, 1.0)
    tl.store(Y + b * s_yb + h * s_yh + d, out.to(Y.dtype.element_ty))


def merge_splits(o: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Combine split-K partial attention ``o`` [B, H, S, D] (fp32) with their log-sum-exps."""
    b, h, s, d = o.shape
    y = torch.empty(b, h, d, dtype=dtype, device=o.device)
    _merge_splits_kernel[(b, h)](o, lse, y, o.stride(0), o.stride(1), o.stride(2), lse.stride(0),
                                 lse.stride(1), y.stride(0), y.stride(1), S=s,
                                 S_PAD=triton.next_power_of_2(s), D=d, **_pdl(), num_warps=1)
    return y
