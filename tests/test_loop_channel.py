"""LoopChannel: Connection's wire format, read and written by an asyncio loop (engine process I/O)."""

from __future__ import annotations

import asyncio
import socket
import threading
from multiprocessing.connection import Connection

import numpy as np

from serve_app.engine._private.loop_channel import LoopChannel


def _pair(on_message=lambda m: None, on_close=lambda: None) -> tuple[LoopChannel, Connection]:
    """A channel on the running loop and a plain Connection at the socket's other end."""
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)    # a 5 MB message never fits at once
    return LoopChannel(ours, asyncio.get_running_loop(), on_message, on_close), Connection(theirs.detach())


async def _until(cond, seconds: float = 5.0) -> None:
    for _ in range(int(seconds / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)


def test_round_trip_with_a_connection_large_and_small_messages():
    """Messages larger than the socket's buffer go out as it drains; a burst of small ones read
    in one go arrives whole and in order; the Connection end sees the same objects."""
    async def main():
        got, closed = [], []
        chan, conn = _pair(got.append, lambda: closed.append(1))
        big = np.random.default_rng(0).integers(0, 255, 5_000_000, dtype=np.uint8)

        def echo():                       # the child's side: echo 3 messages, then 500 small ones
            for _ in range(3):
                conn.send(conn.recv())
            for i in range(500):
                conn.send(("out", i, [1, 2, 3]))
            conn.close()

        chan.send(("add", "r1", big))
        assert chan.pending_bytes > 0               # 5 MB do not fit in the socket at once
        chan.send("config")
        chan.send(("cancel", "r1", None))
        t = threading.Thread(target=echo)            # the far end starts reading only now
        t.start()
        await _until(lambda: closed, 10)
        t.join(5)
        assert closed == [1]
        assert got[0][0] == "add" and np.array_equal(got[0][2], big)
        assert got[1] == "config" and got[2] == ("cancel", "r1", None)
        assert [m[1] for m in got[3:]] == list(range(500))
        assert chan.pending_bytes == 0
    asyncio.run(main())


def test_the_far_end_closing_is_reported_once_and_sends_then_fail():
    async def main():
        closed = []
        chan, conn = _pair(on_close=lambda: closed.append(1))
        conn.close()
        await _until(lambda: closed)
        assert closed == [1]
        try:
            chan.send("late")
        except OSError:
            pass
        else:
            raise AssertionError("send after close must raise")
        chan.close()                                # idempotent
        assert closed == [1]
    asyncio.run(main())


def test_drain_waits_for_queued_bytes():
    async def main():
        chan, conn = _pair()
        chan.send(b"x" * 4_000_000)
        assert not await chan.drain(0.05)           # nobody reads yet: still queued
        t = threading.Thread(target=conn.recv)
        t.start()
        assert await chan.drain(10)
        t.join(5)
        chan.close()
        conn.close()
    asyncio.run(main())


def test_a_failing_handler_does_not_drop_the_messages_after_it():
    async def main():
        got = []

        def handle(m):
            if m == 1:
                raise ValueError("bad message")
            got.append(m)
        chan, conn = _pair(handle)
        for i in range(3):
            conn.send(i)
        await _until(lambda: len(got) == 2)
        assert got == [0, 2]
        chan.close()
        conn.close()
    asyncio.run(main())
