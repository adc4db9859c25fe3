"""Continuous-batching engine on CPU (tiny Qwen3-VL, fp32), checked against HF ``generate``.

The tiny builtin model's N(0, 0.02) weights make greedy output repeat one token, which would hide
position or cache bugs; the fixture re-draws its matrices with a larger, seeded scale so outputs
are varied and sensitive to every input (a wrong M-RoPE delta breaks most image requests).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from serve_app.engine import create_engine
from serve_app.engine.config import EngineConfig
from serve_app.engine.continuous import ContinuousEngine
from serve_app.engine.protocol import EngineRequest, ImageInput, SamplingParams
from serve_app.errors import ServeAppError

IMG, VS, VE = 151655, 151652, 151653
# ENGINE_TEST_DEVICE=cuda runs the same checks through the GPU path (Triton kernels, CUDA graphs).
DEVICE = os.environ.get("ENGINE_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module")
def model_dir(tiny_model_path, tmp_path_factory) -> str:
    from serve_app.models import load_model

    model = load_model(tiny_model_path, dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    out = tmp_path_factory.mktemp("sharp-tiny")
    model.save_pretrained(out)
    for f in Path(tiny_model_path).iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "generation_config", "preprocessor")):
            shutil.copy(f, out / f.name)
    return str(out)


@pytest.fixture(scope="module")
def hf_model(model_dir):
    from serve_app.models import load_model

    return load_model(model_dir, dtype=torch.float32, device=DEVICE)


def _config(model_dir: str, **kw) -> EngineConfig:
    base = dict(model=model_dir, engine="continuous", device=DEVICE, dtype="float32", max_num_seqs=4,
                max_model_len=512, max_prefill_tokens=64)
    base.update(kw)
    return EngineConfig(**base)


def _image(rng, h: int, w: int, image_id: str | None = None) -> ImageInput:
    return ImageInput(rng.standard_normal((h * w, 1536)).astype(np.float32), (1, h, w),
                      image_id or f"img-{rng.integers(1 << 40)}")


def _request(i: int, rng, n_images: int, max_tokens: int, **sampling) -> EngineRequest:
    ids = [int(x) for x in rng.integers(100, 5000, size=int(rng.integers(3, 40)))]
    images = []
    for _ in range(n_images):
        h, w = (int(x) for x in rng.choice([2, 4, 6, 8], size=2))
        im = _image(rng, h, w)
        images.append(im)
        ids += [VS] + [IMG] * im.num_tokens() + [VE] + [int(x) for x in rng.integers(100, 5000, size=3)]
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    for k, v in sampling.items():
        setattr(sp, k, v)
    return EngineRequest(f"req-{i}", ids, images, sp)


def _hf_greedy(model, req: EngineRequest, **gen) -> list[int]:
    ids = torch.tensor([req.prompt_token_ids], device=DEVICE)
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    if req.images:
        kw["pixel_values"] = torch.from_numpy(np.concatenate([im.pixel_values for im in req.images])).to(DEVICE)
        kw["image_grid_thw"] = torch.tensor([im.grid_thw for im in req.images], device=DEVICE)
        kw["mm_token_type_ids"] = (ids == IMG).int()
    with torch.inference_mode():
        out = model.generate(**kw, max_new_tokens=req.sampling.max_tokens, do_sample=False,
                             temperature=None, top_p=None, top_k=None, **gen)
    return out[0, ids.shape[1]:].tolist()


def _assert_greedy(model, req: EngineRequest, toks: list[int]) -> None:
    """The engine's greedy tokens are HF's. On the CPU exactly. On the GPU each token must be
    HF's argmax or within GPU_TIE of it, HF fed the engine's own tokens: random weights leave
    near-ties (a top-2 gap of 0.009 seen) that GPU rounding may break the other way, in HF's
    own GPU run too."""
    if DEVICE == "cpu":
        assert toks == _hf_greedy(model, req), req.request_id
        return
    ids = list(req.prompt_token_ids)
    kw = {}
    if req.images:
        kw["pixel_values"] = torch.from_numpy(np.concatenate([im.pixel_values for im in req.images])).to(DEVICE)
        kw["image_grid_thw"] = torch.tensor([im.grid_thw for im in req.images], device=DEVICE)
    for j, t in enumerate(toks):
        x = torch.tensor([ids], device=DEVICE)
        with torch.inference_mode():
            lg = model(input_ids=x, attention_mask=torch.ones_like(x), mm_token_type_ids=(x == IMG).int(),
                       **kw).logits[0, -1].float()
        assert lg[t] >= lg.max() - GPU_TIE, (req.request_id, j, t, lg.argmax().item(), (lg.max() - lg[t]).item())
        ids.append(t)


GPU_TIE = 0.02


async def _collect(engine, req: EngineRequest, delay: float = 0.0):
    await asyncio.sleep(delay)
    toks, text, last = [], "", None
    async for d in engine.generate(req):
        toks += d.token_ids
        text += d.text
        last = d
    return toks, text, last


def _run(config: EngineConfig, scenario):
    """``scenario(engine)`` on a started engine of ``config`` (in-process or separate_process)."""
    async def main():
        engine = create_engine(config)
        await engine.start()
        try:
            return await scenario(engine)
        finally:
            await engine.shutdown()
    return asyncio.run(main())


def _burst_cpu_tokens(model_dir: str, reqs: list[EngineRequest], **config) -> tuple[list, dict]:
    """Greedy tokens of ``reqs`` arriving together on a small fp32 CPU engine (4 slots, 64-token
    chunks: later requests join mid-batch, long prompts are chunked), and its health info: the
    runs that emulation tests compare. Together, so that which rows share a step depends on the
    requests only: with staggered arrivals two runs batch differently, fp32 CPU GEMMs round
    differently per batch shape, and an e4m3 rounding can turn that into another greedy token."""
    async def scenario(engine):
        res = await asyncio.gather(*[_collect(engine, r) for r in reqs])
        return [t for t, _, _ in res], engine.health()
    return _run(_config(model_dir, device="cpu", **config), scenario)


def test_greedy_matches_hf_generate_staggered(model_dir, hf_model, tokenizer):
    """10 requests (0/1/2 images, prompts chunked past 64 tokens), 4 slots, joining mid-batch."""
    rng = np.random.default_rng(1)
    reqs = [_request(i, rng, i % 3, int(rng.integers(4, 24))) for i in range(10)]

    async def scenario(engine):
        res = await asyncio.gather(*[_collect(engine, r, 0.03 * i) for i, r in enumerate(reqs)])
        return res, engine.stats()

    results, stats = _run(_config(model_dir), scenario)
    assert stats["finished_total"] == 10 and stats["running"] == 0
    assert stats["kv_pages_free"] == stats["kv_pages_total"]
    assert any(len(r.prompt_token_ids) > 64 for r in reqs)  # chunked prefill was exercised
    # every request's first token and end were timed once, into the engine's latency buckets
    for name in ("queue", "ttft", "e2e"):
        assert sum(stats[f"{name}_bucket_counts"]) == 10 and stats[f"{name}_s_total"] >= 0
        assert len(stats[f"{name}_bucket_counts"]) == len(stats[f"{name}_bucket_bounds_s"]) + 1
    assert stats["e2e_s_total"] > stats["ttft_s_total"] > stats["queue_s_total"]
    for req, (toks, text, last) in zip(reqs, results):
        ref = _hf_greedy(hf_model, req)
        assert toks == ref, req.request_id
        assert text == tokenizer.decode(ref, skip_special_tokens=True)
        assert last.num_prompt_tokens == len(req.prompt_token_ids)
        assert last.num_generated_tokens == len(ref)
        assert last.finish_reason in ("length", "stop")


def test_queue_time_is_the_wait_for_a_free_row(model_dir):
    """With one row, three requests at once: the second and third wait in the engine's FIFO for
    the first to finish (the third for the second too), and the queue buckets hold that wait."""
    rng = np.random.default_rng(4)
    reqs = [_request(i, rng, 0, 24, ignore_eos=True) for i in range(3)]

    async def scenario(engine):
        async def timed(r):
            t = asyncio.get_running_loop().time()
            await _collect(engine, r)
            return asyncio.get_running_loop().time() - t
        took = await asyncio.gather(*[timed(r) for r in reqs])
        return took, engine.stats()

    took, stats = _run(_config(model_dir, max_num_seqs=1), scenario)
    assert sum(stats["queue_bucket_counts"]) == 3
    # the second waited about the first's whole run (min(took)), the third that and the second's
    assert stats["queue_s_total"] >= 1.5 * min(took)
    assert stats["queue_s_total"] < stats["ttft_s_total"]
    # the head of the queue waited behind the full row for about two runs; nothing else held it
    rows = stats["admission_blocked_rows_s_total"]
    assert min(took) <= rows <= stats["queue_s_total"]
    assert stats["admission_blocked_kv_pages_s_total"] == 0
    assert stats["admission_blocked_prefill_backlog_s_total"] < 0.5 * rows


def test_rows_past_max_decode_rows_get_their_first_token_then_wait(model_dir, hf_model, monkeypatch):
    """Four rows, two decoding at once: all four requests of a burst get their first token
    before the first one finishes (the last two wait for a decode row after it, counted as
    decode_deferred), no decode step has more than two rows, and every request's greedy tokens
    are HF generate's."""
    from serve_app.engine._private.runner import ModelRunner
    batches: list[int] = []
    decode = ModelRunner.decode

    def logged(self, x, pos, *a, **kw):
        batches.append(len(pos))
        return decode(self, x, pos, *a, **kw)
    monkeypatch.setattr(ModelRunner, "decode", logged)
    rng = np.random.default_rng(9)
    reqs = [_request(i, rng, i % 2, 24, ignore_eos=True) for i in range(4)]

    async def scenario(engine):
        events: list[tuple[str, str]] = []
        seen: list[dict] = []

        async def run(req):
            toks = []
            async for d in engine.generate(req):
                if not toks:
                    events.append(("first", req.request_id))
                    if len(events) == 4:
                        seen.append(engine.stats())
                toks += d.token_ids
            events.append(("done", req.request_id))
            return toks
        return await asyncio.gather(*[run(r) for r in reqs]), events, seen + [engine.health()]

    toks, events, seen = _run(_config(model_dir, max_num_seqs=4, max_decode_rows=2), scenario)
    assert (seen[-1]["max_num_seqs"], seen[-1]["max_decode_rows"]) == (4, 2)     # /readyz shows both
    assert [kind for kind, _ in events[:4]] == ["first"] * 4, events
    assert max(batches) == 2 and seen and seen[0]["decode_deferred"] == 2
    for req, t in zip(reqs, toks):
        _assert_greedy(hf_model, req, t)
    with pytest.raises(ValueError, match="must not exceed max_num_seqs"):
        EngineConfig(max_num_seqs=4, max_decode_rows=5)


