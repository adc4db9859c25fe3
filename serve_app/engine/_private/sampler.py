"""Per-row sampling on the device, reproducible per request whatever the batch.

Randomness comes from a counter-based hash of (seed, step, vocab index) turned into Gumbel noise,
so a request's draw at step ``n`` depends only on its own seed and logits, never on which other
requests share the batch or on a global generator's state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_M1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_M2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


def _shr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    x = (x ^ _shr(x, 30)) * _M1
    x = (x ^ _shr(x, 27)) * _M2
    return x ^ _shr(x, 31)


def gumbel_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab: int) -> torch.Tensor:
    """Gumbel(0, 1) noise [B, vocab] as a pure function of (seed, step, index)."""
    idx = torch.arange(vocab, device=seeds.device, dtype=torch.int64)
    base = _splitmix64(seeds.to(torch.int64) * _GOLDEN + steps.to(torch.int64))
    h = _splitmix64(base[:, None] + idx[None, :] * _GOLDEN)
    u = (_shr(h, 40).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1)
    return -torch.log(-torch.log(u))


@dataclass
class SamplingBatch:
    """Per-row sampling parameters as device tensors (built once per step)."""

    temperature: torch.Tensor      # [B] f32; <= 0 means greedy
    top_p: torch.Tensor            # [B] f32
    top_k: torch.Tensor            # [B] int64; <= 0 disables
    repetition_penalty: torch.Tensor  # [B] f32
    seeds: torch.Tensor            # [B] int64
    steps: torch.Tensor            # [B] int64 (number of tokens generated so far)
    banned: torch.Tensor | None    # [B, n] int64 token ids to forbid (EOS before min_tokens), -1 = none
    all_greedy: bool
    any_top: bool
    any_penalty: bool


def sample(logits: torch.Tensor, batch: SamplingBatch, presence: torch.Tensor | None) -> torch.Tensor:
    """Pick one token per row. ``logits`` is float32 [B, V]; ``presence`` bool [B, V] (prompt+output)."""
    if batch.any_penalty and presence is not None:
        pen = batch.repetition_penalty[:, None]
        penalised = torch.where(logits > 0, logits / pen, logits * pen)
        logits = torch.where(presence, penalised, logits)
    if batch.banned is not None:
        ban = batch.banned
        vals = torch.where(ban >= 0, torch.full_like(ban, 0, dtype=logits.dtype) - float("inf"),
                           logits.gather(1, ban.clamp_min(0)))
        logits = logits.scatter(1, ban.clamp_min(0), vals)
    greedy_tokens = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy_tokens
    greedy = batch.temperature <= 0
    temp = torch.where(greedy, torch.ones_like(batch.temperature), batch.temperature)
    scaled = logits / temp[:, None]
    if batch.any_top:
        scaled = _top_k_top_p(scaled, batch.top_k, batch.top_p)
    noise = gumbel_noise(batch.seeds, batch.steps, scaled.shape[-1])
    sampled = (scaled + noise).argmax(dim=-1)
    return torch.where(greedy, greedy_tokens, sampled)


def _top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask to -inf outside each row's top-k, then outside its nucleus (HF order: top-k, then top-p)."""
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    # HF's TopK keeps ties with the k-th value; matching by value does the same.
    kth = sorted_logits.gather(1, (k - 1)[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    cum = probs.cumsum(dim=-1)
    # Drop tokens whose preceding mass already reaches top_p; always keep the first.
    drop = (cum - probs) >= top_p[:, None]
    drop &= ranks > 0
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
