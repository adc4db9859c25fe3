"""Unit tests of the Ray-free serving logic: detokeniser, prompt building, request checks,
stream merging."""

from __future__ import annotations

import asyncio
import pickle

import numpy as np
import pydantic
import pytest

from serve_app import _chat
from serve_app._http import client_error, validation_message
from serve_app._prompt import PromptBuilder
from serve_app.config import AppConfig
from serve_app.engine.detokenizer import IncrementalDetokenizer
from serve_app.engine.protocol import ImageInput, TokenDelta, merge_deltas
from serve_app.errors import ServeAppError
from serve_app.protocol import ChatCompletionRequest

TEXTS = ["Hello, world! 你好，世界。上一张图里的表格第三行数据是多少？ 😀👍🏽 naïve café",
         "def f(x):\n    return x ** 2  # 平方\n\n\n\ttabs"]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detok_equals_full_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tokenizer)
    pieces = [d.add([t]) for t in ids] + [d.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)  # never emits half a character


@pytest.mark.parametrize("stop", ["世界", "world", "😀", "x ** 2"])
def test_stop_strings_cut_exactly_and_are_never_streamed(tokenizer, stop):
    text = TEXTS[0] + TEXTS[1]
    ids = tokenizer.encode(text, add_special_tokens=False)
    d = IncrementalDetokenizer(tokenizer, stop=[stop, "never-there"])
    out = ""
    for t in ids:
        out += d.add([t])
        assert stop not in out
        if d.stopped:
            break
    out += d.flush()
    assert d.stopped and out == text[:text.index(stop)]


def test_hold_back_released_on_flush(tokenizer):
    ids = tokenizer.encode("abc wor", add_special_tokens=False)
    d = IncrementalDetokenizer(tokenizer, stop=["world"])
    streamed = "".join(d.add([t]) for t in ids)
    assert streamed == "abc "  # "wor" could still become "world"
    assert d.flush() == "wor" and not d.stopped


def _req(**kw) -> ChatCompletionRequest:
    base = {"model": "tiny-qwen3-vl", "messages": [{"role": "user", "content": "hi"}]}
    return ChatCompletionRequest.model_validate({**base, **kw})


def test_split_images_keeps_order_and_roles():
    req = _req(messages=[
        {"role": "developer", "content": "sys"},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:a"}},
                                     {"type": "text", "text": "and"},
                                     {"type": "image_url", "image_url": {"url": "image://b"}}]},
        {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
        {"role": "user", "content": "more"}])
    messages, sources = _chat.split_images(req, 4)
    assert sources == ["data:a", "image://b"]
    assert messages[0] == {"role": "system", "content": "sys"}
    assert [p["type"] for p in messages[1]["content"]] == ["image", "text", "image"]
    assert messages[2] == {"role": "assistant", "content": "ok"}


@pytest.mark.parametrize("kw,code", [
    ({"n": 2}, "unsupported_parameter"),
    ({"model": "other"}, "model_not_found"),
    ({"logprobs": True}, "unsupported_parameter"),
    ({"presence_penalty": 0.5}, "unsupported_parameter"),
    ({"response_format": {"type": "json_object"}}, "unsupported_parameter"),
    ({"max_tokens": 5, "min_tokens": 9}, "invalid_value"),
    ({"max_pixels": 10**12}, "invalid_value"),
])
def test_check_request_rejects_unsupported(kw, code):
    with pytest.raises(ServeAppError) as e:
        _chat.check_request(_req(**kw), AppConfig(), "tiny-qwen3-vl")
    assert e.value.code == code and 400 <= e.value.status < 500


def test_sampling_overrides_only_what_was_set():
    assert _chat.sampling_overrides(_req(max_completion_tokens=7, temperature=0, stop="x")) == {
        "max_tokens": 7, "temperature": 0, "stop": ["x"], "ignore_eos": False, "min_tokens": 0}


def test_prompt_builder_expands_image_tokens(tokenizer):
    pb = PromptBuilder(tokenizer)
    im = ImageInput(np.zeros((1 * 4 * 6, 1536), np.float32), (1, 4, 6), "x")
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    ids = pb.build(msgs, [im])
    assert ids.count(pb.image_token_id) == 6
    full = tokenizer.encode(pb.render(msgs).replace("<|image_pad|>", "<|image_pad|>" * 6),
                            add_special_tokens=False)
    assert ids == full
    with pytest.raises(ServeAppError):
        pb.build(msgs, [])