def test_admission_blocks_name_the_limit_that_held(model_dir):
    """Eight requests at once with rows to spare: admission stops at max_prefill_tokens of
    waiting prompt tokens, and only that limit is charged. Two requests that each need the whole
    KV cache: the second waits for pages, and that limit is charged."""
    rng = np.random.default_rng(8)
    reqs = [_request(i, rng, 0, 8) for i in range(8)]
    stats = _run(_config(model_dir, max_num_seqs=8, max_prefill_tokens=64), lambda engine: _collect_all(engine, reqs))
    assert stats["admission_blocked_prefill_backlog_s_total"] > 0
    assert stats["admission_blocked_rows_s_total"] == stats["admission_blocked_kv_pages_s_total"] == 0

    big = [_request(10 + i, rng, 0, 16) for i in range(2)]
    stats = _run(_config(model_dir, max_num_seqs=4, kv_cache_tokens=64),
                 lambda engine: _collect_all(engine, big))
    assert stats["finished_total"] == 2
    assert stats["admission_blocked_kv_pages_s_total"] > 0
    assert stats["admission_blocked_rows_s_total"] == 0


def test_arrival_gaps_are_bucketed(model_dir):
    """The gaps between requests' arrivals in the engine, in buckets: 1 ms, 3 ms, 96 ms, 2.9 s."""
    from serve_app.engine._private.scheduler import Scheduler
    sched = Scheduler.load(_config(model_dir), emit=lambda items: None)
    rng = np.random.default_rng(11)
    for i, t in enumerate([10.0, 10.001, 10.004, 10.1, 13.0]):
        sched.add(_request(i, rng, 0, 4), t)
    st = sched.stats()
    assert st["arrival_gap_bucket_bounds_s"][:3] == [0.002, 0.005, 0.01]
    assert st["arrival_gap_bucket_counts"] == [1, 1, 0, 0, 0, 1, 0, 0, 0, 1]
    assert st["arrival_gap_s_total"] == pytest.approx(3.0)


