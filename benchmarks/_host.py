"""The benchmark host's CPU, recorded with GPU figures (no heavy imports: engine-only scripts use it)."""

from __future__ import annotations

import platform
import time
from typing import Any


def host_speed() -> dict[str, Any]:
    """The CPU model and a single-thread Python figure (best of 2 runs of a 3M-step loop). The
    engine's eager GPU paths (prefill, vision tower) are bound by their launches on the host
    (RESULTS.md, "FP8 decode kernels with swapped roles, host-bound prefill"), so sweeps on two
    machines of one GPU kind can differ by their CPUs."""
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        sum(i * i for i in range(3_000_000))
        times.append(time.perf_counter() - t0)
    return {"cpu_model": model or platform.processor() or None, "python_loop_3m_s": round(min(times), 3)}
