"""The engine thread's loop, shared by the in-process engine and the engine process."""

from __future__ import annotations

import queue
import threading
from typing import Callable

import torch

from serve_app.engine._private.scheduler import Scheduler


def run(sched: Scheduler, inbox: queue.SimpleQueue, wake: threading.Event, stop: threading.Event,
        tick: Callable[[bool], None] | None = None) -> None:
    """Take ``("add", request, arrival)`` / ``("cancel", request_id, None)`` from ``inbox`` and
    step the scheduler until ``stop``. ``tick(busy)`` runs once per turn (the engine process
    pushes its stats from it). Raises what a step raises: the caller fails every stream."""
    with torch.inference_mode():
        while not stop.is_set():
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
            if tick is not None:
                tick(busy)
            if not busy:
                if sched.idle_work():
                    continue
                wake.wait(0.05)
                wake.clear()
                continue
            sched.step()