async def _collect_all(engine, reqs):
    await asyncio.gather(*[_collect(engine, r) for r in reqs])
    return engine.stats()


def test_repetition_penalty_matches_hf_generate(model_dir, hf_model):
    """Greedy with repetition_penalty equals HF generate's, next to requests without one (their
    slots skip the token-presence rows; a slot reused by a penalised request starts clean)."""
    rng = np.random.default_rng(5)
    reqs = [_request(i, rng, i % 2, 16, **({"repetition_penalty": 1.8} if i % 2 else {}))
            for i in range(6)]

    async def scenario(engine):
        return await asyncio.gather(*[_collect(engine, r, 0.02 * i) for i, r in enumerate(reqs)])

    results = _run(_config(model_dir, max_num_seqs=2), scenario)
    for req, (toks, _, _) in zip(reqs, results):
        ref = _hf_greedy(hf_model, req, repetition_penalty=req.sampling.repetition_penalty)
        assert toks == ref, req.request_id
    plain = [toks for (toks, _, _), r in zip(results, reqs) if r.sampling.repetition_penalty == 1.0]
    pen = [toks for (toks, _, _), r in zip(results, reqs) if r.sampling.repetition_penalty != 1.0]
    assert max(len(set(t)) for t in pen) > 1 and plain


def test_compact_uint8_images_equal_float_images(model_dir, hf_model):
    """Preprocess ships uint8 patches; the engine normalises them on its device bit-identically,
    so greedy tokens equal those of the float32 input (and HF's), also mixed in one batch."""
    from serve_app._image import normalise_patches

    rng = np.random.default_rng(9)
    reqs = []
    for i in range(3):
        h, w = (4, 6) if i != 1 else (6, 8)
        u8 = rng.integers(0, 256, size=(h * w, 3, 16, 16), dtype=np.uint8)
        ids = [int(x) for x in rng.integers(100, 5000, size=5)]
        ids += [VS] + [IMG] * (h * w // 4) + [VE] + [int(x) for x in rng.integers(100, 5000, size=3)]
        for kind, px in (("u8", u8), ("f32", normalise_patches(u8))):
            reqs.append(EngineRequest(f"r{i}-{kind}", ids, [ImageInput(px, (1, h, w), f"{kind}-{i}")],
                                      SamplingParams(max_tokens=8, temperature=0.0)))

    async def scenario(engine):
        runner = engine._sched.runner
        u8 = reqs[0].images[0].pixel_values
        dev = runner.pixels.to_device([u8, reqs[1].images[0].pixel_values, u8])
        ref = torch.from_numpy(normalise_patches(u8))
        assert torch.equal(dev[:len(u8)].cpu(), ref) and torch.equal(dev[-len(u8):].cpu(), ref)
        return await asyncio.gather(*[_collect(engine, r) for r in reqs])

    results = _run(_config(model_dir), scenario)
    for j in range(0, len(reqs), 2):
        assert results[j][0] == results[j + 1][0] == _hf_greedy(hf_model, reqs[j + 1])


def test_cancel_frees_slot_and_pages(model_dir):
    rng = np.random.default_rng(2)

    async def scenario(engine):
        long_req = _request(0, rng, 1, 400, ignore_eos=True)
        got = []
        async for d in engine.generate(long_req):
            got.append(d)
            if len(got) == 3:
                await engine.cancel(long_req.request_id)
        assert got[-1].finish_reason == "cancelled"
        # closing the stream early cancels too
        other = _request(1, rng, 0, 400, ignore_eos=True)
        stream = engine.generate(other)
        await stream.__anext__()
        await stream.aclose()
        for _ in range(100):
            s = engine.stats()
            if s["running"] == 0 and s["kv_pages_free"] == s["kv_pages_total"]:
                break
            await asyncio.sleep(0.02)
        # the freed slot serves a new request
        toks, _, last = await _collect(engine, _request(2, rng, 0, 5))
        return engine.stats(), toks, last

    stats, toks, last = _run(_config(model_dir, max_num_seqs=1), scenario)
    assert stats["cancelled_total"] == 2 and stats["running"] == 0
    assert stats["kv_pages_free"] == stats["kv_pages_total"]
    assert len(toks) == last.num_generated_tokens and last.finish_reason in ("length", "stop")


def test_slow_consumer_gets_merged_deltas(model_dir):
    """Deltas that pile up while the consumer is busy come out merged: the same text, tokens and
    counts as a fast consumer gets, in fewer items; an engine error still comes after them."""
    rng = np.random.default_rng(8)
    req = _request(0, rng, 1, 24, ignore_eos=True)

    async def consume(engine, request_id, pause=0.0, park=False):
        req.request_id = request_id
        before = engine.stats()["finished_total"]
        out = []
        async for d in engine.generate(req):
            out.append(d)
            if park and len(out) == 1:  # sit out the whole generation: the rest is queued
                while engine.stats()["finished_total"] == before:
                    await asyncio.sleep(0.005)
                await asyncio.sleep(0.05)  # the finishing step's deltas reach the queue
            await asyncio.sleep(pause)
        return out

    async def scenario(engine):
        fast = await consume(engine, "fast")
        slow = await consume(engine, "slow", pause=0.02)
        parked = await consume(engine, "parked", park=True)
        # an error queued behind deltas: the deltas first (merged), then the error
        stream = engine.generate(_request(1, rng, 0, 400, ignore_eos=True))
        first = await stream.__anext__()
        await asyncio.sleep(0.1)
        await engine.shutdown()
        rest = []
        with pytest.raises(ServeAppError) as e:
            async for d in stream:
                rest.append(d)
        return fast, slow, parked, first, rest, e.value

    fast, slow, parked, first, rest, err = _run(_config(model_dir), scenario)
    flat = lambda ds: ([t for d in ds for t in d.token_ids], "".join(d.text for d in ds))  # noqa: E731
    assert len(flat(fast)[0]) == 24
    for got in (slow, parked):
        assert flat(got) == flat(fast)
        assert (got[-1].finish_reason, got[-1].num_generated_tokens) == ("length", 24)
        assert all(d.finish_reason is None for d in got[:-1])
        assert [d.num_prompt_tokens for d in got] == [fast[0].num_prompt_tokens] * len(got)
    assert len(parked) <= 2  # what was queued while it sat out came as one item
    assert err.code == "engine_shutdown"
    assert len(rest) == 1 and rest[0].finish_reason is None and rest[0].token_ids
    assert rest[0].num_generated_tokens == len(first.token_ids) + len(rest[0].token_ids)


def test_seeded_sampling_reproducible_alone_and_in_batch(model_dir):
    rng = np.random.default_rng(4)
    target = _request(0, rng, 1, 20, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)
    others = [_request(i, rng, i % 3, 20, temperature=0.8, seed=i, ignore_eos=True) for i in range(1, 5)]

    async def scenario(engine):
        alone = await _collect(engine, target)
        target.request_id = "again"
        batch = await asyncio.gather(_collect(engine, target, 0.01),
                                     *[_collect(engine, o) for o in others])
        target.request_id, target.sampling.seed = "other-seed", 99
        diff = await _collect(engine, target)
        return alone[0], batch[0][0], diff[0]

    alone, in_batch, other_seed = _run(_config(model_dir), scenario)
    assert alone == in_batch
    assert other_seed != alone


def test_stop_strings_and_stop_tokens_cut_exactly(model_dir):
    rng = np.random.default_rng(5)
    base = _request(0, rng, 1, 20)

    async def scenario(engine):
        toks, text, _ = await _collect(engine, base)
        assert len(text) > 12
        stop = text[6:10]
        base.request_id, base.sampling.stop = "with-stop", [stop, "never-there"]
        _, cut_text, last = await _collect(engine, base)
        base.request_id, base.sampling.stop = "with-stop-id", []
        base.sampling.stop_token_ids = [toks[4]]
        stop_toks, _, last_id = await _collect(engine, base)
        return toks, text, stop, cut_text, last, stop_toks, last_id

    toks, text, stop, cut_text, last, stop_toks, last_id = _run(_config(model_dir), scenario)
    assert cut_text == text[:text.index(stop)]
    assert last.finish_reason == "stop"
    assert stop_toks == toks[:toks.index(toks[4]) + 1] and last_id.finish_reason == "stop"


def test_min_tokens_bans_stop_tokens_like_hf(model_dir, hf_model):
    """min_tokens forbids the request's stop tokens until it is reached (HF's min_new_tokens), in a
    batch where other rows have no minimum; with ignore_eos the EOS ids are not stop tokens."""
    rng = np.random.default_rng(11)
    base = _request(0, rng, 1, 16, ignore_eos=True)
    others = [_request(i, rng, i % 2, 12) for i in range(1, 4)]

    async def free_run(engine):
        return (await _collect(engine, base))[0]

    toks = _run(_config(model_dir), free_run)
    stop = toks[1]
    base.request_id = "min-tokens"
    base.sampling.stop_token_ids, base.sampling.min_tokens = [stop], 5

    async def scenario(engine):
        outs = await asyncio.gather(_collect(engine, base), *[_collect(engine, o, 0.01) for o in others])
        return outs[0]

    got, _, last = _run(_config(model_dir), scenario)
    want = _hf_greedy(hf_model, base, eos_token_id=[stop], min_new_tokens=5)
    assert stop not in got[:5]
    assert got == want
    assert last.finish_reason == ("stop" if got[-1] == stop else "length")


def test_vision_cache_reuses_repeated_image(model_dir):
    rng = np.random.default_rng(6)
    req = _request(0, rng, 1, 6)

    async def scenario(engine):
        first = await _collect(engine, req)
        req.request_id = "turn-2"
        second = await _collect(engine, req)
        return first[0], second[0], engine.stats()

    first, second, stats = _run(_config(model_dir), scenario)
    assert first == second
    assert stats["images_encoded"] == 1 and stats["vision_cache_hits"] == 1


def _image_request(i: int, rng, sizes: list[int], max_tokens: int) -> EngineRequest:
    """A request whose images have the given square sides (in patches)."""
    ids = [int(x) for x in rng.integers(100, 5000, size=5)]
    images = [_image(rng, n, n) for n in sizes]
    for im in images:
        ids += [VS] + [IMG] * im.num_tokens() + [VE] + [int(x) for x in rng.integers(100, 5000, size=3)]
    return EngineRequest(f"req-{i}", ids, images, SamplingParams(max_tokens=max_tokens, temperature=0.0))


def test_hf_generate_engine_agrees_with_continuous(model_dir):
    """The two engines behind the protocol give the same greedy tokens (images included), and
    ignore_eos runs to max_tokens in both."""
    from serve_app.engine.hf_generate import HFGenerateEngine

    rng = np.random.default_rng(7)
    reqs = [_request(i, rng, i % 3, 12) for i in range(4)]
    reqs.append(_request(9, rng, 1, 20, ignore_eos=True))

    async def run(engine):
        await engine.start()
        try:
            return [await _collect(engine, r) for r in reqs]
        finally:
            await engine.shutdown()

    cfg = _config(model_dir)
    cont = asyncio.run(run(ContinuousEngine(cfg)))
    hf = asyncio.run(run(HFGenerateEngine(cfg.model_copy(update={"engine": "hf-generate"}))))
    for req, (t1, x1, l1), (t2, x2, l2) in zip(reqs, cont, hf):
        assert t1 == t2 and x1 == x2, req.request_id
        assert l1.finish_reason == l2.finish_reason
    assert len(cont[-1][0]) == 20 and cont[-1][2].finish_reason == "length"


def test_vision_encoder_matches_hf_module(model_dir, hf_model):
    """Our batched vision tower (sorted by size, packed attention, cached grid tables) equals HF's
    vision module per image, deepstack levels included, for images of different grids."""
    from serve_app.engine._private.runner import ModelRunner

    runner = ModelRunner(hf_model, torch.device(DEVICE), max_num_seqs=2, max_model_len=256, fuse=False)
    rng = np.random.default_rng(11)
    grids = [(1, 6, 8), (1, 4, 4), (1, 6, 8), (1, 8, 2)]
    pix = [rng.standard_normal((t * h * w, 1536)).astype(np.float32) for t, h, w in grids]
    for p in pix:
        p.setflags(write=False)                   # as arrays arrive from Ray: read-only
    ours = runner.encode_images(pix, grids)
    ours_again = runner.encode_images(pix[:2], grids[:2])   # cached grid tables
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # HF's Conv3d: no TF32 on GPU
        ref = runner.encode_images_hf(pix, grids)
    assert len(ours) == len(grids)
    for (e, ds), (re, rds), (t, h, w) in zip(ours, ref, grids):
        assert e.shape == re.shape == (t * h * w // 4, re.shape[1])
        torch.testing.assert_close(e, re, rtol=1e-4, atol=1e-4)
        assert len(ds) == len(rds) >= 1
        for a, b in zip(ds, rds):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for (e, _), (re, _) in zip(ours_again, ref[:2]):
        torch.testing.assert_close(e, re, rtol=1e-4, atol=1e-4)
