"""Qwen3-VL vision tower over a whole batch of images: HF's weights and math, far fewer kernels.

HF's module runs attention image by image (a host sync per layer to split ``cu_seqlens``),
applies the rotary embedding with ~10 fp32 kernels, and recomputes position-embedding
interpolation and rotary tables on every call. Here:

* the per-grid tables (interpolated position embeddings, rotary cos/sin) are computed once per
  ``(t, h, w)`` with HF's own helpers and cached;
* the patch embedding (a Conv3d whose stride equals its kernel) is one GEMM;
* attention is one varlen flash call, or one SDPA call per run of equal-length images, over the
  packed batch (images are sorted by size so that equal grids are adjacent), with no host sync;
* on the GPU the rotary embedding is one Triton kernel per layer, in place on the fused qkv rows.

Mergers (final and deepstack) are HF's modules, unchanged.

With ``fp8``, each block's four linears (qkv, proj, fc1, fc2: most of the tower's GEMM FLOPs) run
as FP8 GEMMs with per-channel weight and per-token activation scales, as the decoder's do
(``fp8.linear``); their bf16 weights are freed. fc1 then loses the GELU epilogue (GELU is its
own kernel).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F

from serve_app.engine._private import fp8 as fp8_mod
from serve_app.engine._private.attention import packed_attention

_GRID_CACHE_SIZE = 64


class VisionEncoder:
    def __init__(self, visual: torch.nn.Module, device: torch.device, attn_impl: str = "sdpa",
                 fp8: bool = False):
        self.v = visual
        cfg = visual.config
        self.device = device
        self.heads = cfg.num_heads
        self.dim = cfg.hidden_size
        self.head_dim = self.dim // self.heads
        self.merge = cfg.spatial_merge_size
        self.deep_index = {layer: j for j, layer in enumerate(cfg.deepstack_visual_indexes)}
        self.attn_impl = attn_impl
        pow2 = lambda x: x & (x - 1) == 0  # noqa: E731
        self.use_triton = device.type == "cuda" and pow2(2 * self.heads) and pow2(self.head_dim)
        # HF's act is GELU with the tanh approximation, which is cuBLASLt's GELU epilogue.
        self.gelu_epilogue = (device.type == "cuda" and getattr(cfg, "hidden_act", "") == "gelu_pytorch_tanh"
                              and hasattr(torch, "_addmm_activation"))
        self._grids: OrderedDict[tuple[int, int, int], tuple[torch.Tensor, ...]] = OrderedDict()
        self.fp8 = fp8
        self._fp8_w: list[dict[str, fp8_mod.Fp8Weight]] = [self._quantize(blk) for blk in visual.blocks] if fp8 else []

    @staticmethod
    def _linears(blk) -> dict[str, torch.nn.Linear]:
        return {"qkv": blk.attn.qkv, "proj": blk.attn.proj, "fc1": blk.mlp.linear_fc1, "fc2": blk.mlp.linear_fc2}

    def _quantize(self, blk) -> dict[str, "fp8_mod.Fp8Weight"]:
        """One block's linears as FP8 weights, each bf16 original freed before the next."""
        out = {}
        for name, lin in self._linears(blk).items():
            out[name] = fp8_mod.quantize_weight(lin.weight, f"v_{name}")
            lin.weight.data = torch.empty(0, dtype=lin.weight.dtype, device=lin.weight.device)
        return out

    def _lin(self, x: torch.Tensor, i: int, name: str, lin: torch.nn.Linear) -> torch.Tensor:
        """Block ``i``'s linear ``name``: FP8 when quantised, else the module's weights."""
        if not self.fp8:
            return F.linear(x, lin.weight, lin.bias)
        return fp8_mod.linear(x, self._fp8_w[i][name], x.dtype, lin.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.v.patch_embed.proj.weight.dtype

    def _grid_tables(self, grid: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(position embeddings [n, C] in the tower's dtype, cos [n, D], sin [n, D] fp32), as HF."""
        hit = self._grids.get(grid)
        if hit is not None:
            self._grids.move_to_end(grid)
            return hit
        from transformers.vision_utils import (get_vision_interpolation_indices_and_weights,
                                               get_vision_position_ids)
        v = self.v
        g = torch.tensor([grid], dtype=torch.long, device=self.device)
        idx, wts = get_vision_interpolation_indices_and_weights(
            g, num_grid_per_side=v.num_grid_per_side, mode=v.interpolation_mode,
            align_corners=v.interpolation_align_corners, spatial_merge_size=self.merge)
        pos = (v.pos_embed(idx) * wts[:, :, None]).sum(1).to(self.dtype)
        probe = torch.empty(1, dtype=self.dtype, device=self.device)
        cos, sin = v.rotary_pos_emb(probe, get_vision_position_ids(g, self.merge))
        hit = (pos.contiguous(), cos.float().contiguous(), sin.float().contiguous())
        self._grids[grid] = hit
        if len(self._grids) > _GRID_CACHE_SIZE:
            self._grids.popitem(last=False)
        return hit

    def _rope_(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Rotate q and k of fused ``qkv`` [N, 3C]; returns q, k, v views [N, H, D]."""
        n = qkv.shape[0]
        h, d = self.heads, self.head_dim
        if self.use_triton:
            from serve_app.engine._private.kernels import vision_rope_
            vision_rope_(qkv, cos, sin, h, d)
            q, k, v = qkv.view(n, 3, h, d).unbind(1)
            return q, k, v
        from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision
        q, k, v = qkv.view(n, 3, h, d).unbind(1)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        return q, k, v

    @torch.inference_mode()
    def __call__(self, pixels: torch.Tensor, grids: list[tuple[int, int, int]]):
        """``pixels`` [sum(t*h*w), patch_dim] on the device (images in ``grids`` order) ->
        (merged embeddings [sum/merge^2, out], [deepstack level embeddings ...])."""
        v = self.v
        tables = [self._grid_tables(g) for g in grids]
        pos, cos, sin = (torch.cat(t) if len(tables) > 1 else tables[0][i]
                         for i, t in enumerate(zip(*tables)))
        # Every frame of every image is its own attention segment (HF's cu_seqlens).
        lens = [h * w for t, h, w in grids for _ in range(t)]
        pw = v.patch_embed.proj
        x = F.linear(pixels.to(self.dtype), pw.weight.reshape(self.dim, -1), pw.bias)
        x = x + pos
        n = x.shape[0]
        deep = []
        for i, blk in enumerate(v.blocks):
            a = blk.attn
            hs = F.layer_norm(x, (self.dim,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
            qkv = self._lin(hs, i, "qkv", a.qkv)
            q, k, val = self._rope_(qkv, cos, sin)
            o = packed_attention(q, k, val, lens, causal=False, scale=a.scaling, impl=self.attn_impl)
            x = x + self._lin(o.reshape(n, self.dim), i, "proj", a.proj)
            hs = F.layer_norm(x, (self.dim,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
            m = blk.mlp
            if self.gelu_epilogue and not self.fp8:    # fc1 + bias + GELU(tanh) in one cuBLASLt GEMM
                a1 = torch._addmm_activation(m.linear_fc1.bias, hs, m.linear_fc1.weight.t(), use_gelu=True)
            else:
                a1 = m.act_fn(self._lin(hs, i, "fc1", m.linear_fc1))
            x = x + self._lin(a1, i, "fc2", m.linear_fc2)
            j = self.deep_index.get(i)
            if j is not None:
                deep.append(v.deepstack_merger_list[j](x))
        return v.merger(x), deep
