"""One timer for the GPU probes: host launch time, GPU time between events, and wall time of a
call, as medians (no heavy imports: a probe's CPU dry-run imports it too)."""

from __future__ import annotations

import time

import torch


def measure(fn, reps: int = 6, digits: int = 2) -> dict:
    """Medians over ``reps - 1`` calls (the first is a warm-up) of: host ms to return from
    ``fn`` without a sync, GPU ms between events around it, wall ms until it is done."""
    rows = []
    for _ in range(reps):
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        b.record()
        b.synchronize()
        rows.append(((t1 - t0) * 1e3, a.elapsed_time(b), (time.perf_counter() - t0) * 1e3))
    med = lambda i: round(sorted(r[i] for r in rows[1:])[len(rows[1:]) // 2], digits)  # noqa: E731
    return {"host_launch_ms": med(0), "gpu_ms": med(1), "wall_ms": med(2)}
