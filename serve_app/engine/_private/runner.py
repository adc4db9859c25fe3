"""Model runner: Qwen3-VL's own weights driven by our prefill/decode over a paged KV cache.

The HF modules provide the weights, the vision tower (with deepstack), the M-RoPE tables and
``get_rope_index``; the forward passes here replace HF's so that (a) many requests at different
lengths share one step, (b) attention reads live lengths only, without repeating K/V for GQA, and
(c) the decode step is a fixed-shape function that can be captured as a CUDA graph per batch bucket.
On CPU everything runs eagerly through the same code with torch attention (fp32 there matches HF
``generate`` token for token). The prompt passes are in :mod:`.prefill_pass` (a mixin).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from serve_app.engine._private.attention import (balanced_splits_for, decode_attention_torch,
                                                 decode_attention_triton, num_splits_for, pick_packed_impl,
                                                 write_kv)
from serve_app.engine._private import cuda_graphs, fp8
from serve_app.engine._private.kv_cache import PagedKVCache
from serve_app.engine._private.pixels import PixelUpload
from serve_app.engine._private.prefill_pass import PrefillChunk, PrefillPasses, rms_norm_ref, rope_ref
from serve_app.engine._private.vision import VisionEncoder
from serve_app.engine._private.transfer import PinnedStaging, upload

__all__ = ["ModelRunner", "PrefillChunk"]   # PrefillChunk: the input of ModelRunner.prefill


class ModelRunner(PrefillPasses):
    def __init__(self, model, device: torch.device, max_num_seqs: int, max_model_len: int,
                 page_size: int = 16, fuse: bool | None = None, quantization: str | None = None,
                 kv_cache_dtype: str = "auto", vision_quantization: str | None = None,
                 pdl: bool = False, decode_balance: int = 0, lm_head_quantization: str | None = None):
        self.model = model
        self.device = device
        cfg = model.config
        tc = cfg.text_config
        self.lm = model.model.language_model
        self.visual = model.model.visual
        self.lm_head = model.lm_head
        self.dtype = self.lm_head.weight.dtype
        if kv_cache_dtype not in ("auto", "fp8"):
            raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r} (supported: 'auto', 'fp8')")
        if kv_cache_dtype == "fp8" and (why := fp8.supported(device)):
            # the Triton store and decode attention convert to and from e4m3 (sm_89+)
            raise ValueError(f"kv_cache_dtype='fp8': {why}")
        if decode_balance and device.type != "cuda":
            raise ValueError("decode_balance needs a CUDA GPU (it shapes the Triton decode attention)")
        self.decode_balance = int(decode_balance)
        if pdl and (device.type != "cuda" or torch.cuda.get_device_capability(device) < (9, 0)):
            raise ValueError("pdl needs a GPU of compute capability 9.0+ (Hopper, Blackwell)")
        if device.type == "cuda":
            # griddepcontrol is a Hopper instruction. The flag is the kernels module's, so one per
            # process (a replica has one runner): the latest runner's setting holds.
            from serve_app.engine._private import kernels
            kernels.PDL = pdl
        # 'fp8': e4m3 K/V without scales (see config.kv_cache_dtype); 'auto': the model's dtype
        self.kv_dtype = fp8.FP8 if kv_cache_dtype == "fp8" else self.dtype
        self.num_layers = tc.num_hidden_layers
        self.num_heads = tc.num_attention_heads
        self.num_kv_heads = tc.num_key_value_heads
        self.head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        self.hidden = tc.hidden_size
        self.vocab = tc.vocab_size
        self.eps = tc.rms_norm_eps
        self.scale = self.head_dim ** -0.5
        self.merge = cfg.vision_config.spatial_merge_size
        self.image_token_id = cfg.image_token_id
        self.max_num_seqs = max_num_seqs
        self.max_model_len = max_model_len
        self.page_size = page_size
        self.max_pages = -(-max_model_len // page_size)
        self.is_cuda = device.type == "cuda"
        # Fused projections are one GEMM instead of three/two on the GPU; on CPU we keep HF's
        # separate ones so fp32 results stay identical to HF.
        self.fuse = self.is_cuda if fuse is None else fuse
        self.fused_prefill = True      # GPU: fused prefill layers (False: the plain torch layers)
        for name, value in (("quantization", quantization), ("vision_quantization", vision_quantization),
                            ("lm_head_quantization", lm_head_quantization)):
            if value not in (None, "fp8"):
                raise ValueError(f"unknown {name} {value!r} (supported: 'fp8')")
            if value == "fp8" and (why := fp8.supported(device)):
                raise ValueError(f"{name}='fp8': {why}")
        self.fp8 = quantization == "fp8"   # the decoder layers' linears as FP8 GEMMs
        # FP8 decode: per (projection, row tile) a Triton kernel's config (fp8_gemv: "a16" or
        # "swap8"), or None for cuBLASLt W8A8; timed at start-up, before KV is sized. Empty: W8A8
        # everywhere (prefill, CPU).
        self.fp8_plan: dict[tuple[str, int], tuple | None] = {}
        self.fp8_timings: dict = {}
        self._prepare_weights()
        # The LM head in FP8 (lm_head_quantization): a decode step reads the whole head. Per row
        # tile a kernel, "bf16" (the model's head) or None (cuBLASLt W8A8), timed at start-up;
        # empty: W8A8 (CPU, no graphs). A tied head stays: the embedding lookup reads it.
        self.head8: fp8.Fp8Weight | None = None
        self.head_plan: dict[int, tuple | str | None] = {}
        if lm_head_quantization == "fp8":
            self.head8 = fp8.quantize_weight(self.lm_head.weight, "lm_head")
            if self.lm_head.weight.data_ptr() != self.lm.embed_tokens.weight.data_ptr():
                self.lm_head.weight.data = torch.empty(0, dtype=self.dtype, device=device)
        # 1-D RoPE table for decode: all three M-RoPE components equal (t + rope_delta) there.
        pos = torch.arange(max_model_len, device=device)
        probe = torch.empty(1, dtype=self.dtype, device=device)
        cos, sin = self.lm.rotary_emb(probe, pos.view(1, 1, -1).expand(3, 1, -1))
        self.cos_table, self.sin_table = cos[0].contiguous(), sin[0].contiguous()
        self.kv: PagedKVCache | None = None
        # Slot-indexed block tables on the device; the extra last row (all page 0) serves padding.
        self.block_tables = torch.zeros(max_num_seqs + 1, self.max_pages, dtype=torch.int32, device=device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # Decode inputs: rows ids, rope pos, page, offset, live length, slot, tokens generated so
        # far (the sampler's step). The scheduler launches step N+1 before step N's copy is known
        # to be done: two pinned host buffers in turn.
        self._staging = torch.zeros(7, max_num_seqs, dtype=torch.int64, device=device)
        self._staging_up = PinnedStaging((7, max_num_seqs), torch.int64, device)
        # The token each slot feeds next, written by the sampler on the device: a decode step can
        # be launched before the host has seen the previous step's tokens.
        self.last_tok = torch.zeros(max_num_seqs + 1, dtype=torch.int64, device=device)
        self.num_sms = (torch.cuda.get_device_properties(device).multi_processor_count
                        if self.is_cuda else 1)
        # Packed (varlen) attention for prefill and the vision tower: the fastest implementation
        # that works on this GPU, timed once on representative shapes.
        vc = model.config.vision_config
        self.patch_dim = 3 * vc.temporal_patch_size * vc.patch_size ** 2   # a float pixel row
        self.vision_attn_impl, vt = pick_packed_impl(
            device, vc.num_heads, vc.num_heads, vc.hidden_size // vc.num_heads, [4096] * 3, False, self.dtype)
        self.prefill_attn_impl, pt = pick_packed_impl(
            device, self.num_heads, self.num_kv_heads, self.head_dim, [1024, 1024], True, self.dtype)
        self.attn_timings = {"vision": vt, "prefill": pt}
        self.vision = VisionEncoder(self.visual, device, self.vision_attn_impl,
                                    fp8=vision_quantization == "fp8")
        self._pg = None           # PrefillGraphs, when set up (setup_prefill_graphs)
        self.eager_prefill = {"passes": 0, "tokens": 0}   # packed eager passes (launch-bound)
        self._vg = None           # VisionGraphs, when set up (setup_vision_graphs)
        # engine.prompt_sms: the SM-limited stream the prompt work (tower, prefill) runs and its
        # graphs are captured on (green_context); None: an ordinary side stream, if any
        self.prompt_stream: torch.cuda.Stream | None = None
        self.prompt_sms: int | None = None
        self.pixels = PixelUpload(device, self.visual.dtype, vc.temporal_patch_size)

    # ----------------------------------------------------------------------------------- setup
    def _prepare_weights(self) -> None:
        """Fuse q/k/v and gate/up where the model sits (load on CPU for CUDA: no holes are left
        in the GPU allocator's segments), free the originals, then move the model to the device."""
        fused = []
        for layer in self.lm.layers:
            a, m = layer.self_attn, layer.mlp
            if self.fuse:
                qkv = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], dim=0)
                gu = torch.cat([m.gate_proj.weight, m.up_proj.weight], dim=0)
                for mod in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
                    mod.weight.data = torch.empty(0, dtype=mod.weight.dtype, device=mod.weight.device)
                fused.append((qkv, gu))
        self.model.to(self.device)
        self.w = []
        for i, layer in enumerate(self.lm.layers):
            a, m = layer.self_attn, layer.mlp
            d = dict(ln1=layer.input_layernorm.weight, ln2=layer.post_attention_layernorm.weight,
                     qn=a.q_norm.weight, kn=a.k_norm.weight, o=a.o_proj.weight, down=m.down_proj.weight)
            if self.fuse:
                d["qkv"] = fused[i][0].to(self.device).contiguous()
                d["gu"] = fused[i][1].to(self.device).contiguous()
                fused[i] = None
            else:
                d.update(q=a.q_proj.weight, k=a.k_proj.weight, v=a.v_proj.weight,
                         gate=m.gate_proj.weight, up=m.up_proj.weight)
            if self.fp8:      # one weight at a time: the bf16 copy is freed before the next
                for key in ("qkv", "gu", "q", "k", "v", "gate", "up", "o", "down"):
                    if key in d:
                        d[key] = fp8.quantize_weight(d[key], key)
                for mod in (a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj):
                    mod.weight.data = torch.empty(0, dtype=mod.weight.dtype, device=mod.weight.device)
            self.w.append(d)
        self.final_norm = self.lm.norm.weight

    def allocate_kv(self, num_tokens: int) -> None:
        pages = -(-num_tokens // self.page_size) + 1
        self.kv = PagedKVCache(self.num_layers, pages, self.page_size, self.num_kv_heads,
                               self.head_dim, self.kv_dtype, self.device)

    def kv_bytes_per_token(self) -> int:
        return PagedKVCache.bytes_per_token(self.num_layers, self.num_kv_heads, self.head_dim, self.kv_dtype)

    def set_block_table(self, slot: int, pages: list[int]) -> None:
        row = torch.zeros(self.max_pages, dtype=torch.int32)
        row[:len(pages)] = torch.tensor(pages, dtype=torch.int32)
        self.block_tables[slot].copy_(upload(row, self.device))

    # ------------------------------------------------------------------------------ layer math
    def _lin(self, x, w) -> torch.Tensor:
        """``x @ w.T``: a bf16/fp32 weight, or an FP8 one (``x`` may then be pre-quantised)."""
        if isinstance(w, fp8.Fp8Weight):
            return fp8.linear(x, w, self.dtype)
        return F.linear(x, w)

    def _dec_lin(self, x, w, plan: dict | None, partial: bool = False) -> torch.Tensor:
        """A decode-step linear: the planned Triton kernel (``x`` in bf16 for "a16", e4m3 rows for
        "swap8"; with ``partial`` maybe fp32 split-K partials for the next RMSNorm), else
        :meth:`_lin` (cuBLASLt W8A8)."""
        cfg = plan.get(w.name) if plan else None
        if cfg is None:
            return self._lin(x, w)
        from serve_app.engine._private import fp8_gemv
        if fp8_gemv.takes_fp8(cfg) and not isinstance(x, tuple):
            x = fp8.quantize_rows(x)             # the o projection's input (attention's output)
        return fp8_gemv.linear(x, w.q, w.scale, cfg, partial, self.dtype)

    def _decode_plan(self, batch: int) -> dict | None:
        if not self.fp8_plan:
            return None
        from serve_app.engine._private.fp8_gemv import row_tile
        bm = row_tile(batch)
        return {name: self.fp8_plan.get((name, bm)) for name in ("qkv", "o", "gu", "down")}

    def tune_fp8_decode(self) -> None:
        """Time the FP8 kernels of the decode projections and of the LM head on this GPU
        (``fp8_gemv.plan_decode``, ``fp8_gemv.plan_head``)."""
        from serve_app.engine._private import fp8_gemv
        tiles = sorted({fp8_gemv.row_tile(b) for b in self.buckets if b <= fp8_gemv.MAX_ROWS})
        if self.fp8:
            self.fp8_plan, self.fp8_timings = fp8_gemv.plan_decode(self.w, tiles, self.dtype)
        if self.head8 is not None:
            kept = self.lm_head.weight if self.lm_head.weight.numel() else None
            self.head_plan, timings = fp8_gemv.plan_head(self.head8, kept, tiles, self.dtype)
            self.fp8_timings.update(timings)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """float32 logits of final-normed rows: the model's head, or its FP8 copy through the
        kernel planned for this many rows (:meth:`_dec_lin`; W8A8 where none is: the CPU, more
        than 64 rows)."""
        cfg = self._head_cfg(x.shape[0]) if self.head8 is not None else "bf16"
        if cfg == "bf16":
            return self.lm_head(x).float()
        return self._dec_lin(x, self.head8, {self.head8.name: cfg}).float()

    def _head_cfg(self, rows: int) -> tuple | str | None:
        if not self.head_plan:
            return None
        from serve_app.engine._private.fp8_gemv import MAX_ROWS, row_tile
        return self.head_plan.get(row_tile(rows)) if rows <= MAX_ROWS else None

    def _qkv(self, w: dict, x: torch.Tensor):
        t = x.shape[0]
        hq, hk, d = self.num_heads, self.num_kv_heads, self.head_dim
        if self.fuse:
            qkv = self._lin(x, w["qkv"])
            q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
        else:
            q, k, v = self._lin(x, w["q"]), self._lin(x, w["k"]), self._lin(x, w["v"])
        q = rms_norm_ref(q.reshape(t, hq, d), w["qn"], self.eps)
        k = rms_norm_ref(k.reshape(t, hk, d), w["kn"], self.eps)
        return q, k, v.reshape(t, hk, d)

    def _norm(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.is_cuda:
            from serve_app.engine._private.kernels import rms_norm
            return rms_norm(x, w, self.eps)
        return rms_norm_ref(x, w, self.eps)

    def _mlp(self, w: dict, x: torch.Tensor) -> torch.Tensor:
        if self.is_cuda and self.fuse:
            from serve_app.engine._private.kernels import silu_mul
            return self._lin(silu_mul(self._lin(x, w["gu"]), quant=self.fp8), w["down"])
        if self.fuse:
            g, u = self._lin(x, w["gu"]).chunk(2, dim=-1)
        else:
            g, u = self._lin(x, w["gate"]), self._lin(x, w["up"])
        return self._lin(F.silu(g) * u, w["down"])

    # --------------------------------------------------------------------------------- vision
    @torch.inference_mode()
    def encode_images(self, pixel_values: list, grids: list[tuple[int, int, int]]):
        """Run the vision tower once over several images (numpy arrays or tensors of patch rows);
        per image ``(embeds, [deepstack...])``, in the given order."""
        grids = [tuple(int(x) for x in g) for g in grids]
        out: list = [None] * len(grids)
        vg = self._vg
        replay = [i for i, g in enumerate(grids) if vg is not None and vg.has(g)]  # a graph each
        # The rest batched, equal grids side by side: one attention call per distinct size.
        order = sorted((i for i in range(len(grids)) if i not in replay), key=lambda i: grids[i][1] * grids[i][2])
        # One upload for all (each upload through the pinned buffer waits for the one before).
        rows = [pixel_values[i].shape[0] for i in replay]
        pv = self.pixels.to_device([pixel_values[i] for i in replay + order])
        for i, part in zip(replay, pv.split(rows + [pv.shape[0] - sum(rows)])):
            merged, deep = vg.run(grids[i], part)
            out[i] = (merged.to(self.dtype), [d.to(self.dtype) for d in deep])
        if not order:
            return out
        pv = pv[sum(rows):]
        sorted_grids = [grids[i] for i in order]
        merged, deep = self.vision(pv, sorted_grids)
        if vg is not None:
            vg.note(sorted_grids)
        sizes = [t * h * w // (self.merge ** 2) for t, h, w in sorted_grids]
        embeds = merged.to(self.dtype).split(sizes)
        deep = [d.to(self.dtype).split(sizes) for d in deep]
        for j, i in enumerate(order):
            out[i] = (embeds[j], [lvl[j] for lvl in deep])
        return out

    def setup_vision_graphs(self, max_grids: int, max_patches: int) -> None:
        """Vision-tower graphs per recurring grid (``vision_graphs.VisionGraphs``), captured in
        idle time (:meth:`capture_pending_vision_graph`)."""
        from serve_app.engine._private.vision_graphs import VisionGraphs
        self._vg = VisionGraphs(self.vision, self.device, max_grids, max_patches, self.patch_dim,
                                self.prompt_stream)

    def capture_pending_vision_graph(self, busy: bool = False) -> bool:
        return self._vg is not None and self._vg.capture_pending(busy)

    @torch.inference_mode()
    def encode_images_hf(self, pixel_values: list, grids: list[tuple[int, int, int]]):
        """HF's own vision module (reference for tests and the benchmark)."""
        pv = self.pixels.to_device(pixel_values).to(self.visual.dtype)
        grid = torch.tensor(grids, dtype=torch.long, device=self.device)
        out = self.visual(pv, grid_thw=grid, return_dict=True)
        sizes = [t * h * w // (self.merge ** 2) for t, h, w in grids]
        embeds = out.pooler_output.to(self.dtype).split(sizes)
        deep = [d.to(self.dtype).split(sizes) for d in out.deepstack_features]
        return [(embeds[i], [lvl[i] for lvl in deep]) for i in range(len(grids))]

    # ----------------------------------------------------------------- prompt stream, graph stats
    def use_prompt_stream(self, num_sms: int, priority: int) -> None:
        """Run prompt work on a stream held to ``num_sms`` SMs (``engine.prompt_sms``); call before
        the prefill and vision graphs are set up, so they are captured on it."""
        from serve_app.engine._private.green_context import sm_limited_stream
        self.prompt_stream, self.prompt_sms = sm_limited_stream(self.device, num_sms, priority)

    def graph_stats(self) -> dict:
        """Prefill buckets, vision graphs, and how often each kind replayed."""
        pg, vg = self._pg, self._vg
        return {"prefill_graph_buckets": len(pg.buckets) if pg else 0,
                "prefill_graph_replays": pg.replays if pg else 0,
                "prefill_eager_passes": self.eager_prefill["passes"],
                "prefill_eager_tokens": self.eager_prefill["tokens"],
                "vision_graphs": len(vg.graphs) if vg else 0,
                "vision_graph_replays": vg.replays if vg else 0,
                "prefill_graph_attention": pg.attn_impl if pg else None,
                "vision_graph_attention": vg.attn_impl if vg else None}

    # --------------------------------------------------------------------------------- decode
    def _decode_forward(self, staging: torch.Tensor, batch: int, reference: bool = False) -> torch.Tensor:
        """One token for ``batch`` rows; inputs in ``staging`` rows: ids, rope pos, page, offset,
        live length (incl. the new token), slot. Fixed shapes: capturable as a CUDA graph."""
        ids, pos, page, off, lens, slot = (staging[j, :batch] for j in range(6))
        if self.is_cuda and not reference:
            return self._decode_forward_fused(ids, pos, page, off, lens, slot, batch)
        kv = self.kv
        h = self.lm.embed_tokens(ids)
        cos, sin = self.cos_table[pos][:, None, :], self.sin_table[pos][:, None, :]
        lens_l = lens.tolist()
        bt_rows = [self.block_tables[s, :-(-n // self.page_size)].long()
                   for s, n in zip(slot.tolist(), lens_l)]
        for i, w in enumerate(self.w):
            res = h
            x = rms_norm_ref(h, w["ln1"], self.eps)
            q, k, v = self._qkv(w, x)
            q, k = rope_ref(q, cos, sin), rope_ref(k, cos, sin)
            write_kv(kv.k[i], kv.v[i], k, v, page, off)
            attn = decode_attention_torch(q, kv.k[i], kv.v[i], bt_rows, lens_l, self.scale)
            h = res + self._lin(attn.reshape(batch, -1), w["o"])
            h = h + self._mlp(w, rms_norm_ref(h, w["ln2"], self.eps))
        return self._logits(rms_norm_ref(h, self.final_norm, self.eps))

    def _decode_forward_fused(self, ids, pos, page, off, lens, slot, batch: int) -> torch.Tensor:
        """GPU decode: about ten kernels per layer (fused norms, q/k-norm+RoPE+KV store, SiLU).
        FP8: each projection as planned (``fp8_gemv``: "a16" takes bf16 input; "swap8" and
        cuBLASLt's W8A8 take e4m3 rows, which the norm or SiLU kernel before them writes; o/down
        may hand split-K partials to the next norm)."""
        from serve_app.engine._private import kernels as K

        kv = self.kv
        bt = self.block_tables.index_select(0, slot)
        lens32 = lens.to(torch.int32)
        if self.decode_balance:
            splits = balanced_splits_for(batch, self.num_kv_heads, self.num_sms)
            balanced = self.decode_balance * self.num_sms
        else:
            splits, balanced = num_splits_for(batch, self.num_kv_heads, self.num_sms, kv.k[0].dtype), 0
        hq, hk, d, eps = self.num_heads, self.num_kv_heads, self.head_dim, self.eps
        plan = self._decode_plan(batch)
        from serve_app.engine._private.fp8_gemv import takes_fp8
        qz = {n: self.fp8 and (plan is None or takes_fp8(plan[n])) for n in ("qkv", "gu", "down")}
        h = self.lm.embed_tokens(ids)
        res = None
        for i, w in enumerate(self.w):
            if res is None:
                x, res = K.rms_norm(h, w["ln1"], eps, quant=qz["qkv"]), h
            else:
                x, res = K.rms_norm(h, w["ln1"], eps, residual=res, quant=qz["qkv"])
            qkv = self._dec_lin(x, w["qkv"], plan)
            q = K.qk_norm_rope_store(qkv, w["qn"], w["kn"], self.cos_table, self.sin_table, pos, page,
                                     off, kv.k[i], kv.v[i], hq, hk, d, eps)
            attn = decode_attention_triton(q, kv.k[i], kv.v[i], bt, lens32, self.scale, splits,
                                           self.page_size, balanced=balanced)
            h = self._dec_lin(attn.reshape(batch, -1), w["o"], plan, partial=True)
            x, res = K.rms_norm(h, w["ln2"], eps, residual=res, quant=qz["gu"])
            gu = self._dec_lin(x, w["gu"], plan)
            h = self._dec_lin(K.silu_mul(gu, quant=qz["down"]), w["down"], plan, partial=True)
        x, _ = K.rms_norm(h, self.final_norm, eps, residual=res)
        return self._logits(x)

    def bucket_for(self, batch: int) -> int:
        for b in self.buckets:
            if b >= batch:
                return b
        return batch

    @property
    def buckets(self) -> list[int]:
        out, b = [], 1
        for b in (1, 2, 4, 8, 12, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256):
            if b < self.max_num_seqs:
                out.append(b)
        out.append(self.max_num_seqs)
        return out

    @torch.inference_mode()
    def capture_graphs(self) -> None:
        """Capture the decode step for each batch bucket (largest first, one shared memory pool)."""
        self._staging.zero_()
        self._staging[5].fill_(self.max_num_seqs)        # padding slot: all-zero block table
        self._graphs = cuda_graphs.capture(lambda b: self._decode_forward(self._staging, b), self.buckets,
                                           torch.cuda.graph_pool_handle())

    @torch.inference_mode()
    def decode(self, ids: list[int] | None, positions: list[int], pages: list[int], offsets: list[int],
               lengths: list[int], slots: list[int], steps: list[int] | None = None,
               reference: bool = False) -> torch.Tensor:
        """float32 logits [B, V] for one new token per row (its K/V is written first).

        ``ids=None`` feeds each slot's ``last_tok`` (gathered on the device: no host round trip).
        ``steps`` (optional) lands in :meth:`step_inputs` for the sampler.
        ``reference=True`` runs the plain torch path instead (GPU self-check in the benchmark)."""
        b = len(slots)
        host = self._staging_up.take()
        bb = self.bucket_for(b) if self._graphs else b
        host[:, :bb].zero_()
        host[5, :bb].fill_(self.max_num_seqs)
        for j, vals in enumerate((ids, positions, pages, offsets, lengths, slots, steps)):
            if vals is not None:
                host[j, :b] = torch.as_tensor(vals, dtype=torch.int64)
        self._staging_up.upload(self._staging[:, :bb], host[:, :bb])
        if ids is None:
            torch.index_select(self.last_tok, 0, self._staging[5, :bb], out=self._staging[0, :bb])
        if reference:
            return self._decode_forward(self._staging, b, reference=True)
        if bb in self._graphs:
            g, out = self._graphs[bb]
            g.replay()
            return out[:b]
        return self._decode_forward(self._staging, b)

    def step_inputs(self, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(slots, steps) of the last :meth:`decode` launch, on the device (valid until the next)."""
        return self._staging[5, :b], self._staging[6, :b]
