"""benchmarks/loadgen: workload mix, image uniqueness, Poisson arrivals, percentile maths, SSE
parsing, the two load loops against a tiny fake SSE server, and summaries (the Serve config builder,
autoscaling helpers and the sweep: test_loadgen_sweep.py).

No Ray here: the loops talk to an in-test asyncio HTTP server on a free loopback port.
"""

from __future__ import annotations

import asyncio
import time
import base64
import io
import json
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen import client as lg_client  # noqa: E402
from benchmarks.loadgen.client import (LoadSpec, RequestResult, RunResult, SSEParser,  # noqa: E402
                                       StreamOutcome, apply_event, check_local, profile_arrivals,
                                       run_load)
from benchmarks.loadgen.metrics import (arrival_clumping, blocked_cell, engine_breakdown, markdown_table,  # noqa: E402
                                        percentile, slo_check, summarize)
from benchmarks.loadgen.workload import (DEFAULT_CLASSES, Conversation, PooledImage,  # noqa: E402
                                         Workload, build_image_pool, classes_with_tokens,
                                         make_image, mean_output_tokens, poisson_arrivals,
                                         with_nonce)


@pytest.fixture(scope="module")
def pool():
    return build_image_pool(6, seed=1)


# ------------------------------------------------------------------------------ workload
def test_default_mix_matches_the_article(pool):
    assert {c.name: (c.weight, c.max_tokens, c.n_images) for c in DEFAULT_CLASSES} == {
        "short_description": (0.30, 48, 1), "detail_recognition": (0.40, 128, 1),
        "cross_region_reasoning": (0.20, 192, 1), "two_image_comparison": (0.10, 128, 2)}
    assert mean_output_tokens(DEFAULT_CLASSES) == pytest.approx(116.8)
    w = Workload("m", pool=pool, seed=3)
    n = 20000
    counts = Counter(w.pick_class().name for _ in range(n))
    for c in DEFAULT_CLASSES:  # binomial sd at n=20000 is <= 0.0035; allow ~4 sd
        assert counts[c.name] / n == pytest.approx(c.weight, abs=0.015)


def test_output_lengths_are_configurable_and_forced(pool):
    classes = classes_with_tokens({"short_description": 7, "two_image_comparison": 9})
    assert [c.max_tokens for c in classes] == [7, 128, 192, 9]
    with pytest.raises(ValueError, match="unknown request classes"):
        classes_with_tokens({"nope": 1})
    w = Workload("tiny", classes, pool=pool, seed=0)
    seen = set()
    for _ in range(200):
        t = w.single()
        b = t.body
        cls = next(c for c in classes if c.name == t.cls)
        assert b["model"] == "tiny" and b["stream"] is True and b["stream_options"] == {"include_usage": True}
        assert b["max_tokens"] == b["min_tokens"] == cls.max_tokens and b["ignore_eos"] is True
        parts = b["messages"][0]["content"]
        assert parts[0]["type"] == "text" and parts[0]["text"] in cls.prompts
        assert sum(p["type"] == "image_url" for p in parts) == cls.n_images
        seen.add(t.cls)
    assert seen == {c.name for c in classes}
    free = Workload("tiny", classes, pool=pool, force_lengths=False, temperature=0.0).single().body
    assert "ignore_eos" not in free and "min_tokens" not in free and "top_p" not in free
    assert free["temperature"] == 0.0


def test_image_pool_sizes_quality_and_sources():
    pool = build_image_pool(12, seed=5)
    from PIL import Image

    for p in pool:
        assert 640 <= p.width <= 1920 and 480 <= p.height <= 1080 and 40 <= p.quality <= 75
        im = Image.open(io.BytesIO(p.jpeg))
        assert im.format == "JPEG" and im.size == (p.width, p.height)
    kinds = {p.kind for p in pool}
    assert "generated" in kinds and kinds - {"generated"}, kinds  # both generated and real photos
    lo = make_image(np.random.default_rng(0), 800, 600, 40, "astronaut")
    hi = make_image(np.random.default_rng(0), 800, 600, 75, "astronaut")
    assert len(lo) < len(hi)  # the quality setting reaches the encoder


