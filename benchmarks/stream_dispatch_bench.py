"""Event-loop CPU per streamed token: the engine's stream interval against the VLM's old wrapper.

The VLM replica's event loop shares the GIL with the continuous engine's thread, so its CPU per
decode step is time a step may wait to launch. This drives ``ContinuousEngine``'s real
``generate`` / ``_emit`` / ``_dispatch`` path with no model: a thread emits one delta per stream
per "step" at a fixed rate (as the engine thread does), N consumers read the streams as the VLM
does, and the loop thread's CPU time is measured. Modes:

- ``per-step``: interval 0, one item per step (``stream_interval_ms: 0``);
- ``wrapper``: interval 0 in the engine, merged by ``coalesce_deltas`` around the stream (the
  VLM's path before the engine took the interval);
- ``engine``: ``EngineRequest.stream_interval_s`` (the engine holds and merges in ``_dispatch``).

    python benchmarks/stream_dispatch_bench.py --streams 16 --steps-per-s 300 --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_app.engine.config import EngineConfig  # noqa: E402
from serve_app.engine.continuous import ContinuousEngine  # noqa: E402
from serve_app.engine.protocol import EngineRequest, TokenDelta, coalesce_deltas  # noqa: E402


class _NoLimits:
    """Stands in for the engine's ``RequestLimits``: every request is accepted."""
    patch_dim = 1536

    def check(self, request) -> None:
        pass


def run(mode: str, streams: int, steps_per_s: float, seconds: float, interval_s: float,
        tokens: int = 117) -> dict:
    engine = ContinuousEngine(EngineConfig(engine="continuous", device="cpu"))
    engine._limits, engine._ready = _NoLimits(), True
    stop = threading.Event()
    items_seen = [0]

    def emitter():           # the engine thread: one delta per open stream per step
        k = 0
        next_t = time.perf_counter()
        while not stop.is_set():
            rids = list(engine._streams)
            k += 1
            engine._emit([(rid, TokenDelta(rid, " tok", [k], 1000, k % tokens + 1,
                                           "length" if k % tokens == 0 else None)) for rid in rids])
            next_t += 1 / steps_per_s
            time.sleep(max(0.0, next_t - time.perf_counter()))

    async def consumer(i: int):
        n = 0
        while not stop.is_set():
            n += 1
            req = EngineRequest(f"s{i}-{n}", [1, 2, 3], stream_interval_s=interval_s if mode == "engine" else 0.0)
            stream = engine.generate(req)
            deltas = coalesce_deltas(stream, interval_s) if mode == "wrapper" else stream
            try:
                async for d in deltas:
                    items_seen[0] += 1
                    json.dumps({"t": d.text, "n": d.num_generated_tokens})   # the VLM's per-item work, roughly
                    if d.finish_reason is not None:
                        break
            finally:
                await deltas.aclose()               # closes the engine's stream too

    async def main():
        engine._loop = asyncio.get_running_loop()
        tasks = [asyncio.create_task(consumer(i)) for i in range(streams)]
        await asyncio.sleep(0.2)
        th = threading.Thread(target=emitter, daemon=True)
        th.start()
        await asyncio.sleep(0.5)                # warm-up
        c0, w0, i0 = time.thread_time(), time.perf_counter(), items_seen[0]
        await asyncio.sleep(seconds)
        cpu, wall, items = time.thread_time() - c0, time.perf_counter() - w0, items_seen[0] - i0
        stop.set()
        th.join()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return cpu, wall, items

    cpu, wall, items = asyncio.run(main())
    return {"mode": mode, "streams": streams, "steps_per_s": steps_per_s, "interval_ms": interval_s * 1000,
            "loop_cpu_pct": round(100 * cpu / wall, 1), "items_per_s": round(items / wall, 1),
            "loop_cpu_us_per_stream_step": round(1e6 * cpu / (wall * steps_per_s * streams), 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--steps-per-s", type=float, default=300)
    p.add_argument("--seconds", type=float, default=5)
    p.add_argument("--interval-ms", type=float, default=50)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    rows = [run(m, a.streams, a.steps_per_s, a.seconds, a.interval_ms / 1000)
            for m in ("per-step", "wrapper", "engine")]
    print("| mode | streams | steps/s | loop CPU % | items/s | loop CPU µs per stream-step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['streams']} | {r['steps_per_s']:g} | {r['loop_cpu_pct']} | {r['items_per_s']} | "
              f"{r['loop_cpu_us_per_stream_step']} |")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
