"""The GPU benchmark scripts' parts that run without a GPU: engine_arrivals.py's seeded schedule and
padding, gpu_sweep.py's budget check, engine fields and load-generator command line,
pool_spread.py's image-token counts, and decode_order_sim.py's model. A device call lost to one of these costs minutes of the
session's 30; here they cost seconds.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen.workload import build_image_pool  # noqa: E402


def test_engine_arrivals_schedule_is_seeded_and_shaped_like_the_app():
    """benchmarks/engine_arrivals.py: the same arrivals for every variant (seeded), the loadgen's
    class mix and lengths, images resized as Preprocess does, one image token per merged patch."""
    from benchmarks.engine_arrivals import Patches, request, schedule
    a = schedule(20.0, 30.0, 7, 2359296)
    assert a == schedule(20.0, 30.0, 7, 2359296) and a != schedule(20.0, 30.0, 8, 2359296)
    assert 500 <= len(a) <= 700 and all(0 < x["at"] < 30 for x in a)
    lengths = Counter(x["max_tokens"] for x in a)
    assert set(lengths) == {48, 128, 192} and lengths[128] > lengths[48] > lengths[192]
    assert Counter(len(x["grids"]) for x in a)[2] / len(a) == pytest.approx(0.10, abs=0.04)
    grids = {g for x in a for g in x["grids"]}
    assert (1, 34, 60) in grids and (1, 30, 40) in grids          # 1920x1080 -> 1920x1088; 640x480
    assert all(g[1] % 2 == 0 and g[2] % 2 == 0 and g[1] * g[2] * 256 <= 2359296 for g in grids)
    patches = Patches(0)
    r1, r2 = request(0, a[0], patches, "x"), request(1, a[0], patches, "x")
    assert r1.images[0].image_id != r2.images[0].image_id            # no vision-cache hits
    assert r1.images[0].pixel_values is r2.images[0].pixel_values     # one array per grid
    n_img = sum(im.num_tokens() for im in r1.images)
    assert r1.prompt_token_ids.count(151655) == n_img and len(r1.prompt_token_ids) == n_img + 40 + 8 + 2 * len(r1.images)
    assert r1.sampling.ignore_eos and r1.sampling.max_tokens == a[0]["max_tokens"]


def test_engine_arrivals_padding_share_falls_with_the_bucket_step():
    from benchmarks.engine_arrivals import padding
    out = padding([256, 128, 64], 5.0, 60.0, 7, 2359296)
    assert out["requests"] > 200 and 900 < out["mean_prompt_tokens"] < 1500
    assert out["step_256_padding_pct"] > out["step_128_padding_pct"] > out["step_64_padding_pct"] > 0


def test_gpu_sweep_refuses_a_budget_too_short_for_its_first_step():
    """benchmarks/gpu_sweep.py checks --seconds before it starts Ray: the last session's 120-s step
    at 235 s (start, a 20-s warm-up, the step and its drain did not fit; measured nothing) is
    refused, and so is a 300-s step at 420 s (one such run reached its step, the next started its app
    and missed the step by ~3 s) and a 90-s step at 235 s (its app was ready after 105 s; the step
    was skipped) and since 2026-12-01 a 300-s step at 460 s (app ready after 117 s: skipped); 530 s
    passes; a later run's reserve counts."""
    from benchmarks.gpu_sweep import first_step_shortfall
    assert first_step_shortfall(235, 120, 20) > 0
    assert first_step_shortfall(420, 300, 20) > 0           # started, then missed its step by ~3 s
    assert first_step_shortfall(460, 300, 20) > 0           # app ready after 117 s: skipped its step
    assert first_step_shortfall(530, 300, 20) == 0
    assert first_step_shortfall(240, 30, 20) == 0 and first_step_shortfall(240, 30, 20, kept=100) > 0
    assert first_step_shortfall(150, 10, 0) == 0            # no warm-up load: start, step and drain
    assert first_step_shortfall(235, 90, 10) > 0            # app ready after 105 s: skipped its step


def test_pool_spread_counts_the_image_tokens_each_pool_sends():
    """benchmarks/pool_spread.py: the expectation over the workload's resolutions and mix, and per
    pool the image tokens per request its draws send, deterministic, inside the pool's own range."""
    from benchmarks.loadgen.workload import RESOLUTIONS, expected_image_tokens
    from benchmarks.pool_spread import pool_figures, population_image_tokens

    per_image = sum(expected_image_tokens(w, h) for w, h in RESOLUTIONS) / len(RESOLUTIONS)
    assert population_image_tokens() == pytest.approx(per_image * 1.1)   # 10 % of requests carry two
    a, b = pool_figures(3, 300, 4), pool_figures(3, 300, 4)
    assert a == b and a["seed"] == 3
    pool = build_image_pool(4, seed=3)
    toks = [expected_image_tokens(p.width, p.height) for p in pool]
    assert min(toks) <= a["image_tokens_per_request"] <= 2 * max(toks)
    assert pool_figures(3, 300, 4, draw_seed=4) != a                      # other draws, same pool


def test_gpu_sweep_passes_the_seeds_to_the_load_generator():
    """--seed reaches the sweep always, --pool-seed only when given (the loadgen's default, the pool
    following --seed, keeps every earlier command's workload); both parse in the loadgen."""
    import argparse

    from benchmarks.gpu_sweep import loadgen_argv
    from benchmarks.loadgen import cli
    a = argparse.Namespace(step=300, warmup_load=20, seed=1, pool_seed=None, model="/tmp/m", out="/o")
    argv = loadgen_argv(a, "capped-continuous", "http://127.0.0.1:1", "23", 400.0)
    assert argv[argv.index("--seed") + 1] == "1" and "--pool-seed" not in argv
    a.pool_seed = 0
    argv = loadgen_argv(a, "capped-continuous", "http://127.0.0.1:1", "23", 400.0)
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd")
    sp = sub.add_parser("sweep")
    cli.add_workload_args(sp)
    parsed, _ = ap.parse_known_args(argv)
    assert (parsed.seed, parsed.pool_seed) == (1, 0) and argv[-1] == "/o/capped-continuous"


