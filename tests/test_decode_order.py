"""engine.decode_order: which request waiting after its first token gets a freed decode row."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import numpy as np
import pytest

from serve_app.engine._private import decode_rows
from serve_app.engine.config import EngineConfig
from test_engine import _assert_greedy, _config, _request, _run, hf_model, model_dir  # noqa: F401  (fixtures)


def _row(name: str, arrival: float, max_new: int, launched: int = 1):
    return SimpleNamespace(name=name, arrival=arrival, max_new=max_new, launched=launched)


def test_pick_keeps_decoding_rows_and_orders_the_rest_by_laxity():
    """Rows that decode (more than the first token launched) keep their rows even when a waiting
    one has more tokens left; free rows go by arrival - tokens left x step: the long late one
    before the short early one, and an old short one before a long one that came much later."""
    old = _row("decoding", 0.0, 10, launched=9)
    short = _row("short", 1.0, 48)
    long_ = _row("long", 1.1, 192)            # 144 tokens more x 10 ms = 1.44 s of laxity less
    later = _row("long-later", 3.0, 192)      # 2 s later: the short one has waited longer than that
    rows = [old, short, long_, later]
    assert [r.name for r in decode_rows.pick(list(rows), 2, "laxity", 0.010)] == ["decoding", "long"]
    assert [r.name for r in decode_rows.pick(list(rows), 3, "laxity", 0.010)] == ["decoding", "long", "short"]
    picked = decode_rows.pick(list(rows), 3, "arrival", 0.010)
    assert [r.name for r in picked] == ["decoding", "short", "long"]
    # a step later the rows picked have decoded, so they keep their rows against a longer newcomer
    for r in picked:
        r.launched += 1
    newcomer = _row("newcomer", 3.0, 4000)
    assert [r.name for r in decode_rows.pick(rows + [newcomer], 3, "laxity", 0.010)] == ["decoding", "short", "long"]
    # with room for all, all decode, in join order, either way
    fresh = [_row(n, a, m) for n, a, m in (("a", 0, 5), ("b", 1, 50))]
    assert [r.name for r in decode_rows.pick(fresh, 4, "laxity", 0.01)] == ["a", "b"]


def test_laxity_needs_rows_that_wait():
    EngineConfig(max_num_seqs=4, max_decode_rows=2, decode_order="laxity")
    for kw in ({}, {"max_decode_rows": 4}):
        with pytest.raises(ValueError, match="decode_order='laxity' needs max_decode_rows below"):
            EngineConfig(max_num_seqs=4, decode_order="laxity", **kw)
    with pytest.raises(ValueError, match="needs engine='continuous'"):
        EngineConfig(engine="hf-generate", max_num_seqs=4, max_decode_rows=2, decode_order="laxity")


@pytest.mark.parametrize("order, ends", [("arrival", ["r0", "short", "long"]),
                                         ("laxity", ["r0", "long", "short"])])
def test_a_freed_row_goes_by_decode_order(model_dir, hf_model, order, ends):  # noqa: F811
    """One decode row, four admitted. r0 decodes (48 tokens); a short (4 tokens) and a long (40) request
    come once r0 has its first token, short first. Both get their first token while r0 holds
    the row. When it frees, 'arrival' gives it to the short one, 'laxity' to the long one (its
    end would come latest); r0 keeps its row throughout; every answer is HF's greedy one."""
    rng = np.random.default_rng(5)
    r0 = _request(0, rng, 0, 48, ignore_eos=True)
    short, long_ = _request(1, rng, 0, 4, ignore_eos=True), _request(2, rng, 0, 40, ignore_eos=True)
    r0.request_id, short.request_id, long_.request_id = "r0", "short", "long"

    async def scenario(engine):
        events: list[tuple[str, str]] = []
        started = asyncio.Event()

        async def run(req, wait: bool):
            if wait:
                await started.wait()
            toks = []
            async for d in engine.generate(req):
                if not toks:
                    events.append(("first", req.request_id))
                    started.set()
                toks += d.token_ids
            events.append(("done", req.request_id))
            return toks
        toks = await asyncio.gather(run(r0, False), run(short, True), run(long_, True))
        return toks, events, engine.health()

    toks, events, health = _run(_config(model_dir, max_num_seqs=4, max_decode_rows=1, decode_order=order),
                                scenario)
    assert health["decode_order"] == order
    done = [rid for kind, rid in events if kind == "done"]
    assert done == ends, events
    # both late requests had their first token before r0 ended: they waited for the row, not for admission
    assert events.index(("first", "long")) < events.index(("done", "r0")), events
    for req, t in zip((r0, short, long_), toks):
        _assert_greedy(hf_model, req, t)
