"""Open-loop load straight into the continuous engine: Poisson arrivals of the article's request
mix, per engine variant and rate, the same seeded arrivals for every variant.

    python3 benchmarks/engine_arrivals.py OUT --model /tmp/m --quantization fp8 \\
        --variants '{"shipped": {}, "prefill_stream": {"prefill_stream": true}}' --qps 18,21,24

Why: an app sweep step costs ~85 s of device time (app start, warm-up, a 30-s window, drain) and
carries the serving layer's noise; engine-side changes (side streams, attention rules) are
compared here in ~40 s per rate without Ray or HTTP. The SLO figures stay gpu_sweep.py's: these
latencies leave out HTTP, Preprocess and Serve's routing.

Engine settings: ``deployments.gpu.yaml``'s ``engine`` args, then ``--engine-json``, then each
variant's. Requests: the loadgen's classes (30 % 48 tokens, 40 % 128, 20 % 192, 10 % two images
and 128), images of the loadgen's resolutions resized as Preprocess does (``max_pixels`` from the
yaml), random uint8 patches with a unique image id each (no vision-cache hits), 40 text tokens,
``ignore_eos`` so every request generates its class's length. Per rate: offered requests/s,
served requests/s (all of them over the time from the first arrival to the last end: the
engine's capacity once the offered rate exceeds it), TTFT/TPOT/e2e percentiles of the requests that arrived after ``--warmup``, and from
the engine's stats the decode step, its mean batch, the GPU seconds per request by kind, the
wait for admission (engine queue) and the share of the time each admission limit held it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.engine_bench import CHAT_HEAD, CHAT_TAIL, IMG, VE, VS  # noqa: E402
from benchmarks.loadgen.metrics import (admission_blocks, arrival_clumping, blocked_cell, engine_latency,  # noqa: E402
                                        percentile)
from benchmarks.loadgen.workload import DEFAULT_CLASSES, RESOLUTIONS  # noqa: E402
from serve_app._image import FACTOR, PATCH_SIZE, smart_resize  # noqa: E402
from serve_app.engine import create_engine  # noqa: E402
from serve_app.engine.config import EngineConfig  # noqa: E402
from serve_app.engine.protocol import EngineRequest, ImageInput, SamplingParams  # noqa: E402


def schedule(qps: float, seconds: float, seed: int, max_pixels: int) -> list[dict]:
    """Arrival times and request shapes (class, image sizes), seeded: the same for every variant."""
    rng = np.random.default_rng(seed)
    weights = np.array([c.weight for c in DEFAULT_CLASSES])
    out, t = [], 0.0
    while True:
        t += rng.exponential(1.0 / qps)
        if t >= seconds:
            return out
        cls = DEFAULT_CLASSES[rng.choice(len(DEFAULT_CLASSES), p=weights / weights.sum())]
        sizes = [RESOLUTIONS[rng.integers(len(RESOLUTIONS))] for _ in range(cls.n_images)]
        grids = []
        for w, h in sizes:
            rh, rw = smart_resize(h, w, FACTOR, max_pixels=max_pixels)
            grids.append((1, rh // PATCH_SIZE, rw // PATCH_SIZE))
        out.append({"at": t, "max_tokens": cls.max_tokens, "grids": grids,
                    "text": [int(x) for x in rng.integers(1000, 30000, size=40)]})


class Patches:
    """One random uint8 patch array per grid, shared by requests (the engine keys its vision
    cache by image id, and each request's ids are unique)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.arrays: dict = {}

    def __call__(self, grid: tuple[int, int, int]) -> np.ndarray:
        if grid not in self.arrays:
            t, h, w = grid
            self.arrays[grid] = self.rng.integers(0, 256, size=(t * h * w, 3, PATCH_SIZE, PATCH_SIZE), dtype=np.uint8)
        return self.arrays[grid]


def request(i: int, spec: dict, patches: Patches, tag: str) -> EngineRequest:
    images = [ImageInput(patches(g), g, f"{tag}-{i}-{j}") for j, g in enumerate(spec["grids"])]
    ids = list(CHAT_HEAD)
    for im in images:
        ids += [VS] + [IMG] * im.num_tokens() + [VE]
    ids += spec["text"] + CHAT_TAIL
    sp = SamplingParams(max_tokens=spec["max_tokens"], temperature=0.7, ignore_eos=True)
    return EngineRequest(f"{tag}-{i}", ids, images, sp)


async def one(engine, req: EngineRequest, at: float, t0: float) -> dict:
    await asyncio.sleep(max(0.0, t0 + at - time.perf_counter()))
    start = time.perf_counter()
    first, n = None, 0
    try:
        async for d in engine.generate(req):
            if d.token_ids and first is None:
                first = time.perf_counter()
            n += len(d.token_ids)
    except Exception as e:  # noqa: BLE001 - counted (e.g. a 503 when the GPU ran out of memory)
        return {"at": at, "error": getattr(e, "code", None) or type(e).__name__}
    end = time.perf_counter()
    return {"at": at, "start": start - t0, "ttft": (first or end) - start, "e2e": end - start, "tokens": n}


def padding(steps: list[int], qps: float, seconds: float, seed: int, max_pixels: int) -> dict:
    """Share of padding tokens in the prefill graphs' buckets (a prompt replays the next multiple
    of ``step`` above its length) for this workload's prompts (``--padding``: no GPU needed)."""
    prompts = [len(request(i, x, lambda g: np.empty((g[0] * g[1] * g[2], 0), np.uint8), "p").prompt_token_ids)
               for i, x in enumerate(schedule(qps, seconds, seed, max_pixels))]
    out = {"requests": len(prompts), "mean_prompt_tokens": round(float(np.mean(prompts)), 1)}
    for step in steps:
        pad = sum((n // step + 1) * step - n for n in prompts)
        out[f"step_{step}_padding_pct"] = round(100 * pad / sum(prompts), 1)
    return out


def pct(xs, q) -> float:
    v = percentile(xs, q)
    return float("nan") if v is None else round(v, 4)


async def run_rate(engine, qps: float, seconds: float, a, patches: Patches, tag: str, max_pixels: int) -> dict:
    specs = schedule(qps, seconds, a.seed + int(qps * 1000), max_pixels)
    reqs = [request(i, s, patches, tag) for i, s in enumerate(specs)]
    before = engine.stats()
    t0 = time.perf_counter()
    res = await asyncio.gather(*[one(engine, r, s["at"], t0) for r, s in zip(reqs, specs)])
    wall = time.perf_counter() - t0
    after = engine.stats()
    d = {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], (int, float))
         and not isinstance(after[k], bool)}
    errors = [r["error"] for r in res if "error" in r]
    kept = [r for r in res if r["at"] >= a.warmup and "error" not in r]
    tpot = [(r["e2e"] - r["ttft"]) / max(1, r["tokens"] - 1) for r in kept]
    n = len(res)
    steps = max(1, d.get("decode_steps", 0))
    row = {"offered_qps": qps, "requests": n, "arrived_per_s": round(n / seconds, 3),
           "served_per_s": round((n - len(errors)) / wall, 3), "wall_s": round(wall, 2),
           "errors": len(errors), "error_kinds": sorted(set(errors)),
           "ttft_p50_s": pct([r["ttft"] for r in kept], 50), "ttft_p95_s": pct([r["ttft"] for r in kept], 95),
           "tpot_p50_s": pct(tpot, 50), "e2e_p50_s": pct([r["e2e"] for r in kept], 50),
           "e2e_p95_s": pct([r["e2e"] for r in kept], 95),
           "decode_ms_per_step": round(1000 * d.get("decode_s_total", 0) / steps, 3),
           "mean_decode_batch": round((d.get("generation_tokens_total", 0) - d.get("finished_total", 0)) / steps, 2),
           **{f"gpu_ms_per_request_{k}": round(1000 * d.get(f"{k}_s_total", 0) / max(1, n), 2)
              for k in ("prefill", "vision", "decode")},
           "gpu_s_per_wall_s": round(sum(d.get(f"{k}_s_total", 0) for k in ("prefill", "vision", "decode")) / wall, 3),
           **engine_latency(before, after, "queue"), **admission_blocks(before, after, wall),
           **arrival_clumping(before, after, n / seconds)}
    print(f"  {qps:g}/s: {json.dumps(row)}", flush=True)
    return row


async def run_variant(name: str, settings: dict, a, max_pixels: int) -> dict:
    engine = create_engine(EngineConfig(**settings))
    t = time.perf_counter()
    await engine.start()
    info = {"start_s": round(time.perf_counter() - t, 1), "health": engine.health()}
    patches = Patches(a.seed)
    try:
        # unmeasured: Triton/cuDNN first calls, vision graphs for the recurring grids (captured
        # in the idle second after it)
        await run_rate(engine, a.qps[0] / 2, a.warmup_load, a, patches, f"{name}-warm", max_pixels)
        await asyncio.sleep(2)
        rows = [await run_rate(engine, q, a.seconds, a, patches, f"{name}-{q:g}", max_pixels) for q in a.qps]
    finally:
        await engine.shutdown()
    return {"settings": settings, **info, "rates": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--config", default=str(ROOT / "deployments.gpu.yaml"))
    ap.add_argument("--model", default="builtin:qwen3-vl-4b-random")
    ap.add_argument("--quantization", choices=["fp8"], default=None)
    ap.add_argument("--engine-json", default="{}", help="settings over the yaml's, for every variant")
    ap.add_argument("--variants", default='{"base": {}}', help='JSON: name -> settings over the rest')
    ap.add_argument("--qps", type=lambda s: [float(x) for x in s.split(",")], default=[18.0, 21.0, 24.0])
    ap.add_argument("--seconds", type=float, default=30.0, help="arrivals per rate")
    ap.add_argument("--warmup", type=float, default=5.0, help="arrivals before this are not in the percentiles")
    ap.add_argument("--warmup-load", type=float, default=15.0, help="seconds of unmeasured load per variant")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--padding", type=lambda s: [int(x) for x in s.split(",")], default=None, metavar="STEPS",
                    help="only print the prefill graphs' padding share for these bucket steps (no engine)")
    a = ap.parse_args()
    app = yaml.safe_load(Path(a.config).read_text())["applications"][0]["args"]
    base = {**app.get("engine", {}), "model": a.model, **json.loads(a.engine_json)}
    if a.quantization:
        base["quantization"] = a.quantization
    max_pixels = int(app.get("images", {}).get("max_pixels", 16_777_216))
    if a.padding:
        print(json.dumps(padding(a.padding, a.qps[0], 300.0, a.seed, max_pixels)))
        return
    out = {"meta": {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "command": " ".join(["python3"] + sys.argv), "engine_base": base}, "variants": {}}
    Path(a.out).mkdir(parents=True, exist_ok=True)
    for name, over in json.loads(a.variants).items():
        print(f"== {name}: {over}", flush=True)
        out["variants"][name] = asyncio.run(run_variant(name, {**base, **over}, a, max_pixels))
        (Path(a.out) / "engine_arrivals.json").write_text(json.dumps(out, indent=2, default=str))
    print(markdown(out))
    (Path(a.out) / "engine_arrivals.md").write_text(markdown(out))


def markdown(out: dict) -> str:
    lines = [f"`{out['meta']['command']}` ({out['meta']['date']})", "",
             "| variant | offered (arrived)/s | served/s | TTFT P50/P95 ms | TPOT P50 ms | e2e P50/P95 s | decode ms/step (batch) "
             "| GPU ms/request prefill / vision / decode | GPU s per s | engine queue mean / P95 under ms "
             "| admission held by rows / prefill backlog / KV pages % | arrivals within 10 ms: engine / Poisson % "
             "| errors |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, v in out["variants"].items():
        for r in v["rates"]:
            lines.append(f"| {name} | {r['offered_qps']:g} ({r['arrived_per_s']}) | {r['served_per_s']} | {1000 * r['ttft_p50_s']:.0f}/"
                         f"{1000 * r['ttft_p95_s']:.0f} | {1000 * r['tpot_p50_s']:.1f} | {r['e2e_p50_s']:.2f}/"
                         f"{r['e2e_p95_s']:.2f} | {r['decode_ms_per_step']} ({r['mean_decode_batch']}) | "
                         f"{r['gpu_ms_per_request_prefill']} / {r['gpu_ms_per_request_vision']} / "
                         f"{r['gpu_ms_per_request_decode']} | {r['gpu_s_per_wall_s']} | "
                         f"{r.get('engine_queue_mean_ms', '-')} / {r.get('engine_queue_p95_le_ms', '-')} | "
                         f"{blocked_cell(r)} | {r.get('engine_gaps_within_10ms_pct', '-')} / "
                         f"{r.get('poisson_gaps_within_10ms_pct', '-')} | {r['errors']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
