"""How many KV tokens fit: budget - weights - measured activation peak - CUDA-graph reserve.

The activation peak is measured, not guessed: one profile prefill of ``max_prefill_tokens`` tokens
and one vision-tower pass over as many patches as a prefill step can bring, as vLLM does.
"""

from __future__ import annotations

import logging

import torch

from serve_app.engine._private.runner import ModelRunner, PrefillChunk
from serve_app.engine.config import EngineConfig

logger = logging.getLogger(__name__)

GiB = 1024 ** 3
# An A10 has 24 GB (22.5 GiB usable after the CUDA context): the default budget fits it.
DEFAULT_BUDGET_BYTES = int(21.5 * GiB)
# CUDA graphs, in-flight vision features, allocator fragmentation (seen ~0.4 GiB on an H100).
GRAPH_RESERVE_BYTES = int(1.5 * GiB)
CPU_DEFAULT_KV_TOKENS = 1 << 16


def plan_kv_tokens(config: EngineConfig, runner: ModelRunner, budget: int | None) -> tuple[int, dict]:
    """Returns (KV tokens to allocate, facts for ``health()``); raises if nothing fits."""
    explicit = getattr(config, "kv_cache_tokens", None)
    want_max = config.max_num_seqs * config.max_model_len
    if runner.device.type != "cuda":
        tokens = explicit or min(want_max, CPU_DEFAULT_KV_TOKENS)
        return tokens, {"kv_source": "explicit" if explicit else "cpu-default"}
    dev = runner.device
    torch.cuda.synchronize(dev)
    weights = torch.cuda.memory_allocated(dev)
    peak = _profile_peak(config, runner)
    if budget is None:
        total = torch.cuda.get_device_properties(dev).total_memory
        budget = min(DEFAULT_BUDGET_BYTES, int(0.92 * total))
    per_tok = runner.kv_bytes_per_token()
    reserve = GRAPH_RESERVE_BYTES + config.vision_cache_mb * 2 ** 20
    if config.vision_graph_grids and config.cuda_graphs:
        # Vision graphs keep the activations of their largest grid: about the profile's share.
        from serve_app.engine._private.vision_graphs import MAX_GRAPH_PATCHES
        budget_patches = vision_patch_budget(config.max_prefill_tokens, runner.merge)
        reserve += int((peak - weights) * min(1.0, MAX_GRAPH_PATCHES / budget_patches))
    if config.prefill_graph_tokens and config.cuda_graphs:
        # Prefill graphs keep their activations: about the profile's share for that many tokens.
        share = min(1.0, config.prefill_graph_tokens / config.max_prefill_tokens)
        reserve += int((peak - weights) * share)
    fit = (budget - peak - reserve) // per_tok
    info = {"budget_gib": round(budget / GiB, 2), "weights_gib": round(weights / GiB, 2),
            "activation_peak_gib": round((peak - weights) / GiB, 2),
            "kv_bytes_per_token": per_tok, "kv_tokens_fit": int(max(fit, 0))}
    if explicit:
        tokens = explicit
    else:
        tokens = int(min(fit, want_max))
    if (not explicit and tokens < config.max_model_len) or (explicit and explicit > fit):
        raise RuntimeError(
            f"GPU memory budget {budget / GiB:.1f} GiB does not fit weights {weights / GiB:.2f} GiB + "
            f"activations {(peak - weights) / GiB:.2f} GiB + KV for {max(tokens, config.max_model_len)} "
            f"tokens ({per_tok} B/token); raise max_gpu_memory_gb or lower max_model_len / "
            f"max_prefill_tokens / kv_cache_tokens")
    info["kv_gib"] = round(tokens * per_tok / GiB, 2)
    return tokens, info


def vision_patch_budget(max_prefill_tokens: int, merge: int) -> int:
    """Patches per vision-tower call: what one prefill step can bring (``max_prefill_tokens`` LM
    tokens of ``merge**2`` patches each). The start-up profile measures a call of this size plus
    one image, so the scheduler splits bigger batches into calls of this size and rejects a single
    image above it. An unbounded batch (a burst admitted at once) was seen to exceed the profile by
    12 % and run out of memory under a 24 GB cap."""
    return max_prefill_tokens * merge ** 2


def split_by_budget(sizes: list[int], budget: int) -> list[list[int]]:
    """Indices of ``sizes``, in order, grouped so that each group sums to at most ``budget`` (an
    item over the budget forms a group of its own)."""
    groups: list[list[int]] = []
    total = 0
    for i, n in enumerate(sizes):
        if not groups or total + n > budget:
            groups.append([])
            total = 0
        groups[-1].append(i)
        total += n
    return groups


@torch.inference_mode()
def _profile_peak(config: EngineConfig, runner: ModelRunner) -> int:
    dev = runner.device
    torch.cuda.reset_peak_memory_stats(dev)
    runner.allocate_kv(runner.page_size)                 # 1 usable page: all profile writes go there
    n = config.max_prefill_tokens
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, runner.vocab, (n,), generator=g)
    chunk = PrefillChunk(ids=ids, positions=torch.arange(n).view(1, -1).expand(3, -1), start=0,
                         pages=torch.ones(-(-n // runner.page_size), dtype=torch.int64, device=dev),
                         want_logits=True)
    runner.prefill([chunk])
    # Vision tower over one call's patch budget (see vision_patch_budget) plus one image: margin.
    vc = runner.model.config.vision_config
    side = 64                                           # 64x64 patches = 1024 LM tokens per image
    n_img = max(1, vision_patch_budget(n, vc.spatial_merge_size) // (side * side)) + 1
    patch_dim = 3 * vc.temporal_patch_size * vc.patch_size ** 2
    pix = [torch.randn(side * side, patch_dim, generator=g) for _ in range(n_img)]
    runner.encode_images(pix, [(1, side, side)] * n_img)
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    runner.kv = None
    torch.cuda.empty_cache()
    return peak
