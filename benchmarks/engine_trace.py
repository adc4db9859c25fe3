"""Where the engine's wall time goes on the GPU: torch-profiler traces of the whole engine path.

``engine_bench.py`` times the model (synchronised, one step) and the engine end to end; the
difference between the two is host time the GPU waits for. This runs a few scenarios through
``ContinuousEngine.generate`` under the profiler (with Python stacks) and reports, per scenario,
the wall time, the GPU busy time (union of kernel and copy intervals), and the longest GPU-idle
gaps with the Python functions the engine thread was in during each gap.

    python benchmarks/engine_trace.py --model /tmp/m --out $OUT/trace
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_bench import make_request, run_requests  # noqa: E402
from serve_app.engine.config import EngineConfig  # noqa: E402
from serve_app.engine.continuous import ContinuousEngine  # noqa: E402

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}


def gpu_gaps(trace: dict, t0_us: float, t1_us: float, top: int = 12) -> dict:
    """GPU busy time (union of device intervals) inside [t0, t1] and the longest idle gaps, each
    with the innermost Python frames of the engine thread that overlap it."""
    ev = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    dev = sorted((e["ts"], e["ts"] + e.get("dur", 0)) for e in ev if e.get("cat") in GPU_CATS)
    gaps, last_end = [], t0_us
    for a, b in dev:
        a, b = max(a, t0_us), min(b, t1_us)
        if b <= a:
            continue
        if a > last_end:
            gaps.append((last_end, a))
        last_end = max(last_end, b)
    if t1_us > last_end:
        gaps.append((last_end, t1_us))
    py = [e for e in ev if e.get("cat") == "python_function"]
    engine_tids = {e["tid"] for e in py if "scheduler.py" in e.get("name", "")}
    ours = [e for e in py if e["tid"] in engine_tids and any(
        f in e["name"] for f in ("scheduler.py", "runner.py", "vision.py", "sampler.py", "continuous.py", "kernel"))]
    # per gap: our engine-thread frames overlapping it, innermost (shortest) first
    framed = [(a, b, sorted((e for e in ours if e["ts"] < b and e["ts"] + e.get("dur", 0) > a),
                            key=lambda e: e.get("dur", 0))) for a, b in gaps]
    idle = Counter()
    for a, b, frames in framed:
        idle[frames[0]["name"] if frames else "(engine thread outside our code)"] += (b - a) / 1000
    longest = sorted(framed, key=lambda g: g[0] - g[1])[:top]
    out_gaps = [{"start_ms": round((a - t0_us) / 1000, 3), "ms": round((b - a) / 1000, 3),
                 "engine_frames": list(dict.fromkeys(e["name"] for e in frames))[:6]}
                for a, b, frames in longest]
    busy = (t1_us - t0_us) - sum(b - a for a, b in gaps)
    return {"wall_ms": round((t1_us - t0_us) / 1000, 3), "gpu_busy_ms": round(busy / 1000, 3),
            "gpu_busy_pct": round(100 * busy / max(1.0, t1_us - t0_us), 1),
            "idle_ms_by_engine_frame": {k: round(v, 3) for k, v in idle.most_common(15)},
            "longest_gaps": out_gaps}


async def scenario(engine, name: str, reqs, out_dir: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.cuda.is_available()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts, with_stack=True) as prof:
        t0 = time.perf_counter()
        with torch.profiler.record_function("scenario_start"):
            pass
        r = await run_requests(engine, reqs)
        if cuda:
            torch.cuda.synchronize()
        with torch.profiler.record_function("scenario_end"):
            pass
    path = out_dir / f"{name}.json.gz"
    prof.export_chrome_trace(str(path))            # gzip-compressed by its suffix
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    marks = {e["name"]: e["ts"] for e in trace["traceEvents"] if e.get("name", "").startswith("scenario_")}
    res = {"wall_s_perf": round(time.perf_counter() - t0, 4), "requests": r,
           **gpu_gaps(trace, marks["scenario_start"], marks["scenario_end"])}
    print(name, json.dumps(res, indent=1), flush=True)
    return res


async def main_async(args) -> dict:
    cfg = EngineConfig(model=args.model, engine="continuous", device=args.device,
                       dtype="bfloat16" if args.device == "cuda" else "float32",
                       max_gpu_memory_gb=args.max_gpu_memory_gb, max_num_seqs=64, max_model_len=4096,
                       max_prefill_tokens=8192, quantization=args.quantization)
    engine = ContinuousEngine(cfg)
    await engine.start()
    rng = np.random.default_rng(11)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    await run_requests(engine, [make_request(100 + i, rng, 8, greedy=False) for i in range(4)])  # warm-up
    res = {}
    for n in (1, 4):
        await run_requests(engine, [make_request(200 + 10 * n + i, rng, 1) for i in range(n)])
        res[f"prefill{n}"] = await scenario(engine, f"prefill{n}", [make_request(300 + 10 * n + i, rng, 1)
                                                                   for i in range(n)], out_dir)
    res["decode3_sampled"] = await scenario(engine, "decode3_sampled",
                                            [make_request(400 + i, rng, args.decode_tokens, greedy=False)
                                             for i in range(3)], out_dir)
    await engine.shutdown()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:qwen3-vl-4b-random")
    ap.add_argument("--out", default="benchmarks/out/trace")
    ap.add_argument("--max-gpu-memory-gb", type=float, default=24.0)
    ap.add_argument("--decode-tokens", type=int, default=48)
    ap.add_argument("--quantization", choices=["fp8"], default=None)
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of the script (tiny model)")
    args = ap.parse_args()
    from serve_app.models import resolve_model
    args.model = resolve_model(args.model)
    res = asyncio.run(main_async(args))
    (Path(args.out) / "engine_trace.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
