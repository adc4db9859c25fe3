"""Host -> device uploads that never make the host wait for the GPU.

The engine's host thread runs ahead of the GPU: it launches step N+1 while step N computes. A
blocking copy (``tensor.to(dev)``, ``torch.tensor(..., device=dev)``) synchronises the stream,
and a ``non_blocking`` copy from pageable memory may too (the driver stages it). Either throws
that lead away, and the GPU then idles while the host launches the next kernels. Small
per-step inputs therefore go up through pinned memory (torch's caching host allocator keeps a
block until its copy is done).
"""

from __future__ import annotations

import torch


def upload(data, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``data`` (a host tensor, or anything ``torch.tensor`` takes) on ``device``, without a sync."""
    t = data if isinstance(data, torch.Tensor) else torch.tensor(data, dtype=dtype)
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    if device.type != "cuda":
        return t.to(device)
    if not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)
