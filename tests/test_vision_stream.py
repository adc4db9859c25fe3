"""``engine.vision_stream`` and ``engine.prefill_stream``: the vision tower (and the prefill) on a
CUDA stream of its own, beside the decode steps.

On the CPU there is no second stream, so the scheduling is checked with stand-ins that stay
pending for a few polls: requests whose images (or prefill) are still on the side stream wait,
the others prefill and decode meanwhile, the engine blocks instead of spinning when nothing else
can run, a request cancelled during its side prefill gives its slot back only once that prefill
is done, and the greedy tokens are HF ``generate``'s. The streams themselves need
ENGINE_TEST_DEVICE=cuda (same tokens as HF, with and without vision graphs)."""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
import pytest
import torch

from serve_app.engine._private.image_encoding import ImageEncoding
from serve_app.engine._private.runner import ModelRunner
from serve_app.engine._private.scheduler import Scheduler
from serve_app.engine._private.vision_cache import VisionCache
from serve_app.engine.config import EngineConfig

from test_engine import (DEVICE, _assert_greedy, _collect, _config, _image_request, _request,  # noqa: F401
                         _run, hf_model, model_dir)


class _Pending:
    """Stands in for a CUDA event (``query``) or a side prefill's timer (``done``, ``seconds``,
    ``order``, those of ``timer``): not done for ``polls`` queries, or until synchronised."""

    def __init__(self, polls: int, log: list, timer=None):
        self.polls, self.log, self.timer, self.waited = polls, log, timer, False

    def query(self) -> bool:
        self.polls -= 1
        self.log.append("query")
        return self.waited or self.polls < 0

    done = query

    def synchronize(self) -> None:
        if not (self.waited or self.polls < 0):
            self.log.append("synchronize")
        self.waited = True

    def seconds(self) -> float:
        return self.timer.seconds()

    def order(self, stream) -> None:
        self.log.append("order")


def _pending_images(monkeypatch, polls: int) -> list:
    """Every encoded request's images stay 'on the vision stream' for ``polls`` queries."""
    log: list = []
    encode = ImageEncoding.encode

    def encode_pending(self, todo, *a, **kw):
        encode(self, todo, *a, **kw)
        for s in todo:
            if s.vis_embeds is not None:
                s.vis_event = _Pending(polls, log)
    monkeypatch.setattr(ImageEncoding, "encode", encode_pending)
    return log


def _prefill_log(monkeypatch) -> list:
    """Per prefill call: whether each chunk held image features."""
    calls: list = []
    prefill = ModelRunner.prefill

    def logged(self, chunks):
        calls.append([c.vis_embeds is not None for c in chunks])
        return prefill(self, chunks)
    monkeypatch.setattr(ModelRunner, "prefill", logged)
    return calls


def _later_while_decoding(first: list, later: list):
    """A scenario: ``first`` start; once one of them has a token, ``later`` arrive. Returns every
    request's tokens (``first + later`` order) and the engine's stats."""
    async def scenario(engine):
        started = asyncio.Event()

        async def run(req):
            toks = []
            async for d in engine.generate(req):
                toks += d.token_ids
                started.set()
            return toks
        tasks = [asyncio.create_task(run(r)) for r in first]
        await started.wait()
        tasks += [asyncio.create_task(run(r)) for r in later]
        return await asyncio.gather(*tasks), engine.stats()
    return scenario


def test_vision_stream_settings():
    assert EngineConfig(vision_stream=True).vision_stream and EngineConfig(prefill_stream=True).prefill_stream
    assert EngineConfig(prefill_stream=True, stream_priority="decode").stream_priority == "decode"
    with pytest.raises(ValueError, match="needs vision_stream or prefill_stream"):
        EngineConfig(stream_priority="decode")
    with pytest.raises(ValueError):
        EngineConfig(prefill_stream=True, stream_priority="vision")
    for name in ("vision_stream", "prefill_stream"):
        with pytest.raises(ValueError, match="needs engine='continuous'"):
            EngineConfig(engine="hf-generate", **{name: True})
    assert EngineConfig(prefill_stream=True, prompt_sms=96).prompt_sms == 96
    with pytest.raises(ValueError, match="prompt_sms needs prefill_stream"):
        EngineConfig(vision_stream=True, prompt_sms=96)
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        EngineConfig(prefill_stream=True, prompt_sms=0)
    with pytest.raises(ValueError, match="needs engine='continuous'"):
        EngineConfig(engine="hf-generate", prompt_sms=96)

    class CpuRunner:
        is_cuda = False
        device = torch.device("cpu")
    with pytest.raises(ValueError, match="need a CUDA GPU"):
        ImageEncoding(CpuRunner(), VisionCache(1 << 20), 256, side_stream=True)
    assert ImageEncoding.ready(type("S", (), {"vis_event": None})())


