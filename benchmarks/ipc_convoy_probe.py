"""Why ``engine.separate_process`` left an H200 idle 18 % of the time: the replica's socket I/O
threads against its busy event loop (CPU, no model).

A thread that does blocking I/O must take the GIL back after every read or write. While the
event loop runs Python, it gets it only when the loop yields or at the 5-ms switch interval.
Multiprocessing's ``Connection`` writes a 3.3 MB request in socket-buffer-sized pieces and reads
messages with two reads each, so each piece can wait up to 5 ms. This probe stands in for the
engine process with a child that acknowledges each request and emits a small "outputs" message
every ``--step-ms``, timing how long each of its sends blocks (time its engine thread, and so
the GPU, would stand still). The parent's loop runs Python at ``--duty`` in 2-ms bursts and
talks to the child either with a reader and a writer thread (``threads``, as ProcessEngine did)
or from the loop itself (``loop``: non-blocking socket, ``serve_app.engine._private.loop_channel``).

    python benchmarks/ipc_convoy_probe.py --duty 0,0.5,0.8 --seconds 5 --out results/cpu-ipc-convoy/probe.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import socket
import statistics
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._host import loop_load  # noqa: E402
from serve_app.engine._private.loop_channel import LoopChannel  # noqa: E402


def child(fd: int, step_s: float) -> None:
    """The stand-in engine process: ack each request, emit outputs every ``step_s``, report how
    long its sends blocked."""
    conn = Connection(fd)
    lock = threading.Lock()
    blocked = [0.0, 0]
    stop = threading.Event()

    def send(msg):
        t = time.perf_counter()
        with lock:
            conn.send(msg)
        blocked[0] += time.perf_counter() - t
        blocked[1] += 1

    def receive():
        while True:
            kind, a, b = conn.recv()
            if kind == "stop":
                break
            send(("ack", a, time.monotonic()))
        stop.set()

    threading.Thread(target=receive, daemon=True).start()
    items = [(f"r{i}", {"text": "tok" * 3, "token_ids": [1, 2, 3]}) for i in range(12)]
    n = 0
    while not stop.is_set():
        t = time.perf_counter()
        send(("out", n, time.monotonic(), items))
        n += 1
        time.sleep(max(0.0, step_s - (time.perf_counter() - t)))
    send(("done", blocked[0], blocked[1]))
    time.sleep(0.5)


async def run_one(mode: str, duty: float, seconds: float, qps: float, mb: float, step_s: float,
                  sndbuf: int = 0) -> dict:
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    for sock in (ours, theirs) if sndbuf else ():
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen([sys.executable, __file__, "--child", str(theirs.fileno()), "--step-ms", str(step_s * 1e3)],
                            pass_fds=(theirs.fileno(),), env=env)
    theirs.close()
    ours_sndbuf = ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    sent: dict[int, float] = {}
    acks: list[float] = []
    out_lag: list[float] = []
    final: dict = {}
    done = asyncio.Event()

    def on_message(msg):
        kind = msg[0]
        now = time.monotonic()
        if kind == "ack":
            acks.append(now - sent.pop(msg[1]))
        elif kind == "out":
            out_lag.append(now - msg[2])
        elif kind == "done":
            final.update(blocked_s=msg[1], sends=msg[2])
            done.set()

    if mode == "threads":
        conn = Connection(ours.detach())
        outbox: queue.SimpleQueue = queue.SimpleQueue()

        def reader():
            try:
                while True:
                    msg = conn.recv()
                    loop.call_soon_threadsafe(on_message, msg)
                    if msg[0] == "done":
                        return
            except (EOFError, OSError):
                pass

        def writer():
            while (msg := outbox.get()) is not None:
                conn.send(msg)

        threading.Thread(target=reader, daemon=True).start()
        threading.Thread(target=writer, daemon=True).start()
        send = outbox.put
    else:
        chan = LoopChannel(ours, loop, on_message, lambda: done.set())
        send = chan.send
    stop = asyncio.Event()
    busy = [0.0]
    hog = asyncio.create_task(loop_load(duty, 0.002, stop, busy)) if duty > 0 else None
    image = np.random.default_rng(0).integers(0, 255, int(mb * 1e6), dtype=np.uint8)
    rng = np.random.default_rng(1)
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < seconds:
        sent[i] = time.monotonic()
        send(("add", i, image))
        i += 1
        await asyncio.sleep(rng.exponential(1 / qps))
    await asyncio.sleep(0.5)
    send(("stop", None, None))
    await asyncio.wait_for(done.wait(), 30)
    stop.set()
    if hog:
        await hog
    if mode == "threads":
        outbox.put(None)
    else:
        chan.close()
    proc.wait(10)
    wall = time.monotonic() - t0

    def p(xs, q):
        return round(1e3 * float(np.percentile(xs, q)), 2) if xs else None

    return {"mode": mode, "duty": duty, "sndbuf": ours_sndbuf, "loop_busy": round(busy[0] / wall, 3), "requests": i, "acked": len(acks),
            "request_ms_p50": p(acks, 50), "request_ms_p95": p(acks, 95),
            "output_lag_ms_p50": p(out_lag, 50), "output_lag_ms_p95": p(out_lag, 95),
            "child_send_blocked_pct": round(100 * final.get("blocked_s", 0) / wall, 2),
            "child_send_blocked_ms_mean": round(1e3 * final.get("blocked_s", 0) / max(1, final.get("sends", 1)), 3),
            "output_msgs": len(out_lag), "median_ack_ms": round(1e3 * statistics.median(acks), 2) if acks else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duty", default="0,0.5,0.8")
    ap.add_argument("--modes", default="threads,loop")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--qps", type=float, default=16.0, help="requests per second (Poisson)")
    ap.add_argument("--mb", type=float, default=3.3, help="image bytes per request, MB")
    ap.add_argument("--step-ms", type=float, default=3.4, help="the child's output interval (a decode step)")
    ap.add_argument("--sndbuf", type=int, default=0, help="SO_SNDBUF of both ends, bytes (0: the system's)")
    ap.add_argument("--out")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        child(a.child, a.step_ms / 1e3)
        return
    rows = []
    for duty in (float(x) for x in a.duty.split(",")):
        for mode in a.modes.split(","):
            r = asyncio.run(run_one(mode, duty, a.seconds, a.qps, a.mb, a.step_ms / 1e3, a.sndbuf))
            print(json.dumps(r), flush=True)
            rows.append(r)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                           "args": vars(a), "cpus": os.cpu_count(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
