"""Command line of the load generator: ``python -m benchmarks.loadgen {run,sweep} ...``.

Examples::

    # one open-loop run against a running service
    python -m benchmarks.loadgen run --url http://127.0.0.1:8000 --qps 2 --duration 30
    # 12 closed-loop sessions for 60 s
    python -m benchmarks.loadgen run --url http://127.0.0.1:8000 --mode closed --sessions 12
    # SLO sweep of both engines, each started in-process from deployments.yaml
    python -m benchmarks.loadgen sweep --engines continuous,hf-generate --qps 0.5,1,2,4 \\
        --loads-for hf-generate=0.25,0.5,1 --out benchmarks/out/sweep
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from benchmarks._host import host_speed
from benchmarks.loadgen.client import LoadSpec, check_local, run_load
from benchmarks.loadgen.metrics import (ResourceSampler, blocked_cell, engine_breakdown, markdown_table,
                                        now_stamp, summarize)
from benchmarks.loadgen.server import (ROOT, LocalServe, build_serve_config, cpus_needed, gpu_count,
                                      memory_overrides)
from benchmarks.loadgen.sweep import (SLO, SweepPlan, get_stats, run_sweep, step_line, warm_up,
                                      warm_up_load, write_json)
from benchmarks.loadgen.workload import (RESOLUTIONS, Workload, build_image_pool, classes_with_tokens,
                                         mean_output_tokens, pool_summary)

log = logging.getLogger("loadgen")


def _floats(s: str) -> list[float]:
    return [float(x) for x in s.split(",") if x.strip()]


def _kv(s: str, sep: str = ",") -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in s.split(sep))):
        k, _, v = part.partition("=")
        out[k.strip()] = v.strip()
    return out


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {"host": platform.node(), "platform": platform.platform(),
                            "python": platform.python_version(), "cpus": os.cpu_count(),
                            "load_avg_1m_at_start": round(os.getloadavg()[0], 2), **host_speed()}
    try:
        import psutil

        info["memory_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        info["gpus"] = [pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i))
                        for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:
        info["gpus"] = []
    info["code_sha"] = code_sha()
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                            capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:
        pass
    return info


def code_sha() -> str:
    """Hash of serve_app's Python sources: names the code that ran where git metadata cannot
    (a device's copy of a working tree may carry a stale .git or none)."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted((ROOT / "serve_app").rglob("*.py")):
        h.update(str(f.relative_to(ROOT)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:12]


def add_workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--tokens", default="", help="output tokens per class, e.g. "
                   "'short_description=48,detail_recognition=128' (defaults 48/128/192/128)")
    g.add_argument("--pool-size", type=int, default=32, help="distinct JPEGs encoded before the run")
    g.add_argument("--reuse-images", action="store_true",
                   help="send identical bytes for a pooled image (lets server caches hit)")
    g.add_argument("--no-force-lengths", action="store_true", help="do not send ignore_eos/min_tokens")
    g.add_argument("--turns", type=int, default=3, help="closed loop: turns per conversation")
    g.add_argument("--think-time", type=float, default=0.0, help="closed loop: mean pause (s) between turns")
    g.add_argument("--seed", type=int, default=0,
                   help="arrivals, request classes, image picks; also the image pool unless --pool-seed")
    g.add_argument("--pool-seed", type=int, default=None,
                   help="seed of the image pool alone (default: --seed). The pool's 32 images set the "
                        "prompt size: pools 0-9 average 911-1153 image tokens per image, so hold the pool fixed "
                        "to compare arrivals, or vary it to see the spread")
    g.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--resolutions", default=None,
                   help="image sizes to draw from, e.g. '640x480,800x600' (default 640x480..1920x1080)")
    g.add_argument("--model-name", default=None, help="'model' field (default: from /v1/models)")


def add_load_args(p: argparse.ArgumentParser, step: bool) -> None:
    g = p.add_argument_group("load")
    g.add_argument("--mode", choices=["open", "closed"], default="open")
    g.add_argument("--duration", type=float, default=20.0 if step else 30.0,
                   help="seconds of load" + (" per step" if step else ""))
    g.add_argument("--max-requests", type=int, default=None, help="request budget per run/step")
    g.add_argument("--warmup", type=float, default=2.0 if step else 0.0,
                   help="seconds at the start of each run not measured")
    g.add_argument("--drain", type=float, default=20.0,
                   help="seconds to wait for open requests after the window; the rest are errors")
    g.add_argument("--request-timeout", type=float, default=120.0)
    g.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --url")


