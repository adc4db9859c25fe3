"""GPU SLO sweeps of the whole app over HTTP (issue 6), Ray started before anything else.

    python3 benchmarks/gpu_sweep.py OUT_DIR [--seconds N] [--uncapped]
    # the same flow on a CPU box, as a smoke test of the script itself:
    python benchmarks/gpu_sweep.py /tmp/s --config deployments.yaml --model builtin:tiny-qwen3-vl \\
        --device cpu --qps 0.5,1 --hf-qps 0.25 --cpus 8 --seconds 300 --step 10

On the GPU machine the sweep's own in-process start once timed out (Ray's node never registered
when Ray was started after the workload and NVML were set up); starting Ray first, then sweeping
the app's URL, avoids it. The app is the shipped GPU profile, ``deployments.gpu.yaml`` (VLM memory
capped at 24 GB, an A10's budget), minus the TableExtractor (the workload asks no table questions).

Runs: the continuous engine up the QPS ladder until the first SLO miss (one bisection step), then
the naive ``hf-generate`` engine at low loads, then (``--uncapped``) the continuous engine and the
naive one with 90 % of the card. Each writes OUT_DIR/<name>/sweep.{json,md,png}, also after every step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen.server import LocalServe, build_serve_config, memory_overrides  # noqa: E402
from serve_app.config import AppConfig  # noqa: E402
from serve_app.engine.config import CONTINUOUS_ONLY  # noqa: E402


# Before a run's first step: imports, Ray's start (~13 s) and the app's (59-69 s on the H200
# machines); with a warm-up load, the images' encoding (~4 s), its 5 s of quiet and the loadgen's own
# 3-s warm-up; after each step, the drain. A 420-s budget for a 300-s step passed the old check (75 +
# 10 s) and then missed its step by ~3 s on the H200 (RESULTS.md "GPU: decode rows ... 5 minutes").
# Fresh machines took 83, 96 and 105 s to "app ready" on 2026-11-30; a 235-s budget for a 90-s step
# passed the 85-s check and then skipped its step ("the banded resize in the app", call 4). One took
# 117 s on 2026-12-01, and a 460-s budget for a 300-s step then skipped its step ("24 QPS with both
# FP8 options", call 1); warm machines take 55-71 s.
START_S, WARMUP_EXTRA_S, DRAIN_S = 125.0, 15.0, 15.0


def first_step_shortfall(seconds: float, step: float, warmup_load: float, kept: float = 0.0) -> float:
    """Seconds the budget lacks for the first run to reach the end of its first step (0: it
    fits), ``kept`` being held back for the runs after it. A device call whose budget is too short
    otherwise spends its minutes starting an app that measures nothing."""
    need = START_S + (warmup_load + WARMUP_EXTRA_S if warmup_load else 0.0) + step + DRAIN_S
    return max(0.0, need - (seconds - kept))


def loadgen_argv(a: argparse.Namespace, name: str, url: str, qps: str, budget: float) -> list[str]:
    """The ``benchmarks.loadgen sweep`` command line of one run."""
    pool = ["--pool-seed", str(a.pool_seed)] if a.pool_seed is not None else []
    return ["sweep", "--url", url, "--qps", qps, "--duration", str(a.step), "--warmup", "3",
            "--drain", str(DRAIN_S), "--refine", "1", "--warmup-requests", "2",
            "--warmup-load", str(a.warmup_load), "--seed", str(a.seed), *pool,
            "--time-budget", str(budget), "--title", f"{name}: {a.model}", "--out", f"{a.out}/{name}"]


def run_config(a: argparse.Namespace, engine: str, cap: float | None, replicas: int, port: int) -> dict:
    """The Serve config of one run: the yaml with this run's engine fields and VLM replicas (and,
    with ``--device cpu``, no GPUs asked for)."""
    cpu = a.device == "cpu"
    vlm = {"autoscaling_config": {"min_replicas": replicas, "max_replicas": replicas}}
    vlm_gpus = None if cpu else (a.replica_gpus if replicas > 1 and a.replica_gpus else 1.0 / replicas)
    cfg = build_serve_config(a.config, port=port, engine=engine_overrides(a, engine, cap),
                             deployments={"VLM": vlm}, vlm_num_gpus=vlm_gpus)
    if cpu:
        for d in cfg["applications"][0]["deployments"]:
            d.get("ray_actor_options", {}).pop("num_gpus", None)
    return cfg


def engine_overrides(a: argparse.Namespace, engine: str, cap: float | None) -> dict:
    """The engine fields one run sets over the yaml's. The continuous-engine options (the
    ``--quantization`` and ``--engine-json`` ones, and the yaml's own, such as
    ``separate_process``) go to continuous runs only: every other engine gets them off, which its
    config requires."""
    eng = {"model": a.model, "engine": engine, **memory_overrides(cap)}
    if engine == "continuous":
        if a.quantization:
            eng["quantization"] = a.quantization
        eng.update(json.loads(a.engine_json or "{}"))
    else:
        eng.update(CONTINUOUS_ONLY)
    if a.device:
        eng["device"] = a.device
    if a.device == "cpu":
        eng["dtype"] = "float32"
    return eng


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--config", default=str(ROOT / "deployments.gpu.yaml"))
    p.add_argument("--model", default="builtin:qwen3-vl-4b-random")
    p.add_argument("--device", default=None, help="engine.device (default: the config's)")
    p.add_argument("--cap-gb", type=float, default=24.0, help="VLM memory cap of the capped runs")
    p.add_argument("--uncapped", action="store_true", help="also sweep with no memory cap")
    p.add_argument("--two-replicas", default=None, metavar="QPS",
                   help="last: two VLM replicas packed on one GPU (num_gpus 0.5, each capped at "
                        "--cap-gb), swept over these QPS (issue 7's one-GPU part)")
    p.add_argument("--replica-gpus", type=float, default=None,
                   help="num_gpus per VLM replica in the --two-replicas run (default 0.5: both on one "
                        "card; 1 on a two-GPU machine puts one replica on each GPU)")
    p.add_argument("--only", default=None, metavar="NAMES",
                   help="comma-separated runs to do (capped-continuous, capped-hf-generate, "
                        "uncapped-continuous, uncapped-hf-generate, two-replicas-one-gpu or -two-gpus); default: all asked for")
    p.add_argument("--seconds", type=float, default=440, help="time budget for all sweeps")
    p.add_argument("--qps", default="8,12,16,20,24,28,32,40")
    p.add_argument("--hf-qps", default="0.1,0.25")
    p.add_argument("--hf-seconds", type=float, default=100, help="time kept back for hf-generate")
    p.add_argument("--step", type=float, default=20, help="seconds of load per step")
    p.add_argument("--cpus", type=float, default=12, help="Ray logical CPUs")
    p.add_argument("--warmup-load", type=float, default=0.0, metavar="SECONDS",
                   help="unmeasured load at half the first step's rate before each sweep, then 5 s idle "
                        "(a fresh app's first step ran worst in the H200 sweeps; 0: none, as all sweeps "
                        "in RESULTS.md until then)")
    p.add_argument("--engine-json", default=None, metavar="JSON",
                   help='more engine settings for the continuous runs, e.g. \'{"vision_cache_mb": 0}\'')
    p.add_argument("--quantization", choices=["fp8"], default=None,
                   help="engine.quantization of the continuous runs (hf-generate stays in bf16)")
    p.add_argument("--seed", type=int, default=0,
                   help="the load generator's seed (arrivals, classes, image picks; the image pool too "
                        "unless --pool-seed); 0 gives the arrivals of every earlier sweep in RESULTS.md")
    p.add_argument("--pool-seed", type=int, default=None,
                   help="the image pool's own seed (default: --seed). Pool 0 averages 1,186 prompt "
                        "tokens per request, pool 1 1,097: hold it at 0 to compare arrivals alone")
    p.add_argument("--no-budget-check", action="store_true",
                   help="start even if --seconds looks too short for the first step")
    a = p.parse_args()
    t_end = time.time() + a.seconds
    runs = [("capped-continuous", "continuous", a.cap_gb, a.qps, 1),
            ("capped-hf-generate", "hf-generate", a.cap_gb, a.hf_qps, 1)]
    if a.uncapped:
        runs += [("uncapped-continuous", "continuous", None, a.qps, 1),
                 ("uncapped-hf-generate", "hf-generate", None, a.hf_qps, 1)]
    if a.two_replicas:
        name = "two-replicas-two-gpus" if (a.replica_gpus or 0.5) > 0.5 else "two-replicas-one-gpu"
        runs.append((name, "continuous", a.cap_gb, a.two_replicas, 2))
    if a.only:
        runs = [r for r in runs if r[0] in a.only.split(",")]
    # seconds kept for each later run: app (re)start + warm-up + two or three short steps
    reserve = {"capped-hf-generate": a.hf_seconds, "uncapped-continuous": 150, "uncapped-hf-generate": a.hf_seconds,
               "two-replicas-one-gpu": 130,
               "two-replicas-two-gpus": 130}
    short = first_step_shortfall(a.seconds, a.step, a.warmup_load, sum(reserve[r[0]] for r in runs[1:]))
    if runs and short and not a.no_budget_check:
        print(f"--seconds {a.seconds:g} is ~{short:.0f} s short of {runs[0][0]}'s first step (start "
              f"~{START_S:.0f} s, warm-up, a {a.step:g}-s step and {DRAIN_S:.0f} s of drain, plus what the "
              f"later runs keep): raise it, or pass --no-budget-check", file=sys.stderr)
        return 2
    for name, engine, cap, _, replicas in runs:   # a bad engine field fails here, not in a replica's log
        try:
            AppConfig.model_validate(run_config(a, engine, cap, replicas, 8000)["applications"][0]["args"])
        except ValueError as e:
            print(f"{name}: the app's config is invalid: {e}", file=sys.stderr)
            return 2
    srv = LocalServe(num_cpus=a.cpus)  # first: before NVML, images, or anything else
    from benchmarks.loadgen.cli import main as loadgen

    try:
        for i, (name, engine, cap, qps, replicas) in enumerate(runs):
            left = t_end - time.time()
            if left < 60:
                print(f"skip {name}: {left:.0f} s left", flush=True)
                continue
            cfg = run_config(a, engine, cap, replicas, srv.port)
            t = time.time()
            url = srv.deploy(cfg)
            print(f"{name}: app ready in {time.time() - t:.0f} s", flush=True)
            keep = sum(reserve[r[0]] for r in runs[i + 1:])  # time kept for the runs after this
            budget = max(30.0, t_end - time.time() - keep)
            loadgen(loadgen_argv(a, name, url, qps, budget))
    finally:
        srv.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