@pytest.mark.skipif(DEVICE != "cpu", reason="stand-in events for the CPU path")
def test_decoding_goes_on_while_images_are_pending(model_dir, hf_model, monkeypatch):  # noqa: F811
    """Two text requests are decoding when two image requests arrive. While their images are
    'on the vision stream' (three polls), decode steps go on without waiting for them; then the
    image prompts prefill, and every request's greedy tokens are HF generate's."""
    rng = np.random.default_rng(3)
    text = [_request(i, rng, 0, 40) for i in range(2)]
    images = [_image_request(10, rng, [4], 6), _image_request(11, rng, [6], 6)]
    log = _pending_images(monkeypatch, polls=3)
    calls = _prefill_log(monkeypatch)

    toks, stats = _run(_config(model_dir, max_prefill_tokens=256), _later_while_decoding(text, images))
    assert stats["finished_total"] == 4
    assert log.count("query") >= 4 and "synchronize" not in log, log   # polled between decode steps
    assert not any(calls[0]) and any(any(c) for c in calls[1:]), calls
    for req, t in zip(text + images, toks):
        _assert_greedy(hf_model, req, t)


@pytest.mark.skipif(DEVICE != "cpu", reason="stand-in events for the CPU path")
def test_only_pending_images_block_instead_of_spinning(model_dir, monkeypatch):  # noqa: F811
    """Nothing to run but images on the vision stream: the step waits on the first event."""
    rng = np.random.default_rng(4)
    req = _image_request(0, rng, [4], 4)
    cfg = _config(model_dir)

    async def scenario(engine):
        return (await _collect(engine, req))[0]

    want = _run(cfg, scenario)
    log = _pending_images(monkeypatch, polls=10 ** 9)    # never done unless waited for
    assert _run(cfg, scenario) == want
    assert "synchronize" in log and log.count("query") < 10, log


class _FakeStream:
    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass


def _prefill_on_a_stand_in_stream(monkeypatch, polls: int) -> list:
    """The scheduler's prefill_stream path on the CPU: a stand-in side stream, and side prefills
    that stay pending for ``polls`` queries."""
    log: list = []
    init, step = Scheduler.__init__, Scheduler._prefill_step

    def init_side(self, *a, **kw):
        init(self, *a, **kw)
        self._side, self.images.main = _FakeStream(), _FakeStream()

    def slow_step(self):
        launch = step(self)
        if launch is not None:
            launch.timer = _Pending(polls, log, launch.timer)
            log.append(("prefill", [s.rid for s in launch.seqs]))
        return launch
    monkeypatch.setattr(Scheduler, "__init__", init_side)
    monkeypatch.setattr(Scheduler, "_prefill_step", slow_step)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    return log


@pytest.mark.skipif(DEVICE != "cpu", reason="stand-ins for the CPU path")
def test_side_prefill_rows_join_once_it_is_done(model_dir, hf_model, monkeypatch):  # noqa: F811
    """Text requests decode while later requests' prefills are 'on the side stream' (three polls
    each): decode steps go on meanwhile, the new rows join after the join (the main stream
    ordered after the prefill), one side prefill is in flight at a time, and every request's
    greedy tokens are HF generate's."""
    rng = np.random.default_rng(5)
    text = [_request(i, rng, 0, 30) for i in range(2)]
    later = [_image_request(10, rng, [4], 6), _request(11, rng, 0, 8), _image_request(12, rng, [6], 6)]
    log = _prefill_on_a_stand_in_stream(monkeypatch, polls=3)

    toks, stats = _run(_config(model_dir, max_prefill_tokens=256), _later_while_decoding(text, later))
    assert stats["finished_total"] == 5 and stats["running"] == 0
    assert stats["kv_pages_free"] == stats["kv_pages_total"]
    prefills = [e for e in log if isinstance(e, tuple)]
    assert len(prefills) >= 2 and log.count("order") == len(prefills), log
    # while the later requests' prefill was pending, decode steps of the text requests went on
    i = next(i for i, e in enumerate(log) if isinstance(e, tuple) and set(e[1]) & {r.request_id for r in later})
    assert log[i + 1:i + 6] == ["query"] * 4 + ["order"], log
    for req, t in zip(text + later, toks):
        _assert_greedy(hf_model, req, t)


@pytest.mark.skipif(DEVICE != "cpu", reason="stand-ins for the CPU path")
def test_a_request_cancelled_during_its_side_prefill_frees_its_slot_at_the_join(model_dir, monkeypatch):  # noqa: F811
    """Its slot's rows (last token, sampling state) may still be written on the side stream, so
    the slot goes back to the free list at the join, not at the cancel."""
    _prefill_on_a_stand_in_stream(monkeypatch, polls=10 ** 9)
    sched = Scheduler.load(_config(model_dir), emit=lambda items: None)
    rng = np.random.default_rng(6)
    sched.add(_request(0, rng, 0, 5), 0.0)
    sched.add(_request(1, rng, 0, 5), 0.0)
    sched._admit()
    with torch.cuda.stream(sched._side):
        sched._side_prefill = sched._prefill_step()
    seqs = list(sched._side_prefill.seqs)
    assert len(seqs) == 2 and not sched.running
    free = len(sched.free_slots)
    sched.cancel(seqs[0].rid)
    assert seqs[0].done and len(sched.free_slots) == free      # not yet: the prefill is in flight
    sched._join_side_prefill()
    assert len(sched.free_slots) == free + 1 and sched.running == [seqs[1]]
    assert sched._side_prefill is None