def add_server_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("in-process server (when no --url)")
    g.add_argument("--config", default=str(ROOT / "deployments.yaml"))
    g.add_argument("--model", default=None, help="engine.model (default: the config's)")
    g.add_argument("--device", default=None)
    g.add_argument("--dtype", default=None)
    g.add_argument("--max-gpu-memory-gb", type=float, default=None, help="0 = no cap")
    g.add_argument("--kv-cache-tokens", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=None)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--quantization", choices=["fp8"], default=None, help="engine.quantization")
    g.add_argument("--cache-dir", default=None, help="where built-in models are built")
    g.add_argument("--deployments", default=None,
                   help="JSON: per-deployment overrides, e.g. '{\"VLM\": {\"max_ongoing_requests\": 128}}'")
    g.add_argument("--vlm-num-gpus", type=float, default=None,
                   help="VLM ray_actor_options.num_gpus (default: 1 when a GPU is present)")
    g.add_argument("--num-cpus", type=float, default=None, help="Ray logical CPUs (default: what the "
                   "config's replicas need at max scale)")
    g.add_argument("--ready-timeout", type=float, default=900.0)


def engine_overrides(a: argparse.Namespace) -> dict[str, Any]:
    keys = ("model", "device", "dtype", "max_gpu_memory_gb", "kv_cache_tokens", "max_num_seqs",
            "max_model_len", "cache_dir", "quantization")
    out = {k: getattr(a, k) for k in keys if getattr(a, k) is not None}
    if out.get("max_gpu_memory_gb", 1) <= 0:  # 0 = uncapped, whatever the config says
        out.update(memory_overrides(None))
    return out


def make_workload(url: str, a: argparse.Namespace) -> Workload:
    import httpx

    name = a.model_name
    if name is None:
        name = httpx.get(f"{url}/v1/models", timeout=10, trust_env=False).json()["data"][0]["id"]
    classes = classes_with_tokens({k: int(v) for k, v in _kv(a.tokens).items()})
    t = time.time()
    res = RESOLUTIONS
    if a.resolutions:
        res = tuple(tuple(int(v) for v in r.lower().split("x")) for r in a.resolutions.split(","))
    pool_seed = a.seed if a.pool_seed is None else a.pool_seed
    pool = build_image_pool(a.pool_size, pool_seed, resolutions=res)
    log.info("encoded %d images in %.1f s: %s", len(pool), time.time() - t, pool_summary(pool))
    return Workload(name, classes, pool=pool, seed=a.seed, pool_seed=pool_seed,
                    unique_images=not a.reuse_images, force_lengths=not a.no_force_lengths,
                    temperature=a.temperature, top_p=a.top_p)


def workload_info(w: Workload) -> dict[str, Any]:
    return {"classes": [{"name": c.name, "weight": c.weight, "max_tokens": c.max_tokens,
                         "images": c.n_images} for c in w.classes],
            "mean_output_tokens": round(mean_output_tokens(w.classes), 1),
            "unique_images": w.unique_images, "force_lengths": w.force_lengths,
            "temperature": w.temperature, "top_p": w.top_p,
            "pool": {**pool_summary(w.pool), "seed": w.pool_seed}}


def base_spec(a: argparse.Namespace) -> LoadSpec:
    return LoadSpec(mode=a.mode, duration_s=a.duration, max_requests=a.max_requests,
                    turns=a.turns, think_time_s=a.think_time, drain_s=a.drain,
                    request_timeout_s=a.request_timeout, seed=a.seed)


class Target:
    """Either the given --url, or an in-process app per engine (started/replaced on demand)."""

    def __init__(self, a: argparse.Namespace):
        self.a, self.server, self.cfg = a, None, None
        if a.url:
            if not a.allow_remote:
                check_local(a.url)

    def url_for(self, engine: str | None) -> str:
        a = self.a
        if a.url:
            return a.url.rstrip("/")
        over = engine_overrides(a)
        if engine:
            over["engine"] = engine
        gpus = a.vlm_num_gpus if a.vlm_num_gpus is not None else (1.0 if gpu_count() else None)
        self.cfg = build_serve_config(a.config, port=0, engine=over,
                                      deployments=json.loads(a.deployments) if a.deployments else None,
                                      vlm_num_gpus=gpus)
        if self.server is None:
            self.server = LocalServe(a.num_cpus or max(2.0, cpus_needed(self.cfg)), cache_dir=a.cache_dir)
        t = time.time()
        url = self.server.deploy(self.cfg, a.ready_timeout)
        log.info("app (%s) ready at %s in %.0f s", engine or "config engine", url, time.time() - t)
        return url

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()