def test_pool_seed_holds_the_images_while_seed_redraws_the_requests():
    """--pool-seed fixes the pool (it sets the prompt size: pools differ by ~8 % in tokens per request)."""
    import argparse

    from benchmarks.loadgen import cli

    ap = argparse.ArgumentParser()
    cli.add_workload_args(ap)

    def workload(*argv):
        w = cli.make_workload("unused", ap.parse_args(["--model-name", "m", "--pool-size", "3", *argv]))
        return w, [p.jpeg for p in w.pool], [w.pick_class().name for _ in range(40)]

    (w0, pool0, cls0), (w1, pool1, cls1) = workload("--seed", "0"), workload("--seed", "1")
    (w10, pool10, cls10) = workload("--seed", "1", "--pool-seed", "0")
    assert pool1 != pool0 and (w0.pool_seed, w1.pool_seed) == (0, 1)    # default: the pool follows --seed
    assert pool10 == pool0 and w10.pool_seed == 0                       # held by --pool-seed
    assert cls10 == cls1 != cls0                                         # the requests follow --seed
    assert cli.workload_info(w10)["pool"]["seed"] == 0


def test_nonce_makes_bytes_unique_but_pixels_identical(pool):
    from PIL import Image

    from serve_app._image import image_id_for

    p = pool[0]
    urls = [p.data_url(n) for n in (1, 2)]
    raw = [base64.b64decode(u.split(",", 1)[1]) for u in urls]
    assert raw[0] != raw[1] and image_id_for(raw[0]) != image_id_for(raw[1])
    assert raw[0] == with_nonce(p.jpeg, 1)  # the O(1) base64 splice equals encoding the whole thing
    ref = np.asarray(Image.open(io.BytesIO(p.jpeg)).convert("RGB"))
    for r in raw:
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(r)).convert("RGB")), ref)
    assert base64.b64decode(p.data_url().split(",", 1)[1]) == p.jpeg
    with pytest.raises(ValueError):
        PooledImage(b"\x89PNG....", 1, 1, 50, "x")
    w = Workload("m", pool=pool, seed=0)
    urls = [part["image_url"]["url"] for _ in range(30) for part in w.single().body["messages"][0]["content"]
            if part["type"] == "image_url"]
    assert len(set(urls)) == len(urls)
    same = Workload("m", pool=pool[:1], seed=0, unique_images=False)
    assert len({same.single().body["messages"][0]["content"][1]["image_url"]["url"] for _ in range(5)}) == 1


def test_conversation_turns_history_and_restart(pool):
    w = Workload("m", pool=pool, seed=2)
    conv = Conversation(w, turns=2)
    t0 = conv.next_turn()
    first_msgs = t0.body["messages"]
    assert t0.turn == 0 and len(first_msgs) == 1
    conv.record_answer("answer one")
    t1 = conv.next_turn()
    msgs = t1.body["messages"]
    assert t1.turn == 1 and t1.cls == t0.cls and len(msgs) == 3
    assert msgs[0] == first_msgs[0] and msgs[1] == {"role": "assistant", "content": "answer one"}
    assert msgs[2]["role"] == "user" and isinstance(msgs[2]["content"], str)
    conv.record_answer("answer two")
    t2 = conv.next_turn()  # turns exhausted: a fresh conversation with new images
    assert t2.turn == 0 and len(t2.body["messages"]) == 1
    conv.reset()
    assert conv.next_turn().turn == 0
    with pytest.raises(ValueError):
        Conversation(w, turns=0)