def test_client_error_unwraps_and_maps():
    inner = ServeAppError("bad", 415, "unsupported_image_format")

    class Wrapped(Exception):
        cause = inner

    assert client_error(Wrapped()).status == 415
    assert client_error(RuntimeError("boom")).status == 500
    assert client_error(TimeoutError()).status == 504
    from ray.serve.exceptions import BackPressureError

    bp = client_error(BackPressureError(num_queued_requests=1, max_queued_requests=1, status_code=429,
                                        retry_after_s=1.5))
    assert (bp.status, bp.code, bp.type, bp.retry_after_s) == (429, "overloaded", "rate_limit_error", 1.5)
    assert client_error(BackPressureError(num_queued_requests=1, max_queued_requests=1)).status == 503
    back = pickle.loads(pickle.dumps(ServeAppError("x", 503, "gpu_out_of_memory", retry_after_s=1)))
    assert (back.status, back.code, back.retry_after_s) == (503, "gpu_out_of_memory", 1)
    assert validation_message([{"loc": ("body", "messages"), "msg": "too short", "type": "x"}]) == (
        "invalid request: messages: too short", "messages")


# ---- stream merging (engine queue draining, VLM stream_interval_ms) -----------------------------
def _delta(i: int, finish: str | None = None) -> TokenDelta:
    return TokenDelta("r", f"t{i} ", [i], 7, i, finish)


def test_merge_deltas_concatenates_and_keeps_the_last_counts():
    a, b, c = _delta(1), TokenDelta("r", "", [2], 7, 2), _delta(3, "length")
    m = merge_deltas([a, b, c])
    assert m == TokenDelta("r", "t1 t3 ", [1, 2, 3], 7, 3, "length")
    assert merge_deltas([a]) is a
    assert (a.text, a.token_ids) == ("t1 ", [1])  # inputs untouched
    with pytest.raises(ValueError):
        merge_deltas([])


async def _fake_stream(items, clock):
    """Items are (arrival time, delta or exception); the fake clock jumps to each arrival."""
    for t, item in items:
        clock.now = t
        if isinstance(item, BaseException):
            raise item
        yield item


class _Clock:
    now = 0.0

    def __call__(self):
        return self.now


def _coalesced(items, interval_s):
    from serve_app.engine.protocol import coalesce_deltas

    clock = _Clock()

    async def main():
        out = []
        try:
            async for d in coalesce_deltas(_fake_stream(items, clock), interval_s, clock):
                out.append((clock.now, d))
        except Exception as e:
            out.append((clock.now, e))
        return out
    return asyncio.run(main())


def test_coalesce_sends_first_text_at_once_then_per_interval_and_the_end_at_once():
    empty = TokenDelta("r", "", [0], 7, 1)  # e.g. half a UTF-8 character: no text yet
    items = [(0.000, empty), (0.007, _delta(2)), (0.014, _delta(3)), (0.021, _delta(4)),
             (0.028, _delta(5)), (0.035, _delta(6)), (0.042, _delta(7)), (0.049, _delta(8, "stop"))]
    got = _coalesced(items, 0.020)
    # passed through until text went out (t=0.007), then one item once 20 ms passed, then the end
    assert [(t, d.token_ids) for t, d in got] == [
        (0.000, [0]), (0.007, [2]), (0.028, [3, 4, 5]), (0.049, [6, 7, 8])]
    assert got[-1][1].finish_reason == "stop" and got[-1][1].num_generated_tokens == 8
    assert "".join(d.text for _, d in got) == "".join(d.text for _, d in items)


def test_coalesce_flushes_held_deltas_before_an_error():
    boom = ServeAppError("engine shut down", 503, "engine_shutdown")
    got = _coalesced([(0.0, _delta(1)), (0.001, _delta(2)), (0.002, _delta(3)), (0.003, boom)], 1.0)
    assert [d.token_ids if isinstance(d, TokenDelta) else d for _, d in got] == [[1], [2, 3], boom]


def test_stream_interval_must_not_be_negative():
    from serve_app.vlm import VLM

    for bad in (-5, float("inf")):
        with pytest.raises(pydantic.ValidationError, match="stream_interval_ms"):
            AppConfig.model_validate({"api": {"stream_interval_ms": bad}})
    class Bare(VLM.func_or_class):  # the class under the Serve decorator, minus its async __del__
        def __del__(self):
            pass

    with pytest.raises(ValueError, match="stream_interval_ms must be a finite number >= 0"):
        asyncio.run(Bare.__new__(Bare).__init__({}, 32, -1))


