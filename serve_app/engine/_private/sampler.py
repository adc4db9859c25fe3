"""Per-row sampling on the device, reproducible per request whatever the batch.

Randomness comes from a counter-based hash of (seed, step, vocab index) turned into Gumbel noise,
so a request's draw at step ``n`` depends only on its own seed and logits, never on which other
requests share the batch or on a global generator's state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from serve_app.engine._private.transfer import upload

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
    top_k_max: int = -1            # largest top_k in the batch (-1: unknown, read from top_k)


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
    if batch.all_greedy:
        return logits.argmax(dim=-1)
    if logits.is_cuda:
        return _sample_cuda(logits, batch)
    return sample_torch(logits, batch)


def sample_torch(logits: torch.Tensor, batch: SamplingBatch, sort_nucleus: bool = False) -> torch.Tensor:
    """The CPU path, and the reference for the GPU kernel. ``sort_nucleus``: top-p by sorting the
    whole vocabulary (the earlier path, the benchmark's baseline) instead of the histogram."""
    greedy_tokens = logits.argmax(dim=-1)
    greedy = batch.temperature <= 0
    temp = torch.where(greedy, torch.ones_like(batch.temperature), batch.temperature)
    scaled = logits / temp[:, None]
    if batch.any_top:
        nucleus = _top_k_top_p if sort_nucleus else _top_k_top_p_fast
        scaled = nucleus(scaled, batch.top_k, batch.top_p)
    noise = gumbel_noise(batch.seeds, batch.steps, scaled.shape[-1])
    sampled = (scaled + noise).argmax(dim=-1)
    return torch.where(greedy, greedy_tokens, sampled)


def _sample_cuda(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """GPU: one Triton kernel, no vocabulary sort (top-k's threshold from ``torch.topk``)."""
    from serve_app.engine._private.sampling_kernel import sample_rows

    kth = torch.full((logits.shape[0],), float("-inf"), device=logits.device)
    if batch.any_top:
        kmax = batch.top_k_max if batch.top_k_max >= 0 else int(batch.top_k.max())
        if kmax > 0:
            kth = _top_k_threshold(logits, batch.top_k, kmax)
    return sample_rows(logits, batch.temperature, batch.top_p, kth, batch.seeds, batch.steps)


def _top_k_threshold(logits: torch.Tensor, top_k: torch.Tensor, kmax: int) -> torch.Tensor:
    """Each row's k-th largest logit (tokens equal to it are kept, as HF's TopK does), -inf for
    rows without top-k; ``kmax`` is the largest top_k of the batch."""
    kmax = min(kmax, logits.shape[-1])
    kth = logits.topk(kmax, dim=-1).values.gather(1, (top_k.clamp(1, kmax) - 1)[:, None])[:, 0]
    return torch.where(top_k > 0, kth, torch.full_like(kth, float("-inf")))


_NUCLEUS_BINS = 4096


def _top_k_top_p_fast(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """:func:`_top_k_top_p` without sorting the vocabulary (on CPU a 151,936-token sort is ~13 ms
    a row): the nucleus is every token at or above its smallest kept logit, found with a mass
    histogram over the logits and a sort of one bin only. Same tokens as the sort but for ties at
    the boundary (all kept) and float rounding of the mass there."""
    kmax = int(top_k.max())
    if kmax > 0:
        logits = logits.masked_fill(logits < _top_k_threshold(logits, top_k, kmax)[:, None], float("-inf"))
    rows = []
    for z, p in zip(logits, top_p.tolist()):
        rows.append(z if p >= 1.0 else z.masked_fill(z < _nucleus_floor(z, p), float("-inf")))
    return torch.stack(rows)


def _nucleus_floor(z: torch.Tensor, p: float, bins: int = _NUCLEUS_BINS) -> float:
    """Smallest logit that top-p keeps (tokens in descending order are kept while the mass before
    them is < p). Bin 0 holds the largest logits; only the bin where the mass crosses p is sorted."""
    probs = z.softmax(dim=-1)
    top = z.max()
    bottom = torch.where(torch.isfinite(z), z, top).min()
    if float(top - bottom) <= 0.0:
        return float(top)                                    # one value (ties): keep them all
    b = ((top - z) * ((bins - 1) / (top - bottom))).clamp(0, bins - 1).long()   # -inf -> last bin
    mass = torch.bincount(b, weights=probs.double(), minlength=bins)
    before_bin = mass.cumsum(0) - mass                       # mass of all larger bins
    edge = int((before_bin < p).sum()) - 1                   # bins before it are all kept
    members = (b == edge).nonzero().squeeze(1)
    vals, order = probs[members].double().sort(descending=True)
    before = before_bin[edge] + vals.cumsum(0) - vals
    keep = max(int((before < p).sum()), 1)
    return float(z[members[order[keep - 1]]])


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


class SlotSampling:
    """Per-slot sampling parameters and token presence, kept on the device.

    Set once when a request takes a slot; each step gathers its rows by slot index on the device,
    so a step uploads no per-row parameters and needs no host round trip.
    """

    def __init__(self, num_slots: int, vocab: int, device: torch.device):
        n = num_slots + 1                      # the last row serves padding
        self.temperature = torch.zeros(n, device=device)
        self.top_p = torch.ones(n, device=device)
        self.top_k = torch.zeros(n, dtype=torch.int64, device=device)
        self.penalty = torch.ones(n, device=device)
        self.seed = torch.zeros(n, dtype=torch.int64, device=device)
        self.presence = torch.zeros(n, vocab, dtype=torch.bool, device=device)
        self.device = device

    def assign(self, slot: int, sp, seed: int, prompt: list[int]) -> None:
        dev = self.device
        floats = torch.tensor([sp.temperature if not sp.greedy else 0.0, sp.top_p, sp.repetition_penalty])
        ints = torch.tensor([sp.top_k, seed], dtype=torch.int64)
        floats, ints = upload(floats, dev), upload(ints, dev)
        self.temperature[slot] = floats[0]
        self.top_p[slot] = floats[1]
        self.penalty[slot] = floats[2]
        self.top_k[slot] = ints[0]
        self.seed[slot] = ints[1]
        if sp.repetition_penalty != 1.0:   # only read for rows with a penalty (see sample)
            row = self.presence[slot]
            row.zero_()
            row[upload(prompt, dev, torch.int64)] = True

    def sample(self, logits: torch.Tensor, slots: torch.Tensor, steps: torch.Tensor, params: list,
               banned: torch.Tensor | None) -> torch.Tensor:
        """Tokens for rows ``slots`` (device int64) at generation ``steps``; ``params``: the rows'
        SamplingParams (host), for the batch-level flags only. Marks the tokens as present (when a
        row of the batch has a repetition penalty: only those rows' presence is ever read)."""
        all_greedy = all(sp.greedy for sp in params)
        any_pen = any(sp.repetition_penalty != 1.0 for sp in params)
        if all_greedy:
            one = self.temperature[:1]
            batch = SamplingBatch(one, one, self.top_k[:1],
                                  self.penalty.index_select(0, slots) if any_pen else one, one,
                                  one, banned, all_greedy=True, any_top=False, any_penalty=any_pen)
        else:
            pick = lambda t: t.index_select(0, slots)  # noqa: E731
            batch = SamplingBatch(pick(self.temperature), pick(self.top_p), pick(self.top_k),
                                  pick(self.penalty), pick(self.seed), steps, banned,
                                  all_greedy=False,
                                  any_top=any(sp.top_k > 0 or sp.top_p < 1.0 for sp in params),
                                  any_penalty=any_pen,
                                  top_k_max=max((sp.top_k for sp in params), default=0))
        presence = self.presence.index_select(0, slots) if any_pen else None
        tokens = sample(logits, batch, presence)
        if any_pen:      # rows without a penalty never read their presence: penalised == logits
            self.presence[slots, tokens] = True
        return tokens
