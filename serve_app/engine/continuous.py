"""Continuous-batching engine for Qwen3-VL: iteration-level scheduling over a paged KV cache.

A background thread owns the model. Each iteration it admits waiting requests whose KV fits
(vision encoder batched over the new images, prompt prefill chunked to ``max_prefill_tokens``),
then runs one decode step for every running request (a CUDA graph per batch bucket on GPU).
Finished or cancelled requests free their pages at once. The asyncio side only validates,
queues and streams :class:`TokenDelta` s; nothing here knows about Ray.
"""

from __future__ import annotations

import asyncio
import logging

import queue
import threading
import time
from typing import Any, AsyncIterator

import torch

from serve_app.engine._private import engine_loop, gc_control
from serve_app.engine._private.limits import RequestLimits
from serve_app.engine._private.scheduler import Scheduler
from serve_app.engine.config import EngineConfig
from serve_app.engine.protocol import (DeltaCoalescer, EngineRequest, TokenDelta, merge_deltas,
                                       validate_images)
from serve_app.errors import ServeAppError

logger = logging.getLogger(__name__)


class ContinuousEngine:
    """Implements :class:`serve_app.engine.protocol.Engine`."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.tokenizer: Any = None
        self._sched: Scheduler | None = None
        self._thread: threading.Thread | None = None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stop = threading.Event()
        # request id -> (its queue on the loop, its coalescer when it asked for a stream interval)
        self._streams: dict[str, tuple[asyncio.Queue, DeltaCoalescer | None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = False
        self._error: BaseException | None = None
        self._limits: RequestLimits | None = None    # checked on the loop before queueing

    # ---------------------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._sched = await asyncio.to_thread(Scheduler.load, self.config, self._emit)
        self.tokenizer = self._sched.tokenizer
        self._limits = self._sched.limits
        n = gc_control.start(self.config.gc_freeze)
        logger.info("froze %d start-up objects out of the garbage collector's walk", n)
        self._thread = threading.Thread(target=self._run, name="continuous-engine", daemon=True)
        self._thread.start()
        self._ready = True

    async def shutdown(self) -> None:
        self._ready = False
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
        for rid, (q, _) in list(self._streams.items()):
            q.put_nowait(ServeAppError("engine shut down", 503, "engine_shutdown"))
        if self._sched is not None:
            self._sched.close()
        self._sched = None
        if self.config.gc_freeze:
            gc_control.unfreeze()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def health(self) -> dict:
        if self._error is not None:
            raise RuntimeError(f"continuous engine loop failed: {self._error!r}")
        if self._ready and self._thread is not None and not self._thread.is_alive():
            raise RuntimeError("continuous engine loop is not running")
        out = {"ready": self._ready, "engine": "continuous"}
        if self._sched is not None:
            out.update(self._sched.describe())
        return out

    def stats(self) -> dict:
        base = {"engine": "continuous", "streams_open": len(self._streams)}
        if self._sched is None:
            return base
        return {**base, **self._sched.stats()}

    # ----------------------------------------------------------------------------- requests
    async def generate(self, request: EngineRequest) -> AsyncIterator[TokenDelta]:
        if not self._ready or self._limits is None:
            raise ServeAppError("engine is not ready", 503, "engine_not_ready")
        if self._error is not None:
            raise ServeAppError("engine failed; the replica will restart", 503, "engine_failed")
        rid = request.request_id
        if rid in self._streams:
            raise ServeAppError(f"duplicate request id {rid!r}", 409, "duplicate_request_id")
        try:
            validate_images(request.images, self._limits.patch_dim)
        except ValueError as e:
            raise ServeAppError(str(e), 400, "invalid_image") from e
        self._limits.check(request)  # raises ServeAppError (400) for what can never run
        out: asyncio.Queue = asyncio.Queue()
        interval = request.stream_interval_s
        self._streams[rid] = (out, DeltaCoalescer(interval) if interval > 0 else None)
        self._submit("add", request, time.monotonic())
        done, held = False, None
        try:
            while True:
                if held is not None:
                    item, held = held, None
                else:
                    item = await out.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                if item.finish_reason is None and not out.empty():
                    # A slow consumer (or a busy loop) let deltas pile up: send them as one item.
                    # An exception is kept for the next turn, so it follows the deltas before it.
                    batch = [item]
                    while not out.empty():
                        nxt = out.get_nowait()
                        if isinstance(nxt, BaseException):
                            held = nxt
                            break
                        batch.append(nxt)
                        if nxt.finish_reason is not None:
                            break
                    item = merge_deltas(batch)
                if item.finish_reason is not None:
                    done = True
                yield item
                if done:
                    return
        finally:
            self._streams.pop(rid, None)
            if not done:  # consumer left early (client gone, task cancelled): free its slot
                self._submit("cancel", rid, None)

    async def cancel(self, request_id: str) -> None:
        self._submit("cancel", request_id, None)

    def _submit(self, kind: str, a, b) -> None:
        """To the engine thread: ``("add", request, arrival)`` or ``("cancel", request_id, None)``."""
        self._inbox.put((kind, a, b))
        self._wake.set()

    # ------------------------------------------------------------------ engine thread side
    def _emit(self, items: list[tuple[str, TokenDelta | BaseException]]) -> None:
        """Called on the engine thread with this iteration's outputs: one hop to the loop."""
        if items and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._dispatch, items)

    def _dispatch(self, items) -> None:
        """On the loop, once per engine iteration: each stream's delta goes to its queue, or is
        held and merged (stream interval), so its consumer is not woken for every decode step."""
        for rid, item in items:
            stream = self._streams.get(rid)
            if stream is None:
                continue
            q, merger = stream
            if merger is None:
                q.put_nowait(item)
            elif isinstance(item, BaseException):
                held = merger.drain()
                if held is not None:
                    q.put_nowait(held)
                q.put_nowait(item)
            else:
                out = merger.offer(item)
                if out is not None:
                    q.put_nowait(out)

    def _run(self) -> None:
        try:
            engine_loop.run(self._sched, self._inbox, self._wake, self._stop)
        except BaseException as e:  # the replica is broken: fail everyone, health() raises
            logger.exception("continuous engine loop failed")
            self._error = e
            err = ServeAppError(f"generation failed: {e}", 500, "engine_error")
            self._emit([(rid, err) for rid in list(self._streams)])


