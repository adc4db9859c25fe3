"""The Preprocess -> VLM hop in Ray Serve composition: a DeploymentResponse passed as a top-level
argument (Serve's router waits for the upstream result, then routes the downstream call) against
its ObjectRef nested in an argument (the downstream call is routed at once and its replica awaits
the pixels). Three stand-in deployments on a local Ray cluster: ``Pre`` sleeps like an image
decode and returns uint8 patches of a 1920x1088 image (6.3 MB, as Preprocess's compact form),
``Down`` records when it got the pixels, ``Front`` composes the two either way.

    python benchmarks/compose_hop_probe.py --n 60 --out OUT

Per mode: the gap from the end of ``Pre``'s method to ``Down`` holding the pixels, and the
client's round trip, in ms (P50 / P95 / mean), interleaved requests so that both see the same
machine state.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import ray
from ray import serve


@serve.deployment(max_ongoing_requests=16)
class Pre:
    async def process(self, work_s: float) -> dict:
        await asyncio.sleep(work_s)
        return {"pixels": np.zeros((8160, 3, 16, 16), np.uint8), "t_end": time.time()}


@serve.deployment(max_ongoing_requests=64)
class Down:
    async def take(self, images, nested: bool) -> dict:
        t_in = time.time()
        if nested:
            images = await images[0]
        return {"t_in": t_in, "t_have": time.time(), "t_end_pre": images["t_end"],
                "nbytes": int(images["pixels"].nbytes)}


@serve.deployment(max_ongoing_requests=64)
class Front:
    def __init__(self, pre, down):
        self.pre, self.down = pre, down

    async def __call__(self, nested: bool, work_s: float) -> dict:
        t0 = time.time()
        resp = self.pre.process.remote(work_s)
        if nested:
            out = await self.down.take.remote([await resp._to_object_ref()], True)
        else:
            out = await self.down.take.remote(resp, False)
        return {**out, "t0": t0}


def _pct(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"p50": round(xs[len(xs) // 2], 2), "p95": round(xs[int(0.95 * (len(xs) - 1))], 2),
            "mean": round(statistics.fmean(xs), 2)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=60, help="requests per mode")
    ap.add_argument("--work-ms", type=float, default=20.0, help="Pre's sleep per request")
    ap.add_argument("--gap-ms", type=float, default=50.0, help="pause between requests")
    ap.add_argument("--cpus", type=int, default=4)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    ray.init(num_cpus=a.cpus, include_dashboard=False, log_to_driver=False)
    handle = serve.run(Front.bind(Pre.bind(), Down.bind()), name="hop", route_prefix=None)
    rows = {False: [], True: []}
    for i in range(a.n * 2 + 10):
        nested = bool(i % 2)
        r = handle.remote(nested, a.work_ms / 1000).result()
        r["rt"] = time.time() - r["t0"]
        if i >= 10:                      # the first calls warm routers and workers
            rows[nested].append(r)
        time.sleep(a.gap_ms / 1000)
    out = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "work_ms": a.work_ms, "requests_per_mode": a.n}
    for nested, rs in rows.items():
        out["nested_ref" if nested else "top_level_response"] = {
            "pre_end_to_pixels_ms": _pct([(r["t_have"] - r["t_end_pre"]) * 1000 for r in rs]),
            "round_trip_ms": _pct([r["rt"] * 1000 for r in rs]),
            "pixels_mb": round(rs[0]["nbytes"] / 1e6, 1)}
    print(json.dumps(out, indent=1))
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        Path(a.out, "compose_hop.json").write_text(json.dumps(out, indent=1))
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
