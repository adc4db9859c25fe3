"""How much the loadgen's image pool alone moves the prompt size, per pool seed (CPU, no server).

    python benchmarks/pool_spread.py --seeds 0-9 [--requests 7000] [--pool-size 32] [--draw-seed N]

Why: on 2026-11-30 the same app at 23 QPS missed the SLO with ``--seed 0`` (TTFT P95 605 ms) and
met it with ``--seed 1`` (279 ms). The seed draws the 32 pooled images as well as the arrivals, and
the two pools gave 1,186 and 1,097 prompt tokens per served request: 8 % more prefill and vision
work, which at the edge of capacity is the whole margin. This prints, per pool, the image tokens
per request that ``Workload`` draws (first turns, the open loop's requests; the text adds a fixed
~30-90 tokens), next to the expectation over the resolutions the workload draws from, so a sweep
can say whether its pool is light or heavy. ``--pool-seed`` (loadgen, gpu_sweep) holds a pool.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen.workload import (DEFAULT_CLASSES, RESOLUTIONS, Workload,  # noqa: E402
                                         expected_image_tokens, pool_summary)


def population_image_tokens(classes=DEFAULT_CLASSES, resolutions=RESOLUTIONS) -> float:
    """Image tokens per request expected over the resolutions (uniform) and the class mix."""
    per_image = statistics.mean(expected_image_tokens(w, h) for w, h in resolutions)
    images = sum(c.weight * c.n_images for c in classes) / sum(c.weight for c in classes)
    return per_image * images


def pool_figures(seed: int, requests: int, pool_size: int, draw_seed: int | None = None) -> dict:
    """Image tokens per request that a workload with this pool seed sends (its requests drawn with
    ``draw_seed``, by default the pool's seed: the loadgen's ``--seed N`` alone)."""
    w = Workload("m", pool_size=pool_size, seed=seed if draw_seed is None else draw_seed, pool_seed=seed)
    # a sent image's data URL ends as its pooled JPEG's does (the nonce goes in front)
    tokens = {p.data_url(0)[-64:]: expected_image_tokens(p.width, p.height) for p in w.pool}
    if len(tokens) != len(w.pool):
        raise RuntimeError("two pooled images end alike: cannot tell them apart")
    per_request = []
    for _ in range(requests):
        _, messages = w.first_turn()
        urls = [p["image_url"]["url"] for p in messages[0]["content"] if p["type"] == "image_url"]
        per_request.append(sum(tokens[u[-64:]] for u in urls))
    s = pool_summary(w.pool)
    return {"seed": w.pool_seed, "pool_mean_image_tokens": s["mean_image_tokens"], "generated": s["generated"],
            "mean_jpeg_kb": s["mean_jpeg_kb"],
            "image_tokens_per_request": round(statistics.mean(per_request), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0-9", help="'0-9' or '0,1,5'")
    ap.add_argument("--requests", type=int, default=7000, help="requests drawn per seed (~5 min at 23 QPS)")
    ap.add_argument("--pool-size", type=int, default=32)
    ap.add_argument("--draw-seed", type=int, default=None,
                    help="the loadgen's --seed with these pools as --pool-seed (default: each pool's own)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if "-" in a.seeds:
        lo, hi = (int(x) for x in a.seeds.split("-"))
        seeds = list(range(lo, hi + 1))
    else:
        seeds = [int(x) for x in a.seeds.split(",")]
    rows = [pool_figures(s, a.requests, a.pool_size, a.draw_seed) for s in seeds]
    pop = population_image_tokens()
    if a.json:
        print(json.dumps({"population_image_tokens_per_request": round(pop, 1), "pools": rows}))
        return 0
    print(f"expected over the resolutions and the class mix: {pop:.0f} image tokens per request")
    print("| pool seed | pool mean image tokens | generated of pool | mean JPEG KB | "
          "image tokens per request | vs expected |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        per = r["image_tokens_per_request"]
        print(f"| {r['seed']} | {r['pool_mean_image_tokens']} | {r['generated']} | {r['mean_jpeg_kb']} | "
              f"{per:.0f} | {100 * (per / pop - 1):+.1f} % |")
    per = [r["image_tokens_per_request"] for r in rows]
    if len(per) > 1:
        print(f"\nspread: {min(per):.0f}-{max(per):.0f}, mean {statistics.mean(per):.0f}, "
              f"stdev {statistics.stdev(per):.0f} image tokens per request over {len(per)} pools")
    return 0


if __name__ == "__main__":
    sys.exit(main())