@pytest.mark.skipif(DEVICE != "cuda", reason="a second CUDA stream: ENGINE_TEST_DEVICE=cuda")
@pytest.mark.parametrize("stream", ["vision_stream", "prefill_stream"])
@pytest.mark.parametrize("vision_graph_grids", [0, 2])
def test_side_streams_match_hf(model_dir, hf_model, stream, vision_graph_grids):  # noqa: F811
    """Image requests (a recurring size, so graphs are captured where enabled) and text-only ones,
    staggered so that images are encoded while other rows decode: HF's greedy tokens."""
    _side_streams_match_hf(model_dir, hf_model, stream, vision_graph_grids)


@pytest.mark.skipif(DEVICE != "cuda", reason="a second CUDA stream: ENGINE_TEST_DEVICE=cuda")
def test_decode_first_stream_priority_matches_hf(model_dir, hf_model):  # noqa: F811
    """stream_priority "decode": the engine thread's work on a high-priority stream of its own,
    the prompt work on the side stream below it; the cross-stream ordering must still hold."""
    _side_streams_match_hf(model_dir, hf_model, "prefill_stream", 2, stream_priority="decode")


@pytest.mark.skipif(DEVICE != "cuda", reason="a CUDA green context: ENGINE_TEST_DEVICE=cuda")
def test_prompt_sms_matches_hf(model_dir, hf_model):  # noqa: F811
    """engine.prompt_sms: the prompt work, its prefill graphs and its vision graphs on a stream of a
    green context (8 SMs here): the same tokens as HF, and the start-up info says how many SMs."""
    _side_streams_match_hf(model_dir, hf_model, "prefill_stream", 2, prompt_sms=8, prefill_graph_tokens=256)


@pytest.mark.skipif(DEVICE != "cuda", reason="a CUDA green context: ENGINE_TEST_DEVICE=cuda")
def test_sm_limited_stream_limits_a_gemm():
    """The green context's stream really holds a compute-bound GEMM to its SMs, eagerly and as a
    graph captured and replayed on it: several times slower on 8 SMs of ~132."""
    from serve_app.engine._private import cuda_graphs
    from serve_app.engine._private.green_context import sm_limited_stream
    dev = torch.device("cuda", torch.cuda.current_device())
    stream, got = sm_limited_stream(dev, 8)
    assert 8 <= got < torch.cuda.get_device_properties(dev).multi_processor_count
    a = torch.randn(4096, 4096, device=dev, dtype=torch.bfloat16)

    def timed(s, fn):
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                fn()
            end.record()
        end.synchronize()
        return start.elapsed_time(end)

    full = timed(torch.cuda.Stream(dev), lambda: a @ a)
    limited = timed(stream, lambda: a @ a)
    assert limited > 4 * full, (full, limited)
    graph, _ = cuda_graphs.capture(lambda _: a @ a, [0], stream=stream)[0]
    replayed = timed(stream, graph.replay)                  # as the engine replays its graphs
    elsewhere = timed(torch.cuda.Stream(dev), graph.replay)  # whether nodes keep their context
    print(f"GEMM ms x5: all SMs {full:.2f}, {got} SMs {limited:.2f}, graph there {replayed:.2f}, "
          f"graph replayed on an ordinary stream {elsewhere:.2f}")
    assert replayed > 4 * full, (full, replayed)


def _side_streams_match_hf(model_dir, hf_model, stream, vision_graph_grids, **settings):  # noqa: F811
    rng = np.random.default_rng(9)
    first = [_image_request(i, rng, [6], 8) for i in range(2)]
    later = [_image_request(10 + i, rng, [6, 4], 8) if i % 2 else _request(10 + i, rng, 0, 12) for i in range(6)]

    async def scenario(engine):
        res = [await _collect(engine, r) for r in first]
        for _ in range(100):
            if not vision_graph_grids or engine.stats()["vision_graphs"]:
                break
            await asyncio.sleep(0.05)
        res += await asyncio.gather(*[_collect(engine, r, 0.01 * i) for i, r in enumerate(later)])
        return res, engine.stats(), engine.health()

    res, stats, health = _run(_config(model_dir, vision_graph_grids=vision_graph_grids, max_prefill_tokens=256,
                                      **{stream: True}, **settings), scenario)
    assert health[stream] is True and health["stream_priority"] == settings.get("stream_priority", "prompt")
    if settings.get("prompt_sms"):
        assert health["prompt_sms"] >= settings["prompt_sms"]
        assert stats["prefill_graph_replays"] >= 1
    assert stats["finished_total"] == len(first) + len(later) and stats["images_encoded"] >= 5
    if vision_graph_grids:
        assert stats["vision_graph_replays"] >= 1
    for req, (toks, _, _) in zip(first + later, res):
        _assert_greedy(hf_model, req, toks)
