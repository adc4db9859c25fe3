"""Engine metrics on Ray's Prometheus endpoint: the mapping from ``engine.stats()`` (fake
metrics), then the real export of the session's app, scraped over HTTP after real requests."""

from __future__ import annotations

import re
import time

import httpx
import pytest

from serve_app._engine_metrics import EngineMetrics


class _Fake:
    def __init__(self, name, description="", tag_keys=()):
        self.name, self.tag_keys, self.values = name, tag_keys, {}

    def _key(self, tags):
        return tuple(sorted((tags or {}).items()))

    def set(self, value, tags=None):
        self.values[self._key(tags)] = value

    def inc(self, value=1.0, tags=None):
        assert value > 0, "Prometheus counters only go up"
        k = self._key(tags)
        self.values[k] = self.values.get(k, 0.0) + value


def test_engine_metrics_mapping():
    made = {}

    def factory(name, description="", tag_keys=()):
        made[name] = _Fake(name, description, tag_keys)
        return made[name]

    m = EngineMetrics(counter=factory, gauge=factory)
    m.update({"kv_utilization": 0.25, "waiting": 3, "prefilling": 1, "running": 7,
              "prefill_s_total": 1.5, "decode_s_total": 4.0, "vision_s_total": 0.5,
              "prefill_steps": 10, "decode_steps": 400, "prefill_graph_replays": 8,
              "vision_graph_replays": 0, "images_encoded": 12, "vision_cache_hits": 2, "engine": "x"})
    m.update({"kv_utilization": 0.5, "waiting": 0, "prefilling": 0, "running": 2, "decode_deferred": 1,
              "prefill_s_total": 2.0, "decode_s_total": 4.0, "prefill_steps": 12, "decode_steps": 450,
              "prefill_graph_replays": 9, "images_encoded": 12,
              "host_step_s_total": 3.0, "host_cpu_s_total": 2.5, "host_wait_s_total": 1.0,
              "prefill_eager_passes": 4, "queue_s_total": 0.5, "queue_bucket_counts": [3, 1, 0],
              "ttft_s_total": 2.0, "ttft_bucket_counts": [2, 2],
              "admission_blocked_rows_s_total": 1.25, "admission_blocked_prefill_backlog_s_total": 0.0,
              "admission_blocked_kv_pages_s_total": 0.0})
    assert made["serve_app_vlm_kv_utilization"].values == {(): 0.5}
    assert made["serve_app_vlm_engine_requests"].values == {
        (("state", "waiting"),): 0, (("state", "prefilling"),): 0, (("state", "running"),): 2,
        (("state", "deferred"),): 1}
    gpu = made["serve_app_vlm_engine_gpu_seconds"].values
    assert gpu == {(("phase", "prefill"),): 2.0, (("phase", "decode"),): 4.0, (("phase", "vision"),): 0.5}
    assert made["serve_app_vlm_engine_steps"].values == {(("kind", "prefill"),): 12, (("kind", "decode"),): 450}
    assert made["serve_app_vlm_engine_graph_replays"].values == {(("kind", "prefill"),): 9}
    assert made["serve_app_vlm_engine_images"].values == {(("result", "encoded"),): 12,
                                                          (("result", "cache_hit"),): 2}
    assert made["serve_app_vlm_engine_eager_passes"].values == {(("kind", "prefill"),): 4}
    assert made["serve_app_vlm_engine_host_seconds"].values == {
        (("kind", "step"),): 3.0, (("kind", "cpu"),): 2.5, (("kind", "wait"),): 1.0}
    assert made["serve_app_vlm_engine_latency_seconds"].values == {(("kind", "queue"),): 0.5,
                                                                   (("kind", "ttft"),): 2.0}
    assert made["serve_app_vlm_engine_latency_requests"].values == {(("kind", "queue"),): 4,
                                                                    (("kind", "ttft"),): 4}
    # a limit that never held has no sample (counters advance on growth only)
    assert made["serve_app_vlm_engine_admission_blocked_seconds"].values == {(("limit", "rows"),): 1.25}
    # An engine restarted under the replica: its totals start again, the counters never go down.
    m.update({"decode_steps": 5})
    m.update({"decode_steps": 25})
    assert made["serve_app_vlm_engine_steps"].values[(("kind", "decode"),)] == 470
    # hf-generate has no KV cache or GPU timers: only what it reports is exported.
    m2 = EngineMetrics(counter=factory, gauge=factory)
    m2.update({"engine": "hf-generate", "running": 1, "waiting": 0, "requests_total": 4})
    assert made["serve_app_vlm_kv_utilization"].values == {}
    assert made["serve_app_vlm_engine_gpu_seconds"].values == {}


def _samples(text: str, name: str) -> list[tuple[str, float]]:
    """(labels, value) of every sample of ``name`` (Ray prefixes ``ray_``; counters may end in
    ``_total``)."""
    out = []
    for line in text.splitlines():
        m = re.match(rf"ray_{name}(?:_total)?\{{(.*)\}} (\S+)$", line)
        if m:
            out.append((m.group(1), float(m.group(2))))
    return out


@pytest.mark.slow
def test_engine_metrics_exported(client, model_name, metrics_url):
    r = client.chat.completions.create(model=model_name, max_tokens=8,
                                       messages=[{"role": "user", "content": "count to three"}])
    assert r.choices[0].message.content is not None
    deadline, text = time.time() + 90, ""
    while time.time() < deadline:     # the replica pushes every 5 s, Ray's agent exports ~10 s later
        text = httpx.get(metrics_url, timeout=10).text
        decode = [v for labels, v in _samples(text, "serve_app_vlm_engine_gpu_seconds")
                  if 'phase="decode"' in labels]
        if decode and _samples(text, "serve_app_vlm_kv_utilization"):
            break
        time.sleep(2)
    else:
        pytest.fail("engine metrics not exported in 90 s:\n"
                    + "\n".join(line for line in text.splitlines() if "serve_app" in line)[:3000])
    assert decode[0] > 0
    labels, kv = _samples(text, "serve_app_vlm_kv_utilization")[0]
    assert 0.0 <= kv <= 1.0 and 'deployment="VLM"' in labels
    steps = {lab: v for lab, v in _samples(text, "serve_app_vlm_engine_steps")}
    assert any('kind="decode"' in lab and v >= 7 for lab, v in steps.items())
    states = [lab for lab, _ in _samples(text, "serve_app_vlm_engine_requests")]
    assert any('state="waiting"' in lab for lab in states)
    host = {lab: v for lab, v in _samples(text, "serve_app_vlm_engine_host_seconds")}
    assert any('kind="step"' in lab and v > 0 for lab, v in host.items())
    timed = {lab: v for lab, v in _samples(text, "serve_app_vlm_engine_latency_requests")}
    assert any('kind="ttft"' in lab and v >= 1 for lab, v in timed.items())
    assert any('kind="queue"' in lab and v >= 1 for lab, v in timed.items())
    assert _samples(text, "serve_app_vlm_requests")      # the VLM's request counter, same endpoint
