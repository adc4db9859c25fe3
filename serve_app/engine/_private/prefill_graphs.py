"""Prefill replayed as CUDA graphs: one request's whole prompt, padded to a bucket of tokens.

Why: an eager prefill pass is bound by its ~400 kernel launches. On an H200 host it took ~22 ms
of host time for 300 tokens and for 2,500 alike, as long as the GPU work of a 1,250-token
prompt (RESULTS.md, "FP8 decode kernels with swapped roles, host-bound prefill"). A graph
replays them with one launch.

The padded pass is :meth:`ModelRunner._prefill_static` over static buffers: the prompt, then
padding up to the bucket, whose last row is a sink. Real rows never see padding (attention is
causal and padding comes last). Padding writes its K/V to page 0, which is never handed out,
or to the request's own slots past its prompt, which decode overwrites before reading. Image
rows are scattered through a full-length index whose unused entries point at the sink. So one
graph per bucket serves text and image prompts alike.

Several whole prompts in one prefill step replay one graph each, back to back. Their GPU time is
about that of one packed eager pass (a replay's time is ~proportional to its bucket), without the
packed pass's ~25 ms of launches; an H200 sweep fell behind at 14.5 QPS when 49 of 116 passes
packed several requests eagerly (RESULTS.md, "Prefill and vision-tower CUDA graphs"). Chunks that
continue or begin a longer prompt, and prompts of the largest bucket's size or more, stay eager.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from serve_app.engine._private import cuda_graphs
from serve_app.engine._private.attention import capture_pinned
from serve_app.engine._private.prefill_pass import PrefillChunk
from serve_app.engine._private.transfer import PinnedStaging


@dataclass
class StaticBuffers:
    ids: torch.Tensor        # [T] token ids
    pos: torch.Tensor        # [3, T] M-RoPE positions
    page_idx: torch.Tensor   # [T] where each row's K/V goes
    page_off: torch.Tensor   # [T]
    vidx: torch.Tensor       # [T] image rows, then the sink
    last: torch.Tensor       # [1] the row whose logits are returned
    vemb: torch.Tensor       # [T, hidden] image embeddings (rows past the image's are ignored)
    deep: list[torch.Tensor]  # per deepstack level, [T, hidden]
    pages: torch.Tensor      # unused by a first chunk's attention; PrefillChunk wants one


class PrefillGraphs:
    _INT_ROWS = 8            # ids, pos x3, page_idx, page_off, vidx, last

    def __init__(self, runner, max_tokens: int, step: int = 256):
        if max_tokens < step:
            raise ValueError(f"prefill graphs need at least {step} tokens, got {max_tokens}")
        self.r = runner
        self.buckets = list(range(step, max_tokens // step * step + 1, step))
        t, dev, dt = self.buckets[-1], runner.device, runner.dtype
        levels = len(runner.model.config.vision_config.deepstack_visual_indexes)
        self._dev = torch.zeros(self._INT_ROWS, t, dtype=torch.int64, device=dev)
        # Pinned staging buffers in turn (256 KB each): the several replays of one step do not
        # wait for an earlier upload, which queues behind whatever the GPU still has to do.
        self._up = PinnedStaging((self._INT_ROWS, t), torch.int64, dev, n=8)
        d = self._dev
        self.bufs = StaticBuffers(ids=d[0], pos=d[1:4], page_idx=d[4], page_off=d[5], vidx=d[6],
                                  last=d[7, :1],
                                  vemb=torch.zeros(t, runner.hidden, dtype=dt, device=dev),
                                  deep=[torch.zeros(t, runner.hidden, dtype=dt, device=dev)
                                        for _ in range(levels)],
                                  pages=torch.zeros(1, dtype=torch.int64, device=dev))
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.replays = 0
        self.attn_impl: str | None = None   # what the captures' attention ran on

    @property
    def max_tokens(self) -> int:
        return self.buckets[-1]

    def takes(self, c: PrefillChunk) -> bool:
        """A request's whole prompt, with a sink row to spare in the largest bucket."""
        return c.start == 0 and c.want_logits and c.pages_host is not None and len(c.ids) < self.max_tokens

    def bucket_for(self, n: int) -> int:
        return next(b for b in self.buckets if b > n)

    def _fill(self, c: PrefillChunk) -> int:
        """Write the chunk into the static buffers (one host-to-device copy of the integer rows,
        device copies of the image rows); returns the bucket."""
        n = len(c.ids)
        tb = self.bucket_for(n)
        h = self._up.take()
        h[0, :n] = c.ids
        h[0, n:tb] = 0
        h[1:4, :n] = c.positions
        h[1:4, n:tb] = 0
        p = self.r.page_size
        tok = np.arange(tb)
        pages = np.zeros(tb // p + 1, dtype=np.int64)      # past the request's pages: page 0
        k = min(len(c.pages_host), len(pages))
        pages[:k] = c.pages_host[:k]
        h[4, :tb] = torch.from_numpy(pages[tok // p])
        h[5, :tb] = torch.from_numpy(tok % p)
        nv = 0 if c.vis_local is None else len(c.vis_local)
        if nv:
            h[6, :nv] = c.vis_local
        h[6, nv:tb] = tb - 1                                # the sink
        h[7, 0] = n - 1
        self._up.upload(self._dev, h)
        if nv:
            self.bufs.vemb[:nv].copy_(c.vis_embeds)
            for dst, src in zip(self.bufs.deep, c.deepstack):
                dst[:nv].copy_(src)
        return tb

    @torch.inference_mode()
    def run(self, c: PrefillChunk) -> torch.Tensor:
        """float32 logits [1, vocab] of the prompt's last token; its K/V written. On the GPU the
        bucket's static output: the next replay of that bucket overwrites it."""
        tb = self._fill(c)
        self.replays += 1
        if tb in self._graphs:
            g, out = self._graphs[tb]
            g.replay()
            return out
        return self.r._prefill_static(tb, self.bufs)

    @torch.inference_mode()
    def capture(self) -> None:
        """One graph per bucket, largest first, sharing one memory pool, with attention pinned to
        a capturable implementation (``attention.capture_pinned``: cuDNN where start-up picked
        it, else flash; fp32 plain SDPA)."""
        r = self.r
        h = self._up.take()
        h.zero_()
        t = self.max_tokens
        h[5] = torch.arange(t) % r.page_size
        # warm-up really runs each bucket: image rows point at row 0, in range of every bucket
        self._up.upload(self._dev, h)
        self._graphs, self.attn_impl = capture_pinned(r, "prefill_attn_impl", r.dtype, lambda: cuda_graphs.capture(
            lambda tb: r._prefill_static(tb, self.bufs), self.buckets, torch.cuda.graph_pool_handle(),
            r.prompt_stream))
