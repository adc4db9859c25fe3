"""Attention over the paged KV cache, GQA-aware (K/V are never repeated).

``decode_attention_torch`` is the reference (used on CPU, where it matches HF's SDPA path);
``decode_attention_triton`` is the GPU kernel: split-K flash-decoding over live lengths only, a
fixed grid so that it can be captured in a CUDA graph.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import threading
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

from serve_app.engine._private.fp8 import FP8, FP8_MAX
from serve_app.engine._private.transfer import upload

logger = logging.getLogger(__name__)


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as the KV cache stores it: an FP8 cache keeps e4m3 values without scales,
    clamped to the finite range (a cast would turn overflow into NaN on some paths)."""
    if x.dtype == dtype:
        return x
    if dtype == FP8:
        x = x.clamp(-FP8_MAX, FP8_MAX)
    return x.to(dtype)


def gather_kv(cache: torch.Tensor, pages: torch.Tensor, length: int) -> torch.Tensor:
    """One request's ``[kv_heads, length, head_dim]`` from a layer's ``[pages, kv, P, D]`` pool
    (in the cache's dtype: callers upcast an FP8 cache)."""
    g = _bytes(cache).index_select(0, pages).view(cache.dtype)   # [n, kv, P, D]
    n, kv, p, d = g.shape
    return g.permute(1, 0, 2, 3).reshape(kv, n * p, d)[:, :length]


def write_kv(cache_k: torch.Tensor, cache_v: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             page_idx: torch.Tensor, offset: torch.Tensor) -> None:
    """Store ``k``/``v`` ``[T, kv, D]`` at (page, offset) per token."""
    _bytes(cache_k)[page_idx, :, offset] = _bytes(to_cache_dtype(k, cache_k.dtype))
    _bytes(cache_v)[page_idx, :, offset] = _bytes(to_cache_dtype(v, cache_v.dtype))


def _bytes(x: torch.Tensor) -> torch.Tensor:
    """An FP8 tensor as uint8 (the same bytes): indexing kernels take every integer type, not
    every torch build's float8; other dtypes as they are."""
    return x.view(torch.uint8) if x.dtype == FP8 else x


def prefill_attention(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                      cache_k: torch.Tensor, cache_v: torch.Tensor, pages: torch.Tensor,
                      start: int, scale: float) -> torch.Tensor:
    """Causal attention of a chunk ``q`` [T, H, D] at positions ``start..start+T`` of one request.

    A first chunk attends to itself only (SDPA ``is_causal``, as HF does); a later chunk also reads
    the request's earlier tokens from the cache, with a bottom-right aligned causal mask.
    """
    t = q.shape[0]
    qh = q.transpose(0, 1).unsqueeze(0)
    if start == 0:
        k, v = k_new.transpose(0, 1), v_new.transpose(0, 1)
        out = F.scaled_dot_product_attention(qh, k.unsqueeze(0), v.unsqueeze(0), is_causal=True,
                                             scale=scale, enable_gqa=True)
    else:
        k = torch.cat([gather_kv(cache_k, pages, start).to(k_new.dtype), k_new.transpose(0, 1)], dim=1)
        v = torch.cat([gather_kv(cache_v, pages, start).to(v_new.dtype), v_new.transpose(0, 1)], dim=1)
        s = start + t
        mask = (torch.arange(s, device=q.device)[None, :]
                <= torch.arange(start, s, device=q.device)[:, None])
        out = F.scaled_dot_product_attention(qh, k.unsqueeze(0), v.unsqueeze(0), attn_mask=mask,
                                             scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)                           # [T, H, D]


PACKED_IMPLS = ("sdpa", "flash", "cudnn", "varlen", "cudnn_ungated")