# ------------------------------------------------------------------------------- arrivals
def test_poisson_arrivals_rate_and_exponential_gaps():
    rng = random.Random(7)
    qps, dur = 20.0, 500.0
    arr = poisson_arrivals(qps, dur, rng)
    assert all(0 < a < dur for a in arr) and arr == sorted(arr)
    assert len(arr) / dur == pytest.approx(qps, rel=0.03)           # sd of N is sqrt(10000) = 1 %
    gaps = np.diff([0.0] + arr)
    assert gaps.mean() == pytest.approx(1 / qps, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # exponential: CV = 1
    # memoryless: P(gap > 2/qps) = e^-2
    assert (gaps > 2 / qps).mean() == pytest.approx(np.exp(-2), abs=0.01)
    assert len(poisson_arrivals(qps, dur, random.Random(1), max_requests=10)) == 10
    assert poisson_arrivals(0, 10, rng) == [] and poisson_arrivals(5, 0, rng) == []


def test_profile_arrivals_follow_the_phases():
    arr = profile_arrivals([(100, 2.0), (100, 10.0), (100, 0.0)], random.Random(3))
    first = sum(a < 100 for a in arr)
    second = sum(100 <= a < 200 for a in arr)
    assert first == pytest.approx(200, rel=0.2) and second == pytest.approx(1000, rel=0.1)
    assert not any(a >= 200 for a in arr)
    assert len(profile_arrivals([(100, 5.0)], random.Random(0), max_requests=7)) == 7


# -------------------------------------------------------------------------------- metrics
def test_percentile_matches_numpy_linear():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 100, 1001):
        xs = rng.exponential(size=n).tolist()
        for p in (0, 1, 50, 95, 99, 100):
            assert percentile(xs, p) == pytest.approx(float(np.percentile(xs, p)))
    assert percentile([], 50) is None
    assert percentile([3, 1, 2], 50) == 2
    assert percentile([0, 10], 95) == pytest.approx(9.5)
    with pytest.raises(ValueError):
        percentile([1], 101)


def _res(start, ttft, e2e, cls="a", tokens=11, error=None, status=200, expected=None):
    return RequestResult(cls, 0, start, start + e2e, ttft, status, error, 100, tokens, expected)


def test_summarize_window_rates_latencies_and_errors():
    rs = [_res(0.5, 0.1, 1.0)]                                   # in warm-up: ignored
    rs += [_res(1.0 + i, 0.2 + 0.01 * i, 1.0 + 0.1 * i) for i in range(8)]  # 8 ok in window
    rs += [_res(8.5, 0.3, 5.0, expected=11)]                     # ok but finishes after the window
    rs += [_res(9.0, None, 0.01, error="http_429", status=429),
           _res(9.5, None, 0.2, error="stream_engine_error"),
           _res(9.6, 0.1, 0.3, tokens=5, expected=11)]           # ok, output length mismatch
    rs[-2].error_message = "generation failed: boom"
    run = RunResult(LoadSpec(mode="open", qps=1.5, duration_s=11), rs, wall_s=11.0)
    s = summarize(run, warmup_s=1.0)
    assert s["error_examples"] == {"http_429": None, "stream_engine_error": "generation failed: boom"}
    assert s["requests"] == 12 and s["ok"] == 10 and s["window_s"] == 10.0
    # throughput: ok requests that finished in [1, 11): the warm-up one (ends 1.5), the 8, the short
    # one at 9.6; not the one ending at 13.5
    assert s["achieved_qps"] == pytest.approx(1.0)
    assert s["completed_qps"] == pytest.approx(1.0)
    assert s["offered_qps_actual"] == pytest.approx(1.2)
    assert s["errors"] == {"http_429": 1, "stream_engine_error": 1} and s["error_rate"] == pytest.approx(2 / 12, abs=1e-4)
    assert s["status_counts"] == {"200": 11, "429": 1}
    assert s["output_length_mismatches"] == 1
    e2e = [1.0 + 0.1 * i for i in range(8)] + [5.0, 0.3]
    assert s["e2e_s"]["p95"] == pytest.approx(float(np.percentile(e2e, 95)), abs=1e-4)
    ok_ttfts = [0.2 + 0.01 * i for i in range(8)] + [0.3, 0.1]
    assert s["ttft_s"]["p50"] == pytest.approx(float(np.percentile(ok_ttfts, 50)), abs=1e-4)
    # TPOT = (e2e - ttft) / (tokens - 1)
    assert s["tpot_s"]["max"] == pytest.approx((5.0 - 0.3) / 10, abs=1e-4)
    why = slo_check(s)
    assert any("errors" in w for w in why) and any("P95 e2e" in w for w in why)
    clean = summarize(RunResult(LoadSpec(duration_s=9), rs[1:9], wall_s=9.0), 1.0)
    assert slo_check(clean) == [] and slo_check(clean, ttft_p95_s=0.2)[0].startswith("P95 TTFT")
    assert s["slices"] == []                                     # 10 s: shorter than two slices
    # 4-s slices of the 10-s window: [1, 5), [5, 9), [9, 11)
    sl = summarize(run, warmup_s=1.0, slice_s=4.0)["slices"]
    assert [(x["start_s"], x["seconds"], x["requests"], x["errors"]) for x in sl] == \
        [(0.0, 4.0, 4, 0), (4.0, 4.0, 5, 0), (8.0, 2.0, 3, 2)]
    assert sl[0]["ttft_p95"] == pytest.approx(float(np.percentile([0.2, 0.21, 0.22, 0.23], 95)), abs=1e-4)
    assert sl[2]["ttft_p95"] == pytest.approx(0.1) and sl[2]["e2e_p95"] == pytest.approx(0.3)


