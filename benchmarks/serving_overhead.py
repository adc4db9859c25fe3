"""CPU cost of the serving layer per request: proxy, Ingress, Preprocess, VLM replica plumbing.

The two-GPU run (RESULTS.md "Two GPUs") held 1.75x one replica's arrivals at the SLO, not 2x, with
one Serve proxy and one Ingress replica in front of both GPUs. This measures what those CPU-side
processes spend per request, with the model replaced by :class:`PacedEngine` (no weights: it
streams each request's forced number of tokens at a fixed TTFT and TPOT, one "step" for all
streams at a time, as the continuous engine does). Everything else is the shipped GPU profile
(``deployments.gpu.yaml``: stream batching, admission, Preprocess decoding the article's real
JPEGs). Each component's CPU seconds (user + system, from psutil, summed over its processes) are
divided by the requests served, which gives the cores a component needs at a given QPS.

    python benchmarks/serving_overhead.py --qps 3 --seconds 40 --out benchmarks/results/cpu-serving-overhead

On a small box the processes share the cores, which inflates the per-request figures somewhat
(contention); the figures are an upper bound for a machine with cores to spare.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import AsyncIterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serve_app.engine.config import CONTINUOUS_ONLY  # noqa: E402
from serve_app.engine.protocol import EngineRequest, TokenDelta, merged  # noqa: E402

ENGINE = "benchmarks.serving_overhead:PacedEngine"
# Ray sets each actor's process title; these name the processes summed per component.
COMPONENTS = {"proxy": "ProxyActor", "ingress": "ServeReplica:serve_app:Ingress",
              "preprocess": "ServeReplica:serve_app:Preprocess", "vlm": "ServeReplica:serve_app:VLM",
              "controller": "ServeController"}


class PacedEngine:
    """An engine without a model: every request gets ``max_tokens`` tokens, the first after
    ``PACED_TTFT_MS``, then one per ``PACED_TPOT_MS`` step shared by all streams."""

    def __init__(self, config):
        self.config = config
        self.ttft_s = float(os.environ.get("PACED_TTFT_MS", "150")) / 1000
        self.tpot_s = float(os.environ.get("PACED_TPOT_MS", "8")) / 1000
        self.tokenizer = None
        self._streams: dict[str, list] = {}   # id -> [queue, prompt tokens, tokens wanted, first at, sent]
        self._ticker: asyncio.Task | None = None
        self.counters = {"requests_total": 0, "finished_total": 0, "cancelled_total": 0,
                         "generation_tokens_total": 0}

    async def start(self) -> None:
        from serve_app.models import load_tokenizer, resolve_model

        self.tokenizer = load_tokenizer(resolve_model(self.config.model, self.config.cache_dir))
        self._ids = self.tokenizer.encode(" the serving layer streams these words", add_special_tokens=False)
        self._texts = [self.tokenizer.decode([t]) for t in self._ids]
        self._ticker = asyncio.get_running_loop().create_task(self._tick())

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        nxt = loop.time()
        while True:
            now = loop.time()
            for rid, st in list(self._streams.items()):
                q, n_prompt, want, first_at, sent = st
                if now < first_at:
                    continue
                i = st[4] = sent + 1
                j = (i - 1) % len(self._ids)
                done = i >= want
                q.put_nowait(TokenDelta(rid, self._texts[j], [self._ids[j]], n_prompt, i,
                                        "length" if done else None))
                if done:
                    self._streams.pop(rid, None)
                    self.counters["finished_total"] += 1
                    self.counters["generation_tokens_total"] += want
            nxt += self.tpot_s
            await asyncio.sleep(max(0.0, nxt - loop.time()))

    def generate(self, request: EngineRequest) -> AsyncIterator[TokenDelta]:
        return merged(self._generate(request), request)   # api.stream_interval_ms, as the engines do

    async def _generate(self, request: EngineRequest) -> AsyncIterator[TokenDelta]:
        q: asyncio.Queue = asyncio.Queue()
        first_at = asyncio.get_running_loop().time() + self.ttft_s
        self._streams[request.request_id] = [q, len(request.prompt_token_ids),
                                             max(1, request.sampling.max_tokens), first_at, 0]
        self.counters["requests_total"] += 1
        try:
            while True:
                d = await q.get()
                yield d
                if d.finish_reason:
                    return
        finally:
            if self._streams.pop(request.request_id, None) is not None:
                self.counters["cancelled_total"] += 1

    async def cancel(self, request_id: str) -> None:
        st = self._streams.pop(request_id, None)
        if st is not None:   # the stream ends with 'cancelled', as the protocol says
            st[0].put_nowait(TokenDelta(request_id, "", [], st[1], st[4], "cancelled"))
            self.counters["cancelled_total"] += 1

    def health(self) -> dict:
        return {"ready": self.tokenizer is not None, "engine": "paced"}

    def stats(self) -> dict:
        return {"engine": "paced", "streams_open": len(self._streams), **self.counters}

    async def shutdown(self) -> None:
        if self._ticker is not None:
            self._ticker.cancel()


def cpu_seconds() -> dict[str, float]:
    """User + system CPU seconds per component, summed over its live processes."""
    import psutil

    out = {k: 0.0 for k in COMPONENTS}
    for p in psutil.process_iter(["cmdline"]):
        title = " ".join(p.info["cmdline"] or [])
        for name, tag in COMPONENTS.items():
            if tag in title:
                try:
                    t = p.cpu_times()
                    out[name] += t.user + t.system
                except psutil.Error:
                    pass
                break
    t = psutil.Process().cpu_times()
    out["load_client"] = t.user + t.system + t.children_user + t.children_system
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--qps", type=float, default=3.0)
    p.add_argument("--seconds", type=float, default=40.0, help="load duration")
    p.add_argument("--ttft-ms", type=float, default=150.0)
    p.add_argument("--tpot-ms", type=float, default=8.0, help="the FP8 H200's in-app step: ~4 ms, "
                   "but two requests' steps rarely align; 8 ms is the TPOT P50 the sweeps measured")
    p.add_argument("--config", default=str(ROOT / "deployments.gpu.yaml"))
    p.add_argument("--cpus", type=int, default=8, help="Ray logical CPUs")
    p.add_argument("--idle-seconds", type=float, default=20.0,
                   help="idle time measured first: each process's background CPU rate (metrics "
                        "pushes, health checks) is subtracted from the load's")
    p.add_argument("--stream-interval-ms", type=int, default=None, help="api.stream_interval_ms "
                   "(default: the config's)")
    p.add_argument("--args-json", default=None, help="merged into the app's args, e.g. "
                   "'{\"images\": {\"resize_threads\": 1}}'")
    a = p.parse_args()
    from benchmarks.loadgen.cli import main as loadgen
    from benchmarks.loadgen.server import LocalServe, build_serve_config

    env = {"PACED_TTFT_MS": str(a.ttft_ms), "PACED_TPOT_MS": str(a.tpot_ms),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    srv = LocalServe(num_cpus=a.cpus, env=env)
    out = Path(a.out)
    try:
        args = json.loads(a.args_json) if a.args_json else {}
        if a.stream_interval_ms is not None:
            args.setdefault("api", {})["stream_interval_ms"] = a.stream_interval_ms
        cfg = build_serve_config(a.config, port=srv.port, args=args or None,
                                 engine={**CONTINUOUS_ONLY, "model": "builtin:tiny-qwen3-vl", "engine": ENGINE,
                                         "device": "cpu", "dtype": "float32", "max_gpu_memory_gb": None},
                                 deployments={"VLM": {"autoscaling_config": {"min_replicas": 1,
                                                                             "max_replicas": 1}}})
        for d in cfg["applications"][0]["deployments"]:
            d.get("ray_actor_options", {}).pop("num_gpus", None)
        url = srv.deploy(cfg)
        loadgen(["run", "--url", url, "--qps", "1", "--duration", "5", "--drain", "20",
                 "--out", str(out / "warmup")])       # start-up costs (imports, first decode) out
        idle0, ti = cpu_seconds(), time.time()
        time.sleep(a.idle_seconds)
        idle1, idle_wall = cpu_seconds(), time.time() - ti
        before, t0 = cpu_seconds(), time.time()
        loadgen(["run", "--url", url, "--qps", str(a.qps), "--duration", str(a.seconds),
                 "--drain", "30", "--out", str(out / "load")])
        wall, after = time.time() - t0, cpu_seconds()
    finally:
        srv.shutdown()
    run = json.loads((out / "load" / "run.json").read_text())
    summary = run["run"]["summary"]
    served = sum(1 for r in run["requests"] if r["error"] is None)   # all of them, drain included
    idle_rate = {k: (idle1[k] - idle0[k]) / idle_wall for k in idle1}
    idle_rate["load_client"] = 0.0   # the client does nothing while idle (it is this process)
    per_req = {k: round(1000 * max(0.0, after[k] - before[k] - idle_rate[k] * wall) / max(1, served), 1)
               for k in after}
    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "command": " ".join(sys.argv), "qps": a.qps, "seconds": a.seconds, "wall_s": round(wall, 1),
              "served": served, "errors": summary["errors"], "cpu_ms_per_request": per_req,
              "idle_cpu_pct": {k: round(100 * v, 1) for k, v in idle_rate.items()},
              "stream_interval_ms": cfg["applications"][0]["args"].get("api", {}).get("stream_interval_ms"),
              "cores_at_24_qps": {k: round(v * 24 / 1000, 2) for k, v in per_req.items()},
              "ttft_p95_s": summary["ttft_s"]["p95"], "e2e_p95_s": summary["e2e_s"]["p95"],
              # what the serving layer adds to the time to first token (the engine's is paced)
              "ttft_over_paced_ms": {k: round(1000 * summary["ttft_s"][k] - a.ttft_ms, 1)
                                     for k in ("mean", "p50", "p95", "p99", "max")},
              "mean_output_tokens": summary["mean_output_tokens"], "cpu_count": os.cpu_count()}
    (out / "overhead.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Serving-layer CPU per request ({result['date']})", "", f"`{result['command']}`", "",
             f"{served} requests served at {a.qps} QPS offered, errors {summary['errors'] or 0}, "
             f"mean {summary['mean_output_tokens']} output tokens, TTFT {a.ttft_ms:g} ms / TPOT "
             f"{a.tpot_ms:g} ms paced; stream_interval_ms {result['stream_interval_ms']}; "
             f"{os.cpu_count()} cores; idle CPU subtracted", "",
             "TTFT over the paced first token, ms (the serving layer's share): " + ", ".join(
                 f"{k} {v}" for k, v in result["ttft_over_paced_ms"].items()), "",
             "| component | CPU ms per request | cores at 24 QPS | idle CPU % |", "|---|---|---|---|"]
    lines += [f"| {k} | {v} | {result['cores_at_24_qps'][k]} | {result['idle_cpu_pct'][k]} |"
              for k, v in per_req.items()]
    (out / "overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