class CudnnPlans:
    """Which attention shapes this thread has a cuDNN plan for.

    cuDNN's SDPA builds a plan the first time it sees a shape (batch, lengths, strides), ~30 ms of
    host time during which the GPU idles: measured 36 ms for one vision call of a new batch shape,
    and in the service nearly every request brings new shapes (image sizes and prompt lengths
    vary). torch caches plans per thread. So a shape seen for the first time runs on flash
    attention and is queued; :meth:`build_pending` builds queued plans when the engine has nothing
    else to do, and later calls of that shape take cuDNN (the faster kernel on Hopper).
    """

    def __init__(self, limit: int = 2048):
        self.limit = limit
        self._local = threading.local()
        self.built_total = 0      # counts for stats (read from other threads)
        self.pending_total = 0

    def _state(self):
        st = self._local
        if not hasattr(st, "built"):
            st.built, st.pending, st.failed = set(), {}, set()
        return st

    def ready(self, q, k, v, causal: bool, scale: float) -> bool:
        st = self._state()
        key = (tuple(q.shape), q.stride(), tuple(k.shape), k.stride(), tuple(v.shape), v.stride(),
               causal, q.dtype, q.device, float(scale))
        if key in st.built:
            return True
        if key not in st.pending and key not in st.failed and len(st.built) + len(st.pending) < self.limit:
            st.pending[key] = None
            self.pending_total = len(st.pending)
        return False

    def build_pending(self, max_seconds: float = 0.05, max_plans: int | None = None) -> int:
        """Build queued plans (on throw-away tensors of the same shapes and strides) for up to
        about ``max_seconds`` and at most ``max_plans``; returns how many were built."""
        from torch.nn.attention import SDPBackend, sdpa_kernel
        st = self._state()
        t0, n = time.perf_counter(), 0
        while st.pending and time.perf_counter() - t0 < max_seconds and (max_plans is None or n < max_plans):
            key = next(iter(st.pending))
            del st.pending[key]
            qs, qst, ks, kst, vs, vst, causal, dtype, dev, scale = key
            q, k, v = (torch.empty_strided(sz, sd, dtype=dtype, device=dev).zero_()
                       for sz, sd in ((qs, qst), (ks, kst), (vs, vst)))
            try:
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                                   **({"enable_gqa": True} if ks[1] != qs[1] else {}))
                st.built.add(key)
                self.built_total = len(st.built)
            except RuntimeError:      # cuDNN declines this shape: it stays on flash
                st.failed.add(key)
            n += 1
        self.pending_total = len(st.pending)
        return n