# ---- engine plug-in (engine: "package.module:Class") -------------------------------------------
def test_engine_import_path_builds_a_custom_engine(tiny_model_path):
    """`engine: module:Class` builds the user's engine (here the serving-overhead benchmark's paced
    stand-in); a bad path or a class that is no engine fails with a clear message."""
    from serve_app.engine import EngineConfig, EngineRequest, SamplingParams, create_engine

    engine = create_engine(EngineConfig(model=tiny_model_path, device="cpu",
                                        engine="benchmarks.serving_overhead:PacedEngine"))

    async def run():
        await engine.start()
        try:
            req = EngineRequest("r1", [1, 2, 3], [], SamplingParams(max_tokens=5))
            deltas = [d async for d in engine.generate(req)]
            long = engine.generate(EngineRequest("r2", [1], [], SamplingParams(max_tokens=10_000)))
            first = await long.__anext__()
            await engine.cancel("r2")
            rest = [d async for d in long]   # ends, with 'cancelled'
            assert first.finish_reason is None and rest[-1].finish_reason == "cancelled"
            return deltas, engine.health(), engine.stats()
        finally:
            await engine.shutdown()

    deltas, health, stats = asyncio.run(run())
    assert [d.num_generated_tokens for d in deltas] == [1, 2, 3, 4, 5]
    assert deltas[-1].finish_reason == "length" and all(d.num_prompt_tokens == 3 for d in deltas)
    assert health["ready"] and stats["finished_total"] == 1 and stats["cancelled_total"] == 1
    with pytest.raises(ValueError, match="cannot be imported"):
        create_engine(EngineConfig(engine="serve_app.engine:NoSuchEngine"))
    with pytest.raises(TypeError, match="lacks start, generate"):
        create_engine(EngineConfig(engine="collections:OrderedDict"))
    with pytest.raises(TypeError, match=r"cannot be built as EngineConfig\(engine_config\)"):
        create_engine(EngineConfig(engine="serve_app.engine.config:EngineConfig"))
    with pytest.raises(pydantic.ValidationError):
        EngineConfig(engine="not an engine")


def test_gpu_only_engine_options_are_refused_at_config_time_on_device_cpu():
    """``serve run deployments.gpu.yaml`` with ``device: cpu`` (or a CPU sweep of that yaml) used to
    pass validation and fail later in each VLM replica's start-up, as Serve's "Failed to update the
    deployments ['VLM']"; an explicit CPU device now fails the config with every option named."""
    from serve_app.engine.config import GPU_ONLY, EngineConfig

    both = r"pdl=True, prefill_stream=True need a CUDA GPU.*deployments\.yaml"
    with pytest.raises(pydantic.ValidationError, match=both):
        EngineConfig(device="cpu", prefill_stream=True, pdl=True)
    for name, value in {"pdl": True, "decode_balance": 4, "vision_stream": True, "prefill_stream": True}.items():
        assert name in GPU_ONLY
        with pytest.raises(pydantic.ValidationError, match=f"{name}={value!r} need a CUDA GPU"):
            EngineConfig(device="cpu", **{name: value})
        assert getattr(EngineConfig(device="auto", **{name: value}), name) == value   # decided at start-up
    cpu_ok = EngineConfig(device="cpu", quantization="fp8", kv_cache_dtype="fp8", max_num_seqs=36,
                          max_decode_rows=24)
    assert cpu_ok.quantization == "fp8" and cpu_ok.kv_cache_dtype == "fp8"          # these run on the CPU


def test_continuous_engine_dispatch_holds_merges_and_flushes_before_an_error():
    """The continuous engine applies the stream interval where its thread's outputs reach the
    loop: held deltas are not queued (the consumer is not woken), and go out merged before an
    error."""
    from serve_app.engine.config import EngineConfig
    from serve_app.engine.continuous import ContinuousEngine
    from serve_app.engine.protocol import DeltaCoalescer

    async def main():
        engine = ContinuousEngine(EngineConfig(engine="continuous", device="cpu"))
        clock = _Clock()
        q: asyncio.Queue = asyncio.Queue()
        engine._streams["r"] = (q, DeltaCoalescer(1.0, clock))
        engine._streams["plain"] = (plain := asyncio.Queue(), None)
        got = []
        for t, item in [(0.0, _delta(1)), (0.1, _delta(2)), (0.2, _delta(3))]:
            clock.now = t
            engine._dispatch([("r", item), ("plain", item)])
            got.append(q.qsize())
        boom = ServeAppError("engine failed", 503, "engine_failed")
        engine._dispatch([("r", boom), ("gone", _delta(9))])   # a stream already closed: dropped
        items = [q.get_nowait() for _ in range(q.qsize())]
        return got, items, plain.qsize(), boom
    got, items, n_plain, boom = asyncio.run(main())
    assert got == [1, 1, 1]                    # first text at once; 2 and 3 held (no wake-up)
    assert [i.token_ids if isinstance(i, TokenDelta) else i for i in items] == [[1], [2, 3], boom]
    assert n_plain == 3                        # no interval: one item per step
