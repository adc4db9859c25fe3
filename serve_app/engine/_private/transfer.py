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
