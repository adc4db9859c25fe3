"""Per-row sampling on the GPU: a few short Triton kernels, each row split over S programs.

The torch sampler sorts the 151,936-token vocabulary for top-p and builds the Gumbel noise with
~20 int64 passes over [B, V]. The first kernel (:func:`sample_rows_single`, kept for comparison)
used one program per row: 0.57-0.72 ms at any batch, the latency of ~11 dependent passes. Here
every kernel has grid (B, S), S such that B * S fills ~4 programs per SM, each program one slice
of whole blocks of the row (L2-resident after the first pass):

1. stats: per split, max / min / softmax sum of ``z = x / T`` over the tokens kept by top-k
   (online), and the greedy argmax (value, first index);
2. top-p (rows with T > 0, ``top_p < 1``): the nucleus is every token with ``z >= t*``, ``t*`` the
   largest value with ``mass(z >= t*) >= top_p * total``, found exactly (a float32 value):
   a. counts of tokens in 128 even bins of z below the max (``tl.histogram``: no atomics per
      token); their mass bounds bracket t* (with a bin of margin each side);
   b. radix select over the order-preserving 32-bit keys in the bracket, 3 levels of 2,048 bins
      (11 bits each: any bracket is <= 2**33 keys): each level adds ``exp(z - max)`` of its
      tokens into a per-row histogram with integer atomics. Masses are fixed point (int64,
      2**-44 of the top token's): sums are exact in any order, so the levels agree bin for bin
      and the draw is deterministic. Level 1 also adds the exact mass above the bracket. Each
      level's kernel first locates the previous level's bin, redundantly in every program (a
      cumsum over 2,048 bins), and split 0 leaves the state for the next;
3. Gumbel-max over the kept tokens (key >= key(t*)), the same counter-based hash of (seed, step,
   index) as :func:`sampler.gumbel_noise`; per split the best (value, first index), then a tiny
   kernel takes the row's best (smallest index on ties, as torch.argmax) or its greedy argmax.

Same semantics as the torch path (HF order: top-k, then top-p on the renormalised rest; ties at
the top-k and nucleus edges kept). A nucleus within 2**-20 (relative) of top_p counts as reaching
it (exact ties such as 0.5 + 0.3 = 0.8 fall on the rounding); nothing else is approximate.
"""

from __future__ import annotations

import time

import torch
import triton
import triton.language as tl

