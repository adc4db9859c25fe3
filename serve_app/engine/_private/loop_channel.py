"""Messages over a socket, read and written by an asyncio loop (no I/O threads).

Why: a thread doing blocking I/O in a Serve replica must take the GIL back after every read and
write, and while the replica's event loop runs Python it gets it only at the 5-ms switch
interval. ``multiprocessing.connection.Connection`` writes a 3.3 MB request in socket-buffer
pieces and reads a message with two reads, so the engine process's reader and writer threads
fell behind a busy loop: the child then blocked on full sockets with the GPU idle
(``benchmarks/ipc_convoy_probe.py``). Here the loop itself reads whatever is there whenever the
socket is readable and writes as the socket drains. Wire format is ``Connection``'s (a 4-byte
big-endian length, or -1 and an 8-byte one, then a pickle), so the other end can stay a
``Connection``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import pickle
import socket
import struct
from typing import Any, Callable

_READ = 1 << 20
logger = logging.getLogger(__name__)


class LoopChannel:
    """Pickled messages over ``sock`` on ``loop``: :meth:`send` queues and writes what the socket
    takes now, the rest when it drains; each whole message read goes to ``on_message``, and the
    end of the stream (or an error on it) to ``on_close``, once. Loop thread only."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop,
                 on_message: Callable[[Any], None], on_close: Callable[[], None]):
        sock.setblocking(False)
        self._sock, self._loop, self._fd = sock, loop, sock.fileno()
        self._on_message, self._on_close = on_message, on_close
        self._rbuf = bytearray()
        self._wq: collections.deque = collections.deque()
        self._writing = False
        self._closed = False
        loop.add_reader(self._fd, self._readable)

    @property
    def pending_bytes(self) -> int:
        """Bytes queued but not yet taken by the socket."""
        return sum(len(b) for b in self._wq)

    def send(self, obj: Any) -> None:
        if self._closed:
            raise OSError("channel closed")
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        n = len(data)
        self._wq.append(struct.pack("!i", n) if n <= 0x7FFFFFFF else struct.pack("!iQ", -1, n))
        self._wq.append(memoryview(data))
        if not self._writing:
            self._flush()

    def _flush(self) -> None:
        while self._wq:
            buf = self._wq[0]
            try:
                n = self._sock.send(buf)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._end()
                return
            if n == len(buf):
                self._wq.popleft()
            else:
                self._wq[0] = memoryview(buf)[n:]
        if self._wq and not self._writing:
            self._loop.add_writer(self._fd, self._flush)
            self._writing = True
        elif not self._wq and self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False

    def _readable(self) -> None:
        while True:
            try:
                chunk = self._sock.recv(_READ)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                chunk = b""
            if not chunk:
                self._deliver()
                self._end()
                return
            self._rbuf += chunk
            if len(chunk) < _READ:
                break
        self._deliver()

    def _deliver(self) -> None:
        msgs, pos, buf = [], 0, self._rbuf
        with memoryview(buf) as view:
            while len(buf) - pos >= 4:
                (n,), head = struct.unpack_from("!i", buf, pos), 4
                if n == -1:
                    if len(buf) - pos < 12:
                        break
                    (n,), head = struct.unpack_from("!Q", buf, pos + 4), 12
                if len(buf) - pos < head + n:
                    break
                msgs.append(pickle.loads(view[pos + head:pos + head + n]))
                pos += head + n
        if pos:
            del buf[:pos]
        for m in msgs:
            if self._closed:
                return
            try:
                self._on_message(m)
            except Exception:  # noqa: BLE001 - one bad message must not drop the ones after it
                logger.exception("handling a message from the socket failed")

    def _end(self) -> None:
        if self._closed:
            return
        self.close()
        self._on_close()

    def close(self) -> None:
        """Stop reading and writing (queued bytes are dropped) and close the socket."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._fd)
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        self._wq.clear()
        self._sock.close()

    async def drain(self, timeout: float) -> bool:
        """Wait until every queued byte is in the socket (or ``timeout``); False if it was not."""
        deadline = self._loop.time() + timeout
        while self._wq and not self._closed and self._loop.time() < deadline:
            await asyncio.sleep(0.005)
        return not self._wq
