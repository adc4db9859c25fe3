"""The benchmark host's CPU, recorded with GPU figures (no heavy imports: engine-only scripts use it)."""

from __future__ import annotations

import asyncio
import json
import platform
import time
from typing import Any


def host_speed() -> dict[str, Any]:
    """The CPU model and a single-thread Python figure (best of 5 runs of a 3M-step loop). The
    engine's eager GPU paths (prefill, vision tower) are bound by their launches on the host
    (RESULTS.md, "FP8 decode kernels with swapped roles, host-bound prefill"), so sweeps on two
    machines of one GPU kind can differ by their CPUs. Best of 5, not 2: one H200 machine read
    0.139, 0.144 and 0.240 s at the start of three calls in a row (RESULTS.md "GPU: 36 admitted
    rows"), so two runs could take a passing stall for a slow host."""
    model = None
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), None)
    except OSError:
        pass
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        sum(i * i for i in range(3_000_000))
        times.append(time.perf_counter() - t0)
    return {"cpu_model": model or platform.processor() or None, "python_loop_3m_s": round(min(times), 3)}


async def loop_load(duty: float, burst_s: float, stop: asyncio.Event, done: list) -> None:
    """A stand-in for a busy event loop (Ray streaming every request): Python for ``burst_s``,
    then sleep so that the work is ``duty`` of the time; ``done[0]`` adds up the busy seconds."""
    payload = {"text": "x" * 64, "ids": list(range(16))}
    while not stop.is_set():
        t = time.perf_counter()
        while time.perf_counter() - t < burst_s:
            json.loads(json.dumps(payload))
        done[0] += time.perf_counter() - t
        await asyncio.sleep(burst_s * (1 - duty) / duty)
