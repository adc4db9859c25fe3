"""How long a request waits in Serve's router past the moment a slot of a full target frees.

Why: at 17 QPS the shipped GPU profile's VLM cap (24) makes a TTFT tail of ~1 s (RESULTS.md, "the
VLM admission cap"). A caller's router that finds every replica full probes the replica's queue
length again after a backoff of 25 ms doubling up to 0.5 s (``RAY_SERVE_ROUTER_RETRY_{INITIAL,
MAX}_BACKOFF_S``), so a request may start well after its slot frees. This measures that
overshoot with no model: a ``Slow`` deployment (``max_ongoing_requests`` 2, each call holds its
slot for ``--hold-ms``) is called ``--requests`` times at once through a handle from a ``Caller``
replica, whose process gets the backoff environment of each variant. A request's overshoot is
when it started on ``Slow`` minus when the call two places before it (2 slots) ended.

    python benchmarks/router_backoff_probe.py --requests 12 --hold-ms 300
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import ray
from ray import serve


@serve.deployment(max_ongoing_requests=2)
class Slow:
    def __init__(self, hold_s: float):
        self.hold_s = hold_s

    async def __call__(self, sent: float) -> tuple[float, float]:
        start = time.time()
        await asyncio.sleep(self.hold_s)
        return sent, start


@serve.deployment
class Caller:
    def __init__(self, slow):
        self.slow = slow

    async def run(self, n: int) -> list[tuple[float, float]]:
        calls = []
        for _ in range(n):
            calls.append(self.slow.remote(time.time()))
            await asyncio.sleep(0.001)     # keep the order: FIFO slot accounting below
        return list(await asyncio.gather(*calls))


def measure(env: dict, n: int, hold_s: float, rounds: int) -> dict:
    app = Caller.options(ray_actor_options={"runtime_env": {"env_vars": env}}).bind(Slow.bind(hold_s))
    handle = serve.run(app, name="probe", route_prefix=None)
    handle.run.remote(2).result()          # warm: replicas up, queue lengths known
    overs = []
    for _ in range(rounds):
        res = sorted(handle.run.remote(n).result(), key=lambda r: r[1])
        for i, (sent, start) in enumerate(res[2:], start=2):
            slot_free = res[i - 2][1] + hold_s        # 2 slots: the call two places earlier ends
            overs.append(1000 * (start - max(sent, slot_free)))
        time.sleep(0.5)
    serve.delete("probe")
    overs.sort()
    return {"env": env, "requests": len(overs), "overshoot_ms_mean": round(statistics.mean(overs), 1),
            "overshoot_ms_p95": round(overs[int(0.95 * (len(overs) - 1))], 1),
            "overshoot_ms_max": round(overs[-1], 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--hold-ms", type=float, default=300)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    ray.init(num_cpus=2, include_dashboard=False)
    rows = [measure(env, a.requests, a.hold_ms / 1000, a.rounds) for env in (
        {}, {"RAY_SERVE_ROUTER_RETRY_MAX_BACKOFF_S": "0.05"},
        {"RAY_SERVE_ROUTER_RETRY_INITIAL_BACKOFF_S": "0.005", "RAY_SERVE_ROUTER_RETRY_MAX_BACKOFF_S": "0.02"})]
    print("| router backoff env | requests | overshoot past the free slot, mean / P95 / max ms |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['env'] or 'defaults (25 ms doubling to 500 ms)'} | {r['requests']} | "
              f"{r['overshoot_ms_mean']} / {r['overshoot_ms_p95']} / {r['overshoot_ms_max']} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
