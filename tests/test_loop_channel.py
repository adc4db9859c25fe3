"""LoopChannel: Connection's wire format, read and written by an asyncio loop (engine process I/O)."""

from __future__ import annotations

import asyncio
import socket
import threading
from multiprocessing.connection import Connection

import numpy as np

from serve_app.engine._private.loop_channel import LoopChannel


def test_round_trip_with_a_connection_large_and_small_messages():
    """Messages larger than the socket's buffer go out as it drains; a burst of small ones read
    in one go arrives whole and in order; the Connection end sees the same objects."""
    async def main():
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        conn = Connection(theirs.detach())
        got, closed = [], []
        chan = LoopChannel(ours, loop, got.append, lambda: closed.append(1))
        big = np.random.default_rng(0).integers(0, 255, 5_000_000, dtype=np.uint8)

        def echo():                       # the child's side: echo 3 messages, then 500 small ones
            for _ in range(3):
                conn.send(conn.recv())
            for i in range(500):
                conn.send(("out", i, [1, 2, 3]))
            conn.close()

        t = threading.Thread(target=echo)
        t.start()
        chan.send(("add", "r1", big))
        assert chan.pending_bytes > 0               # 5 MB do not fit in the socket at once
        chan.send("config")
        chan.send(("cancel", "r1", None))
        for _ in range(500):
            if closed:
                break
            await asyncio.sleep(0.02)
        t.join(5)
        assert closed == [1]
        assert got[0][0] == "add" and np.array_equal(got[0][2], big)
        assert got[1] == "config" and got[2] == ("cancel", "r1", None)
        assert [m[1] for m in got[3:]] == list(range(500))
        assert chan.pending_bytes == 0
    asyncio.run(main())


def test_the_far_end_closing_is_reported_once_and_sends_then_fail():
    async def main():
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        closed = []
        chan = LoopChannel(ours, loop, lambda m: None, lambda: closed.append(1))
        theirs.close()
        for _ in range(100):
            if closed:
                break
            await asyncio.sleep(0.01)
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
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        conn = Connection(theirs.detach())
        chan = LoopChannel(ours, loop, lambda m: None, lambda: None)
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
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        conn = Connection(theirs.detach())
        got = []

        def handle(m):
            if m == 1:
                raise ValueError("bad message")
            got.append(m)
        chan = LoopChannel(ours, loop, handle, lambda: None)
        for i in range(3):
            conn.send(i)
        for _ in range(100):
            if len(got) == 2:
                break
            await asyncio.sleep(0.01)
        assert got == [0, 2]
        chan.close()
        conn.close()
    asyncio.run(main())