cudnn_plans = CudnnPlans()


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lens: list[int], causal: bool,
                     scale: float, impl: str = "sdpa", gate: bool = True) -> torch.Tensor:
    """Attention within each of several sequences packed along dim 0 (q [T, H, D], k/v [T, Hk, D],
    any token stride), without padding or masks. ``lens`` are host ints (no device sync).

    ``varlen``: one flash varlen call for the whole pack; otherwise one SDPA call per run of
    equal-length sequences, batched (``flash``/``cudnn`` pin that SDPA backend). ``cudnn`` with
    ``gate``: shapes without a plan yet run on flash (see :class:`CudnnPlans`).
    """
    if impl == "varlen":
        return _varlen(q, k, v, lens, causal, scale)
    if impl == "cudnn_ungated":           # a graph capture: its warm-up run builds the plan
        impl, gate = "cudnn", False
    gqa = k.shape[1] != q.shape[1]
    kw = {"enable_gqa": True} if gqa else {}
    outs, off, i = [], 0, 0
    while i < len(lens):
        n, j = lens[i], i
        while j < len(lens) and lens[j] == n:
            j += 1
        b, sl = j - i, slice(off, off + (j - i) * n)
        qb, kb, vb = (x[sl].view(b, n, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
        use = impl
        if impl == "cudnn" and gate and not cudnn_plans.ready(qb, kb, vb, causal, scale):
            use = "flash"
        o = _sdpa(use, qb, kb, vb, causal, scale, kw)
        outs.append(o.transpose(1, 2).reshape(b * n, *q.shape[1:]))
        off, i = off + b * n, j
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def capturable_impls(dtype: torch.dtype, picked: str) -> list[str]:
    """Packed implementations to try, in order, while capturing a CUDA graph.

    cuDNN first where start-up picked it: a graph has fixed shapes, so the capture's warm-up
    run builds the plan on the host once and replays need none (``cudnn_ungated``). On an H200
    (`benchmarks/attn_probe.py`, cuDNN 9.19) it replayed eager's output exactly and took
    0.155 against flash's 0.211 ms for a 1280x720 image's attention, 0.045 against 0.079 ms
    for a 1,280-token prompt's. Then flash, which keeps no host-side plan or offsets (varlen)
    but takes only 16-bit inputs; fp32 (the GPU tests) gets plain SDPA, capturable too."""
    if dtype not in (torch.bfloat16, torch.float16):
        return ["sdpa"]
    return ["cudnn_ungated", "flash"] if picked == "cudnn" else ["flash"]


def capture_pinned(owner, attr: str, dtype: torch.dtype, do_capture: Callable[[], Any]) -> tuple[Any, str]:
    """``do_capture()`` with ``owner.<attr>`` (an attention implementation) pinned to each of
    :func:`capturable_impls` in turn until one captures; returns (its result, that impl). The
    attribute is restored either way; if every implementation fails, the last error is raised."""
    saved = getattr(owner, attr)
    impls = capturable_impls(dtype, saved)
    try:
        for impl, fallback in zip(impls, impls[1:]):
            setattr(owner, attr, impl)
            try:
                return do_capture(), impl
            except Exception as e:  # noqa: BLE001 - the next implementation may capture
                logger.warning("CUDA graph capture with %s attention failed, trying %s: %r", impl, fallback, e)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
        setattr(owner, attr, impls[-1])          # the last one's error is the caller's
        return do_capture(), impls[-1]
    finally:
        setattr(owner, attr, saved)


def _flash(q, k, v, causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)[0]


def _cudnn(q, k, v, causal, scale):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, causal, False,
                                                              scale=scale)[0]


_DIRECT = {"flash": _flash, "cudnn": _cudnn}
_DIRECT_FAILED: set[str] = set()


def _sdpa(use: str, q, k, v, causal: bool, scale: float, kw: dict) -> torch.Tensor:
    """SDPA [B, H, L, D] on a pinned backend. The backend's op is called directly (both take
    GQA K/V as they are, as SDPA itself passes them): ``sdpa_kernel``'s context manager costs
    more host time per call than the attention of a short prefill takes on the GPU. If the
    direct op is missing or has another signature in this torch, that backend goes through
    ``sdpa_kernel`` from then on. Inputs the backend cannot take (fp32) raise, as through SDPA."""
    fn = _DIRECT.get(use)
    if fn is not None and use not in _DIRECT_FAILED:
        try:
            return fn(q, k, v, causal, scale)
        except (TypeError, AttributeError, NotImplementedError):
            _DIRECT_FAILED.add(use)
    if fn is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **kw)
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[use]
    with sdpa_kernel(backend):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, **kw)


_VARLEN_PARAMS: frozenset | None = None


def _varlen(q, k, v, lens: list[int], causal: bool, scale: float) -> torch.Tensor:
    global _VARLEN_PARAMS
    from torch.nn.attention.varlen import varlen_attn
    if _VARLEN_PARAMS is None:
        _VARLEN_PARAMS = frozenset(inspect.signature(varlen_attn).parameters)
    kw: dict = {}
    if causal:
        if "window_size" in _VARLEN_PARAMS:
            kw["window_size"] = (-1, 0)
        else:
            kw["is_causal"] = True
    if k.shape[1] != q.shape[1] and "enable_gqa" in _VARLEN_PARAMS:
        kw["enable_gqa"] = True
    if "scale" in _VARLEN_PARAMS:
        kw["scale"] = scale
    elif abs(scale - q.shape[-1] ** -0.5) > 1e-12:
        raise NotImplementedError("varlen_attn without a scale argument")
    cu = upload([0, *itertools.accumulate(lens)], q.device, torch.int32)
    m = max(lens)
    return varlen_attn(q, k, v, cu, cu, m, m, **kw)