@pytest.mark.parametrize("config", ["deployments.gpu.yaml", "deployments.yaml"])
def test_gpu_sweep_engine_fields_validate_for_each_engine(config):
    """A device call lost two deploys to this: the sweep handed deployments.gpu.yaml's
    continuous-engine options (separate_process, prefill_stream) to its hf-generate runs, which the
    app's config rejects. Each run's engine section must validate, and the continuous runs keep the
    yaml's options and the command line's."""
    import argparse

    from benchmarks.gpu_sweep import engine_overrides
    from benchmarks.loadgen.server import build_serve_config
    from serve_app.config import AppConfig
    a = argparse.Namespace(model="/models/m", quantization="fp8", device=None,
                           engine_json='{"pdl": true, "lm_head_quantization": "fp8"}')
    for engine in ("continuous", "hf-generate"):
        for cap in (24, None):
            cfg = build_serve_config(ROOT / config, port=8000, engine=engine_overrides(a, engine, cap))
            eng = AppConfig.model_validate(cfg["applications"][0]["args"]).engine
            assert eng.engine == engine and eng.model == "/models/m"
            if engine == "continuous":
                assert eng.quantization == "fp8" and eng.pdl and eng.lm_head_quantization == "fp8"
                assert eng.separate_process == (config == "deployments.gpu.yaml")
            else:
                assert eng.quantization is None and not eng.separate_process and not eng.prefill_stream


def test_gpu_sweep_checks_every_runs_config_before_it_starts_ray(tmp_path):
    """The docstring's CPU smoke test once ran the GPU yaml on the CPU: Ray started, the app's VLM
    replicas died in start-up, and the sweep said only "Failed to update the deployments ['VLM']".
    Now each run's config is validated first, and the sweep exits 2 naming the option."""
    import argparse
    import subprocess

    from benchmarks.gpu_sweep import run_config
    from serve_app.config import AppConfig
    a = argparse.Namespace(model="builtin:tiny-qwen3-vl", quantization=None, device="cpu", engine_json=None,
                           config=str(ROOT / "deployments.yaml"), replica_gpus=None)
    cfg = run_config(a, "continuous", 24.0, 1, 8000)
    assert AppConfig.model_validate(cfg["applications"][0]["args"]).engine.device == "cpu"
    assert all("num_gpus" not in d.get("ray_actor_options", {}) for d in cfg["applications"][0]["deployments"])
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_sweep.py"), str(tmp_path / "s"),
                          "--model", "builtin:tiny-qwen3-vl", "--device", "cpu", "--only", "capped-continuous",
                          "--no-budget-check"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "capped-continuous: the app's config is invalid" in out.stderr and "need a CUDA GPU" in out.stderr
    assert "deployments.yaml" in out.stderr and not (tmp_path / "s").exists()


def test_decode_order_sim_moves_the_wait_from_long_to_short_answers(tmp_path):
    """benchmarks/decode_order_sim.py, through the engine's own decode_rows.pick: the same seeded
    arrivals for both orders; by laxity the 192-token class's e2e P95 falls and the 48-token
    class's rises (the wait moves to them), more requests wait at a time (a long one holds its row
    longer), and every request ends; with an admission limit the wait before admission appears and
    laxity lengthens it; --out writes the table and the JSON."""
    from benchmarks.decode_order_sim import main, simulate
    arrival, laxity = (simulate(24.0, order, seed=3, seconds=120) for order in ("arrival", "laxity"))
    assert arrival["requests"] == laxity["requests"] > 2000
    a, x = arrival["class_p95"], laxity["class_p95"]
    assert x["cross_region_reasoning"] < a["cross_region_reasoning"]
    assert x["short_description"] > a["short_description"]
    assert laxity["mean_waiting"] > arrival["mean_waiting"] > 0
    assert 10 < arrival["mean_batch"] <= 24
    assert 0.5 < arrival["e2e_p50"] < arrival["e2e_p95"] < 5
    assert arrival["queue_mean"] == 0 and arrival["ttft_p95"] <= 0.18   # no admission limit: no queue
    # with 36 admitted a request waiting for a decode row holds its place: by laxity the short
    # answers hold theirs longer, so the queue before admission and TTFT grow (as measured at 24 QPS)
    arrival36, laxity36 = (simulate(24.0, order, seed=3, seconds=120, admitted=36) for order in ("arrival", "laxity"))
    assert laxity36["queue_mean"] > arrival36["queue_mean"] > 0
    assert laxity36["ttft_p95"] > arrival36["ttft_p95"] > arrival["ttft_p95"]
    assert arrival36["e2e_p95"] >= arrival["e2e_p95"] * 0.98
    assert main(["--qps", "20", "--seeds", "0", "--seconds", "30", "--step-scales", "1,0.9",
                 "--out", str(tmp_path)]) == 0
    table = (tmp_path / "decode_order_sim.md").read_text()
    assert "| 20 | - | 1 | arrival | 0 |" in table and "| 20 | - | 0.9 | laxity | 0 |" in table
    # shorter steps, shorter answers: the same arrivals end sooner
    assert simulate(24.0, "arrival", seed=3, seconds=120, step_ms=3.6 * 0.9, row_ms=0.18 * 0.9)["e2e_p95"] \
        < arrival["e2e_p95"]
