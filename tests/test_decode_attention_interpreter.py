"""The split-K decode attention kernel in every config, run by Triton's CPU interpreter against
the torch reference: scattered pages, ragged lengths, 1 and 4 splits.

fp32 q over an fp32 and an e4m3 cache (upcast on load), for every config: the interpreter does
not emulate a bf16 ``tl.dot`` faithfully (garbage for bf16 operands, where the GPU test of the
same configs passes), so bf16 math is the GPU test's part. bf16 q over the e4m3 cache runs in
fp16 (the kernel's ``F16_MATH``), which NumPy has, so that case runs here too. The interpreter runs in a
subprocess (TRITON_INTERPRET is read when kernels are defined), with one patch: under NumPy 2.4
its ``__index__`` of a loaded scalar fails on a 1-element array (the kernel's loop bounds)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

SCRIPT = r'''
import numpy as np, torch
import triton.runtime.interpreter as interp
_orig = interp._patch_lang_tensor
def _patched(tensor, scope):
    _orig(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(np.asarray(self.handle.data).reshape(-1)[0]))
interp._patch_lang_tensor = _patched
from serve_app.engine._private import attention as A
real_empty = torch.empty
def nan_empty(*a, **k):
    t = real_empty(*a, **k)
    return t.fill_(float("nan")) if t.dtype == torch.float32 else t
torch.manual_seed(0)
b, h, kv, d, page = 3, 8, 2, 128, 16
lens = [37, 130, 5]
per = [-(-n // page) for n in lens]
worst = 0.0
for dt in (torch.float32, torch.float8_e4m3fn):
    ck = A.to_cache_dtype(torch.randn(sum(per) + 1, kv, page, d) * 2, dt)
    cv = A.to_cache_dtype(torch.randn(sum(per) + 1, kv, page, d), dt)
    perm = torch.randperm(sum(per)) + 1
    tables, start = [], 0
    for n in per:
        tables.append(perm[start:start + n]); start += n
    bt = torch.zeros(b, max(per), dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, :len(t)] = t
    q = torch.randn(b, h, d)
    want = A.decode_attention_torch(q.float(), ck.float(), cv.float(), tables, lens, d ** -0.5)
    for cfg in A.DECODE_CONFIGS + [None]:          # None: decode_config_for's pick
        for splits in (1, 4):
            got = A.decode_attention_triton(q, ck, cv, bt, torch.tensor(lens, dtype=torch.int32), d ** -0.5,
                                            splits, page, cfg)
            err = ((got.float() - want).norm() / want.norm()).item()
            assert err < 1e-5, (dt, cfg, splits, err)
            worst = max(worst, err)
        # balanced chunks (one length for all rows): a few programs aimed at (long chunks, the
        # longest row's bound decides) and many (short chunks; the 5-token row leaves most of its
        # chunks empty, which must not reach the merge: the partials start as NaN here, so an
        # unwritten one that did would show)
        for splits, target in ((4, 2), (8, 64), (16, 1000)):
            A.torch.empty = nan_empty
            try:
                got = A.decode_attention_triton(q, ck, cv, bt, torch.tensor(lens, dtype=torch.int32), d ** -0.5,
                                                splits, page, cfg, balanced=target)
            finally:
                A.torch.empty = real_empty
            err = ((got.float() - want).norm() / want.norm()).item()
            assert err < 1e-5, (dt, cfg, splits, target, err)
            worst = max(worst, err)
            if dt == torch.float8_e4m3fn:
                # bf16 q over the FP8 cache: the kernel's fp16 math (numpy has fp16, not bf16);
                # within bf16's output rounding of the fp32 reference
                got = A.decode_attention_triton(q.bfloat16(), ck, cv, bt, torch.tensor(lens, dtype=torch.int32),
                                                d ** -0.5, splits, page, cfg)
                assert got.dtype == torch.bfloat16
                want16 = A.decode_attention_torch(q.bfloat16().float(), ck.float(), cv.float(), tables, lens, d ** -0.5)
                err16 = ((got.float() - want16).norm() / want16.norm()).item()
                assert err16 < 8e-3, (cfg, splits, err16)
print("ok", len(A.DECODE_CONFIGS), "configs, worst relative error", worst)
'''


def test_every_decode_attention_config_in_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, "-c", SCRIPT], cwd=root, env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert r.stdout.startswith("ok"), r.stdout


def test_decode_config_pick():
    """The measured picks: (32, 4) over an FP8 cache in one split, (128, 8) over a 16-bit cache
    in 4+ splits, (64, 4) elsewhere."""
    import torch

    from serve_app.engine._private import attention as A
    e4m3, bf16 = torch.float8_e4m3fn, torch.bfloat16
    assert A.decode_config_for(e4m3, 1) == A.DECODE_CONFIG_FP8_ONE_SPLIT == (32, 4)
    assert A.decode_config_for(e4m3, 2) == A.decode_config_for(e4m3, 16) == A.DECODE_CONFIG == (64, 4)
    assert A.decode_config_for(bf16, 1) == A.decode_config_for(bf16, 8) == A.DECODE_CONFIG
    assert A.decode_config_for(bf16, 9) == A.DECODE_CONFIG_16BIT_MANY_SPLITS == (128, 8)
    assert A.decode_config_for(torch.float32, 16) == (128, 8)
    # split counts at the decode graphs' buckets (8 KV heads, 132 SMs): twice as many over a
    # 16-bit cache at 5-24 rows, the FP8 cache's unchanged
    buckets = (1, 2, 4, 8, 12, 16, 24, 32, 64)
    assert [A.num_splits_for(b, 8, 132, bf16) for b in buckets] == [16, 16, 9, 10, 6, 6, 4, 2, 1]
    assert [A.num_splits_for(b, 8, 132, e4m3) for b in buckets] == [16, 16, 9, 5, 3, 3, 2, 2, 1]
    assert [A.num_splits_for(b, 8, 132) for b in buckets] == [16, 16, 9, 5, 3, 3, 2, 2, 1]
    # balanced chunks: a grid of 4x the plain count, at most 16
    assert [A.balanced_splits_for(b, 8, 132) for b in buckets] == [16, 16, 16, 16, 12, 12, 8, 8, 4]
