"""CUDA graph capture, as the decode steps, prefill buckets, vision grids and the FP8 plan's
timings all do it: every size first runs once on a side stream (Triton compiles, cuBLAS handles
and workspaces are made outside the capture), then each is captured, largest first, into one
memory pool (graphs that never run at the same time can share it). ``stream``: warm up and capture
on that stream (an SM-limited one records its limit in the graph's kernels), not fresh ones."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch


def capture(fn: Callable[[Any], Any], sizes: Iterable, pool=None, stream=None) -> dict:
    """``{size: (graph, output of fn(size))}`` for each size, largest first."""
    sizes = sorted(sizes, reverse=True)
    warm = stream or torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):
        for s in sizes:
            fn(s)
    torch.cuda.current_stream().wait_stream(warm)
    torch.cuda.synchronize()
    graphs = {}
    for s in sizes:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=pool, stream=stream):
            out = fn(s)
        graphs[s] = (g, out)
    torch.cuda.synchronize()
    return graphs