def cmd_run(a: argparse.Namespace) -> int:
    target = Target(a)
    try:
        url = target.url_for(a.engine)
        w = make_workload(url, a)
        spec = base_spec(a)
        spec.qps, spec.sessions = a.qps, a.sessions
        before, tb = get_stats(url), time.perf_counter()
        with ResourceSampler() as sampler:
            run = asyncio.run(run_load(url, w, spec, allow_remote=a.allow_remote))
        after, ta = get_stats(url), time.perf_counter()
        step = {"engine": (after or {}).get("vlm", {}).get("engine", a.engine or "?"),
                "summary": summarize(run, a.warmup), "resources": sampler.summary(),
                "engine_time": engine_breakdown(before, after, ta - tb)}
        print(step_line(step))
        if a.out:
            out = Path(a.out)
            write_json(out / "run.json", {"meta": meta(a, w), "run": step,
                                          "requests": [r.to_dict() for r in run.results]})
            (out / "run.md").write_text(markdown_table([step], "offered QPS" if a.mode == "open"
                                                       else "sessions") + "\n")
            print(f"wrote {out}/run.json, run.md")
    finally:
        target.close()
    return 0


def meta(a: argparse.Namespace, w: Workload | None) -> dict[str, Any]:
    argv = list(sys.argv)
    if argv and argv[0].endswith("__main__.py"):
        argv[0:1] = ["python", "-m", "benchmarks.loadgen"]
    return {"date": now_stamp(), "command": " ".join(shlex.quote(x) for x in argv),
            "machine": machine_info(), "workload": workload_info(w) if w else None,
            "server": "url" if a.url else {"config": a.config, "engine_overrides": engine_overrides(a)}}


def cmd_sweep(a: argparse.Namespace) -> int:
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    engines = [e for e in (a.engines or "").split(",") if e] or [None]
    loads_for = {k: _floats(v) for k, v in _kv(a.loads_for, ";").items()} if a.loads_for else {}
    deadline = time.time() + a.time_budget if a.time_budget else None
    slo = SLO(a.slo_ttft, a.slo_e2e)
    target = Target(a)
    results: dict[str, Any] = {"meta": meta(a, None), "sweeps": []}
    w = None
    try:
        for engine in engines:
            if deadline and time.time() > deadline - (30 if a.url else 90):  # (app start +) one short step
                log.warning("time budget spent before engine %s", engine)
                break
            label = engine or "target"
            try:
                url = target.url_for(engine)
            except Exception as e:  # one engine failing to start must not lose the others' results
                log.error("engine %s did not start: %s", label, e)
                results["sweeps"].append({"engine": label, "mode": a.mode, "steps": [],
                                          "error": f"did not start: {e}"[:2000]})
                write_json(out / "sweep.json", results)
                continue
            if w is None:
                w = make_workload(url, a)
                results["meta"]["workload"] = workload_info(w)
            if engine is None:
                label = (get_stats(url) or {}).get("vlm", {}).get("engine", "target")
            errs = asyncio.run(warm_up(url, w, a.warmup_requests))
            if errs:
                log.warning("warm-up errors on %s: %s", label, errs)
            loads = loads_for.get(label) or _floats(a.loads)
            if a.warmup_load > 0 and a.mode == "open":
                spec = replace(base_spec(a), qps=a.warmup_load_qps or loads[0] / 2,
                               duration_s=a.warmup_load, seed=a.seed + 7919)
                wl = warm_up_load(url, w, spec, a.warmup_idle, a.allow_remote)
                results["meta"].setdefault("warmup_load", {})[label] = wl
                print(f"warm-up load on {label}: {wl}", flush=True)
            plan = SweepPlan(loads, base_spec(a), a.warmup, a.refine, not a.no_stop, deadline)
            partial = {"engine": label, "mode": a.mode, "steps": [], "slo": asdict(slo)}
            results["sweeps"].append(partial)

            def on_step(step, partial=partial):
                print(step_line(step), flush=True)
                partial["steps"].append(step)
                write_json(out / "sweep.json", results)
                write_reports(results, out, a.title)  # a run killed at its time limit keeps these

            res = run_sweep(url, w, plan, slo, label, on_step, a.allow_remote)
            res["server_config"] = target.cfg
            partial.clear()
            partial.update(res)
            write_json(out / "sweep.json", results)
            print(f"[{label}] max load at SLO: {res['max_at_slo']}  (first miss: {res['first_miss']}, "
                  f"max achieved {res['max_achieved_qps']} qps){' ' + res['stopped'] if res['stopped'] else ''}",
                  flush=True)
    finally:
        target.close()
        write_json(out / "sweep.json", results)
        write_reports(results, out, a.title)
    return 0