def test_engine_breakdown_from_stats_snapshots():
    before = {"vlm": {"engine": "continuous", "prefill_steps": 10, "prefill_ms_avg": 100.0,
                      "decode_steps": 100, "decode_ms_avg": 10.0, "finished_total": 5,
                      "generation_tokens_total": 500, "prompt_tokens_total": 5000}}
    after = {"vlm": {"engine": "continuous", "prefill_steps": 20, "prefill_ms_avg": 150.0,
                     "decode_steps": 300, "decode_ms_avg": 20.0, "finished_total": 15,
                     "generation_tokens_total": 1510, "prompt_tokens_total": 15000}}
    b = engine_breakdown(before, after, wall_s=10.0)
    # prefill 3.0 - 1.0 s, decode 6.0 - 1.0 s of 10 s
    assert b["prefill_s"] == pytest.approx(2.0) and b["decode_s"] == pytest.approx(5.0)
    assert (b["prefill_pct"], b["decode_pct"], b["other_pct"]) == (20.0, 50.0, 30.0)
    assert b["decode_ms_per_step"] == pytest.approx(25.0)
    assert b["mean_decode_batch"] == pytest.approx((1010 - 10) / 200)
    assert b["prefill_tokens_per_s"] == pytest.approx(5000.0)
    assert "host_busy_pct" not in b           # an engine without host timers
    before["vlm"].update(host_step_s_total=2.0, host_cpu_s_total=1.5, host_wait_s_total=1.0)
    after["vlm"].update(host_step_s_total=11.0, host_cpu_s_total=7.5, host_wait_s_total=4.0)
    b = engine_breakdown(before, after, wall_s=10.0)
    # 9 s in steps, 3 s of them waiting for the GPU: busy 6 of 10 s; CPU 6 of 10 s
    assert (b["host_busy_pct"], b["host_cpu_pct"]) == (60.0, 60.0)
    assert "host_gap_pct" not in b            # no loop timers
    before["vlm"].update(host_loop_s_total=10.0, host_idle_s_total=0.5, host_inbox_s_total=0.1,
                         host_tick_s_total=0.0, host_emit_s_total=0.2)
    after["vlm"].update(host_loop_s_total=20.0, host_idle_s_total=1.5, host_inbox_s_total=0.3,
                        host_tick_s_total=0.1, host_emit_s_total=0.7)
    b = engine_breakdown(before, after, wall_s=10.0)
    # 10 s of loop: 9 in steps, 1 idle, 0.2 taking requests, 0.1 pushing stats: no gap left
    assert (b["host_idle_pct"], b["host_inbox_pct"], b["host_tick_pct"], b["host_emit_pct"]) == (10.0, 2.0, 1.0, 5.0)
    assert b["host_gap_pct"] == 0.0
    after["vlm"]["host_loop_s_total"] = 21.3                 # 1.0 s between turns unaccounted
    assert engine_breakdown(before, after, wall_s=10.0)["host_gap_pct"] == 10.0
    hf = engine_breakdown({"vlm": {"engine": "hf-generate", "finished_total": 1}},
                          {"vlm": {"engine": "hf-generate", "finished_total": 4}}, 1.0)
    assert hf == {"engine": "hf-generate", "counters": {"finished_total": 3}}
    assert engine_breakdown(None, after, 1.0) is None
    assert "engine_ttft_mean_ms" not in b      # an engine without TTFT buckets


