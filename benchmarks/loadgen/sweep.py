"""SLO sweep: raise the offered load step by step until the SLO breaks; report the max load at SLO.

One step = one bounded load run (open loop at a QPS, or closed loop with N sessions) with resource
sampling and a before/after ``/v1/stats`` snapshot for the engine's time split. Results are written
after every step, so a sweep cut short (time limit) still leaves its JSON.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import httpx

from benchmarks.loadgen.client import LoadSpec, make_client, run_load, send
from benchmarks.loadgen.metrics import (SLO_E2E_P95_S, SLO_TTFT_P95_S, ResourceSampler, arrival_clumping,
                                        blocked_cell, engine_breakdown, slo_check, summarize)
from benchmarks.loadgen.workload import Turn, Workload


@dataclass
class SLO:
    ttft_p95_s: float = SLO_TTFT_P95_S
    e2e_p95_s: float = SLO_E2E_P95_S


@dataclass
class SweepPlan:
    loads: list[float]                      # QPS (open) or sessions (closed), ascending
    base: LoadSpec = field(default_factory=LoadSpec)
    warmup_s: float = 2.0                   # per step: requests started earlier are not measured
    refine: int = 0                         # bisection steps between the last pass and first miss
    stop_on_miss: bool = True
    deadline: float | None = None           # time.time() after which no new step starts


def _get_json(url: str) -> dict[str, Any] | None:
    try:
        r = httpx.get(url, timeout=10, trust_env=False)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def get_stats(url: str) -> dict[str, Any] | None:
    return _get_json(f"{url}/v1/stats")


def get_engine_info(url: str) -> dict[str, Any] | None:
    """``/readyz``'s engine description (start-up and capture seconds, KV tokens, kernel plans)."""
    return _get_json(f"{url}/readyz")


async def warm_up(url: str, workload: Workload, n: int = 4, timeout_s: float = 300) -> list[str]:
    """``n`` concurrent requests (classes in turn) so load/JIT/cache effects miss the first step."""
    async with make_client() as client:
        t0 = time.perf_counter()
        turns = []
        for i in range(n):
            cls, messages = workload.first_turn(workload.classes[i % len(workload.classes)])
            turns.append(Turn(cls.name, workload.body(cls, messages), 0))
        done = await asyncio.gather(*(send(client, url, t, t0, timeout_s) for t in turns))
    return [res.error or "?" for res, _ in done if not res.ok]


def warm_up_load(url: str, workload: Workload, spec: LoadSpec, idle_s: float,
                 allow_remote: bool = False) -> dict[str, Any]:
    """Unmeasured load before the first step, then ``idle_s`` of quiet. A fresh app serves its
    first minute differently: attention shapes it has no cuDNN plan for yet run on flash until
    the engine is idle long enough to build plans (one at a time), and caches are cold. Today's
    H200 sweeps saw their worst step first. Returns what the warm-up did, for the report."""
    t0 = time.perf_counter()
    run = asyncio.run(run_load(url, workload, spec, allow_remote=allow_remote))
    time.sleep(idle_s)
    ok = sum(1 for r in run.results if r.ok)
    return {"qps": spec.qps, "seconds": spec.duration_s, "idle_s": idle_s, "requests": len(run.results),
            "ok": ok, "errors": len(run.results) - ok, "wall_s": round(time.perf_counter() - t0, 1)}


def run_step(url: str, workload: Workload, spec: LoadSpec, warmup_s: float,
             slo: SLO | None = None, allow_remote: bool = False) -> dict[str, Any]:
    """One measured load run: summary, resources, engine time split, SLO verdict."""
    before, tb = get_stats(url), time.perf_counter()
    with ResourceSampler() as sampler:
        run = asyncio.run(run_load(url, workload, spec, allow_remote=allow_remote))
    after, ta = get_stats(url), time.perf_counter()
    summary = summarize(run, warmup_s)
    et = engine_breakdown(before, after, ta - tb)
    if et is not None:
        et.update(arrival_clumping(before["vlm"], after["vlm"], summary["offered_qps_actual"]))
    step: dict[str, Any] = {"spec": asdict(spec), "summary": summary, "resources": sampler.summary(),
                            "engine_time": et,
                            "engine_stats_after": (after or {}).get("vlm")}
    if slo is not None:
        step["slo_violations"] = slo_check(summary, slo.ttft_p95_s, slo.e2e_p95_s)
    return step


