"""The engine's limits on the CPU (tiny Qwen3-VL, fp32): a small KV budget queues instead of failing,
requests that can never run get a 400, vision-tower calls stay inside the start-up memory profile,
and a GPU out-of-memory error fails only the requests it hits."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from serve_app.engine.protocol import EngineRequest, SamplingParams
from serve_app.errors import ServeAppError
from test_engine import (VE, _collect, _config, _hf_greedy, _image_request, _request, _run,  # noqa: F401
                         hf_model, model_dir)


def test_small_kv_budget_queues_instead_of_failing(model_dir, hf_model):
    rng = np.random.default_rng(3)
    reqs = [_request(i, rng, i % 2, 30, ignore_eos=True) for i in range(6)]
    # 160 tokens of KV: one or two requests at a time, the rest must wait for freed pages
    cfg = _config(model_dir, max_num_seqs=6, kv_cache_tokens=160)

    async def scenario(engine):
        seen_waiting = 0

        async def watch():
            nonlocal seen_waiting
            while True:
                seen_waiting = max(seen_waiting, engine.stats()["waiting"])
                await asyncio.sleep(0.005)
        w = asyncio.create_task(watch())
        res = await asyncio.gather(*[_collect(engine, r) for r in reqs])
        w.cancel()
        return res, seen_waiting, engine.stats()

    results, seen_waiting, stats = _run(cfg, scenario)
    assert seen_waiting > 0
    assert stats["finished_total"] == 6
    for req, (toks, _, last) in zip(reqs, results):
        assert last.finish_reason == "length" and len(toks) == 30
    assert results[0][0][:10] == _hf_greedy(hf_model, reqs[0])[:10]


def test_rejects_what_can_never_run(model_dir):
    rng = np.random.default_rng(7)

    async def scenario(engine):
        errors = []
        too_long = EngineRequest("long", [5] * 600, [], SamplingParams(max_tokens=4))
        bad = _request(1, rng, 1, 4)
        bad.prompt_token_ids = bad.prompt_token_ids[:-8]          # drop some image tokens
        bad.prompt_token_ids += [VE]
        for r in (too_long, bad):
            with pytest.raises(ServeAppError) as e:
                await _collect(engine, r)
            errors.append(e.value)
        return errors

    errors = _run(_config(model_dir), scenario)
    assert [e.status for e in errors] == [400, 400]
    assert errors[0].code == "context_length_exceeded"


def test_vision_calls_stay_within_the_profiled_budget(model_dir, hf_model):
    """max_prefill_tokens 64 -> at most 64 x 4 = 256 patches per vision-tower call (the size the
    start-up memory profile measures): two 16x16 images go in two calls; a bigger image is a 400."""
    rng = np.random.default_rng(11)
    reqs = [_image_request(0, rng, [16, 16], 5), _image_request(1, rng, [8, 12], 5)]
    calls = []

    async def scenario(engine):
        runner = engine._sched.runner
        encode = runner.encode_images

        def spy(pixel, grids):
            calls.append(sum(t * h * w for t, h, w in grids))
            return encode(pixel, grids)

        runner.encode_images = spy
        res = await asyncio.gather(*[_collect(engine, r) for r in reqs])
        with pytest.raises(ServeAppError) as e:
            await _collect(engine, _image_request(2, rng, [18], 4))
        return res, e.value, engine.stats()

    results, err, stats = _run(_config(model_dir), scenario)
    assert calls and max(calls) <= 256 and sum(calls) == 2 * 256 + 64 + 144
    assert stats["vision_calls"] == len(calls) >= 3 and stats["images_encoded"] == 4
    for req, (toks, _, _) in zip(reqs, results):
        assert toks == _hf_greedy(hf_model, req), req.request_id
    assert (err.status, err.code) == (400, "image_too_large") and "324 patches" in str(err)


def test_gpu_out_of_memory_fails_only_the_requests_it_hits(model_dir, hf_model):
    """An OOM in the vision tower or in a prefill gives those requests a retryable 503 and frees
    their slots and pages; the engine stays healthy and serves the next requests exactly (under a
    burst, one unbounded vision batch used to kill the whole replica)."""
    rng = np.random.default_rng(12)
    a, b = _request(0, rng, 1, 5), _request(1, rng, 0, 5)
    c, d = _request(2, rng, 2, 6), _request(3, rng, 0, 6)
    arm = {"encode_images": False, "prefill": False}

    async def scenario(engine):
        runner = engine._sched.runner
        for name in arm:
            real = getattr(runner, name)

            def fake(*args, _real=real, _name=name):
                if arm[_name]:
                    arm[_name] = False
                    raise torch.OutOfMemoryError("CUDA out of memory (test)")
                return _real(*args)

            setattr(runner, name, fake)
        errors = []
        for req, name in ((a, "encode_images"), (b, "prefill")):
            arm[name] = True
            with pytest.raises(ServeAppError) as e:
                await _collect(engine, req)
            errors.append(e.value)
        res = await asyncio.gather(_collect(engine, c), _collect(engine, d))
        return errors, res, engine.stats(), engine.health()

    errors, res, stats, health = _run(_config(model_dir), scenario)
    assert [(e.status, e.code) for e in errors] == [(503, "gpu_out_of_memory")] * 2
    assert "encoding its images" in str(errors[0]) and "prefill" in str(errors[1])
    assert stats["failed_oom_total"] == 2 and stats["finished_total"] == 2
    assert stats["running"] == 0 and stats["kv_pages_free"] == stats["kv_pages_total"]
    assert health["ready"] is True
    for req, (toks, _, _) in zip((c, d), res):
        assert toks == _hf_greedy(hf_model, req), req.request_id