def test_engine_latency_from_bucket_counts():
    bounds = [0.05, 0.1, 0.2, 0.4, 0.8, 1.6]
    before = {"vlm": {"engine": "continuous", "ttft_s_total": 1.0, "ttft_bucket_bounds_s": bounds,
                      "ttft_bucket_counts": [5, 0, 0, 0, 0, 0, 0]}}
    # 100 more first tokens: 90 in (0.05, 0.1], 5 in (0.2, 0.4], 3 in (0.4, 0.8], 2 over 1.6 s
    after = {"vlm": {"engine": "continuous", "ttft_s_total": 21.0, "ttft_bucket_bounds_s": bounds,
                     "ttft_bucket_counts": [5, 90, 0, 5, 3, 0, 2]}}
    b = engine_breakdown(before, after, wall_s=10.0)
    assert b["engine_ttft_mean_ms"] == 200.0
    assert (b["engine_ttft_p50_le_ms"], b["engine_ttft_p95_le_ms"]) == (100, 400)
    assert "engine_e2e_mean_ms" not in b       # no e2e buckets in these snapshots
    qb = [0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6]     # the wait for admission: its own bounds
    before["vlm"].update(queue_s_total=0.0, queue_bucket_bounds_s=qb, queue_bucket_counts=[5] + [0] * 8)
    after["vlm"].update(queue_s_total=2.0, queue_bucket_bounds_s=qb, queue_bucket_counts=[85, 0, 0, 10, 10] + [0] * 4)
    b = engine_breakdown(before, after, wall_s=10.0)
    assert (b["engine_queue_mean_ms"], b["engine_queue_p50_le_ms"], b["engine_queue_p95_le_ms"]) == (20.0, 10, 200)
    assert "engine_blocked_rows_pct" not in b    # an engine without the admission limits' seconds
    for k, (x, y) in {"rows": (1.0, 3.5), "prefill_backlog": (0.5, 1.0), "kv_pages": (0.0, 0.0)}.items():
        before["vlm"][f"admission_blocked_{k}_s_total"], after["vlm"][f"admission_blocked_{k}_s_total"] = x, y
    b = engine_breakdown(before, after, wall_s=10.0)
    assert (b["engine_blocked_rows_pct"], b["engine_blocked_prefill_backlog_pct"], b["engine_blocked_kv_pages_pct"]) \
        == (25.0, 5.0, 0.0)
    assert blocked_cell(b) == "25.0 / 5.0 / 0.0" and blocked_cell({}) == "- / - / -"
    after["vlm"]["ttft_bucket_counts"] = [5, 90, 0, 0, 0, 0, 10]
    assert engine_breakdown(before, after, 10.0)["engine_ttft_p95_le_ms"] is None   # past the last bound
    assert "engine_ttft_mean_ms" not in engine_breakdown(before, before, 10.0)      # nothing new
    before["vlm"].update(gc_collections=[100, 10, 1], gc_pause_s_total=0.5, gc_pause_max_s=0.2)
    after["vlm"].update(gc_collections=[150, 14, 3], gc_pause_s_total=0.9, gc_pause_max_s=0.25)
    b = engine_breakdown(before, after, 10.0)
    assert (b["gc_collections"], b["gc_pause_s"], b["gc_pause_max_s"]) == ([50, 4, 2], 0.4, 0.25)