def pick_packed_impl(device: torch.device, heads: int, kv_heads: int, head_dim: int, lens: list[int],
                     causal: bool, dtype: torch.dtype,
                     candidates=("cudnn", "flash", "varlen")) -> tuple[str, dict]:
    """Fastest ``packed_attention`` implementation that works here and agrees with plain SDPA
    (timed once at start-up on a representative shape, plans built; within 3 % the earlier
    candidate wins). Plain ``sdpa`` is only the fallback: on Hopper it dispatches to cuDNN
    without the :class:`CudnnPlans` gate, i.e. with a plan build for every new shape."""
    if device.type != "cuda":
        return "sdpa", {}
    g = torch.Generator(device=device).manual_seed(0)
    t = sum(lens)
    q = torch.randn(t, heads, head_dim, device=device, dtype=dtype, generator=g)
    k = torch.randn(t, kv_heads, head_dim, device=device, dtype=dtype, generator=g)
    v = torch.randn(t, kv_heads, head_dim, device=device, dtype=dtype, generator=g)
    scale = head_dim ** -0.5
    ref = packed_attention(q, k, v, lens, causal, scale, "sdpa").float()
    times: dict[str, float] = {}
    ok = []
    for impl in candidates:                 # correctness, and a warm-up of every candidate first
        try:
            out = packed_attention(q, k, v, lens, causal, scale, impl, gate=False)
            if ((out.float() - ref).norm() / ref.norm()).item() <= 2e-2:
                ok.append(impl)
        except Exception:  # noqa: BLE001 - a backend this build/GPU lacks is simply not picked
            pass
        times[impl] = float("inf")
    torch.cuda.synchronize(device)
    for impl in ok:
        st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        st.record()
        for _ in range(10):
            packed_attention(q, k, v, lens, causal, scale, impl, gate=False)
        en.record()
        en.synchronize()
        times[impl] = st.elapsed_time(en) / 10
    fastest = min(times.values())
    if fastest == float("inf"):
        return "sdpa", times
    return next(i for i in candidates if times[i] <= 1.03 * fastest), times


def decode_attention_torch(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                           block_tables: list[torch.Tensor], lengths: list[int],
                           scale: float) -> torch.Tensor:
    """q [B, H, D] (one new token per row, already in the cache) -> [B, H, D]."""
    outs = []
    for i, (pages, n) in enumerate(zip(block_tables, lengths)):
        k = gather_kv(cache_k, pages, n).unsqueeze(0).to(q.dtype)
        v = gather_kv(cache_v, pages, n).unsqueeze(0).to(q.dtype)
        o = F.scaled_dot_product_attention(q[i][None, :, None], k, v, scale=scale, enable_gqa=True)
        outs.append(o[0, :, 0])
    return torch.stack(outs)


_triton_kernel = None


