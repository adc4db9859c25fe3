"""CPU sampling cost per step: top-p by sorting the vocabulary vs the mass-histogram nucleus.

    python benchmarks/sampler_bench.py

Times ``sample_torch`` (temperature 0.7, top-p 0.95, the load workload's) and its nucleus step
alone over Qwen3-VL's 151,936-token vocabulary, for flat logits (random weights, as the demo
model) and peaked ones (trained-model-like); the GPU kernel's figures come from engine_bench.py.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_app.engine._private.sampler import (SamplingBatch, _top_k_top_p,  # noqa: E402
                                               _top_k_top_p_fast, sample_torch)


def median_ms(fn, iters: int) -> float:
    fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    torch.manual_seed(0)
    print(f"{platform.node()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
          f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M UTC}")
    print("| batch | logits | nucleus: sort ms | nucleus: histogram ms | sample_torch: sort ms | "
          "sample_torch: histogram ms |\n| --- | --- | --- | --- | --- | --- |")
    for b in (int(x) for x in a.batches.split(",")):
        for name, spread in (("flat (std 0.1)", 0.1), ("peaked (std 8)", 8.0)):
            logits = torch.randn(b, a.vocab) * spread
            batch = SamplingBatch(torch.full((b,), 0.7), torch.full((b,), 0.95),
                                  torch.zeros(b, dtype=torch.long), torch.ones(b), torch.arange(b),
                                  torch.zeros(b, dtype=torch.long), None, all_greedy=False,
                                  any_top=True, any_penalty=False)
            row = [median_ms(lambda: f(logits, batch.top_k, batch.top_p), a.iters)
                   for f in (_top_k_top_p, _top_k_top_p_fast)]
            row += [median_ms(lambda: sample_torch(logits, batch, sort_nucleus=s), a.iters)
                    for s in (True, False)]
            print(f"| {b} | {name} | " + " | ".join(f"{x:.2f}" for x in row) + " |")


if __name__ == "__main__":
    main()