def test_arrival_clumping_against_poisson():
    """100 gaps, 30 of them within 10 ms; at 20 requests/s Poisson would put 18.1 % there."""
    gb = [0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
    b = {"arrival_gap_bucket_bounds_s": gb, "arrival_gap_bucket_counts": [0] * 10}
    a = {"arrival_gap_bucket_bounds_s": gb, "arrival_gap_bucket_counts": [10, 10, 10, 20, 30, 15, 5, 0, 0, 0]}
    assert arrival_clumping(b, a, 20.0) == {"engine_gaps_within_10ms_pct": 30.0,
                                            "poisson_gaps_within_10ms_pct": 18.1}
    assert arrival_clumping(b, a, None) == {} and arrival_clumping(b, b, 20.0) == {}   # no rate; no gaps
    assert arrival_clumping({}, a, 20.0) == {}                                         # an engine without them


def test_markdown_table_and_plot(tmp_path):
    run = RunResult(LoadSpec(duration_s=4), [_res(0.5 + i, 0.1, 0.5) for i in range(3)], wall_s=4.0)
    s = summarize(run)
    step = {"engine": "continuous", "summary": s, "resources": {"cpu_mean_pct": 40.0},
            "engine_time": {"prefill_pct": 10.0, "decode_pct": 50.0, "other_pct": 40.0},
            "slo_violations": []}
    md = markdown_table([step]).splitlines()
    assert len(md) == 3 and md[0].count("|") == md[1].count("|") == md[2].count("|")
    assert "| continuous | 1 | 0.75 | 100/100/100 |" in md[2] and "| 10/-/50/40 |" in md[2] and "| ok |" in md[2]
    assert "| 100 | 0 |" in md[2]                                     # prompt tokens per request, errors
    step["engine_time"].update(vision_pct=15.0, other_pct=25.0)       # an engine that times its tower
    assert "| 10/15/50/25 |" in markdown_table([step]).splitlines()[2]
    pytest.importorskip("matplotlib")
    from benchmarks.loadgen.plot import plot_autoscale, plot_sweeps

    png = plot_sweeps([{"engine": "continuous", "mode": "open", "steps": [step],
                        "slo": {"ttft_p95_s": 0.4, "e2e_p95_s": 1.8}}], tmp_path / "s.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    tl = [{"t": t, "offered_qps": 1.0, "completed_qps": 0.5, "e2e_p95_s": None,
           "replicas": {"VLM": {"RUNNING": 1 + (t > 2)}}} for t in range(5)]
    assert plot_autoscale(tl, tmp_path / "a.png").stat().st_size > 1000


# ---------------------------------------------------------------------------------- SSE
def test_sse_parser_handles_multiline_comments_and_crlf():
    p = SSEParser()
    lines = [": keep-alive", "data: {\"a\":", "data: 1}", "", "event: x\r\n", "data:[DONE]\r\n", "\r\n", ""]
    got = [d for d in (p.feed_line(x) for x in lines) if d is not None]
    assert got == ['{"a":\n1}', "[DONE]"]
    assert p.flush() is None
    p.feed_line("data: tail")
    assert p.flush() == "tail"


