"""The engine thread's loop, shared by the in-process engine and the engine process."""

from __future__ import annotations

import queue
import threading
import time
from typing import Callable

import torch

from serve_app.engine._private.scheduler import Scheduler


def run(sched: Scheduler, inbox: queue.SimpleQueue, wake: threading.Event, stop: threading.Event,
        tick: Callable[[bool], None] | None = None) -> None:
    """Take ``("add", request, arrival)`` / ``("cancel", request_id, None)`` from ``inbox`` and
    step the scheduler until ``stop``. ``tick(busy)`` runs once per turn (the engine process
    pushes its stats from it). Raises what a step raises: the caller fails every stream.

    The thread's time outside ``step()`` lands in the scheduler's host timers: ``inbox`` (taking
    requests), ``tick``, ``idle`` (no work: waiting or idle-time captures) and ``loop`` (all of
    it), so that loop - step - idle - inbox - tick is time lost between steps (GIL waits)."""
    sched.enter_thread()
    host = sched.host_times
    clock = time.perf_counter
    with torch.inference_mode():
        last = clock()
        while not stop.is_set():
            t0 = clock()
            host["loop"] += t0 - last
            last = t0
            while True:
                try:
                    kind, a, b = inbox.get_nowait()
                except queue.Empty:
                    break
                if kind == "add":
                    sched.add(a, b)
                else:
                    sched.cancel(a)
            busy = sched.has_work()
            t1 = clock()
            host["inbox"] += t1 - t0
            if tick is not None:
                tick(busy)
                host["tick"] += clock() - t1
            if not busy:
                t2 = clock()
                if not sched.idle_work():
                    wake.wait(0.05)
                    wake.clear()
                host["idle"] += clock() - t2
                continue
            sched.step()
