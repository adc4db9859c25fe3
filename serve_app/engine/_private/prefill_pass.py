"""Prompt (prefill) passes of the model runner: packed eager passes over several requests'
chunks, the plain-torch and fused-kernel layer loops, and the static pass the prefill graphs
capture. A mixin of :class:`~serve_app.engine._private.runner.ModelRunner`, kept apart so that
each module stays readable; it uses the runner's weights, KV cache and helpers (``_lin``,
``_qkv``, ``_norm``, ``_mlp``, ``_logits``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from serve_app.engine._private.attention import packed_attention, prefill_attention, write_kv
from serve_app.engine._private.transfer import upload


@dataclass
class PrefillChunk:
    """Tokens ``start..start+len(ids)`` of one request's prompt."""

    ids: torch.Tensor                 # [T] int64, CPU
    positions: torch.Tensor           # [3, T] int64, CPU (M-RoPE)
    start: int
    pages: torch.Tensor               # int64 page ids covering at least start+T tokens (device)
    vis_local: torch.Tensor | None = None   # [n] indices in this chunk that are image tokens
    vis_embeds: torch.Tensor | None = None  # [n, hidden] on device
    deepstack: list[torch.Tensor] = field(default_factory=list)  # per level, [n, hidden]
    want_logits: bool = False
    pages_host: list[int] | None = None     # the same page ids on the host (prefill graphs)


def rms_norm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """Exactly HF's Qwen3VLTextRMSNorm."""
    dt = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(dt)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


