"""The VLM deployment's ``stream_interval_ms`` with both engines (tiny model on CPU, no Ray).

The class under ``@serve.deployment`` is driven directly, as Serve would: a merged stream carries
the same text, tokens and usage as an unmerged one, and closing it (client gone) still cancels the
engine request.
"""

from __future__ import annotations

import asyncio

import pytest

from serve_app.vlm import VLM


class _VLM(VLM.func_or_class):
    def __del__(self):  # the deployment's async __del__ is Serve's to await; the test shuts down
        pass


MESSAGES = [{"role": "user", "content": "Tell me a story."}]
SAMPLING = {"max_tokens": 16, "temperature": 1.0, "seed": 7, "ignore_eos": True}


@pytest.mark.parametrize("engine, extra", [("continuous", {}), ("hf-generate", {}),
                                           ("continuous", {"separate_process": True})],
                         ids=["continuous", "hf-generate", "continuous-separate-process"])
def test_stream_interval_merges_without_changing_output(tiny_model_path, engine, extra):
    cfg = {"model": tiny_model_path, "engine": engine, "device": "cpu", "dtype": "float32",
           "max_model_len": 1024, "max_num_seqs": 4, **extra}

    async def main():
        vlm = _VLM.__new__(_VLM)
        await vlm.__init__(cfg, 32, stream_interval_ms=60_000)  # nothing is sent by the timer here
        try:
            merged = [d async for d in vlm.generate("merged", MESSAGES, [], SAMPLING)]
            vlm.stream_interval_s = 0
            plain = [d async for d in vlm.generate("plain", MESSAGES, [], SAMPLING)]
            # client gone after the first text: the engine request is cancelled
            vlm.stream_interval_s = 60.0
            gen = vlm.generate("gone", MESSAGES, [], {**SAMPLING, "max_tokens": 400})
            await gen.__anext__()  # accepted
            await gen.__anext__()  # first tokens
            await gen.aclose()
            for _ in range(500):
                stats = vlm.engine.stats()
                if stats["cancelled_total"] == 1 and stats.get("running", 0) == 0:
                    break
                await asyncio.sleep(0.02)
            return merged, plain, stats, vlm._running
        finally:
            await vlm.engine.shutdown()

    merged, plain, stats, running = asyncio.run(main())
    for items in (merged, plain):
        accepted, *deltas = items
        assert accepted.num_generated_tokens == 0 and not accepted.token_ids
        assert deltas[-1].finish_reason == "length" and deltas[-1].num_generated_tokens == 16
        assert all(d.finish_reason is None for d in deltas[:-1])
        assert sum(len(d.token_ids) for d in deltas) == 16
        assert {d.num_prompt_tokens for d in items} == {accepted.num_prompt_tokens}
    assert "".join(d.text for d in merged) == "".join(d.text for d in plain)
    assert [t for d in merged for t in d.token_ids] == [t for d in plain for t in d.token_ids]
    # passed through until the first text, then everything else held until the final delta
    first_text = next(i for i, d in enumerate(merged) if d.text)
    assert len(merged) <= first_text + 2
    assert stats["cancelled_total"] == 1 and running == 0
