"""The engine's state on Ray's Prometheus endpoint, next to the VLM's request metrics.

Why: ``GET /v1/stats`` answers from one replica, and only when asked. Alerts and dashboards need
every replica's KV use, queue and GPU time over time: a replica whose KV cache stays near 1.0 or
whose waiting queue grows is the one to scale out. The VLM deployment feeds this every few
seconds from ``engine.stats()``. Engines report what they have (``hf-generate`` has no KV cache),
and a key an engine lacks is simply not exported.
"""

from __future__ import annotations

from typing import Any, Callable

from serve_app.engine._private.latency import ADMISSION_LIMITS

INTERVAL_S = 5.0

# engine.stats() key -> (metric, tag value) for the tagged families below
_STATES = {"waiting": "waiting", "prefilling": "prefilling", "running": "running",
           "decode_deferred": "deferred"}
_GPU_SECONDS = {"prefill_s_total": "prefill", "decode_s_total": "decode", "vision_s_total": "vision"}
_STEPS = {"prefill_steps": "prefill", "decode_steps": "decode"}
_REPLAYS = {"prefill_graph_replays": "prefill", "vision_graph_replays": "vision"}
_EAGER = {"prefill_eager_passes": "prefill"}
_IMAGES = {"images_encoded": "encoded", "vision_cache_hits": "cache_hit"}
# the engine's own latencies from a request's arrival in it: to admission, first and last token
_LATENCIES = ("queue", "ttft", "e2e")
_LATENCY_SECONDS = {f"{k}_s_total": k for k in _LATENCIES}
_LATENCY_COUNTS = {f"{k}_count": k for k in _LATENCIES}     # from the bucket counts, in update()
_ADMISSION_BLOCKED = {f"admission_blocked_{k}_s_total": k for k in ADMISSION_LIMITS}
_HOST_SECONDS = {f"host_{k}_s_total": k for k in ("step", "cpu", "wait", "emit", "loop", "idle", "inbox", "tick")}


class EngineMetrics:
    """Gauges set from the latest stats; counters advanced by the growth of the engine's totals
    (Prometheus counters only go up: a total that shrank, as after an engine restart, only
    resets the baseline)."""

    def __init__(self, counter: Callable[..., Any] | None = None, gauge: Callable[..., Any] | None = None):
        if counter is None or gauge is None:
            from ray.serve.metrics import Counter, Gauge
            counter, gauge = counter or Counter, gauge or Gauge
        self._kv = gauge("serve_app_vlm_kv_utilization", "fraction of the KV cache's pages in use")
        self._states = gauge("serve_app_vlm_engine_requests",
                             "requests in the engine: waiting for admission, prefilling, decoding "
                             "(running), and of those running, the ones past max_decode_rows that wait "
                             "for a decode row after their first token (deferred)",
                             tag_keys=("state",))
        self._families = [
            (_GPU_SECONDS, "phase", counter("serve_app_vlm_engine_gpu_seconds",
                                            "GPU seconds spent per phase (CUDA events; CPU: wall time)",
                                            tag_keys=("phase",))),
            (_STEPS, "kind", counter("serve_app_vlm_engine_steps", "engine steps", tag_keys=("kind",))),
            (_REPLAYS, "kind", counter("serve_app_vlm_engine_graph_replays",
                                       "prefill passes and vision-tower calls served by CUDA graphs",
                                       tag_keys=("kind",))),
            (_EAGER, "kind", counter("serve_app_vlm_engine_eager_passes",
                                     "prefill passes run eagerly (launch-bound) with prefill graphs "
                                     "available: continuations and prompts too long for a graph",
                                     tag_keys=("kind",))),
            (_IMAGES, "result", counter("serve_app_vlm_engine_images",
                                        "images through the vision tower, or taken from its cache",
                                        tag_keys=("result",))),
            (_HOST_SECONDS, "kind", counter("serve_app_vlm_engine_host_seconds",
                                            "engine thread seconds: in steps (wall), its CPU time (CUDA's spin-wait "
                                            "included), and waiting for the GPU; step - wait near the wall "
                                            "time: host-bound. Also its loop: all of it, idle, taking "
                                            "requests, stats pushes, and handing outputs over (emit)",
                                            tag_keys=("kind",))),
            (_LATENCY_SECONDS, "kind", counter("serve_app_vlm_engine_latency_seconds",
                                               "summed engine latencies from a request's arrival in the "
                                               "engine: to admission (queue: the wait for a row and KV "
                                               "pages), to first token (ttft), to last token (e2e); "
                                               "divide the rate by that of latency_requests for a mean",
                                               tag_keys=("kind",))),
            (_ADMISSION_BLOCKED, "limit", counter("serve_app_vlm_engine_admission_blocked_seconds",
                                                  "seconds the head of the engine's queue was held, per "
                                                  "limit: no free row (rows; more max_num_seqs would admit "
                                                  "it), max_prefill_tokens of prompts already waiting "
                                                  "(prefill_backlog), no KV pages (kv_pages); may overlap",
                                                  tag_keys=("limit",))),
            (_LATENCY_COUNTS, "kind", counter("serve_app_vlm_engine_latency_requests",
                                              "requests timed in serve_app_vlm_engine_latency_seconds",
                                              tag_keys=("kind",))),
        ]
        self._last: dict[str, float] = {}

    def update(self, stats: dict) -> None:
        stats = {**stats, **{f"{k}_count": sum(stats[f"{k}_bucket_counts"]) for k in _LATENCIES
                             if isinstance(stats.get(f"{k}_bucket_counts"), list)}}
        if isinstance(stats.get("kv_utilization"), (int, float)):
            self._kv.set(float(stats["kv_utilization"]))
        for key, state in _STATES.items():
            if isinstance(stats.get(key), (int, float)):
                self._states.set(float(stats[key]), tags={"state": state})
        for keys, tag, metric in self._families:
            for key, value in keys.items():
                total = stats.get(key)
                if not isinstance(total, (int, float)):
                    continue
                grown = total - self._last.get(key, 0.0)
                self._last[key] = total
                if grown > 0:
                    metric.inc(grown, tags={tag: value})
