"""Host -> device uploads that never make the host wait for the GPU.

The engine's host thread runs ahead of the GPU: it launches step N+1 while step N computes. A
blocking copy (``tensor.to(dev)``, ``torch.tensor(..., device=dev)``) waits for everything queued
on the stream, which throws that lead away: the GPU then idles while the host launches the next
kernels. Measured on the H200 behind 40 ms of queued GPU work (`benchmarks/copy_sync_probe.py`, 2026-11-29): a
16-element blocking copy held the host 40.1 ms; ``non_blocking`` from pageable memory 0.22 ms
(the driver stages small copies without waiting); through ``pin_memory()`` 0.29-0.33 ms. So
small inputs go up as pageable ``non_blocking`` copies, and large ones (pixels) through a
reused pinned buffer (``PixelUpload._upload_pixels``).
"""

from __future__ import annotations

import torch


def upload(data, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``data`` (a host tensor, or anything ``torch.tensor`` takes) on ``device``, without a sync."""
    t = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t.to(device, non_blocking=device.type == "cuda")


class PinnedStaging:
    """Pinned host buffers of one shape, used in turn, for inputs copied up before every launch
    (decode steps, prefill graphs). A buffer is written again only once the event of its previous
    upload has passed: the host may be a launch or two ahead of the GPU, and a pinned copy is
    read by the GPU when it runs, not when it is queued. With two buffers one upload can still be
    pending while the next is written."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, n: int = 2):
        cuda = device.type == "cuda"
        self._bufs = [torch.zeros(shape, dtype=dtype, pin_memory=cuda) for _ in range(n)]
        self._events = [torch.cuda.Event() if cuda else None for _ in range(n)]
        self._turn = 0
        self._cuda = cuda

    def take(self) -> torch.Tensor:
        """The next buffer, free to write."""
        ev = self._events[self._turn]
        if ev is not None:
            ev.synchronize()
        return self._bufs[self._turn]

    def upload(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Copy ``src`` (a view of the buffer :meth:`take` gave) into ``dst``; the buffer is
        written again after this copy."""
        dst.copy_(src, non_blocking=self._cuda)
        if self._events[self._turn] is not None:
            self._events[self._turn].record()
        self._turn = (self._turn + 1) % len(self._bufs)