def _build_triton_kernel():
    import triton
    import triton.language as tl

    # a module global, not a closure variable: Triton's interpreter resolves only globals (this
    # module imports no Triton at its top: the CPU engine uses it without Triton)
    from serve_app.engine._private.kernels import _pdl_enter
    globals()["_pdl_enter"] = _pdl_enter

    @triton.jit
    def kernel(Q, K, V, BT, LENS, O, LSE,
               s_qb, s_qh, s_kp, s_kh, s_ks, s_btb, s_ob, s_oh, s_os, s_lb, s_lh,
               scale, target,
               GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr, PAGE: tl.constexpr,
               BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, PREC: tl.constexpr, PDL: tl.constexpr = False,
               F16_MATH: tl.constexpr = False, BALANCED: tl.constexpr = False, B_PAD: tl.constexpr = 1):
        _pdl_enter(PDL)
        b = tl.program_id(0)
        kvh = tl.program_id(1)
        sp = tl.program_id(2)
        seq_len = tl.load(LENS + b)
        if BALANCED:
            # balanced: one chunk length for every row, from all rows' lengths (each program
            # reads them: no extra launch, and a graph replays it with new lengths), so that
            # the batch's tokens fill about ``target`` programs and the longest row fits in SPLITS
            offs_b = tl.arange(0, B_PAD)
            lens = tl.load(LENS + offs_b, mask=offs_b < tl.num_programs(0), other=0)
            per = tl.maximum(tl.cdiv(tl.max(lens, 0), SPLITS),
                             tl.cdiv(tl.sum(lens, 0) * tl.num_programs(1), target))
            per = tl.cdiv(per, BLOCK_N) * BLOCK_N
        else:
            per = tl.cdiv(tl.cdiv(seq_len, SPLITS), BLOCK_N) * BLOCK_N
        start = sp * per
        end = tl.minimum(start + per, seq_len)
        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, D)
        gmask = offs_g < GROUP
        heads = kvh * GROUP + offs_g
        q = tl.load(Q + b * s_qb + heads[:, None] * s_qh + offs_d[None, :], mask=gmask[:, None], other=0.0)
        if F16_MATH:    # an FP8 cache under bf16 q: e4m3 -> fp16 is one instruction per pair, -> bf16 three
            q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0).to(tl.float16)
        m_i = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([GROUP_PAD], dtype=tl.float32)
        acc = tl.zeros([GROUP_PAD, D], dtype=tl.float32)
        qk_scale = scale * 1.4426950408889634
        Kh = K + kvh * s_kh           # the head's offset once, not in every [BLOCK_N, D] address
        Vh = V + kvh * s_kh
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            nmask = offs_n < end
            page = tl.load(BT + b * s_btb + offs_n // PAGE, mask=nmask, other=0).to(tl.int64)
            row = page * s_kp + (offs_n % PAGE) * s_ks
            # an FP8 cache is upcast on load: the bytes read halve, the math stays 16-bit (fp16:
            # every e4m3 value is exact in it, and it has 3 more mantissa bits than bf16)
            k = tl.load(Kh + row[:, None] + offs_d[None, :], mask=nmask[:, None], other=0.0).to(q.dtype)
            v = tl.load(Vh + row[:, None] + offs_d[None, :], mask=nmask[:, None], other=0.0).to(q.dtype)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            s = tl.where(nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp2(s - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m_i = m_new
        has = l_i > 0
        out = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, m_i / 1.4426950408889634 + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
        if BALANCED:        # a chunk past its row's end writes only its lse (-inf): the merge skips it
            omask = gmask[:, None] & (start < end)
        else:
            omask = gmask[:, None]
        tl.store(O + b * s_ob + heads[:, None] * s_oh + sp * s_os + offs_d[None, :], out, mask=omask)
        tl.store(LSE + b * s_lb + heads * s_lh + sp, lse, mask=gmask)

    return kernel


def num_splits_for(batch: int, num_kv_heads: int, num_sms: int = 132, cache_dtype: torch.dtype | None = None) -> int:
    """Enough split-K partitions to give every SM about two programs; over a 16-bit cache at
    5-24 rows, twice that.

    Why twice there: the app's rows differ in length (300-4,300 tokens), and the splits of the
    longest row set a call's time. On an H200 (decode_attn_probe.py --mixed, rows of 0.25x-2x
    1.3k tokens; RESULTS.md "FP8 KV in the app"), doubling, with :func:`decode_config_for`'s
    picks, took 7-26 % off a call at 8-24 rows (41.1 -> 30.5 us at 12 rows, the app's usual
    bucket), and 0-11 % with rows of equal length. Over an FP8 cache it helped mixed rows but cost
    7-25 % with equal ones, so there it stays at two programs per SM."""
    want = -(-2 * num_sms // max(1, batch * num_kv_heads))
    if cache_dtype is not None and cache_dtype.itemsize > 1 and 5 <= batch <= 24:
        want *= 2
    return int(max(1, min(16, want)))


def balanced_splits_for(batch: int, num_kv_heads: int, num_sms: int = 132) -> int:
    """The most chunks a row may take with balanced chunks (the grid): 4x the plain split count,
    at most 16; the kernel picks the chunk length, so most of them stay empty."""
    return min(16, 4 * num_splits_for(batch, num_kv_heads, num_sms))


# (BLOCK_N, num_warps) of the split-K decode kernel: the tokens a program loads per iteration, and
# its warps. Picked per cache dtype and split count from H200 probes (benchmarks/decode_attn_probe.py;
# RESULTS.md "PDL, FP8 vision linears, decode-attention configs" and "FP8 KV in the app"). 16-bit
# cache: (128, 8) at 9+ splits (1-4 rows; 8 rows, doubled to 10 splits, tie), (64, 4) below:
# fastest or within 7 % at 12-64 rows, equal or mixed lengths. FP8 cache (fp16 math): (64, 4),
# but (32, 4) in one split (batch >= ~33): 89.5 us a call at batch 64 against 112. At 2 splits the
# FP8 probes disagree: (32, 4) took 48.5 us at batch 32 against 59.9 with (64, 4), but 43.7
# against 36.7 at batch 24, and 75.4 against 57.9 with rows of mixed lengths. Compiled for sm_90
# as the JIT specialises it, (64, 4) holds 80 registers, no spills (kernel_resources.py).
# CUDA-core variants for the group's 4 q heads (no MMA tile padded to 16 rows) were 2-6x slower
# and were dropped.
DECODE_CONFIG = (64, 4)
DECODE_CONFIG_FP8_ONE_SPLIT = (32, 4)
DECODE_CONFIG_16BIT_MANY_SPLITS = (128, 8)
DECODE_CONFIGS = [(16, 4), (32, 4), (32, 8), (64, 4), (64, 8), (128, 8)]


def decode_config_for(cache_dtype: torch.dtype, splits: int) -> tuple[int, int]:
    """The measured config for a cache dtype and split count (see :data:`DECODE_CONFIG`)."""
    if cache_dtype.itemsize == 1:
        return DECODE_CONFIG_FP8_ONE_SPLIT if splits == 1 else DECODE_CONFIG
    return DECODE_CONFIG_16BIT_MANY_SPLITS if splits >= 9 else DECODE_CONFIG


def decode_attention_triton(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor,
                            block_tables: torch.Tensor, lengths: torch.Tensor, scale: float,
                            splits: int, page_size: int,
                            config: tuple | None = None, balanced: int = 0) -> torch.Tensor:
    """q [B, H, D]; cache [pages, kv, P, D]; block_tables [B, max_pages] int32; lengths [B] int32;
    ``config``: (BLOCK_N, num_warps), :func:`decode_config_for` the cache when left out.

    ``balanced`` > 0 (programs to aim at; needs ``splits`` >= 2): every row is cut into chunks of
    one length, set in the kernel from all rows' lengths, instead of into ``splits`` equal parts
    of its own. With rows of mixed lengths the parts of the longest row set a call's time
    (decode_attn_probe.py --mixed); equal chunks spread the tokens evenly over the programs.
    ``splits`` is then the most chunks a row may take (the grid), and the chunk is at least
    1/``splits`` of the longest row."""
    import triton

    from serve_app.engine._private import kernels as K
    global _triton_kernel
    if _triton_kernel is None:
        _triton_kernel = _build_triton_kernel()
    b, h, d = q.shape
    kv = cache_k.shape[1]
    group = h // kv
    block_n, warps = config or decode_config_for(cache_k.dtype, splits)
    if splits < 2:
        balanced = 0              # one split: the output goes out unmerged, every row must write it
    o = torch.empty(b, h, splits, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, h, splits, dtype=torch.float32, device=q.device)
    _triton_kernel[(b, kv, splits)](
        q, cache_k, cache_v, block_tables, lengths, o, lse,
        q.stride(0), q.stride(1), cache_k.stride(0), cache_k.stride(1), cache_k.stride(2),
        block_tables.stride(0), o.stride(0), o.stride(1), o.stride(2), lse.stride(0), lse.stride(1),
        scale, max(1, int(balanced)), GROUP=group, GROUP_PAD=max(16, group), D=d,
        PAGE=page_size, BLOCK_N=block_n, SPLITS=splits,
        PREC="ieee" if q.dtype == torch.float32 else "tf32",
        F16_MATH=cache_k.dtype.itemsize == 1 and q.dtype == torch.bfloat16,
        BALANCED=bool(balanced), B_PAD=triton.next_power_of_2(b) if balanced else 1,
        **K._pdl(), num_warps=warps, num_stages=2)
    if splits == 1:
        return o[:, :, 0].to(q.dtype)
    return K.merge_splits(o, lse, q.dtype)
