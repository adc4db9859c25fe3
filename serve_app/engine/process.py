"""The continuous engine in a process of its own (``engine.separate_process: true``).

Why: in the serving replica the engine thread shares one GIL with the replica's event loop, which
streams every request through Ray. On an H200, 16 QPS with 48 requests admitted rather than 24
took decode steps from 3.34 to 3.77 ms where the engine bench's slope predicts 0.06 ms, and the
engine thread's busy share rose 52 -> 61 % (benchmarks/RESULTS.md, "the VLM admission cap"):
host time, most likely GIL waits between launches (not yet confirmed on a GPU). vLLM runs its
engine core in its own process for the same reason. Here the scheduler and its loop run in a
child, ``python -m serve_app.engine._private.engine_process`` on a socket pair; this side keeps
the streams, the request checks and the tokenizer. Requests (with their image arrays) and outputs
cross the socket, which the replica's event loop reads and writes itself (``LoopChannel``:
non-blocking, written as it drains, so the loop never waits on it). Reader and writer threads
did this before; each had to win the GIL back from the busy loop after every read and write.

Measured on an H200: first slower, the GPU idle 18 % of the time against 2 % in-process
(RESULTS.md, "the engine in its own process"). Since then the stats push no longer walks every
object frozen at start-up (``gc.get_freeze_count()``: 24-33 ms per push, 4 pushes a second on
the engine thread; fixed in ``gc_control``), and the socket I/O moved onto the event loop.
Re-measured at 17 QPS (RESULTS.md, "the engine process after the gc fix"): the GPU 98.8 % busy
against 96.7 %, e2e P95 1.58 s against 1.64-1.75, but the TTFT tail, made in front of the engine,
no lower, and no higher max load at SLO. With the engine's own admission (max_num_seqs 24 behind
a VLM cap of 48) it held 17.5-19 QPS where in-process cap 24 missed 17.5 (RESULTS.md, "the engine
process with its own admission"), so deployments.gpu.yaml turns it on; the engine's default is off.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import subprocess
import sys
from typing import Any

from serve_app.engine._private.loop_channel import LoopChannel
from serve_app.engine.continuous import ContinuousEngine
from serve_app.errors import ServeAppError

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 1800.0      # a real model on a cold disk, graphs and FP8 plans included


class ProcessEngine(ContinuousEngine):
    """:class:`ContinuousEngine` whose scheduler runs in a child process."""

    def __init__(self, config):
        super().__init__(config)
        self._proc: subprocess.Popen | None = None
        self._chan: LoopChannel | None = None
        self._first: asyncio.Future | None = None
        self._stats: dict[str, Any] = {}
        self._describe: dict[str, Any] = {}
        self._closing = False
        self._gone = False

    async def start(self) -> None:
        from serve_app.models import load_tokenizer, resolve_model

        self._loop = asyncio.get_running_loop()
        # ``python -m`` on an inherited socket, not multiprocessing's spawn: spawn re-imports the
        # parent's __main__, which breaks any script that builds an engine without a main guard
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._proc = subprocess.Popen([sys.executable, "-m", "serve_app.engine._private.engine_process",
                                       str(theirs.fileno())], pass_fds=(theirs.fileno(),), env=env)
        theirs.close()
        self._first = self._loop.create_future()
        self._chan = LoopChannel(ours, self._loop, self._on_message, self._on_close)
        self._chan.send(self.config.model_dump_json())
        try:
            kind, info = await asyncio.wait_for(asyncio.shield(self._first), START_TIMEOUT_S)
        except BaseException as e:
            self._proc.kill()                       # timed out (or cancelled): no orphan left
            self._chan.close()
            if isinstance(e, asyncio.TimeoutError):
                raise RuntimeError(f"engine process did not start within {START_TIMEOUT_S:.0f} s") from None
            raise
        if kind in ("failed", "eof"):
            self._chan.close()
            await asyncio.to_thread(self._proc.wait, 10)
            if kind == "failed":
                raise info
            raise RuntimeError(f"engine process exited during start-up (exit code {self._proc.returncode}); "
                               f"see the replica's log")
        self._limits, self._describe = info["limits"], info["describe"]
        # the child has resolved (and, for a built-in, built) the model: only the tokenizer here
        path = await asyncio.to_thread(resolve_model, self.config.model, self.config.cache_dir)
        self.tokenizer = await asyncio.to_thread(load_tokenizer, path)
        self._ready = True
        logger.info("engine process %d ready", self._proc.pid)

    # ------------------------------------------------------------------ the socket (loop thread)
    def _on_message(self, msg) -> None:
        if not self._first.done():                  # ("ready", info) or ("failed", error)
            self._first.set_result(msg)
            return
        kind, payload = msg
        if kind == "out":
            self._dispatch(payload)
        elif kind == "stats":
            self._stats = payload
        elif kind == "crashed":
            self._error = RuntimeError(payload)
            self._fail_streams(ServeAppError(f"generation failed: {payload}", 500, "engine_error"))

    def _on_close(self) -> None:
        self._gone = True
        if not self._first.done():
            self._first.set_result(("eof", None))
            return
        if not self._closing and self._error is None:
            self._error = RuntimeError(f"engine process exited (exit code {self._proc.poll()})")
            self._fail_streams(ServeAppError("engine failed; the replica will restart", 503, "engine_failed"))

    def _fail_streams(self, err: BaseException) -> None:
        self._dispatch([(rid, err) for rid in list(self._streams)])

    def _submit(self, kind: str, a, b) -> None:
        if self._error is not None or self._chan is None or self._gone:
            if kind == "cancel":
                return                              # nothing left to cancel
            raise ServeAppError("engine failed; the replica will restart", 503, "engine_failed")
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._chan.send((kind, a, b))
        else:                                       # e.g. a generator finalised off the loop
            self._loop.call_soon_threadsafe(self._send_quietly, (kind, a, b))

    def _send_quietly(self, msg) -> None:
        try:
            self._chan.send(msg)
        except OSError:
            pass                                    # the child is gone: _on_close reports it

    async def shutdown(self) -> None:
        self._ready = False
        self._closing = True
        if self._chan is not None and not self._gone:
            self._send_quietly(("stop", None, None))
            await self._chan.drain(10)
        if self._proc is not None:
            try:
                await asyncio.to_thread(self._proc.wait, 30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                await asyncio.to_thread(self._proc.wait, 5)
        if self._chan is not None:
            self._chan.close()
        for rid, (q, _) in list(self._streams.items()):
            q.put_nowait(ServeAppError("engine shut down", 503, "engine_shutdown"))

    def health(self) -> dict:
        if self._error is not None:
            raise RuntimeError(f"continuous engine process failed: {self._error!r}")
        if self._ready and (self._proc is None or self._proc.poll() is not None):
            raise RuntimeError("continuous engine process is not running")
        return {"ready": self._ready, "engine": "continuous", "separate_process": True, **self._describe}

    def stats(self) -> dict:
        """The child's latest stats (pushed every 0.25 s while busy, every 1 s while idle)."""
        return {"engine": "continuous", "streams_open": len(self._streams), **self._stats,
                "engine_pid": self._proc.pid if self._proc is not None else None}