def write_reports(results: dict[str, Any], out: Path, title: str = "") -> None:
    sweeps = [s for s in results["sweeps"] if s.get("steps")]
    if not sweeps:
        return
    mode = sweeps[0]["mode"]
    label = "offered QPS" if mode == "open" else "sessions"
    m = results["meta"]
    mach, wl = m.get("machine") or {}, m.get("workload") or {}
    slo = sweeps[0].get("slo") or {}
    lines = [f"# Load sweep {m['date']}", "", f"`{m['command']}`", "",
             f"Machine: {mach.get('cpus')} CPUs ({mach.get('cpu_model')}; Python loop "
             f"{mach.get('python_loop_3m_s')} s; 1-min load {mach.get('load_avg_1m_at_start')} at start), "
             f"{mach.get('memory_gb')} GB, GPUs {mach.get('gpus') or 'none'}, "
             f"commit {mach.get('git_commit')}, serve_app sources {mach.get('code_sha')}. "
             f"Workload: mean output {wl.get('mean_output_tokens')} tokens, "
             f"images {wl.get('pool')}, temperature {wl.get('temperature')}. "
             f"SLO: P95 TTFT <= {slo.get('ttft_p95_s')} s, P95 e2e <= {slo.get('e2e_p95_s')} s, no errors.", "",
             markdown_table([st for s in sweeps for st in s["steps"]], label), "",
             "| engine | max load at SLO | achieved QPS there | first miss | max achieved QPS | note |",
             "|---|---|---|---|---|---|"]
    for s in results["sweeps"]:
        best = s.get("max_at_slo") or {}
        note = s.get("stopped") or s.get("error") or ("" if "max_at_slo" in s else "in progress")
        lines.append(f"| {s['engine']} | {best.get('offered', 'none')} | {best.get('achieved_qps', '-')} | "
                     f"{s.get('first_miss', '-')} | {s.get('max_achieved_qps', '-')} | {note} |")
    lines += ["", "Engine time per step (from /v1/stats; 'other' = scheduling and idle; with the engine's "
              "vision_stream or prefill_stream the phases run on two CUDA streams and overlap, so "
              "their shares can add up to over 100 %):", "",
              "| engine | load | prefill s | decode s | other % | decode ms/step | mean decode batch | "
              "prefill tok/s | prefill graph replays / eager passes | engine thread busy / CPU % | "
              "engine loop gap / idle % | engine queue mean / P95 under ms | admission held by rows / "
              "prefill backlog / KV pages % | arrivals within 10 ms of the last: engine / Poisson % | "
              "engine TTFT mean / P95 under ms | engine e2e mean / P95 under ms |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in sweeps:
        for st in s["steps"]:
            et = st.get("engine_time") or {}
            c = et.get("counters") or {}
            if et.get("decode_s") is not None:
                lines.append(f"| {s['engine']} | {st['summary']['offered']:g} | {et['prefill_s']} | "
                             f"{et['decode_s']} | {et['other_pct']} | {et.get('decode_ms_per_step', '-')} | "
                             f"{et.get('mean_decode_batch', '-')} | {et.get('prefill_tokens_per_s', '-')} | "
                             f"{c.get('prefill_graph_replays', '-')} / {c.get('prefill_eager_passes', '-')} | "
                             f"{et.get('host_busy_pct', '-')} / {et.get('host_cpu_pct', '-')} | "
                             f"{et.get('host_gap_pct', '-')} / {et.get('host_idle_pct', '-')} | "
                             f"{et.get('engine_queue_mean_ms', '-')} / {et.get('engine_queue_p95_le_ms', '-')} | "
                             f"{blocked_cell(et)} | {et.get('engine_gaps_within_10ms_pct', '-')} / "
                             f"{et.get('poisson_gaps_within_10ms_pct', '-')} | "
                             f"{et.get('engine_ttft_mean_ms', '-')} / {et.get('engine_ttft_p95_le_ms', '-')} | "
                             f"{et.get('engine_e2e_mean_ms', '-')} / {et.get('engine_e2e_p95_le_ms', '-')} |")
    sliced = [(s["engine"], st["summary"]) for s in sweeps for st in s["steps"] if st["summary"].get("slices")]
    if sliced:
        ms = lambda v: "-" if v is None else f"{1000 * v:.0f}"  # noqa: E731
        lines += ["", "Long steps by slice of request start times (the SLO's percentiles per slice):", "",
                  "| engine | load | slice start s | seconds | requests | errors | TTFT P95 ms | e2e P95 ms |",
                  "|---|---|---|---|---|---|---|---|"]
        for e, sm in sliced:
            lines += [f"| {e} | {sm['offered']:g} | {x['start_s']:g} | {x['seconds']:g} | {x['requests']} | "
                      f"{x['errors']} | {ms(x['ttft_p95'])} | {ms(x['e2e_p95'])} |" for x in sm["slices"]]
    starts = [(s["engine"], s["engine_info"]) for s in sweeps if s.get("engine_info")]
    if starts:
        keys = ("startup_s", "graph_capture_s", "prefill_graph_capture_s", "kv_tokens", "quantization")
        lines += ["", "Engine start-up (from /readyz):", "", "| engine | " + " | ".join(keys) + " |",
                  "|---|" + "---|" * len(keys)]
        lines += [f"| {e} | " + " | ".join(str(i.get(k, "-")) for k in keys) + " |" for e, i in starts]
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    if os.environ.get("LOADGEN_NO_PLOT"):  # e.g. a device run that may bring back only a few files
        return
    try:
        from benchmarks.loadgen.plot import plot_sweeps

        plot_sweeps(sweeps, out / "sweep.png", title)
    except ImportError as e:
        log.warning("no plot (pip install matplotlib): %s", e)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.loadgen", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="one load run")
    r.add_argument("--url", default=None, help="target service (default: start one in-process)")
    r.add_argument("--engine", default=None, help="in-process: engine.engine")
    r.add_argument("--qps", type=float, default=1.0, help="open loop: Poisson arrival rate")
    r.add_argument("--sessions", type=int, default=12, help="closed loop: concurrent sessions")
    r.add_argument("--out", default=None, help="folder for run.json / run.md")
    add_load_args(r, False)
    add_workload_args(r)
    add_server_args(r)
    s = sub.add_parser("sweep", help="SLO sweep over offered load")
    s.add_argument("--url", default=None, help="target service (default: start one per --engines)")
    s.add_argument("--engines", default=None, help="in-process: engines to measure in turn, "
                   "e.g. continuous,hf-generate")
    s.add_argument("--loads", "--qps", dest="loads", default="0.5,1,2,4,8,12,16,24,32",
                   help="offered QPS (open) or sessions (closed) per step, ascending")
    s.add_argument("--loads-for", default=None,
                   help="per-engine step lists: 'hf-generate=0.1,0.2;continuous=1,2,4'")
    s.add_argument("--refine", type=int, default=1, help="steps after the first miss: bisection, or "
                   "15 %% lower while the very first step misses")
    s.add_argument("--no-stop", action="store_true", help="run every step even after a miss")
    s.add_argument("--slo-ttft", type=float, default=0.412, help="P95 TTFT SLO (s)")
    s.add_argument("--slo-e2e", type=float, default=1.86, help="P95 end-to-end SLO (s)")
    s.add_argument("--warmup-requests", type=int, default=4)
    s.add_argument("--warmup-load", type=float, default=0.0, metavar="SECONDS",
                   help="open mode: this long of unmeasured load before the first step (0: none)")
    s.add_argument("--warmup-load-qps", type=float, default=None,
                   help="its rate (default: half the first step's)")
    s.add_argument("--warmup-idle", type=float, default=5.0,
                   help="seconds of quiet after it (the engine builds queued attention plans when idle)")
    s.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole sweep; steps that would not finish are skipped")
    s.add_argument("--title", default="")
    s.add_argument("--out", required=True, help="folder for sweep.json / sweep.md / sweep.png")
    add_load_args(s, True)
    add_workload_args(s)
    add_server_args(s)
    pl = sub.add_parser("plot", help="re-write sweep.md / sweep.png from a sweep.json")
    pl.add_argument("dir", help="folder holding sweep.json")
    pl.add_argument("--title", default="")
    a = p.parse_args(argv)
    if a.cmd == "plot":
        d = Path(a.dir)
        write_reports(json.loads((d / "sweep.json").read_text()), d, a.title)
        print(f"wrote {d}/sweep.md" + (", sweep.png" if (d / "sweep.png").exists() else ""))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    return cmd_run(a) if a.cmd == "run" else cmd_sweep(a)

