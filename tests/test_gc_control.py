"""The engine freezes its start-up objects out of Python's collector and counts collections."""

from __future__ import annotations

import asyncio
import gc

import pytest

from serve_app.engine._private import gc_control
from serve_app.engine.config import EngineConfig
from serve_app.engine.continuous import ContinuousEngine


@pytest.fixture(autouse=True)
def _unfrozen():
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_pauses_counted_per_generation():
    gc_control.watch()
    gc_control.watch()                        # idempotent: one callback
    assert gc.callbacks.count(gc_control.PAUSES) == 1
    before = gc_control.PAUSES.stats()
    gc.collect(0)
    gc.collect(2)
    after = gc_control.PAUSES.stats()
    grown = [a - b for a, b in zip(after["gc_collections"], before["gc_collections"])]
    assert grown[0] >= 1 and grown[2] >= 1
    assert sum(after["gc_pause_bucket_counts"]) - sum(before["gc_pause_bucket_counts"]) == sum(grown)
    assert after["gc_pause_s_total"] >= before["gc_pause_s_total"]
    assert after["gc_pause_max_s"] >= 0


def test_freeze_moves_live_objects_out_and_unfreeze_gives_them_back():
    keep = [[i] for i in range(1000)]          # 1000 live containers
    n = gc_control.freeze_startup_objects()
    assert n >= len(keep) and gc.get_freeze_count() == n
    assert gc_control.PAUSES.stats()["gc_frozen_objects"] == n     # kept, not counted again
    gc_control.unfreeze()
    assert gc.get_freeze_count() == 0 and gc_control.PAUSES.stats()["gc_frozen_objects"] == 0
    del keep


def test_stats_do_not_walk_the_frozen_objects(monkeypatch):
    """The engine process pushes these stats every 0.25 s from its engine thread: they must not
    call gc.get_freeze_count(), which walks every frozen object with the GIL held (24-33 ms over
    ~400k on the 2-core VM: 13 % of the engine process's loop)."""
    keep = [[i] for i in range(1000)]
    n = gc_control.freeze_startup_objects()
    try:
        def walk():
            raise AssertionError("stats() walked the frozen objects")
        monkeypatch.setattr(gc_control.gc, "get_freeze_count", walk)
        assert gc_control.PAUSES.stats()["gc_frozen_objects"] == n
    finally:
        monkeypatch.undo()
        gc_control.unfreeze()
        del keep


@pytest.mark.parametrize("freeze", [True, False])
def test_engine_freezes_after_start_and_unfreezes_at_shutdown(tiny_model_path, freeze):
    config = EngineConfig(model=tiny_model_path, engine="continuous", device="cpu", dtype="float32",
                          max_num_seqs=2, max_model_len=256, gc_freeze=freeze)

    async def main():
        engine = ContinuousEngine(config)
        await engine.start()
        try:
            return engine.stats()
        finally:
            await engine.shutdown()

    stats = asyncio.run(main())
    # the model, tokenizer and imports were frozen (hundreds of thousands of objects), or nothing
    assert (stats["gc_frozen_objects"] > 10_000) is freeze
    assert len(stats["gc_collections"]) == 3 and "gc_pause_s_total" in stats
    assert gc.get_freeze_count() == 0          # shutdown gave them back
