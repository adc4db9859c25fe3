"""Autoscaling run: rising then falling open-loop load; VLM/Preprocess replica counts over time.

Starts the app in-process from ``deployments.yaml`` with autoscaling overrides (VLM 1..2 replicas,
small ``target_ongoing_requests``, short delays), offers a piecewise-Poisson load profile, samples
``serve.status()`` every second from the driver and writes ``autoscale.json``, ``autoscale.md`` and
``autoscale.png`` (offered/completed QPS and P95 latency above, replicas per deployment below).

    python benchmarks/autoscale_run.py --out benchmarks/results/autoscale-cpu
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.loadgen.cli import (add_server_args, add_workload_args, engine_overrides,  # noqa: E402
                                    make_workload, meta, workload_info)
from benchmarks.loadgen.client import LoadSpec, run_load  # noqa: E402
from benchmarks.loadgen.metrics import ResourceSampler, percentile, summarize  # noqa: E402
from benchmarks.loadgen.server import (LocalServe, build_serve_config, cpus_needed,  # noqa: E402
                                       replica_counts)
from benchmarks.loadgen.sweep import write_json  # noqa: E402

log = logging.getLogger("loadgen")

# Small targets and short delays so a few minutes of CPU load show a scale-up and a scale-down.
DEFAULT_OVERRIDES: dict[str, dict[str, Any]] = {
    "VLM": {"max_ongoing_requests": 8,
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2,
                                   "upscale_delay_s": 3, "downscale_delay_s": 15,
                                   "look_back_period_s": 5, "metrics_interval_s": 1}},
    "Preprocess": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 2,
                                          "target_ongoing_requests": 2, "upscale_delay_s": 3,
                                          "downscale_delay_s": 15, "look_back_period_s": 5,
                                          "metrics_interval_s": 1}},
}
DEFAULT_PROFILE = "20:0.3,45:3,20:1,60:0.1"


def parse_profile(s: str) -> list[tuple[float, float]]:
    """``"20:0.3,60:2"`` -> ``[(20.0, 0.3), (60.0, 2.0)]`` (seconds:qps phases)."""
    out = []
    for part in s.split(","):
        d, _, q = part.partition(":")
        out.append((float(d), float(q)))
    if not out or any(d <= 0 or q < 0 for d, q in out):
        raise ValueError(f"bad profile {s!r}")
    return out


def offered_at(profile: list[tuple[float, float]], t: float) -> float:
    end = 0.0
    for d, q in profile:
        end += d
        if t < end:
            return q
    return 0.0


class ReplicaSampler:
    """Samples ``serve.status()`` replica states once per ``interval_s`` on a thread."""

    def __init__(self, t0: float, interval_s: float = 1.0):
        self.t0, self.interval_s = t0, interval_s
        self.samples: list[dict[str, Any]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="replica-sampler")

    def _loop(self) -> None:
        while not self._stop.is_set():
            t = time.perf_counter() - self.t0
            try:
                self.samples.append({"t": round(t, 2), "replicas": replica_counts()})
            except Exception as e:  # a slow controller must not end the run
                log.warning("serve.status() failed: %s", e)
            self._stop.wait(self.interval_s)

    def start(self) -> "ReplicaSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def running(sample: dict[str, Any], name: str) -> int:
    return sample["replicas"].get(name, {}).get("RUNNING", 0)


def timeline(samples: list[dict[str, Any]], results: list, profile: list[tuple[float, float]],
             rate_window_s: float = 5.0, latency_window_s: float = 10.0) -> list[dict[str, Any]]:
    """Per replica sample: offered QPS, completed QPS and P95 e2e over trailing windows."""
    out = []
    ok = [r for r in results if r.ok]
    for s in samples:
        t = s["t"]
        done = [r for r in ok if t - rate_window_s < r.end <= t]
        lat = [r.e2e for r in ok if t - latency_window_s < r.end <= t]
        out.append({"t": t, "offered_qps": offered_at(profile, t),
                    "completed_qps": round(len(done) / rate_window_s, 3),
                    "e2e_p95_s": percentile(lat, 95), "replicas": s["replicas"]})
    return out


def scale_events(samples: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """Times at which the RUNNING replica count of ``name`` changed."""
    events, prev = [], None
    for s in samples:
        n = running(s, name)
        if prev is not None and n != prev:
            events.append({"t": s["t"], "from": prev, "to": n})
        prev = n
    return events


def _target(sample: dict[str, Any], name: str) -> int:
    """Replicas ``name`` is meant to have: every state but STOPPING."""
    return sum(v for k, v in sample["replicas"].get(name, {}).items() if k != "STOPPING")


def replacements(samples: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """Replicas Serve stopped and replaced (failed health checks), which are not scale events: a
    replica went STOPPING while the target count did not fall."""
    out, prev = [], None
    for s in samples:
        stopping = s["replicas"].get(name, {}).get("STOPPING", 0)
        if prev is not None and stopping > prev[0] and _target(s, name) >= prev[1]:
            out.append({"t": s["t"], "running": running(s, name)})
        prev = (stopping, _target(s, name))
    return out


def scale_up_latencies(samples: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """For each scale-up of ``name``: when the controller decided it (the target count - replicas
    in any state but STOPPING - grew: a STARTING replica appeared that replaces none) and when the
    new replicas served (RUNNING reached the new count); resolution = the sampling interval."""
    out, prev_total, pending = [], None, None
    for s in samples:
        total = _target(s, name)
        if prev_total is not None and total > prev_total and pending is None:
            pending = {"decided_t": s["t"], "from": prev_total, "to": total}
        if pending is not None:
            pending["to"] = max(pending["to"], total)
            if running(s, name) >= pending["to"]:
                pending["serving_t"] = s["t"]
                pending["seconds"] = round(s["t"] - pending["decided_t"], 2)
                out.append(pending)
                pending = None
        prev_total = total
    if pending is not None:
        out.append({**pending, "serving_t": None, "seconds": None})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--engine", default=None, help="engine.engine (default: the config's)")
    p.add_argument("--profile", default=DEFAULT_PROFILE, help="seconds:qps phases of the open loop")
    p.add_argument("--cooldown", type=float, default=60.0,
                   help="after the load: keep sampling (no load) until VLM is back to its minimum, "
                        "at most this many seconds")
    p.add_argument("--overrides", default=json.dumps(DEFAULT_OVERRIDES),
                   help="JSON per-deployment overrides merged into the config")
    p.add_argument("--metrics-push-s", type=float, default=1.0,
                   help="RAY_SERVE_{REPLICA,HANDLE}_AUTOSCALING_METRIC_PUSH_INTERVAL_S (Serve's default "
                        "is 10 s, which slows every reaction by up to that much)")
    p.add_argument("--request-timeout", type=float, default=120.0)
    p.add_argument("--sample-interval", type=float, default=0.5,
                   help="seconds between serve.status() samples (the scale-up timing resolution)")
    p.add_argument("--title", default="")
    add_workload_args(p)
    add_server_args(p)
    a = p.parse_args(argv)
    a.url = None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    profile = parse_profile(a.profile)
    overrides = json.loads(a.overrides)
    if a.deployments:
        overrides.update(json.loads(a.deployments))
    eng = engine_overrides(a)
    if a.engine:
        eng["engine"] = a.engine
    cfg = build_serve_config(a.config, port=0, engine=eng, deployments=overrides)
    env = {k: str(a.metrics_push_s) for k in ("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S",
                                                "RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S")}
    num_cpus = a.num_cpus or cpus_needed(cfg)
    server = LocalServe(num_cpus, cache_dir=a.cache_dir, env=env)
    try:
        url = server.deploy(cfg, a.ready_timeout)
        w = make_workload(url, a)
        spec = LoadSpec(mode="open", profile=profile, drain_s=30, request_timeout_s=a.request_timeout,
                        seed=a.seed)
        t0 = time.perf_counter()
        sampler = ReplicaSampler(t0, a.sample_interval).start()
        log.info("load profile %s (%.0f s), Ray num_cpus=%s", profile, spec.duration_s, num_cpus)
        with ResourceSampler() as res:
            run = asyncio.run(run_load(url, w, spec, t0=t0))
        # No load now: wait for the VLM to scale back to its minimum (or the cooldown to pass).
        vlm_cfg = next(d for d in cfg["applications"][0]["deployments"] if d["name"] == "VLM")
        vlm_min = (vlm_cfg.get("autoscaling_config") or {}).get("min_replicas", 1)
        end = time.time() + a.cooldown
        while time.time() < end:
            if sampler.samples and running(sampler.samples[-1], "VLM") <= vlm_min \
                    and any(running(s, "VLM") > vlm_min for s in sampler.samples):
                break
            time.sleep(1)
        time.sleep(2)
        sampler.stop()
    finally:
        server.shutdown()
    tl = timeline(sampler.samples, run.results, profile)
    summary = summarize(run)
    events = {name: scale_events(sampler.samples, name) for name in ("VLM", "Preprocess")}
    scale_ups = {name: scale_up_latencies(sampler.samples, name) for name in ("VLM", "Preprocess")}
    replaced = {name: replacements(sampler.samples, name) for name in ("VLM", "Preprocess")}
    peak = {name: max((running(s, name) for s in sampler.samples), default=0)
            for name in ("VLM", "Preprocess")}
    result = {"meta": {**meta(a, w), "profile": profile, "overrides": overrides, "num_cpus": num_cpus,
                       "metric_push_interval_s": a.metrics_push_s},
              "summary": summary, "resources": res.summary(), "scale_events": events,
              "scale_up_latency": scale_ups, "replacements": replaced,
              "peak_running": peak, "timeline": tl, "workload": workload_info(w)}
    write_json(out / "autoscale.json", result)
    lines = [f"# Autoscaling run {result['meta']['date']}", "", f"`{result['meta']['command']}`", "",
             f"profile (s:qps): {a.profile}; requests {summary['requests']}, ok {summary['ok']}, "
             f"errors {summary['errors'] or 0}", ""]
    for name, ev in events.items():
        lines.append(f"- {name}: peak {peak[name]} RUNNING; RUNNING count changes: "
                     + (", ".join(f"t={e['t']:.0f}s {e['from']}->{e['to']}" for e in ev) or "none")
                     + "; scale-up decision -> serving: "
                     + (", ".join(f"{u['from']}->{u['to']} at t={u['decided_t']:.1f}s: "
                                  + (f"{u['seconds']:.1f} s" if u["seconds"] is not None else "never served")
                                  for u in scale_ups[name]) or "none")
                     + ("; replaced (failed health checks) at " + ", ".join(f"t={r['t']:.0f}s" for r in replaced[name])
                        if replaced[name] else ""))
    gpu = result["resources"].get("gpu_mem_peak_gb_per_device")
    if gpu:
        lines.append(f"- GPU memory peak per device (GB): {gpu}")
    (out / "autoscale.md").write_text("\n".join(lines) + "\n")
    try:
        from benchmarks.loadgen.plot import plot_autoscale

        engine = cfg["applications"][0]["args"]["engine"].get("engine")
        plot_autoscale(tl, out / "autoscale.png",
                       a.title or f"autoscaling ({engine} engine), load profile s:qps {a.profile}")
    except ImportError as e:
        log.warning("no plot (pip install matplotlib): %s", e)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