_GOLDEN = tl.constexpr(0x9E3779B97F4A7C15)
_M1 = tl.constexpr(0xBF58476D1CE4E5B9)
_M2 = tl.constexpr(0x94D049BB133111EB)
_NB = 2048               # bins per radix level (11 bits of the key)
_NC = 128                # count bins that bracket the nucleus edge
_BLOCK = 1024            # tokens per program per iteration
_WAVES = 4               # programs per SM: B * S ~ _WAVES * SMs
_WARPS = 4


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
def _sample_kernel(L, s_l, V, TEMP, TOPP, KTH, SEED, STEP, OUT, BLOCK: tl.constexpr):
    """The first kernel, one program per row: max/sum, then an 8-way search for t* over
    [max - 64, max + 1] (9 passes, to 5e-7), then Gumbel-max; per-lane accumulators."""
    row = tl.program_id(0).to(tl.int64)
    base = L + row * s_l
    t = tl.load(TEMP + row)
    inv_t = tl.where(t > 0.0, 1.0 / t, 1.0)
    kth = tl.load(KTH + row)
    top_p = tl.load(TOPP + row)
    cols = tl.arange(0, BLOCK)
    m_l = tl.full([BLOCK], -1e30, tl.float32)
    s_l = tl.zeros([BLOCK], dtype=tl.float32)
    bv_l = tl.full([BLOCK], -float("inf"), tl.float32)
    bi_l = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, V, BLOCK):
        z = _scaled(base, start + cols, V, kth, inv_t)
        nm = tl.maximum(m_l, z)
        s_l = s_l * tl.exp(m_l - nm) + tl.exp(z - nm)
        m_l = nm
        bi_l = tl.where(z > bv_l, start + cols, bi_l)
        bv_l = tl.maximum(bv_l, z)
    m = tl.max(m_l, axis=0)
    s = tl.sum(s_l * tl.exp(m_l - m), axis=0)
    token = _argmax_lanes(bv_l, bi_l, V)
    if t > 0.0:
        lo = tl.full([], -float("inf"), tl.float32)
        if top_p < 1.0:
            lo = m - 64.0                      # invariant: mass(z >= lo) >= target > mass(z >= hi)
            hi = m + 1.0
            j = tl.arange(0, 8)
            for _ in range(9):
                w = (hi - lo) / 8.0
                mids = lo + (j + 1).to(tl.float32) * w
                acc = tl.zeros([8, BLOCK], dtype=tl.float32)
                for start in range(0, V, BLOCK):
                    z = _scaled(base, start + cols, V, kth, inv_t)
                    acc += tl.where(z[None, :] >= mids[:, None], tl.exp(z - m)[None, :], 0.0)
                ok = (tl.sum(acc, axis=1) >= top_p * s) & (j < 7)
                n_ok = tl.sum(ok.to(tl.int32), axis=0).to(tl.float32)
                hi = lo + (n_ok + 1.0) * w
                lo = lo + n_ok * w
        h0 = _splitmix64(tl.load(SEED + row).to(tl.uint64, bitcast=True) * _GOLDEN
                         + tl.load(STEP + row).to(tl.uint64, bitcast=True))
        bv_l = tl.full([BLOCK], -float("inf"), tl.float32)
        bi_l = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(0, V, BLOCK):
            offs = start + cols
            z = _scaled(base, offs, V, kth, inv_t)
            u = ((_splitmix64(h0 + offs.to(tl.uint64) * _GOLDEN) >> 40).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
            val = tl.where(z >= lo, z - tl.log(-tl.log(u)), -float("inf"))
            bi_l = tl.where(val > bv_l, offs, bi_l)
            bv_l = tl.maximum(bv_l, val)
        token = _argmax_lanes(bv_l, bi_l, V)
    tl.store(OUT + row, token.to(tl.int64))


@triton.jit
def _row(TEMP, TOPP, KTH, s_l, V, SPLIT):
    """This program's row, parameters and slice [lo, hi) of the vocabulary."""
    row = tl.program_id(0).to(tl.int64)
    lo = tl.program_id(1) * SPLIT
    t = tl.load(TEMP + row)
    return (row, row * s_l, lo, tl.minimum(lo + SPLIT, V), t, tl.where(t > 0.0, 1.0 / t, 1.0),
            tl.load(KTH + row), tl.load(TOPP + row))


@triton.jit
def _row_stats(PM, PN, PS, row, S, SP2: tl.constexpr):
    """The row's max, min (finite) and softmax sum of z, from its splits' partials."""
    j = tl.arange(0, SP2)
    pm = tl.load(PM + row * S + j, mask=j < S, other=-float("inf"))
    m = tl.max(pm, axis=0)
    s = tl.sum(tl.load(PS + row * S + j, mask=j < S, other=0.0) * tl.exp(pm - m), axis=0)
    return m, tl.min(tl.load(PN + row * S + j, mask=j < S, other=float("inf")), axis=0), s


@triton.jit
def _count_range(m, zmin, s, top_p, V, NC: tl.constexpr):
    """(lo, bin width) of the counts: tokens below lo carry < (1 - top_p) / e of the mass in all
    (V * exp(lo - m) bound), so t* lies above lo."""
    lo = tl.maximum(tl.maximum(zmin, m + tl.log((1.0 - top_p) * s / V) - 1.0), m - 64.0)
    return lo, tl.maximum((m - lo) / NC, 1e-5 * tl.maximum(tl.abs(m), 1.0))


@triton.jit
def _key(z):
    """Order-preserving uint32 key of a float32."""
    u = z.to(tl.uint32, bitcast=True)
    return tl.where((u >> 31) == 1, u ^ 0xFFFFFFFF, u ^ 0x80000000)


@triton.jit
def _locate(H, target, above, NB: tl.constexpr):
    """The last bin k with mass(bins >= k) + above >= target, and the mass above bin k."""
    j = tl.arange(0, NB)
    h = tl.load(H + j)
    k = tl.maximum(tl.sum((tl.cumsum(h, axis=0, reverse=True) + above >= target).to(tl.int32), axis=0) - 1, 0)
    return k, above + tl.sum(tl.where(j > k, h, 0), axis=0)


@triton.jit
def _stats_kernel(L, s_l, V, TEMP, TOPP, KTH, PM, PN, PS, PI, CNT, HIST, ABOVE, S, SPLIT,
                  BLOCK: tl.constexpr, NB: tl.constexpr, NC: tl.constexpr):
    """Per split: max, min, softmax sum of z (one exp a token), greedy argmax; split 0 zeroes the
    row's histograms."""
    row, base, lo, hi, t, inv_t, kth, top_p = _row(TEMP, TOPP, KTH, s_l, V, SPLIT)
    cols = tl.arange(0, BLOCK)
    m_l = tl.full([BLOCK], -1e30, tl.float32)
    s_l = tl.zeros([BLOCK], dtype=tl.float32)
    mn = tl.full([BLOCK], float("inf"), tl.float32)
    bv = tl.full([BLOCK], -float("inf"), tl.float32)
    bi = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(lo, hi, BLOCK):
        z = _scaled(L + base, start + cols, hi, kth, inv_t)
        d = z - m_l
        e = tl.exp(-tl.abs(d))
        s_l = tl.where(d > 0, s_l * e + 1.0, s_l + e)
        m_l = tl.maximum(m_l, z)
        mn = tl.minimum(mn, tl.where(z > -float("inf"), z, float("inf")))
        bi = tl.where(z > bv, start + cols, bi)
        bv = tl.maximum(bv, z)
    sp = row * S + tl.program_id(1)
    tl.store(PM + sp, tl.max(bv, axis=0))
    tl.store(PN + sp, tl.min(mn, axis=0))
    tl.store(PS + sp, tl.sum(s_l * tl.exp(m_l - tl.max(m_l, axis=0)), axis=0))
    tl.store(PI + sp, _argmax_lanes(bv, bi, V))
    if (tl.program_id(1) == 0) & (t > 0.0) & (top_p < 1.0):
        tl.store(CNT + row * NC + tl.arange(0, NC), tl.zeros([NC], dtype=tl.int32))
        for i in range(3):
            tl.store(HIST + (row * 3 + i) * NB + tl.arange(0, NB), tl.zeros([NB], dtype=tl.int64))
        tl.store(ABOVE + row, 0)


@triton.jit
def _count_kernel(L, s_l, V, TEMP, TOPP, KTH, PM, PN, PS, CNT, S, SPLIT, SP2: tl.constexpr,
                  BLOCK: tl.constexpr, NC: tl.constexpr):
    """Token counts in NC even bins of z below the max (one atomic per bin and program)."""
    row, base, lo, hi, t, inv_t, kth, top_p = _row(TEMP, TOPP, KTH, s_l, V, SPLIT)
    m, zmin, s = _row_stats(PM, PN, PS, row, S, SP2)
    if (t > 0.0) & (top_p < 1.0) & (m > -float("inf")):
        c_lo, w = _count_range(m, zmin, s, top_p, V, NC)
        cnt = tl.zeros([NC], dtype=tl.int32)
        for start in range(lo, hi, BLOCK):
            z = _scaled(L + base, start + tl.arange(0, BLOCK), hi, kth, inv_t)
            c = tl.minimum(tl.maximum((z - c_lo) * (1.0 / w), 0.0), NC - 1.0).to(tl.int32)
            cnt += tl.histogram(c, NC, mask=z >= c_lo)
        tl.atomic_add(CNT + row * NC + tl.arange(0, NC), cnt, mask=cnt > 0, sem="relaxed")


@triton.jit
def _level_kernel(L, s_l, V, TEMP, TOPP, KTH, PM, PN, PS, CNT, HIST, ABOVE, STATE, S, SPLIT,
                  LEVEL: tl.constexpr, SP2: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr,
                  NC: tl.constexpr, SCALE: tl.constexpr):
    """Radix level LEVEL (1..3): fixed-point masses of the tokens with key in [k0, k0 + lim), in
    bins ``(key - k0) >> sh``. Level 1 takes the bracket from the counts; later levels the bin the
    previous one located. STATE[row, LEVEL - 1] = (target, k0, lim, sh, mass above)."""
    row, base, lo, hi, t, inv_t, kth, top_p = _row(TEMP, TOPP, KTH, s_l, V, SPLIT)
    m, zmin, s = _row_stats(PM, PN, PS, row, S, SP2)
    if (t > 0.0) & (top_p < 1.0) & (m > -float("inf")):
        if LEVEL == 1:
            target = tl.maximum((top_p.to(tl.float64) * s * (1.0 - 2.0 ** -20) * SCALE).to(tl.int64), 1)
            c_lo, w = _count_range(m, zmin, s, top_p, V, NC)
            j = tl.arange(0, NC)
            cnt = tl.load(CNT + row * NC + j).to(tl.float32)
            tf = target.to(tl.float32) / SCALE           # mass bounds of the bins, from the top
            low = tl.cumsum(cnt * tl.exp(c_lo + j.to(tl.float32) * w - m), axis=0, reverse=True)
            up = tl.cumsum(cnt * tl.exp(c_lo + (j + 1).to(tl.float32) * w - m), axis=0, reverse=True)
            a = tl.maximum(tl.sum((low >= tf).to(tl.int32), axis=0) - 2, 0)
            b = tl.sum((up >= tf).to(tl.int32), axis=0) + 1
            kb = tl.where(b >= NC, _key(m).to(tl.int64) + 1, _key(c_lo + b.to(tl.float32) * w).to(tl.int64))
            k0 = _key(c_lo + a.to(tl.float32) * w).to(tl.int64)
            lim = tl.maximum(kb - k0, 1)
            sh = tl.sum((((lim - 1) >> (tl.arange(0, 32) + 11)) > 0).to(tl.int64), axis=0)
            above = tl.zeros([], dtype=tl.int64)
        else:
            st = STATE + (row * 3 + LEVEL - 2) * 5
            target = tl.load(st)
            above = tl.load(st + 4)
            if LEVEL == 2:
                above += tl.load(ABOVE + row)
            k, above = _locate(HIST + (row * 3 + LEVEL - 2) * NB, target, above, NB)
            k0 = tl.load(st + 1) + (k.to(tl.int64) << tl.load(st + 3))
            lim = tl.full([], 1, tl.int64) << tl.load(st + 3)
            sh = tl.maximum(tl.load(st + 3) - 11, 0)
        if tl.program_id(1) == 0:                            # for the next kernel
            st = STATE + (row * 3 + LEVEL - 1) * 5
            tl.store(st, target)
            tl.store(st + 1, k0)
            tl.store(st + 2, lim)
            tl.store(st + 3, sh)
            tl.store(st + 4, above)
        cols = tl.arange(0, BLOCK)
        acc = tl.zeros([BLOCK], dtype=tl.int64)
        H = HIST + (row * 3 + LEVEL - 1) * NB
        for start in range(lo, hi, BLOCK):
            z = _scaled(L + base, start + cols, hi, kth, inv_t)
            key = _key(z)
            d = key - k0.to(tl.uint32)                     # wraps below k0: then >= lim
            inside = d < lim.to(tl.uint32)
            if LEVEL == 1:
                over = key >= (k0 + lim).to(tl.uint32)
                if tl.max((inside | over).to(tl.int32), axis=0) > 0:     # skip blocks below
                    e = (tl.exp(z - m) * SCALE + 0.5).to(tl.int64)
                    acc += tl.where(over, e, 0)
                    tl.atomic_add(H + (d >> sh.to(tl.uint32)), e, mask=inside & (e > 0), sem="relaxed")
            else:
                if tl.max(inside.to(tl.int32), axis=0) > 0:
                    e = (tl.exp(z - m) * SCALE + 0.5).to(tl.int64)
                    tl.atomic_add(H + (d >> sh.to(tl.uint32)), e, mask=inside, sem="relaxed")
        if LEVEL == 1:
            tl.atomic_add(ABOVE + row, tl.sum(acc, axis=0), sem="relaxed")


@triton.jit
def _gumbel_kernel(L, s_l, V, TEMP, TOPP, KTH, SEED, STEP, PM, HIST, STATE, PV, PJ, S, SPLIT,
                   SP2: tl.constexpr, BLOCK: tl.constexpr, NB: tl.constexpr):
    """Per split: argmax of z + Gumbel noise over the kept tokens (key >= key(t*))."""
    row, base, lo, hi, t, inv_t, kth, top_p = _row(TEMP, TOPP, KTH, s_l, V, SPLIT)
    if t > 0.0:
        j = tl.arange(0, SP2)
        m = tl.max(tl.load(PM + row * S + j, mask=j < S, other=-float("inf")), axis=0)
        tkey = tl.zeros([], dtype=tl.int64)                  # keep all
        if (top_p < 1.0) & (m > -float("inf")):
            st = STATE + (row * 3 + 2) * 5
            k, above = _locate(HIST + (row * 3 + 2) * NB, tl.load(st), tl.load(st + 4), NB)
            tkey = tl.load(st + 1) + (k.to(tl.int64) << tl.load(st + 3))
        h0 = _splitmix64(tl.load(SEED + row).to(tl.uint64, bitcast=True) * _GOLDEN
                         + tl.load(STEP + row).to(tl.uint64, bitcast=True))
        cols = tl.arange(0, BLOCK)
        hc = cols.to(tl.uint64) * _GOLDEN
        bv = tl.full([BLOCK], -float("inf"), tl.float32)
        bi = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(lo, hi, BLOCK):
            z = _scaled(L + base, start + cols, hi, kth, inv_t)
            keep = _key(z) >= tkey.to(tl.uint32)
            if tl.max(keep.to(tl.int32), axis=0) > 0:           # skip blocks outside the nucleus
                h = _splitmix64(h0 + tl.cast(start, tl.uint64) * _GOLDEN + hc)
                u = ((h >> 40).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
                val = tl.where(keep, z - tl.log(-tl.log(u)), -float("inf"))
                bi = tl.where(val > bv, start + cols, bi)
                bv = tl.maximum(bv, val)
        tl.store(PV + row * S + tl.program_id(1), tl.max(bv, axis=0))
        tl.store(PJ + row * S + tl.program_id(1), _argmax_lanes(bv, bi, V))


@triton.jit
def _pick_kernel(TEMP, PM, PI, PV, PJ, OUT, S, V, SP2: tl.constexpr):
    """The row's token from its splits' best: the Gumbel draw, or the greedy argmax (T <= 0)."""
    row = tl.program_id(0).to(tl.int64)
    j = tl.arange(0, SP2)
    if tl.load(TEMP + row) > 0.0:
        v = tl.load(PV + row * S + j, mask=j < S, other=-float("inf"))
        i = tl.load(PJ + row * S + j, mask=j < S, other=V)
    else:
        v = tl.load(PM + row * S + j, mask=j < S, other=-float("inf"))
        i = tl.load(PI + row * S + j, mask=j < S, other=V)
    tl.store(OUT + row, _argmax_lanes(v, i, V).to(tl.int64))


_SCRATCH: dict = {}


def _splits(b: int, v: int, device: torch.device) -> tuple[int, int]:
    """(S, split length): B * S ~ _WAVES programs per SM, each split whole blocks."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132
    nblocks = triton.cdiv(v, _BLOCK)
    per = triton.cdiv(nblocks, max(1, min(nblocks, triton.cdiv(_WAVES * sms, b))))
    return triton.cdiv(nblocks, per), per * _BLOCK


def _scratch(b: int, s: int, dev: torch.device):
    """Work buffers for ``b`` rows of ``s`` splits: one set per split count and CUDA stream (a
    prefill's sampling may run on a second stream beside a decode step's: engine.prefill_stream),
    grown to the largest batch seen and sliced (row-major, so a prefix of rows is contiguous).
    Every call writes before it reads."""
    key = (s, dev, torch.cuda.current_stream(dev).cuda_stream if dev.type == "cuda" else 0)
    have = _SCRATCH.get(key)
    if have is None or have[0] < b:
        f, i, q = (dict(dtype=d, device=dev) for d in (torch.float32, torch.int32, torch.int64))
        have = (b, [torch.empty(b, s, **f) for _ in range(4)], [torch.empty(b, s, **i) for _ in range(2)],
                torch.empty(b, _NC, **i), torch.empty(b, 3, _NB, **q), torch.empty(b, **q),
                torch.empty(b, 3, 5, **q))
        _SCRATCH[key] = have
    _, fl, it, cnt, hist, above, state = have
    return [x[:b] for x in fl], [x[:b] for x in it], cnt[:b], hist[:b], above[:b], state[:b]


def warm_up(max_batch: int, vocab: int, device: torch.device) -> float:
    """Compile every kernel variant that batches of 1..``max_batch`` rows need, at start-up.

    The split count S, and with it compile-time constants and Triton's integer specialisations,
    changes with the batch size: without this, the first batch of each new size waits for ~6
    kernel compiles (seconds, measured as a stalled first GPU sweep step). Returns seconds."""
    t0 = time.perf_counter()
    g = torch.Generator(device=device).manual_seed(0)
    for b in range(1, max_batch + 1):
        ones = torch.ones(b, device=device)
        sample_rows(torch.randn(b, vocab, device=device, generator=g), 0.7 * ones, 0.9 * ones,
                    torch.full((b,), float("-inf"), device=device), torch.arange(b, device=device),
                    torch.zeros(b, dtype=torch.int64, device=device))
    torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def _args(logits, temperature, top_p, kth, seeds, steps):
    logits = logits if logits.stride(1) == 1 else logits.contiguous()
    return (logits, logits.stride(0), logits.shape[1], *(x.float().contiguous() for x in (temperature, top_p, kth)),
            seeds.to(torch.int64).contiguous(), steps.to(torch.int64).contiguous())


def sample_rows_single(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                       kth: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """:func:`sample_rows` with the first kernel (one program per row), for comparison."""
    out = torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)
    _sample_kernel[(logits.shape[0],)](*_args(logits, temperature, top_p, kth, seeds, steps), out,
                                       BLOCK=2048, num_warps=8)
    return out


def sample_rows(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor,
                kth: torch.Tensor, seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One token per row of float32 ``logits`` [B, V]; ``kth`` is each row's top-k threshold on the
    raw logits (-inf: no top-k); temperature <= 0 means greedy for that row."""
    logits, s_l, v, temperature, top_p, kth, seeds, steps = _args(logits, temperature, top_p, kth, seeds, steps)
    b, dev = logits.shape[0], logits.device
    s, split = _splits(b, v, dev)
    (pm, pn, ps, pv), (pi, pj), cnt, hist, above, state = _scratch(b, s, dev)
    out = torch.empty(b, dtype=torch.int64, device=dev)
    row = (logits, s_l, v, temperature, top_p, kth)
    sp2, w = triton.next_power_of_2(s), dict(BLOCK=_BLOCK, num_warps=_WARPS)
    scale = float(2 ** min(44, 62 - v.bit_length()))        # V * scale must fit in int64
    _stats_kernel[(b, s)](*row, pm, pn, ps, pi, cnt, hist, above, s, split, NB=_NB, NC=_NC, **w)
    _count_kernel[(b, s)](*row, pm, pn, ps, cnt, s, split, SP2=sp2, NC=_NC, **w)
    for level in (1, 2, 3):
        _level_kernel[(b, s)](*row, pm, pn, ps, cnt, hist, above, state, s, split, LEVEL=level,
                              SP2=sp2, NB=_NB, NC=_NC, SCALE=scale, **w)
    _gumbel_kernel[(b, s)](*row, seeds, steps, pm, hist, state, pv, pj, s, split, SP2=sp2, NB=_NB, **w)
    _pick_kernel[(b,)](temperature, pm, pi, pv, pj, out, s, v, SP2=sp2, num_warps=1)
    return out
