"""The continuous engine in a process of its own (``engine.separate_process: true``).

Why: in the serving replica the engine thread shares one GIL with the replica's event loop, which
streams every request through Ray. On an H200, 16 QPS with 48 requests admitted rather than 24
took decode steps from 3.34 to 3.77 ms where the engine bench's slope predicts 0.06 ms, and the
engine thread's busy share rose 52 -> 61 % (benchmarks/RESULTS.md, "the VLM admission cap"):
host time, most likely GIL waits between launches (not yet confirmed on a GPU). vLLM runs its
engine core in its own process for the same reason. Here the scheduler and its loop run in a
child, ``python -m serve_app.engine._private.engine_process`` on a socket pair; this side keeps
the streams, the request checks and the tokenizer. Requests (with their image arrays) and outputs
cross the socket. A writer thread sends the requests, so the loop never waits on the socket (a
request with 3.3 MB of image patches took ~7 ms to send on a 2-core VM); a reader thread hands
each iteration's outputs to the loop, as the engine thread does in-process.

Measured on an H200 (RESULTS.md, "the engine in its own process"): slower. The GPU sat idle 18 % of
the time against 2 % in-process, and the in-process GPU was already 95-98 % busy, so the GIL was
not what capped throughput. Where the child's loop waits is not yet known. Off by default.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

from serve_app.engine.continuous import ContinuousEngine
from serve_app.errors import ServeAppError

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 1800.0      # a real model on a cold disk, graphs and FP8 plans included


class ProcessEngine(ContinuousEngine):
    """:class:`ContinuousEngine` whose scheduler runs in a child process."""

    def __init__(self, config):
        super().__init__(config)
        self._proc: subprocess.Popen | None = None
        self._conn: Connection | None = None
        self._reader: threading.Thread | None = None
        self._writer: threading.Thread | None = None
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._stats: dict[str, Any] = {}
        self._describe: dict[str, Any] = {}
        self._closing = False

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
        self._conn = Connection(ours.detach())
        self._conn.send(self.config.model_dump_json())
        try:
            kind, info = await asyncio.to_thread(self._handshake)
        except BaseException:
            self._proc.kill()                       # timed out (or cancelled): no orphan left
            raise
        if kind == "failed":
            await asyncio.to_thread(self._proc.wait, 10)
            raise info
        self._limits, self._describe = info["limits"], info["describe"]
        # the child has resolved (and, for a built-in, built) the model: only the tokenizer here
        path = await asyncio.to_thread(resolve_model, self.config.model, self.config.cache_dir)
        self.tokenizer = await asyncio.to_thread(load_tokenizer, path)
        self._reader = threading.Thread(target=self._read, name="engine-process-reader", daemon=True)
        self._reader.start()
        self._writer = threading.Thread(target=self._write, name="engine-process-writer", daemon=True)
        self._writer.start()
        self._ready = True
        logger.info("engine process %d ready", self._proc.pid)

    def _handshake(self):
        if not self._conn.poll(START_TIMEOUT_S):
            raise RuntimeError(f"engine process did not start within {START_TIMEOUT_S:.0f} s")
        try:
            return self._conn.recv()
        except EOFError:
            self._proc.wait(10)
            raise RuntimeError(f"engine process exited during start-up (exit code {self._proc.returncode}); "
                               f"see the replica's log") from None

    def _read(self) -> None:
        """Reader thread: outputs to the loop, stats to the cache, the end of the child to errors."""
        try:
            while True:
                kind, payload = self._conn.recv()
                if kind == "out":
                    self._to_loop(self._dispatch, payload)
                elif kind == "stats":
                    self._stats = payload
                elif kind == "crashed":
                    self._error = RuntimeError(payload)
                    self._fail_streams(ServeAppError(f"generation failed: {payload}", 500, "engine_error"))
        except (EOFError, OSError):
            pass
        if not self._closing and self._error is None:
            self._error = RuntimeError(f"engine process exited (exit code {self._proc.poll()})")
            self._fail_streams(ServeAppError("engine failed; the replica will restart", 503, "engine_failed"))

    def _fail_streams(self, err: BaseException) -> None:
        self._to_loop(lambda: self._dispatch([(rid, err) for rid in list(self._streams)]))

    def _to_loop(self, fn, *args) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:                        # the loop is closed: nobody is listening
            pass

    def _submit(self, kind: str, a, b) -> None:
        if self._error is not None:
            raise ServeAppError("engine failed; the replica will restart", 503, "engine_failed")
        self._outbox.put((kind, a, b))

    def _write(self) -> None:
        """Writer thread: requests, cancels and the final stop to the child, in order."""
        while True:
            msg = self._outbox.get()
            if msg is None:
                return
            try:
                self._conn.send(msg)
            except (OSError, ValueError):       # the child is gone: the reader reports it
                return

    async def shutdown(self) -> None:
        self._ready = False
        self._closing = True
        if self._writer is not None:
            self._outbox.put(("stop", None, None))
            self._outbox.put(None)
            await asyncio.to_thread(self._writer.join, 10)
        elif self._conn is not None:              # start-up did not finish
            try:
                self._conn.send(("stop", None, None))
            except (OSError, ValueError):
                pass
        if self._proc is not None:
            try:
                await asyncio.to_thread(self._proc.wait, 30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                await asyncio.to_thread(self._proc.wait, 5)
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, 5)
        if self._conn is not None:
            self._conn.close()
        for rid, (q, _) in list(self._streams.items()):
            q.put_nowait(ServeAppError("engine shut down", 503, "engine_shutdown"))

    def health(self) -> dict:
        if self._error is not None:
            raise RuntimeError(f"continuous engine process failed: {self._error!r}")
        if self._ready and (self._proc is None or self._proc.poll() is not None):
            raise RuntimeError("continuous engine process is not running")
        return {"ready": self._ready, "engine": "continuous", "separate_process": True, **self._describe}

    def stats(self) -> dict:
        """The child's latest stats (pushed every 0.25 s while busy, and when it goes idle)."""
        return {"engine": "continuous", "streams_open": len(self._streams), **self._stats,
                "engine_pid": self._proc.pid if self._proc is not None else None}
