"""benchmarks/loadgen's Serve side: the config builder over deployments.yaml, the autoscaling
run's helpers (profiles, scale events, scale-up latency), and the SLO sweep's plan, report and
step line. No Ray here either."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen.client import LoadSpec  # noqa: E402
from test_loadgen import _res, _small_workload, pool  # noqa: E402,F401  (fixture)


def test_build_serve_config_from_deployments_yaml():
    from ray.serve.schema import ServeDeploySchema

    from benchmarks.loadgen.server import build_serve_config, cpus_needed
    from serve_app.config import AppConfig

    cfg = build_serve_config(ROOT / "deployments.yaml", port=12345,
                             engine={"engine": "continuous", "max_gpu_memory_gb": 24},
                             deployments={"VLM": {"autoscaling_config": {"max_replicas": 2}}},
                             vlm_num_gpus=1.0)
    ServeDeploySchema.model_validate(cfg)
    app = cfg["applications"][0]
    AppConfig.model_validate(app["args"])
    assert cfg["http_options"]["port"] == 12345 and cfg["http_options"]["host"] == "127.0.0.1"
    assert app["args"]["engine"]["engine"] == "continuous" and app["args"]["engine"]["max_gpu_memory_gb"] == 24
    assert app["args"]["tables"]["enabled"] is False
    deps = {d["name"]: d for d in app["deployments"]}
    assert "TableExtractor" not in deps
    assert deps["VLM"]["ray_actor_options"]["num_gpus"] == 1.0
    vlm_as = deps["VLM"]["autoscaling_config"]
    assert vlm_as["max_replicas"] == 2 and "target_ongoing_requests" in vlm_as  # merged, not replaced
    assert cpus_needed(cfg) == pytest.approx(
        sum((d.get("autoscaling_config") or {}).get("max_replicas", 1)
            * d.get("ray_actor_options", {}).get("num_cpus", 1) for d in app["deployments"]))
    with pytest.raises(ValueError, match="no deployment"):
        build_serve_config(ROOT / "deployments.yaml", port=1, deployments={"Nope": {}})


def test_autoscale_helpers():
    from benchmarks.autoscale_run import offered_at, parse_profile, scale_events, timeline

    prof = parse_profile("10:0.5,20:2")
    assert prof == [(10.0, 0.5), (20.0, 2.0)]
    assert [offered_at(prof, t) for t in (0, 9.9, 10, 29.9, 30)] == [0.5, 0.5, 2.0, 2.0, 0.0]
    with pytest.raises(ValueError):
        parse_profile("10:-1")
    samples = [{"t": float(t), "replicas": {"VLM": {"RUNNING": n}}} for t, n in enumerate([1, 1, 2, 2, 1])]
    assert scale_events(samples, "VLM") == [{"t": 2.0, "from": 1, "to": 2}, {"t": 4.0, "from": 2, "to": 1}]
    results = [_res(0.0, 0.1, 1.5), _res(1.0, 0.1, 2.0), _res(2.0, None, 0.1, error="x")]
    tl = timeline(samples, results, prof, rate_window_s=2.0, latency_window_s=10.0)
    assert tl[3]["completed_qps"] == pytest.approx(1.0)   # ends 1.5 and 3.0 within (1, 3]
    assert tl[3]["e2e_p95_s"] == pytest.approx(float(np.percentile([1.5, 2.0], 95)))
    assert tl[0]["e2e_p95_s"] is None and statistics.mean(p["offered_qps"] for p in tl) == 0.5


def test_scale_up_latency_from_replica_states():
    """Decision = a replica appears in any state; serving = RUNNING reaches the new count."""
    from benchmarks.autoscale_run import scale_up_latencies

    states = [{"RUNNING": 1}, {"RUNNING": 1, "STARTING": 1}, {"RUNNING": 1, "STARTING": 1},
              {"RUNNING": 2}, {"RUNNING": 1, "STOPPING": 1}, {"RUNNING": 1},
              {"RUNNING": 1, "STARTING": 1}]
    samples = [{"t": 0.5 * i, "replicas": {"VLM": st}} for i, st in enumerate(states)]
    assert scale_up_latencies(samples, "VLM") == [
        {"decided_t": 0.5, "from": 1, "to": 2, "serving_t": 1.5, "seconds": 1.0},
        {"decided_t": 3.0, "from": 1, "to": 2, "serving_t": None, "seconds": None}]  # never served
    assert scale_up_latencies(samples, "Preprocess") == []


def test_replacements_are_not_scale_ups():
    """A replica that failed its health checks is stopped and replaced in one controller update:
    RUNNING drops and comes back, but the target count never grows (seen on two H200s)."""
    from benchmarks.autoscale_run import replacements, scale_up_latencies

    states = [{"RUNNING": 2}, {"RUNNING": 1, "STOPPING": 1, "STARTING": 1}, {"RUNNING": 1, "STARTING": 1},
              {"RUNNING": 2}, {"RUNNING": 1, "STOPPING": 1}, {"RUNNING": 1}]   # then a scale-down
    samples = [{"t": 1.0 * i, "replicas": {"VLM": st}} for i, st in enumerate(states)]
    assert scale_up_latencies(samples, "VLM") == []
    assert replacements(samples, "VLM") == [{"t": 1.0, "running": 1}]


# -------------------------------------------------------------------------------- sweep
def _fake_step(capacity: float, lucky: float | None = None):
    """run_step stand-in: an engine that meets the SLO below ``capacity`` (and at ``lucky``)."""
    calls = []

    def run_step(url, workload, spec, warmup_s, slo, allow_remote):
        calls.append(spec.qps)
        ok = spec.qps <= capacity or spec.qps == lucky
        summary = {"offered": spec.qps, "achieved_qps": min(spec.qps, capacity)}
        return {"summary": summary, "slo_violations": [] if ok else ["P95 TTFT too high"]}
    return run_step, calls


def test_sweep_stops_at_first_miss_and_bisects(monkeypatch):
    from benchmarks.loadgen import sweep as sw

    fake, calls = _fake_step(capacity=5.0)
    monkeypatch.setattr(sw, "run_step", fake)
    plan = sw.SweepPlan([1, 2, 4, 8, 16], LoadSpec(duration_s=1, drain_s=0), refine=2)
    seen = []
    res = sw.run_sweep("http://127.0.0.1:1", None, plan, label="x", on_step=seen.append)
    assert calls == [1, 2, 4, 8, 6.0, 5.0]           # stop at 8, then bisect 4..8: 6 (miss), 5 (ok)
    assert res["max_at_slo"] == {"offered": 5.0, "achieved_qps": 5.0} and res["first_miss"] == 6.0
    assert len(seen) == 6 and all(s["engine"] == "x" for s in seen)


def test_sweep_steps_down_when_the_first_step_misses(monkeypatch):
    """A ladder that starts above the knee: refine steps go down by 15 % until one passes, then
    bisect (the two-GPU run's first ladder, 22/24/26/28, ended with no load at the SLO)."""
    from benchmarks.loadgen import sweep as sw

    fake, calls = _fake_step(capacity=17.0)
    monkeypatch.setattr(sw, "run_step", fake)
    plan = sw.SweepPlan([22, 24], LoadSpec(duration_s=1, drain_s=0), refine=3)
    res = sw.run_sweep("http://127.0.0.1:1", None, plan)
    assert calls == [22, 18.7, 15.895, 17.297]       # miss, miss, ok, then bisect 15.895..18.7
    assert res["max_at_slo"]["offered"] == 15.895 and res["first_miss"] == 17.297


def test_sweep_no_stop_ignores_lucky_pass_and_honours_deadline(monkeypatch):
    import time as _time

    from benchmarks.loadgen import sweep as sw

    fake, calls = _fake_step(capacity=2.0, lucky=8.0)
    monkeypatch.setattr(sw, "run_step", fake)
    plan = sw.SweepPlan([1, 2, 4, 8], LoadSpec(duration_s=1, drain_s=0), stop_on_miss=False)
    res = sw.run_sweep("http://127.0.0.1:1", None, plan)
    assert calls == [1, 2, 4, 8] and res["max_at_slo"]["offered"] == 2 and res["first_miss"] == 4
    assert res["max_achieved_qps"] == 2.0
    fake, calls = _fake_step(capacity=100)
    monkeypatch.setattr(sw, "run_step", fake)
    plan = sw.SweepPlan([1, 2], LoadSpec(duration_s=60, drain_s=0), deadline=_time.time() + 30)
    res = sw.run_sweep("http://127.0.0.1:1", None, plan)
    assert calls == [] and res["stopped"].startswith("time budget") and res["max_at_slo"] is None


def test_sweep_command_runs_the_warm_up_load_first(monkeypatch, tmp_path, pool):
    """`sweep --warmup-load S`: unmeasured load at half the first step's rate, before any step,
    recorded in the report's meta."""
    from benchmarks.loadgen import cli
    from benchmarks.loadgen import sweep as sw

    order = []
    fake, calls = _fake_step(capacity=5.0)

    def run_step(*args, **kw):
        order.append(("step", args[2].qps))
        return fake(*args, **kw)

    def warm_up_load(url, workload, spec, idle_s, allow_remote=False):
        order.append(("warm", spec.qps, spec.duration_s, idle_s))
        return {"qps": spec.qps, "requests": 3, "ok": 3, "errors": 0}

    async def warm_up(*a, **k):
        return []

    monkeypatch.setattr(sw, "run_step", run_step)
    monkeypatch.setattr(cli, "warm_up_load", warm_up_load)
    monkeypatch.setattr(cli, "warm_up", warm_up)
    monkeypatch.setattr(cli, "make_workload", lambda url, a: _small_workload(pool))
    monkeypatch.setattr(cli, "get_stats", lambda url: None)
    monkeypatch.setattr(cli, "step_line", lambda step: "")          # the stand-in steps are bare
    monkeypatch.setattr(cli, "write_reports", lambda *a, **k: None)
    out = tmp_path / "sw"
    assert cli.main(["sweep", "--url", "http://127.0.0.1:9", "--qps", "4,8", "--duration", "1", "--drain", "0",
                     "--warmup-load", "20", "--warmup-idle", "0.5", "--out", str(out)]) == 0
    assert order[0] == ("warm", 2.0, 20.0, 0.5) and [o[0] for o in order[1:]] == ["step"] * (len(order) - 1)
    meta = json.loads((out / "sweep.json").read_text())["meta"]
    assert meta["warmup_load"]["target"]["requests"] == 3


def test_zero_memory_cap_means_most_of_the_card_not_the_default_budget():
    import argparse

    from benchmarks.loadgen.cli import add_server_args, engine_overrides

    p = argparse.ArgumentParser()
    add_server_args(p)
    a = p.parse_args(["--max-gpu-memory-gb", "0"])
    assert engine_overrides(a) == {"max_gpu_memory_gb": None, "gpu_memory_fraction": 0.9}
    a = p.parse_args(["--max-gpu-memory-gb", "24"])
    assert engine_overrides(a) == {"max_gpu_memory_gb": 24.0}


def test_sweep_report_names_the_code_and_the_engine_start_up(tmp_path, monkeypatch):
    """sweep.md carries the hash of serve_app's sources (a device copy's git metadata may be
    stale) and each engine's start-up figures from /readyz. Real steps from a committed GPU run."""
    from benchmarks.loadgen import cli

    src = Path(__file__).parent.parent / "benchmarks/results/gpu-h200-prefill-vision-graphs/machine1-on/sweep.json"
    results = json.loads(src.read_text())
    results["meta"]["machine"]["code_sha"] = cli.code_sha()
    results["sweeps"][0]["engine_info"] = {"status": "ready", "startup_s": 41.2, "graph_capture_s": 3.1,
                                           "prefill_graph_capture_s": 6.5, "kv_tokens": 90112,
                                           "quantization": "fp8"}
    results["sweeps"][0]["steps"][0]["summary"]["slices"] = [
        {"start_s": 0.0, "seconds": 60.0, "requests": 1300, "errors": 0, "ttft_p95": 0.35, "e2e_p95": 1.6},
        {"start_s": 60.0, "seconds": 37.5, "requests": 800, "errors": 1, "ttft_p95": None, "e2e_p95": None}]
    monkeypatch.setenv("LOADGEN_NO_PLOT", "1")
    cli.write_reports(results, tmp_path)
    md = (tmp_path / "sweep.md").read_text()
    assert "| 60 | 37.5 | 800 | 1 | - | - |" in md and "| 0 | 60 | 1300 | 0 | 350 | 1600 |" in md
    assert len(cli.code_sha()) == 12 and f"serve_app sources {cli.code_sha()}" in md
    assert "| continuous | 41.2 | 3.1 | 6.5 | 90112 | fp8 |" in md
    assert "| continuous | 13.5 | 12.83 |" in md                      # the steps still render
    # every table's rows have as many cells as its header (else Markdown does not render it)
    tables, cur = [], []
    for ln in md.splitlines() + [""]:
        if ln.startswith("|"):
            cur.append(ln.count("|") - 1)
        elif cur:
            tables.append(cur)
            cur = []
    assert len(tables) >= 4 and all(len(set(t)) == 1 for t in tables), tables


def test_step_line_reports_the_engine_split_and_its_thread():
    from benchmarks.loadgen.sweep import step_line

    lat = {"p50": 0.1, "p95": 0.3}
    step = {"engine": "continuous",
            "summary": {"mode": "open", "offered": 16.5, "requests": 400, "achieved_qps": 16.1,
                        "ttft_s": lat, "e2e_s": {"p50": 0.8, "p95": 1.6}, "tpot_s": {"p50": 0.006}, "errors": {}},
            "engine_time": {"prefill_pct": 20.0, "vision_pct": 20.0, "decode_pct": 58.0, "other_pct": 2.0,
                            "host_busy_pct": 47.0, "host_gap_pct": 10.0, "host_idle_pct": 1.0,
                            "host_tick_pct": 0.1, "host_emit_pct": 0.5},
            "slo_violations": []}
    line = step_line(step)
    assert "prefill/vision/decode/other 20/20/58/2%" in line and line.endswith("SLO ok")
    assert "engine thread busy 47.0% gap 10.0% idle 1.0% tick 0.1% emit 0.5%" in line
    del step["engine_time"]["host_gap_pct"]
    assert "gap" not in step_line(step)                      # an engine without loop timers
    step["engine_time"].update(engine_queue_mean_ms=86.0, engine_queue_p95_le_ms=800, engine_blocked_rows_pct=30.5,
                               engine_blocked_prefill_backlog_pct=2.0, engine_blocked_kv_pages_pct=0.0)
    step["summary"]["slices"] = [{"ttft_p95": 0.31}, {"ttft_p95": 0.62}]
    line = step_line(step)
    assert "(queue mean 86 ms, P95 <= 800 ms; admission held by rows/backlog/KV 30.5 / 2.0 / 0.0%)" in line
    assert "TTFT P95 per slice 310/620 ms" in line
