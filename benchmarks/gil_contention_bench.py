"""Decode pace of the continuous engine while its replica's event loop is busy: in-process vs
``engine.separate_process`` (CPU, tiny model).

In a Serve replica the engine thread shares the GIL with the event loop that streams every request
through Ray. This stands in for that load with a loop task that runs Python for ``--burst-ms`` and
then yields, at a duty cycle of ``--duty`` (0-1), while 8 requests decode. The engine's decode
steps per second and the loop's achieved duty are compared between the engine in the replica's
process (one GIL) and in its own process.

    python benchmarks/gil_contention_bench.py --duty 0,0.3,0.6,0.9 --seconds 6
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._host import loop_load  # noqa: E402
from serve_app.engine import create_engine  # noqa: E402
from serve_app.engine.config import EngineConfig  # noqa: E402
from serve_app.engine.protocol import EngineRequest, SamplingParams  # noqa: E402


async def _one(engine, duty: float, burst_s: float, seconds: float, rows: int) -> dict:
    stop = asyncio.Event()
    done = [0.0]

    async def stream(i: int):
        n = 0
        while not stop.is_set():
            n += 1
            req = EngineRequest(f"d{duty}-{i}-{n}", [100 + i, 200, 300], [],
                                SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True))
            gen = engine.generate(req)
            try:
                async for _ in gen:
                    if stop.is_set():
                        break
            finally:
                await gen.aclose()
    tasks = [asyncio.create_task(stream(i)) for i in range(rows)]
    await asyncio.sleep(1.0)                             # all rows decoding
    load = asyncio.create_task(loop_load(duty, burst_s, stop, done)) if duty > 0 else None
    await asyncio.sleep(0.5)
    s0, d0, t0 = await _stats(engine), done[0], time.perf_counter()
    await asyncio.sleep(seconds)
    s1, d1, t1 = await _stats(engine), done[0], time.perf_counter()
    stop.set()
    for t in tasks + ([load] if load else []):
        t.cancel()
    await asyncio.gather(*tasks, *([load] if load else []), return_exceptions=True)
    def grew(k):
        return s1[f"host_{k}_s_total"] - s0[f"host_{k}_s_total"]
    # the engine thread's own timers: in step(), and between turns (neither stepping, idle,
    # taking requests nor pushing stats: e.g. waiting for the GIL)
    loop = grew("loop")
    gap = loop - grew("step") - grew("idle") - grew("inbox") - grew("tick")
    return {"duty": duty, "decode_steps_per_s": round((s1["decode_steps"] - s0["decode_steps"]) / (t1 - t0), 1),
            "loop_work_pct": round(100 * (d1 - d0) / (t1 - t0), 1),
            "engine_step_pct": round(100 * grew("step") / max(loop, 1e-9), 1),
            "engine_tick_pct": round(100 * grew("tick") / max(loop, 1e-9), 1),
            "engine_gap_pct": round(100 * max(0.0, gap) / max(loop, 1e-9), 1)}


def _walk_ms() -> dict:
    """What counting the frozen objects costs here (``gc.get_freeze_count()`` walks them; the
    engine's stats once called it on every push): objects frozen and ms per count, best of 5."""
    import gc
    best = min(_timed(gc.get_freeze_count) for _ in range(5))
    return {"frozen_objects": gc.get_freeze_count(), "freeze_count_ms": round(1e3 * best, 2)}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


async def _stats(engine) -> dict:
    if getattr(engine, "_proc", None) is not None:
        await asyncio.sleep(0.3)                         # the child pushes its stats every 0.25 s
    return engine.stats()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:tiny-qwen3-vl")
    p.add_argument("--duty", default="0,0.3,0.6,0.9")
    p.add_argument("--burst-ms", type=float, default=2.0)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    rows, walk = [], {}
    for separate in (False, True):
        cfg = EngineConfig(model=a.model, engine="continuous", device="cpu", dtype="float32",
                           max_num_seqs=a.rows, max_model_len=20_000, separate_process=separate)

        async def run():
            engine = create_engine(cfg)
            await engine.start()
            try:
                if not separate:      # the in-process engine froze this process's start-up objects
                    walk.update(_walk_ms())
                return [await _one(engine, float(d), a.burst_ms / 1000, a.seconds, a.rows)
                        for d in a.duty.split(",")]
            finally:
                await engine.shutdown()
        for r in asyncio.run(run()):
            rows.append({"engine": "separate process" if separate else "in-process", **r})
    print(f"gc.get_freeze_count() over {walk.get('frozen_objects')} frozen objects: {walk.get('freeze_count_ms')} ms")
    print("| engine | loop duty asked | loop work achieved % | decode steps/s | "
          "engine thread in step / stats push / between turns % |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['engine']} | {r['duty']:g} | {r['loop_work_pct']} | {r['decode_steps_per_s']} | "
              f"{r['engine_step_pct']} / {r['engine_tick_pct']} / {r['engine_gap_pct']} |")
    if a.out:
        Path(a.out).write_text(json.dumps({"gc_walk": walk, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
