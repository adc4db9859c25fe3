"""``engine.separate_process``: the continuous engine's scheduler in a child process (CPU, tiny model).

The same requests give the same greedy tokens as in-process; checks run before anything crosses
the pipe; a client leaving cancels in the child; the child's stats reach the parent; a child that
dies fails its open streams with a 503 and turns the engine unhealthy; a bad model fails start-up
with the same clear error as in-process.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import numpy as np
import pytest

from serve_app.engine import create_engine
from serve_app.engine.process import ProcessEngine
from serve_app.engine.protocol import EngineRequest, SamplingParams
from serve_app.errors import ServeAppError
from test_engine import _collect, _config, _request, _run, model_dir  # noqa: F401 - fixture

pytestmark = pytest.mark.slow


async def _stats_when(engine, pred, timeout_s: float = 20.0) -> dict:
    """The child pushes its stats every 0.25 s while busy and every 1 s while idle."""
    for _ in range(int(timeout_s / 0.05)):
        s = engine.stats()
        if pred(s):
            return s
        await asyncio.sleep(0.05)
    raise AssertionError(f"stats never matched: {engine.stats()}")


def test_same_greedy_tokens_as_in_process_and_stats_from_the_child(model_dir):  # noqa: F811
    rng = np.random.default_rng(3)
    reqs = [_request(i, rng, i % 3, 12) for i in range(6)]

    async def scenario(engine):
        res = await asyncio.gather(*[_collect(engine, r, 0.02 * i) for i, r in enumerate(reqs)])
        stats = await _stats_when(engine, lambda s: s.get("finished_total") == 6 and s.get("running") == 0)
        return res, stats, engine.health()

    local, _, _ = _run(_config(model_dir), scenario)
    remote, stats, health = _run(_config(model_dir, separate_process=True), scenario)
    assert [r[0] for r in remote] == [r[0] for r in local]
    assert [r[1] for r in remote] == [r[1] for r in local]
    assert stats["engine_pid"] != os.getpid() and stats["kv_pages_free"] == stats["kv_pages_total"]
    assert sum(stats["ttft_bucket_counts"]) == 6 and stats["gc_frozen_objects"] > 0
    assert health["ready"] and health["separate_process"] and "kv_tokens" in health


def test_idle_time_reaches_the_parent_while_idle(model_dir):  # noqa: F811
    """A snapshot after an idle spell includes it (a benchmark step's baseline)."""
    async def scenario(engine):
        first = await _stats_when(engine, lambda s: "host_idle_s_total" in s)
        await asyncio.sleep(2.5)
        return first, engine.stats()

    first, later = _run(_config(model_dir, separate_process=True), scenario)
    assert later["host_idle_s_total"] - first["host_idle_s_total"] >= 1.0


def test_checks_on_this_side_cancel_in_the_child_and_a_dead_child_fails_streams(model_dir):  # noqa: F811
    async def scenario(engine):
        assert isinstance(engine, ProcessEngine)
        too_long = EngineRequest("long", list(range(100, 700)), [], SamplingParams(max_tokens=4))
        with pytest.raises(ServeAppError) as e:           # max_model_len 512: never queued
            await anext(aiter(engine.generate(too_long)))
        assert e.value.status == 400 and e.value.code == "context_length_exceeded"
        # a client that leaves after its first tokens cancels the request in the child
        gen = engine.generate(EngineRequest("gone", [1, 2, 3], [], SamplingParams(max_tokens=300,
                                                                                 ignore_eos=True)))
        await anext(gen)
        await gen.aclose()
        stats = await _stats_when(engine, lambda s: s.get("cancelled_total") == 1 and s.get("running") == 0)
        # the child dies mid-stream: the open stream ends with a 503, health() raises
        stream = engine.generate(EngineRequest("open", [1, 2, 3], [], SamplingParams(max_tokens=400,
                                                                                    ignore_eos=True)))
        await anext(stream)
        engine._proc.kill()
        with pytest.raises(ServeAppError) as died:
            async for _ in stream:
                pass
        with pytest.raises(RuntimeError, match="engine process"):
            engine.health()
        return stats, died.value

    stats, died = _run(_config(model_dir, separate_process=True), scenario)
    assert stats["cancelled_total"] == 1 and stats["finished_total"] == 0
    assert died.status == 503 and died.code == "engine_failed"


def test_started_from_a_script_without_a_main_guard(tmp_path, tiny_model_path):
    """The child is ``python -m``, not multiprocessing's spawn (which re-runs the caller's script)."""
    import subprocess
    import sys

    script = tmp_path / "no_guard.py"
    script.write_text(f"""
import asyncio
from serve_app.engine import create_engine
from serve_app.engine.config import EngineConfig
from serve_app.engine.protocol import EngineRequest, SamplingParams

async def main():
    engine = create_engine(EngineConfig(model={tiny_model_path!r}, engine="continuous", device="cpu",
                                        dtype="float32", max_model_len=256, separate_process=True))
    await engine.start()
    req = EngineRequest("r", [1, 2, 3], [], SamplingParams(max_tokens=3, ignore_eos=True))
    n = 0
    async for d in engine.generate(req):
        n += len(d.token_ids)
    print("TOKENS", n)
    await engine.shutdown()

asyncio.run(main())
""")
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         cwd=str(Path(__file__).resolve().parents[1]))
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.count("TOKENS 3") == 1


def test_a_missing_model_fails_start_up_with_the_built_in_options(tmp_path):
    config = _config(str(tmp_path / "no-such-model"), separate_process=True)

    async def main():
        engine = create_engine(config)
        with pytest.raises(Exception) as e:
            await engine.start()
        return e.value, engine._proc.returncode
    err, code = asyncio.run(main())
    assert "builtin:tiny-qwen3-vl" in str(err)
    assert code == 0                                # it reported the failure and exited


def test_the_child_starts_from_a_ray_worker(serve_url, tiny_model_path):
    """Serve replicas are Ray workers (their own sys.path, __main__ and environment): the engine
    process must start and serve from one (here a plain actor beside the session's app)."""
    import ray

    @ray.remote(num_cpus=0)
    class Host:
        async def run(self, model: str) -> tuple[list[int], int, int]:
            from serve_app.engine.config import EngineConfig

            engine = create_engine(EngineConfig(model=model, engine="continuous", device="cpu",
                                                dtype="float32", max_model_len=256, max_num_seqs=2,
                                                separate_process=True))
            await engine.start()
            try:
                req = EngineRequest("r", [1, 2, 3], [], SamplingParams(max_tokens=5, temperature=0.0,
                                                                       ignore_eos=True))
                toks = [t async for d in engine.generate(req) for t in d.token_ids]
                return toks, engine.stats()["engine_pid"], os.getpid()
            finally:
                await engine.shutdown()

    toks, child, host = ray.get(Host.remote().run.remote(tiny_model_path), timeout=300)
    assert len(toks) == 5 and child != host
