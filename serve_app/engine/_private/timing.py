"""GPU time of launched work, read without stalling the host (the scheduler's per-kind totals)."""

from __future__ import annotations

import time

import torch


class StepTimer:
    """Time of work launched on the GPU (CUDA events, read once it is done); host time on CPU."""

    def __init__(self, cuda: bool):
        self._cuda = cuda
        if cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0, self._t1 = time.perf_counter(), 0.0

    def stop(self) -> "StepTimer":
        if self._cuda:
            self._end.record()
        else:
            self._t1 = time.perf_counter()
        return self

    def synchronize(self) -> None:
        if self._cuda:
            self._end.synchronize()

    def order(self, stream) -> None:
        """Make ``stream``'s later work wait for this work's end (CUDA; nothing on the CPU)."""
        if self._cuda:
            stream.wait_event(self._end)

    def done(self) -> bool:
        return not self._cuda or self._end.query()

    def seconds(self) -> float:
        if self._cuda:
            return self._start.elapsed_time(self._end) / 1000
        return self._t1 - self._t0