class PrefillPasses:
    """:meth:`prefill` and the prefill graphs' setup and static pass (mixed into ModelRunner)."""

    # -------------------------------------------------------------------------------- prefill
    @torch.inference_mode()
    def prefill(self, chunks: list[PrefillChunk]) -> torch.Tensor | None:
        """Run prompt chunks of several requests; write their KV.

        Returns float32 logits for the chunks with ``want_logits`` (their last token), in order.
        With prefill graphs, each whole prompt that fits replays its bucket's graph and the other
        chunks run packed as one eager sequence.
        """
        graphed = [self._pg.takes(c) for c in chunks] if self._pg is not None else []
        if not any(graphed):
            return self._prefill_eager(chunks)
        if len(chunks) == 1:
            return self._pg.run(chunks[0])
        rest = [c for c, g in zip(chunks, graphed) if not g]
        rest_logits = self._prefill_eager(rest) if rest else None
        out, j = [], 0
        for c, g in zip(chunks, graphed):
            if g:                     # cloned: a later replay of the same bucket overwrites it
                out.append(self._pg.run(c).clone())
            elif c.want_logits:
                out.append(rest_logits[j:j + 1])
                j += 1
        return torch.cat(out)

    def _prefill_eager(self, chunks: list[PrefillChunk]) -> torch.Tensor | None:
        """:meth:`prefill` as one packed eager pass."""
        self.eager_prefill["passes"] += 1
        self.eager_prefill["tokens"] += sum(len(c.ids) for c in chunks)
        dev, p = self.device, self.page_size
        ids = upload(torch.cat([c.ids for c in chunks]), dev)
        pos = upload(torch.cat([c.positions for c in chunks], dim=1), dev)
        h = self.lm.embed_tokens(ids)
        offsets, vis_idx, vis_emb, deep = [], [], [], []
        o = 0
        for c in chunks:
            offsets.append(o)
            if c.vis_local is not None and len(c.vis_local):
                vis_idx.append(upload(c.vis_local, dev) + o)
                vis_emb.append(c.vis_embeds)
                deep.append(c.deepstack)
            o += len(c.ids)
        if vis_idx:
            vidx = torch.cat(vis_idx)
            h[vidx] = torch.cat(vis_emb).to(h.dtype)
            n_deep = min(len(d) for d in deep)
            deep_cat = [torch.cat([d[i] for d in deep]) for i in range(n_deep)]
        else:
            vidx, deep_cat = None, []
        cos, sin = self.lm.rotary_emb(h, pos[:, None, :])
        # Where each new token's K/V goes.
        page_idx, page_off = [], []
        for c in chunks:
            tok = torch.arange(c.start, c.start + len(c.ids), device=dev)
            page_idx.append(c.pages[tok // p])
            page_off.append(tok % p)
        page_idx, page_off = torch.cat(page_idx), torch.cat(page_off)
        h = self._layers(h, cos, sin, page_idx, page_off, chunks, offsets, vidx, deep_cat)
        last = [off + len(c.ids) - 1 for c, off in zip(chunks, offsets) if c.want_logits]
        if not last:
            return None
        hl = rms_norm_ref(h[upload(last, dev, torch.int64)], self.final_norm, self.eps)
        return self._logits(hl)

    def _attend(self, q, k, v, i: int, chunks, offsets) -> torch.Tensor:
        """Prefill attention: first chunks packed (varlen / batched SDPA), later chunks against
        their cached prefix."""
        kv = self.kv
        outs, run = [], []          # run: consecutive first chunks, attended in one call

        def flush():
            if run:
                a, b = run[0][0], run[-1][0] + run[-1][1]
                outs.append(packed_attention(q[a:b], k[a:b], v[a:b], [n for _, n in run], True,
                                             self.scale, self.prefill_attn_impl))
                run.clear()

        for c, off in zip(chunks, offsets):
            n = len(c.ids)
            if c.start == 0:
                run.append((off, n))
                continue
            flush()
            outs.append(prefill_attention(q[off:off + n], k[off:off + n], v[off:off + n],
                                          kv.k[i], kv.v[i], c.pages, c.start, self.scale))
        flush()
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _layers(self, h, cos, sin, *args):
        """The decoder layers over packed rows ``h``, with ``rotary_emb``'s ``cos``/``sin``
        ``[1, T, d]``: fused kernels on the GPU, plain torch elsewhere."""
        if self.is_cuda and self.fuse and self.fused_prefill:
            return self._prefill_layers_fused(h, cos[0].contiguous(), sin[0].contiguous(), *args)
        return self._prefill_layers(h, cos[0][:, None, :], sin[0][:, None, :], *args)

    def _prefill_layers(self, h, cos, sin, page_idx, page_off, chunks, offsets, vidx, deep_cat):
        """Plain torch layers (CPU: HF's numerics exactly)."""
        kv = self.kv
        for i, w in enumerate(self.w):
            res = h
            x = self._norm(h, w["ln1"])
            q, k, v = self._qkv(w, x)
            q, k = rope_ref(q, cos, sin), rope_ref(k, cos, sin)
            write_kv(kv.k[i], kv.v[i], k, v, page_idx, page_off)
            attn = self._attend(q, k, v, i, chunks, offsets)
            h = res + self._lin(attn.reshape(h.shape[0], -1), w["o"])
            h = h + self._mlp(w, self._norm(h, w["ln2"]))
            if vidx is not None and i < len(deep_cat):
                h[vidx] = h[vidx] + deep_cat[i].to(h.dtype)
        return h

    def _prefill_layers_fused(self, h, cos, sin, page_idx, page_off, chunks, offsets, vidx, deep_cat):
        """GPU layers: residual fused into the norms, q/k-norm + M-RoPE + KV store in one kernel."""
        from serve_app.engine._private import kernels as K

        kv = self.kv
        t = h.shape[0]
        hq, hk, d, eps = self.num_heads, self.num_kv_heads, self.head_dim, self.eps
        rows = torch.arange(t, device=h.device)
        k_buf = torch.empty(t, hk, d, dtype=h.dtype, device=h.device)
        res, q8 = None, self.fp8
        for i, w in enumerate(self.w):
            if res is None:
                x, res = K.rms_norm(h, w["ln1"], eps, quant=q8), h
            else:
                x, res = K.rms_norm(h, w["ln1"], eps, residual=res, quant=q8)
            qkv = self._lin(x, w["qkv"])
            q = K.qk_norm_rope_store(qkv, w["qn"], w["kn"], cos, sin, rows, page_idx, page_off,
                                     kv.k[i], kv.v[i], hq, hk, d, eps, k_out=k_buf)
            v = qkv.view(t, hq + 2 * hk, d)[:, hq + hk:]
            attn = self._attend(q, k_buf, v, i, chunks, offsets)
            h = self._lin(attn.reshape(t, -1), w["o"])
            x, res = K.rms_norm(h, w["ln2"], eps, residual=res, quant=q8)
            h = self._lin(K.silu_mul(self._lin(x, w["gu"]), quant=q8), w["down"])
            if vidx is not None and i < len(deep_cat):
                h = res + h                       # HF adds deepstack to the layer's output
                h[vidx] = h[vidx] + deep_cat[i].to(h.dtype)
                res = None
        return h if res is None else res + h

    # ------------------------------------------------------------------------ prefill graphs
    def setup_prefill_graphs(self, max_tokens: int, step: int = 256) -> None:
        """Fixed-shape prefill for one request's first chunk, padded to a bucket of ``step``
        tokens up to ``max_tokens`` (CUDA graphs on the GPU; on the CPU the same padded function
        runs eagerly, which is what the tests compare against :meth:`prefill`)."""
        from serve_app.engine._private.prefill_graphs import PrefillGraphs
        pg = PrefillGraphs(self, max_tokens, step)
        if self.is_cuda:
            pg.capture()                   # if this raises, prefill stays eager
        self._pg = pg

    @property
    def prefill_graph_tokens(self) -> int:
        """Prompts shorter than this replay a prefill graph whole (0: no prefill graphs)."""
        return self._pg.max_tokens if self._pg is not None else 0

    def _prefill_static(self, tb: int, bufs) -> torch.Tensor:
        """Prefill of the first ``tb`` rows of the static buffers ``bufs`` as one causal
        sequence: the real prompt, then padding whose last row is a sink for padded scatters.
        Real rows never attend to padding (causal), padding writes its KV to page 0 (never handed
        out) or to the request's own not-yet-used slots, and the logits are of row ``bufs.last``."""
        h = self.lm.embed_tokens(bufs.ids[:tb])
        vidx = bufs.vidx[:tb]
        h.index_copy_(0, vidx, bufs.vemb[:tb].to(h.dtype))
        deep = [d[:tb] for d in bufs.deep]
        pos = bufs.pos[:, :tb]
        cos, sin = self.lm.rotary_emb(h, pos[:, None, :])
        chunk = PrefillChunk(ids=bufs.ids[:tb], positions=pos, start=0, pages=bufs.pages)
        args = (bufs.page_idx[:tb], bufs.page_off[:tb], [chunk], [0], vidx, deep)
        h = self._layers(h, cos, sin, *args)
        hl = rms_norm_ref(h.index_select(0, bufs.last), self.final_norm, self.eps)
        return self._logits(hl)
