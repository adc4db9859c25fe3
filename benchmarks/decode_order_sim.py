"""A model of the decode rows after the first token, to compare ``engine.decode_order`` policies (CPU).

    python benchmarks/decode_order_sim.py [--qps 23,24] [--orders arrival,laxity] [--seeds 0,1,2]
        [--rows 24] [--seconds 300] [--step-ms 3.6] [--row-ms 0.18] [--step-scales 1,0.97]
        [--ttft-ms 120] [--out DIR]

Why: at 24 QPS on one H200 (RESULTS.md, "23 QPS for 5 minutes on the pool at the workload's
expectation") the app missed the SLO on e2e alone (P95 1.949 s against 1.86), and the 192-token
class (20 % of requests) made that tail (its P95 2.26 s). With 36 admitted and 24 decoding, a
request past the 24 rows waits after its first token; the engine gave a freed row to the first
joined. This asks, before device time is spent, what giving it by laxity would do.

The model, not a measurement: Poisson arrivals of the loadgen's class mix and output lengths; the
first token ``--ttft-ms`` x U(0.5, 1.5) after arrival; then at most ``--rows`` requests decode, one
token each per step of ``step_ms + row_ms x rows`` ms. The rows are picked by the engine's own
``decode_rows.pick``. 0.18 ms per row is the slope through the decode steps measured in the app at
23 and 24 QPS (5.41 ms at 15.7 rows, 5.79 at 17.8: 2.6 ms + 0.18 per row); the default 3.6 ms adds
1 ms per step for the decode stream's gaps (it was ~90 % busy), fitted so that arrival order gives
the 24-QPS run's e2e P50 (1.08 s measured and modelled; P95 1.88 modelled against 1.95 measured).
Prompt work's own queue and its effect on step times are not modelled. ``--admitted N`` adds the
engine's admission limit (``max_num_seqs``; 0, the default, none): a FIFO queue before it, and a
request holds its place from admission to its last token, waiting for a decode row included, with
the prompt time drawn from admission instead of arrival. Without it the model missed what the
device showed (RESULTS.md, "24 QPS held for 5 minutes with both FP8 options"): laxity moved the
192-token class's e2e P95 as modelled (2.26 -> 2.09 s) but raised TTFT P95 from 388 to 507 ms,
since the short answers held their places longer. With ``--admitted 36`` it gives that rise.
``--step-scales`` asks how the tail moves with decode steps that much shorter (or longer).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shlex
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen.workload import DEFAULT_CLASSES  # noqa: E402
from serve_app.engine._private import decode_rows  # noqa: E402


def simulate(qps: float, order: str, seed: int = 0, rows: int = 24, seconds: float = 300.0,
             step_ms: float = 3.6, row_ms: float = 0.18, ttft_ms: float = 120.0, admitted: int = 0) -> dict:
    """e2e (and TTFT, queue) percentiles in s over the requests after the first 10 %, overall and
    per class. ``admitted`` > 0: at most that many requests in the engine at once (FIFO queue before
    it, as ``max_num_seqs``); a request holds its place from admission to its last token."""
    rng = random.Random(seed)
    names, weights = [c.name for c in DEFAULT_CLASSES], [c.weight for c in DEFAULT_CLASSES]
    tokens = {c.name: c.max_tokens for c in DEFAULT_CLASSES}
    reqs, t = [], 0.0
    while t < seconds:
        t += rng.expovariate(qps)
        name = rng.choices(names, weights)[0]
        prompt_s = ttft_ms / 1e3 * (0.5 + rng.random())
        reqs.append(SimpleNamespace(cls=name, arrival=t, prompt_s=prompt_s, admit=None, first=None,
                                    max_new=tokens[name], launched=1, end=None))
    limit = admitted if admitted > 0 else len(reqs)
    st = SimpleNamespace(i=0, inside=0, queue=[], prompting=[])

    def admit(r, at: float) -> None:
        r.admit, r.first = at, at + r.prompt_s
        st.prompting.append(r)
        st.inside += 1

    def arrive(until: float) -> None:
        """Arrivals up to ``until``: in at once if a place was free when they came (places free
        only at step ends, which the caller applies after this), else into the FIFO queue."""
        while st.i < len(reqs) and reqs[st.i].arrival <= until:
            r = reqs[st.i]
            st.i += 1
            if not st.queue and st.inside < limit:
                admit(r, r.arrival)
            else:
                st.queue.append(r)

    now, ready, waits, batches = 0.0, [], [], []
    while st.i < len(reqs) or st.queue or st.prompting or ready:
        arrive(now)
        while st.queue and st.inside < limit:     # places freed at this step's end
            admit(st.queue.pop(0), now)
        ready += [r for r in st.prompting if r.first <= now]
        st.prompting = [r for r in st.prompting if r.first > now]
        if not ready:
            now = max(now, min([r.first for r in st.prompting] + [reqs[st.i].arrival] * (st.i < len(reqs))))
            continue
        step = (step_ms + row_ms * min(rows, len(ready))) / 1e3
        batch = decode_rows.pick(ready, rows, order, step)
        waits.append(len(ready) - len(batch))
        batches.append(len(batch))
        now += step
        arrive(now)
        for r in batch:
            r.launched += 1
            if r.launched >= r.max_new:
                r.end = now
                st.inside -= 1
        ready = [r for r in ready if r.end is None]
    kept = reqs[len(reqs) // 10:]
    e2e = np.array([r.end - r.arrival for r in kept])
    ttft = np.array([r.first - r.arrival for r in kept])
    out = {"requests": len(kept), "e2e_p50": float(np.percentile(e2e, 50)),
           "e2e_p95": float(np.percentile(e2e, 95)), "ttft_p95": float(np.percentile(ttft, 95)),
           "queue_mean": float(np.mean([r.admit - r.arrival for r in kept])),
           "mean_waiting": float(np.mean(waits)), "mean_batch": float(np.mean(batches)), "class_p95": {}}
    for name in names:
        mine = np.array([r.end - r.arrival for r in kept if r.cls == name])
        out["class_p95"][name] = float(np.percentile(mine, 95))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--qps", default="23,24")
    ap.add_argument("--orders", default="arrival,laxity")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--rows", type=int, default=24)
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--step-ms", type=float, default=3.6)
    ap.add_argument("--row-ms", type=float, default=0.18)
    ap.add_argument("--step-scales", default="1", help="factors on --step-ms and --row-ms, e.g. 1,0.97,0.95")
    ap.add_argument("--ttft-ms", type=float, default=120.0)
    ap.add_argument("--admitted", default="0",
                    help="requests in the engine at once (max_num_seqs, 36 shipped), e.g. 36,48; 0: no limit")
    ap.add_argument("--out", help="folder for decode_order_sim.json and .md")
    a = ap.parse_args(argv)
    names = [c.name for c in DEFAULT_CLASSES]
    lines = ["| QPS | admitted | step x | decode_order | seed | e2e P50 s | e2e P95 s | TTFT P95 s | admission queue mean ms | "
             "mean waiting for a row | mean decode batch | "
             + " | ".join(f"{n} ({c.max_tokens} tok) P95 s" for n, c in zip(names, DEFAULT_CLASSES)) + " |",
             "|---" * (11 + len(names)) + "|"]
    results = []
    for qps in (float(q) for q in a.qps.split(",")):
        for admitted in (int(x) for x in a.admitted.split(",")):
            for scale in (float(x) for x in a.step_scales.split(",")):
                for seed in (int(s) for s in a.seeds.split(",")):
                    for order in a.orders.split(","):
                        r = simulate(qps, order, seed, a.rows, a.seconds, a.step_ms * scale, a.row_ms * scale,
                                     a.ttft_ms, admitted)
                        results.append({"qps": qps, "admitted": admitted, "step_scale": scale, "order": order,
                                        "seed": seed, **r})
                        lines.append(f"| {qps:g} | {admitted or '-'} | {scale:g} | {order} | {seed} | "
                                     f"{r['e2e_p50']:.3f} | {r['e2e_p95']:.3f} | {r['ttft_p95']:.3f} | "
                                     f"{1e3 * r['queue_mean']:.1f} | {r['mean_waiting']:.1f} | {r['mean_batch']:.1f} | "
                                     + " | ".join(f"{r['class_p95'][n]:.3f}" for n in names) + " |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "decode_order_sim.json").write_text(json.dumps({"args": vars(a), "results": results}, indent=1))
        when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        (out / "decode_order_sim.md").write_text(f"`python benchmarks/decode_order_sim.py {shlex.join(sys.argv[1:])}`"
                                                 f" ({when}, {os.cpu_count()} CPUs)\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
