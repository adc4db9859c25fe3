"""The child side of ``engine.separate_process``: the scheduler and its loop in a process of their own.

Started as ``python -m serve_app.engine._private.engine_process FD`` on one end of a socket pair.
The first message is the engine config (JSON). Then, parent -> child: ``("add", request, arrival)``, ``("cancel", id,
None)``, ``("stop", None, None)``. Child -> parent: ``("ready", info)`` or ``("failed", error)``
once at start-up, then ``("out", items)`` per engine iteration (the same items the in-process engine
hands its event loop), ``("stats", dict)`` every ``STATS_INTERVAL_S`` while busy and every
``IDLE_STATS_INTERVAL_S`` while idle, and ``("crashed", message)`` if the loop dies.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

STATS_INTERVAL_S = 0.25
# The idle timers keep counting while idle: without pushes then, a snapshot taken after an idle
# spell (a benchmark step's "before") missed it, and the next step's idle share counted it (17.4 %
# in the first step of both GPU sweeps of 2026-11-30 06:45-06:56, 0.7 % in the second).
IDLE_STATS_INTERVAL_S = 1.0


def portable_error(e: BaseException) -> BaseException:
    """``e`` if it survives pickling (ServeAppError does), else a RuntimeError with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001 - any unpicklable error becomes its message
        return RuntimeError(f"{type(e).__name__}: {e}")


def main(config_json: str, conn) -> None:
    """The engine process's life: load, report, serve the pipe until told to stop or orphaned."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s engine-process %(message)s")
    from serve_app.engine._private import engine_loop, gc_control
    from serve_app.engine._private.scheduler import Scheduler
    from serve_app.engine.config import EngineConfig

    lock = threading.Lock()
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    wake, stop = threading.Event(), threading.Event()

    def send(msg) -> None:
        with lock:
            try:
                conn.send(msg)
            except (OSError, ValueError):         # the parent is gone: finish quietly
                stop.set()
                wake.set()

    config = EngineConfig.model_validate_json(config_json)
    try:
        sched = Scheduler.load(config, lambda items: send(("out", items)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        send(("failed", portable_error(e)))
        conn.close()
        return
    gc_control.start(config.gc_freeze)
    send(("ready", {"limits": sched.limits, "describe": sched.describe()}))

    def receive() -> None:
        try:
            while True:
                msg = conn.recv()
                if msg[0] == "stop":
                    break
                inbox.put(msg)
                wake.set()
        except (EOFError, OSError):
            pass                                  # the parent is gone: stop too
        stop.set()
        wake.set()

    threading.Thread(target=receive, name="engine-process-inbox", daemon=True).start()
    state = {"last": 0.0}

    def tick(busy: bool) -> None:
        """Stats every STATS_INTERVAL_S while busy, every IDLE_STATS_INTERVAL_S while idle."""
        now = time.monotonic()
        if now - state["last"] >= (STATS_INTERVAL_S if busy else IDLE_STATS_INTERVAL_S):
            send(("stats", sched.stats()))
            state["last"] = now

    try:
        engine_loop.run(sched, inbox, wake, stop, tick)
        send(("stats", sched.stats()))
    except BaseException as e:  # noqa: BLE001 - the parent fails every stream and turns unhealthy
        logging.exception("engine process loop failed")
        send(("crashed", f"{type(e).__name__}: {e}"))
    finally:
        conn.close()


if __name__ == "__main__":
    # python -m serve_app.engine._private.engine_process FD: FD is this end of the replica's socket
    import sys
    from multiprocessing.connection import Connection

    _conn = Connection(int(sys.argv[1]))
    main(_conn.recv(), _conn)