def run_sweep(url: str, workload: Workload, plan: SweepPlan, slo: SLO = SLO(), label: str = "",
          on_step: Callable[[dict[str, Any]], None] | None = None,
          allow_remote: bool = False) -> dict[str, Any]:
    """Run the plan's steps in order; stop at the first SLO miss (then optionally bisect)."""
    steps: list[dict[str, Any]] = []
    first_miss: float | None = None
    stopped = None
    engine_info = get_engine_info(url)

    def do(load: float) -> bool:
        nonlocal stopped
        step_len = plan.base.duration_s + plan.base.drain_s
        if plan.deadline is not None and time.time() + step_len > plan.deadline:
            stopped = f"time budget: step {load:g} not started"
            return False
        spec = replace(plan.base, qps=load) if plan.base.mode == "open" else \
            replace(plan.base, sessions=int(load))
        spec = replace(spec, seed=plan.base.seed + len(steps))
        step = run_step(url, workload, spec, plan.warmup_s, slo, allow_remote)
        step["engine"] = label
        steps.append(step)
        if on_step:
            on_step(step)
        return not step["slo_violations"]

    passed: list[float] = []
    for load in plan.loads:
        if do(load):
            passed.append(load)
        elif stopped:
            break
        else:
            first_miss = load if first_miss is None else first_miss
            if plan.stop_on_miss:
                break
    hi = first_miss
    lo = max((x for x in passed if hi is None or x < hi), default=None)
    left = plan.refine
    # The first step already missed: the refine steps go down (x0.85) until one passes, then bisect
    # (a ladder started just above the knee otherwise ends with no load at the SLO at all).
    going_down = lo is None and hi is not None and hi == plan.loads[0]
    while going_down and lo is None and left > 0 and not stopped:
        down = round(hi * 0.85, 3) if plan.base.mode == "open" else int(hi * 0.85)
        if down <= 0 or down == hi:
            break
        left -= 1
        if do(down):
            lo = down
        elif not stopped:
            hi = first_miss = down
    for _ in range(left):
        if lo is None or hi is None or stopped:
            break
        mid = (lo + hi) / 2 if plan.base.mode == "open" else (lo + hi) // 2
        if mid in (lo, hi):
            break
        mid = round(mid, 3)
        if do(mid):
            lo = mid
        else:
            hi = mid
    # The max load at SLO is the highest step below the first miss: a lucky pass above a miss
    # (possible with --no-stop) does not count.
    best = None
    for st in sorted(steps, key=lambda s: s["summary"]["offered"]):
        if st["slo_violations"]:
            break
        best = {"offered": st["summary"]["offered"], "achieved_qps": st["summary"]["achieved_qps"]}
    max_ach = max((s["summary"]["achieved_qps"] for s in steps), default=None)
    return {"engine": label, "mode": plan.base.mode, "steps": steps,
            "max_at_slo": best,           # highest offered load whose step met the SLO (None: none did)
            "first_miss": hi, "max_achieved_qps": max_ach, "stopped": stopped,
            "slo": asdict(slo), "engine_info": engine_info}


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


def step_line(step: dict[str, Any]) -> str:
    s = step["summary"]
    et = step.get("engine_time") or {}
    ms = lambda x: "-" if x is None else f"{x * 1000:.0f}"  # noqa: E731
    split = ""
    if et.get("prefill_pct") is not None:
        vis = "-" if et.get("vision_pct") is None else f"{et['vision_pct']:.0f}"
        split = (f" prefill/vision/decode/other {et['prefill_pct']:.0f}/{vis}/{et['decode_pct']:.0f}/"
                 f"{et['other_pct']:.0f}%")
    if et.get("engine_ttft_mean_ms") is not None:
        split += (f" engine TTFT mean {et['engine_ttft_mean_ms']:.0f} ms, P95 <= "
                  f"{et['engine_ttft_p95_le_ms'] or 'inf'} ms")
    if et.get("engine_queue_mean_ms") is not None:
        split += (f" (queue mean {et['engine_queue_mean_ms']:.0f} ms, P95 <= "
                  f"{et['engine_queue_p95_le_ms'] or 'inf'} ms; admission held by rows/backlog/KV "
                  f"{blocked_cell(et)}%)")
    if et.get("engine_gaps_within_10ms_pct") is not None:
        split += (f", arrivals within 10 ms {et['engine_gaps_within_10ms_pct']}% "
                  f"(Poisson {et['poisson_gaps_within_10ms_pct']}%)")
    if et.get("gc_collections") is not None:
        split += f", GC {et['gc_collections']} collections {1000 * et['gc_pause_s']:.0f} ms"
    if et.get("engine_e2e_mean_ms") is not None:
        split += (f", engine e2e mean {et['engine_e2e_mean_ms']:.0f} ms, P95 <= "
                  f"{et['engine_e2e_p95_le_ms'] or 'inf'} ms")
    if et.get("host_gap_pct") is not None:
        split += (f", engine thread busy {et.get('host_busy_pct')}% gap {et['host_gap_pct']}% "
                  f"idle {et.get('host_idle_pct')}% tick {et.get('host_tick_pct')}% emit {et.get('host_emit_pct')}%")
    if s.get("slices"):
        split += ", TTFT P95 per slice " + "/".join(ms(x["ttft_p95"]) for x in s["slices"]) + " ms"
    verdict = ""
    if "slo_violations" in step:
        verdict = " SLO ok" if not step["slo_violations"] else " SLO MISS: " + "; ".join(step["slo_violations"])
    return (f"[{step.get('engine', '')}] {s['mode']} {s['offered']:g}: {s['requests']} req, "
            f"achieved {s['achieved_qps']:.2f} qps, TTFT p50/p95 {ms(s['ttft_s']['p50'])}/"
            f"{ms(s['ttft_s']['p95'])} ms, e2e p50/p95 {ms(s['e2e_s']['p50'])}/{ms(s['e2e_s']['p95'])} ms, "
            f"TPOT p50 {ms(s['tpot_s']['p50'])} ms, errors {s['errors'] or 0}{split}{verdict}")
