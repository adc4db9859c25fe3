"""The vision tower replayed as a CUDA graph per image grid that keeps coming back.

Why: an eager vision-tower call is bound by its launches. On an H200 host it took ~10 ms of host
time, as long as the GPU work of a 1280x720 image (RESULTS.md, "FP8 decode kernels with swapped
roles, host-bound prefill"). The tower is a fixed-shape function of the grid ``(t, h, w)``.
Clients send few distinct sizes (the article's workload: ten), so a graph per grid that has been
seen twice covers most images. Graphs are captured while the engine is idle, one at a time (or,
under load that leaves no idle moment, one per second between steps), at most ``max_grids`` of
them, sharing one memory pool (replays never overlap, and each replay's outputs are copied out
before the next). Other images stay on the eager, batched call.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict

import torch

from serve_app.engine._private import cuda_graphs
from serve_app.engine._private.attention import capture_pinned

logger = logging.getLogger(__name__)

SEEN_BEFORE_CAPTURE = 2
# Under steady load the engine may never be idle: then one capture (~2 eager calls of GPU time,
# stalling running streams once) is allowed per this many seconds.
BUSY_CAPTURE_INTERVAL_S = 1.0
# Largest grid given a graph: a 1920x1080 image is 68x120 = 8,160 patches. The shared pool keeps
# the activations of the largest captured grid for good (memory.plan_kv_tokens reserves them).
MAX_GRAPH_PATCHES = 8192


class VisionGraphs:
    def __init__(self, encoder, device: torch.device, max_grids: int, max_patches: int, patch_dim: int,
                 stream: "torch.cuda.Stream | None" = None):
        self.enc = encoder
        self.stream = stream          # engine.prompt_sms: captured on the SM-limited stream
        self.device = device
        self.max_grids = max_grids
        self.max_patches = max_patches
        self.patch_dim = patch_dim
        self.seen: Counter = Counter()
        self.pending: OrderedDict[tuple[int, int, int], None] = OrderedDict()
        # grid -> (graph or None on the CPU, static pixels, merged out, deep outs, grid tables)
        self.graphs: dict[tuple[int, int, int], tuple] = {}
        self._pool = torch.cuda.graph_pool_handle() if device.type == "cuda" else None
        self.failed: set[tuple[int, int, int]] = set()   # capture raised (e.g. out of memory)
        self.replays = 0
        self.attn_impl: str | None = None   # what the last capture's attention ran on
        self._last_capture = float("-inf")

    def note(self, grids: list[tuple[int, int, int]]) -> None:
        """Count the grids of an eager call; queue the ones seen often enough for capture."""
        for g in grids:
            if g in self.graphs or g in self.failed or g[0] * g[1] * g[2] > self.max_patches:
                continue
            self.seen[g] += 1
            if self.seen[g] >= SEEN_BEFORE_CAPTURE and len(self.graphs) + len(self.pending) < self.max_grids:
                self.pending[g] = None

    def has(self, grid: tuple[int, int, int]) -> bool:
        return grid in self.graphs

    @torch.inference_mode()
    def capture_pending(self, busy: bool = False) -> bool:
        """Capture one queued grid; True if it did. ``busy``: requests are running, so at most
        one capture per ``BUSY_CAPTURE_INTERVAL_S``."""
        if not self.pending:
            return False
        now = time.monotonic()
        if busy and now - self._last_capture < BUSY_CAPTURE_INTERVAL_S:
            return False
        self._last_capture = now
        grid, _ = self.pending.popitem(last=False)
        try:
            self.graphs[grid] = self._capture(grid)
        except Exception as e:  # noqa: BLE001 - an optional speed-up: the grid stays eager
            self.failed.add(grid)
            logger.warning("vision graph for grid %s not captured; it stays eager: %r", grid, e)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            return False
        return True

    def _capture(self, grid: tuple[int, int, int]) -> tuple:
        t, h, w = grid
        pix = torch.zeros(t * h * w, self.patch_dim, dtype=self.enc.dtype, device=self.device)
        tables = self.enc._grid_tables(grid)          # held here: the LRU must not free them
        if self.device.type != "cuda":
            return None, pix, None, [], tables
        graphs, self.attn_impl = capture_pinned(self.enc, "attn_impl", self.enc.dtype, lambda: cuda_graphs.capture(
            lambda g: self.enc(pix, [g]), [grid], self._pool, self.stream))
        graph, (merged, deep) = graphs[grid]
        return graph, pix, merged, deep, tables

    @torch.inference_mode()
    def run(self, grid: tuple[int, int, int], pixels: torch.Tensor):
        """The tower over one image of a captured grid: (merged, [deepstack...]), copies that the
        next replay does not overwrite."""
        graph, pix, merged, deep, _ = self.graphs[grid]
        pix.copy_(pixels)
        self.replays += 1
        if graph is None:                             # CPU: the same static-buffer call, eager
            return self.enc(pix, [grid])
        graph.replay()
        return merged.clone(), [d.clone() for d in deep]