def test_apply_event_content_usage_and_errors():
    out = StreamOutcome()
    apply_event(out, json.dumps({"choices": [{"delta": {"role": "assistant", "content": ""}}]}), 1.0)
    assert out.first_content_at is None  # the role chunk is not a token
    apply_event(out, json.dumps({"choices": [{"delta": {"content": "he"}}]}), 2.0)
    apply_event(out, json.dumps({"choices": [{"delta": {"content": "llo"}, "finish_reason": None}]}), 3.0)
    apply_event(out, json.dumps({"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2}}), 4)
    apply_event(out, "[DONE]", 5.0)
    assert (out.text, out.first_content_at, out.prompt_tokens, out.completion_tokens, out.done) == \
        ("hello", 2.0, 9, 2, True)
    bad = StreamOutcome()
    apply_event(bad, json.dumps({"error": {"message": "x", "code": "engine_error"}}), 1.0)
    apply_event(bad, "not json", 1.0)
    assert (bad.error, bad.error_message) == ("stream_engine_error", "x")


def test_check_local_only_allows_loopback():
    for ok in ("http://127.0.0.1:8000", "http://localhost:1", "http://[::1]:80", "http://127.0.0.5"):
        check_local(ok)
    for bad in ("http://10.0.0.1:8000", "http://example.com", "https://8.8.8.8"):
        with pytest.raises(ValueError, match="loopback"):
            check_local(bad)


# --------------------------------------------------------------- loops vs a fake SSE server
class FakeServer:
    """Minimal HTTP/1.1 server speaking the chat-completions SSE stream; behaviour by ``model``."""

    def __init__(self, first_delay: float = 0.05, token_delay: float = 0.01):
        self.first_delay, self.token_delay = first_delay, token_delay
        self.bodies: list[dict] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length"))
            body = json.loads(await reader.readexactly(length))
            self.bodies.append(body)
            mode = body["model"]
            if mode == "busy":
                err = json.dumps({"error": {"message": "queue full", "code": "overloaded"}}).encode()
                writer.write(b"HTTP/1.1 429 Too Many Requests\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(err) + err)
                return
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
            writer.write(b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n')
            await writer.drain()
            if mode == "hang":
                await asyncio.sleep(3600)
            await asyncio.sleep(self.first_delay)
            n = body["max_tokens"]
            for i in range(n):
                if mode == "midstream" and i == 2:
                    writer.write(b'data: {"error":{"message":"boom","code":"engine_error"}}\n\ndata: [DONE]\n\n')
                    return
                chunk = {"choices": [{"delta": {"content": f"t{i} "}}]}
                writer.write(f"data: {json.dumps(chunk)}\n\n".encode())
                await writer.drain()
                await asyncio.sleep(self.token_delay)
            usage = {"choices": [], "usage": {"prompt_tokens": 50, "completion_tokens": n}}
            writer.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            try:
                await writer.drain()
                writer.close()
            except (ConnectionError, RuntimeError):
                pass

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def __aexit__(self, *exc) -> None:
        self.server.close()


def _small_workload(pool, model="ok", tokens=5):
    classes = classes_with_tokens({c.name: tokens for c in DEFAULT_CLASSES})
    return Workload(model, classes, pool=pool[:2], seed=0)


def test_open_loop_against_fake_server(pool):
    fake = FakeServer(first_delay=0.05, token_delay=0.01)

    async def go():
        async with fake as url:
            spec = LoadSpec(mode="open", qps=25, duration_s=1.0, drain_s=5, seed=4)
            return await run_load(url, _small_workload(pool), spec)

    run = asyncio.run(go())
    n = len(run.arrivals)
    assert 10 <= n <= 45 and len(run.results) == n == len(fake.bodies)
    assert all(r.ok and r.output_tokens == 5 and r.prompt_tokens == 50 for r in run.results)
    for r in run.results:
        # lower bounds are the server's sleeps; upper bounds leave room for a busy shared CPU
        assert 0.04 <= r.ttft < 2.0 and r.e2e >= r.ttft + 4 * 0.01 and 0.009 <= r.tpot < 1.0
    starts = [r.start for r in run.results]
    assert all(abs(s - a) < 0.5 for s, a in zip(starts, run.arrivals))  # sent on schedule
    assert all(b["stream"] and b["ignore_eos"] for b in fake.bodies)
    s = summarize(run)
    assert s["errors"] == {} and 0.04 <= s["ttft_s"]["p50"] < 1.0


def test_warm_up_load_runs_unmeasured_load_then_idles(pool):
    from benchmarks.loadgen.sweep import warm_up_load

    fake = FakeServer(first_delay=0.01, token_delay=0.005)

    async def serve_while(fn):
        async with fake as url:
            return await asyncio.to_thread(fn, url)

    spec = LoadSpec(mode="open", qps=20, duration_s=0.5, drain_s=5, seed=3)
    t0 = time.perf_counter()
    res = asyncio.run(serve_while(lambda url: warm_up_load(url, _small_workload(pool), spec, idle_s=0.3)))
    assert time.perf_counter() - t0 >= 0.8
    assert res["requests"] == len(fake.bodies) >= 3 and res["ok"] == res["requests"] and res["errors"] == 0
    assert (res["qps"], res["seconds"], res["idle_s"]) == (20, 0.5, 0.3)


def test_closed_loop_sessions_carry_their_conversation(pool):
    fake = FakeServer(first_delay=0.01, token_delay=0.002)

    async def go():
        async with fake as url:
            spec = LoadSpec(mode="closed", sessions=3, duration_s=1.0, turns=2, drain_s=5, seed=1)
            return await run_load(url, _small_workload(pool, tokens=3), spec)

    run = asyncio.run(go())
    assert len(run.results) >= 6 and all(r.ok for r in run.results)
    followups = [b for b in fake.bodies if len(b["messages"]) == 3]
    assert followups, "no second turns were sent"
    for b in followups:   # the assistant turn carries what the fake server streamed
        assert b["messages"][1] == {"role": "assistant", "content": "t0 t1 t2 "}
    # closed loop: never more than `sessions` requests in flight
    events = sorted([(r.start, 1) for r in run.results] + [(r.end, -1) for r in run.results])
    level = peak = 0
    for _, d in events:
        level += d
        peak = max(peak, level)
    assert peak <= 3
    budget = asyncio.run(_closed_with_budget(pool))
    assert len(budget.results) == 4


async def _closed_with_budget(pool):
    async with FakeServer(0.0, 0.0) as url:
        spec = LoadSpec(mode="closed", sessions=2, duration_s=30, max_requests=4, turns=2)
        return await run_load(url, _small_workload(pool, tokens=2), spec)


@pytest.mark.parametrize("model,error", [("busy", "http_429_overloaded"),
                                         ("midstream", "stream_engine_error"),
                                         ("hang", "drain_timeout")])
def test_errors_are_classified(pool, model, error):
    async def go():
        async with FakeServer() as url:
            spec = LoadSpec(mode="open", qps=20, duration_s=0.3, drain_s=0.5, max_requests=3, seed=2)
            return await run_load(url, _small_workload(pool, model), spec)

    run = asyncio.run(go())
    assert run.results and all(r.error == error for r in run.results)
    message = {"busy": "queue full", "midstream": "boom", "hang": None}[model]
    assert all(r.error_message == message for r in run.results)
    if model == "busy":
        assert all(r.status == 429 for r in run.results)


def test_request_timeout_and_connect_error(pool):
    async def go():
        async with FakeServer() as url:
            spec = LoadSpec(mode="open", qps=20, duration_s=0.2, drain_s=5, max_requests=2,
                            request_timeout_s=0.3)
            timed = await run_load(url, _small_workload(pool, "hang"), spec)
        from benchmarks.loadgen.server import free_port

        dead = await run_load(f"http://127.0.0.1:{free_port()}", _small_workload(pool),
                              LoadSpec(mode="open", qps=20, duration_s=0.2, max_requests=2))
        return timed, dead

    timed, dead = asyncio.run(go())
    assert [r.error for r in timed.results] == ["timeout"] * len(timed.results) and timed.results
    assert [r.error for r in dead.results] == ["connect_error"] * len(dead.results) and dead.results


def test_run_load_refuses_remote_targets(pool):
    with pytest.raises(ValueError, match="loopback"):
        asyncio.run(run_load("http://192.0.2.1:80", _small_workload(pool), LoadSpec(duration_s=1)))


def test_loadspec_validation():
    with pytest.raises(ValueError):
        LoadSpec(mode="burst")
    assert LoadSpec(profile=[(2, 1.0), (3, 2.0)]).duration_s == 5
    assert lg_client.LoadSpec(mode="closed", sessions=4).offered == 4.0


# ------------------------------------------------------------------------- server config
