"""Per-row sampling on the GPU in a few short Triton kernels, each row split over S programs.

The torch sampler sorts the whole 151,936-token vocabulary for top-p and builds the Gumbel noise
with ~20 int64 elementwise passes over [B, V]. A first kernel (:func:`sample_rows_single`, kept
for comparison) used one program per row: 0.72 ms at any batch, the latency of ~11 dependent
passes. Here every kernel has grid (B, S), S chosen so that B * S programs fill a few waves of the
GPU; each program reads its slice of the row (from L2 after the first pass):

1. stats: per split, the max of ``z = x / T`` over the tokens kept by top-k and the greedy argmax;
2. top-p (rows with T > 0 and ``top_p < 1``): the nucleus is every token with ``z >= t*``, where
   ``t*`` is the largest value with ``mass(z >= t*) >= top_p * total``. It is found by radix
   select on the float's order-preserving 32-bit key, 11 + 11 + 10 bits: each level's kernel
   adds ``exp(z - max)`` of its tokens into a per-row histogram of the next key bits, over the
   tokens whose higher bits match the bin chosen so far. Masses are fixed point (int64, 2**-44
   of the top token's) and added with integer atomics: exact and the same whatever the order,
   so levels agree bin for bin and the draw does not depend on scheduling. The consumer of a
   level (every program of the next kernel, redundantly: 1-2k bins) picks the bin where the
   mass from the top crosses the target; ``t*`` ends as an exact float32 value;
3. Gumbel-max over the kept tokens (key >= key(t*)), the noise being the same counter-based hash
   of (seed, step, index) as :func:`sampler.gumbel_noise`; per split the best (value, first
   index), then a tiny kernel takes the row's best (smallest index among equal values, as
   torch.argmax), or the greedy argmax for rows with T <= 0.

Same semantics as the torch path (HF order: top-k, then top-p on the renormalised rest; ties at
the top-k boundary and at ``t*`` kept); only float rounding of the mass at the nucleus boundary
may differ (masses below 2**-44 of the top token's count as zero: < 1e-8 of the total).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_GOLDEN = tl.constexpr(0x9E3779B97F4A7C15)
_M1 = tl.constexpr(0xBF58476D1CE4E5B9)
_M2 = tl.constexpr(0x94D049BB133111EB)
_NB = 2048               # histogram bins per level (radix: key bits 31..21, 20..10, 9..0)
_BLOCK = 1024            # tokens per program per iteration
_WAVES = 4               # programs per SM (B * S ~ _WAVES * SMs)
_WARPS = 4
_SEARCH_PASSES = 9       # 8-way search: 8**9 = 2**27 steps over a 65-wide interval
_SPAN_BELOW_MAX = 64.0   # tokens further below the max carry < e**-64 of the mass each


@triton.jit
def _splitmix64(x):
    x = (x ^ (x >> 30)) * _M1
    x = (x ^ (x >> 27)) * _M2
    return x ^ (x >> 31)


@triton.jit
def _scaled(base, offs, V, kth, inv_t):
    """Logits / temperature, -inf outside the vocabulary and below the top-k threshold."""
    x = tl.load(base + offs, mask=offs < V, other=-float("inf"))
    return tl.where(x >= kth, x * inv_t, -float("inf"))


@triton.jit
def _argmax_lanes(best_v, best_i, V):
    """Reduce per-lane (value, first index) pairs: the max, its smallest index (torch's argmax)."""
    v = tl.max(best_v, axis=0)
    return tl.min(tl.where(best_v == v, best_i, V), axis=0)


@triton.jit
def _sample_kernel(L, s_l, V, TEMP, TOPP, KTH, SEED, STEP, OUT,
                   BLOCK: tl.constexpr, PASSES: tl.constexpr, SPAN: tl.constexpr):
    """One program per row: max/sum, an 8-way search for t* over [max - 64, max + 1] (9 passes,
    to 5e-7), Gumbel-max. Latency-bound: ~11 dependent passes whatever the batch."""
    # Every pass keeps per-lane accumulators and reduces once at its end: a cross-warp reduction
    # per block would make each pass latency-bound.
    row = tl.program_id(0).to(tl.int64)
    base = L + row * s_l
    t = tl.load(TEMP + row)
    inv_t = tl.where(t > 0.0, 1.0 / t, 1.0)
    kth = tl.load(KTH + row)
    top_p = tl.load(TOPP + row)
    cols = tl.arange(0, BLOCK)

    # pass 1: max, softmax denominator (online, per lane), greedy argmax
    m_l = tl.full([BLOCK], -1e30, tl.float32)
    s_l = tl.zeros([BLOCK], dtype=tl.float32)
    bv_l = tl.full([BLOCK], -float("inf"), tl.float32)
    bi_l = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + cols
        z = _scaled(base, offs, V, kth, inv_t)
        nm = tl.maximum(m_l, z)
        s_l = s_l * tl.exp(m_l - nm) + tl.exp(z - nm)
        m_l = nm
        bi_l = tl.where(z > bv_l, offs, bi_l)
        bv_l = tl.maximum(bv_l, z)
    m = tl.max(m_l, axis=0)
    s = tl.sum(s_l * tl.exp(m_l - m), axis=0)
    token = _argmax_lanes(bv_l, bi_l, V)

    if t > 0.0:
        lo = tl.full([], -float("inf"), tl.float32)
        if top_p < 1.0:
            # invariant: mass(z >= lo) >= target > mass(z >= hi)
            target = top_p * s
            lo = m - SPAN
            hi = m + 1.0
            j = tl.arange(0, 8)
            for _ in range(PASSES):
                w = (hi - lo) / 8.0
                mids = lo + (j + 1).to(tl.float32) * w       # mids[7] == hi
                acc = tl.zeros([8, BLOCK], dtype=tl.float32)
                for start in range(0, V, BLOCK):
                    offs = start + cols
                    z = _scaled(base, offs, V, kth, inv_t)
                    e = tl.exp(z - m)
                    acc += tl.where(z[None, :] >= mids[:, None], e[None, :], 0.0)
                mass = tl.sum(acc, axis=1)
                ok = (mass >= target) & (j < 7)
                n_ok = tl.sum(ok.to(tl.int32), axis=0).to(tl.float32)   # a prefix: mass falls with j
                hi = lo + (n_ok + 1.0) * w
                lo = lo + n_ok * w
        # last pass: Gumbel-max over the kept tokens
        seed = tl.load(SEED + row).to(tl.uint64, bitcast=True)
        step = tl.load(STEP + row).to(tl.uint64, bitcast=True)
        h0 = _splitmix64(seed * _GOLDEN + step)
        bv_l = tl.full([BLOCK], -float("inf"), tl.float32)
        bi_l = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, V, BLOCK):
            offs = start + cols
            z = _scaled(base, offs, V, kth, inv_t)
            h = _splitmix64(h0 + offs.to(tl.uint64) * _GOLDEN)
            u = ((h >> 40).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            val = tl.where(z >= lo, z - tl.log(-tl.log(u)), -float("inf"))
            bi_l = tl.where(val > bv_l, offs, bi_l)
            bv_l = tl.maximum(bv_l, val)
        token = _argmax_lanes(bv_l, bi_l, V)
    tl.store(OUT + row, token.to(tl.int64))


def sample_rows_single(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                       kth: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """:func:`sample_rows` with one program per row (the first kernel: for comparison)."""
    b, v = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(b, dtype=torch.int64, device=logits.device)
    _sample_kernel[(b,)](logits, logits.stride(0), v, temperature.float().contiguous(),
                         top_p.float().contiguous(), kth.float().contiguous(),
                         seeds.to(torch.int64).contiguous(), steps.to(torch.int64).contiguous(), out,
                         BLOCK=2048, PASSES=_SEARCH_PASSES, SPAN=_SPAN_BELOW_MAX, num_warps=8)
    return out


@triton.jit
def _row(TEMP, TOPP, KTH, s_l, V, SPLIT):
    """This program's row, parameters and slice [lo, hi) of the vocabulary."""
    row = tl.program_id(0).to(tl.int64)
    lo = tl.program_id(1) * SPLIT
    t = tl.load(TEMP + row)
    return (row, row * s_l, lo, tl.minimum(lo + SPLIT, V), t, tl.where(t > 0.0, 1.0 / t, 1.0),
            tl.load(KTH + row), tl.load(TOPP + row))


@triton.jit
def _row_max(PM, row, S, SP2: tl.constexpr):
    j = tl.arange(0, SP2)
    return tl.max(tl.load(PM + row * S + j, mask=j < S, other=-float("inf")), axis=0)


@triton.jit
def _key(z):
    """Order-preserving int64 key of a float32 (its 32 bits, sign-folded)."""
    u = z.to(tl.uint32, bitcast=True)
    return tl.where((u >> 31) == 1, u ^ 0xFFFFFFFF, u ^ 0x80000000).to(tl.int64)


@triton.jit
def _locate(H, target, above, NBINS: tl.constexpr):
    """The last bin j with mass(bins >= j) + above >= target (bins low to high key), and the mass
    above it. Integer masses: the result is exact and the same in every program."""
    j = tl.arange(0, NBINS)
    h = tl.load(H + j)
    suffix = tl.cumsum(h, axis=0, reverse=True) + above
    k = tl.maximum(tl.sum((suffix >= target).to(tl.int32), axis=0) - 1, 0)
    return k, above + tl.sum(tl.where(j > k, h, 0), axis=0)


@triton.jit
def _stats_kernel(L, s_l, V, TEMP, TOPP, KTH, PM, PI, HIST, S, SPLIT,
                  BLOCK: tl.constexpr, NB: tl.constexpr):
    """Per split: max of z and the greedy argmax (first index); zeroes the row's histograms."""
    row, base, lo, hi, t, inv_t, kth, top_p = _row(TEMP, TOPP, KTH, s_l, V, SPLIT)
    cols = tl.arange(0, BLOCK)
    bv = tl.full([BLOCK], -float("inf"), tl.float32)
    bi = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(lo, hi, BLOCK):
        offs = start + cols
        z = _scaled(L + base, offs, hi, kth, inv_t)
        bi = tl.where(z > bv, offs, bi)
        bv = tl.maximum(bv, z)
    sp = tl.program_id(1)
    tl.store(PM + row * S + sp, tl.max(bv, axis=0))
    tl.store(PI + row * S + sp, _argmax_lanes(bv, bi, V))
    if (sp == 0) & (t > 0.0) & (top_p < 1.0):
        for i in range(0, 3 * NB, BLOCK):
            tl.store(HIST + row * 3 * NB + i + cols, tl.zeros([BLOCK], dtype=tl.int64))


@triton.jit
def _hist_kernel(L, s_l, V, TEMP, TOPP, KTH, PM, HIST, STATE, S, SPLIT, LEVEL: tl.constexpr,
                 SP2: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr, SCALE: tl.constexpr):
    """Radix level LEVEL of t*: locate the previous level's bin (redundantly, in every program),
    then add the fixed-point mass of the tokens in it to the histogram of the next key bits."""
    row, base, lo, hi, t, inv_t, kth, top_p = _row(TEMP, TOPP, KTH, s_l, V, SPLIT)
    m = _row_max(PM, row, S, SP2)
    if (t > 0.0) & (top_p < 1.0) & (m > -float("inf")):
        H = HIST + row * 3 * NB
        if LEVEL == 1:
            total = tl.sum(tl.load(H + tl.arange(0, NB)), axis=0)
            target = tl.maximum((top_p.to(tl.float64) * total.to(tl.float64)).to(tl.int64), 1)
            pfx, above = _locate(H, target, 0, NB)
        if LEVEL == 2:
            target = tl.load(STATE + row * 6)
            k, above = _locate(H + NB, target, tl.load(STATE + row * 6 + 2), NB)
            pfx = tl.load(STATE + row * 6 + 1) * NB + k
        if LEVEL > 0:
            if tl.program_id(1) == 0:                # for the next kernel
                st = STATE + row * 6 + (LEVEL - 1) * 3
                tl.store(st, target)
                tl.store(st + 1, pfx)
                tl.store(st + 2, above)
        cols = tl.arange(0, BLOCK)
        for start in range(lo, hi, BLOCK):
            offs = start + cols
            z = _scaled(L + base, offs, hi, kth, inv_t)
            key = _key(z)
            e = (tl.exp(z - m) * SCALE + 0.5).to(tl.int64)
            if LEVEL == 0:
                sel, b = e > 0, key >> 21
            elif LEVEL == 1:
                sel, b = (key >> 21) == pfx, (key >> 10) & 2047
            else:
                sel, b = (key >> 10) == pfx, key & 1023
            tl.atomic_add(H + LEVEL * NB + b, e, mask=sel & (e > 0), sem="relaxed")


@triton.jit
def _gumbel_kernel(L, s_l, V, TEMP, TOPP, KTH, SEED, STEP, PM, HIST, STATE, PV, PJ, S, SPLIT,
                   SP2: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr):
    """Per split: argmax of z + Gumbel noise over the kept tokens (key >= key(t*))."""
    row, base, lo, hi, t, inv_t, kth, top_p = _row(TEMP, TOPP, KTH, s_l, V, SPLIT)
    if t > 0.0:
        tkey = tl.zeros([], dtype=tl.int64)                 # keep all
        if (top_p < 1.0) & (_row_max(PM, row, S, SP2) > -float("inf")):
            k, above = _locate(HIST + row * 3 * NB + 2 * NB, tl.load(STATE + row * 6 + 3),
                               tl.load(STATE + row * 6 + 5), 1024)
            tkey = tl.load(STATE + row * 6 + 4) * 1024 + k
        seed = tl.load(SEED + row).to(tl.uint64, bitcast=True)
        step = tl.load(STEP + row).to(tl.uint64, bitcast=True)
        h0 = _splitmix64(seed * _GOLDEN + step)
        cols = tl.arange(0, BLOCK)
        bv = tl.full([BLOCK], -float("inf"), tl.float32)
        bi = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(lo, hi, BLOCK):
            offs = start + cols
            z = _scaled(L + base, offs, hi, kth, inv_t)
            h = _splitmix64(h0 + offs.to(tl.uint64) * _GOLDEN)
            u = ((h >> 40).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            val = tl.where(_key(z) >= tkey, z - tl.log(-tl.log(u)), -float("inf"))
            bi = tl.where(val > bv, offs, bi)
            bv = tl.maximum(bv, val)
        sp = tl.program_id(1)
        tl.store(PV + row * S + sp, tl.max(bv, axis=0))
        tl.store(PJ + row * S + sp, _argmax_lanes(bv, bi, V))


@triton.jit
def _pick_kernel(TEMP, PM, PI, PV, PJ, OUT, S, V, SP2: tl.constexpr):
    """The row's token from its splits' best: the greedy argmax (T <= 0) or the Gumbel draw."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, SP2)
    ok = j < S
    if tl.load(TEMP + row) > 0.0:
        v = tl.load(PV + row * S + j, mask=ok, other=-float("inf"))
        i = tl.load(PJ + row * S + j, mask=ok, other=V)
    else:
        v = tl.load(PM + row * S + j, mask=ok, other=-float("inf"))
        i = tl.load(PI + row * S + j, mask=ok, other=V)
    tl.store(OUT + row, _argmax_lanes(v, i, V).to(tl.int64))


_SCRATCH: dict = {}


def _splits(b: int, v: int, device: torch.device) -> tuple[int, int]:
    """(S, split length): B * S ~ _WAVES programs per SM, each split whole blocks."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    nblocks = triton.cdiv(v, _BLOCK)
    per = triton.cdiv(nblocks, max(1, min(nblocks, triton.cdiv(_WAVES * sms, b))))
    return triton.cdiv(nblocks, per), per * _BLOCK


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                kth: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One token per row of float32 ``logits`` [B, V]; ``kth`` is each row's top-k threshold on the
    raw logits (-inf: no top-k); temperature <= 0 means greedy for that row."""
    b, v = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    dev = logits.device
    s, split = _splits(b, v, dev)
    if (b, s, dev) not in _SCRATCH:                 # written before read on every call
        f, i = dict(dtype=torch.float32, device=dev), dict(dtype=torch.int32, device=dev)
        _SCRATCH[(b, s, dev)] = (torch.empty(b, s, **f), torch.empty(b, s, **i), torch.empty(b, s, **f),
                                 torch.empty(b, s, **i), torch.empty(b, 3, _NB, dtype=torch.int64, device=dev),
                                 torch.empty(b, 6, dtype=torch.int64, device=dev))
    pm, pi, pv, pj, hist, state = _SCRATCH[(b, s, dev)]
    temperature, top_p, kth = (x.float().contiguous() for x in (temperature, top_p, kth))
    seeds, steps = seeds.to(torch.int64).contiguous(), steps.to(torch.int64).contiguous()
    out = torch.empty(b, dtype=torch.int64, device=dev)
    row = (logits, logits.stride(0), v, temperature, top_p, kth)
    sp2, w = triton.next_power_of_2(s), dict(num_warps=_WARPS)
    # masses up to V * 2**shift must fit in int64
    scale = float(2 ** min(44, 62 - v.bit_length()))
    _stats_kernel[(b, s)](*row, pm, pi, hist, s, split, BLOCK=_BLOCK, NB=_NB, **w)
    for level in range(3):
        _hist_kernel[(b, s)](*row, pm, hist, state, s, split, LEVEL=level, SP2=sp2, BLOCK=_BLOCK,
                             NB=_NB, SCALE=scale, **w)
    _gumbel_kernel[(b, s)](*row, seeds, steps, pm, hist, state, pv, pj, s, split, SP2=sp2,
                           BLOCK=_BLOCK, NB=_NB, **w)
    _pick_kernel[(b,)](temperature, pm, pi, pv, pj, out, s, v, SP2=sp2, num_warps=1)
    return out
