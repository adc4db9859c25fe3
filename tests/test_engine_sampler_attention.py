"""The engine's sampler and packed attention without a model: seeded Gumbel noise, top-k / top-p /
penalties, the CPU nucleus without a sort, every attention implementation against SDPA, and the
gate that keeps shapes without a cuDNN plan off cuDNN."""

from __future__ import annotations

import pytest
import torch

from serve_app.engine._private.sampler import SamplingBatch, gumbel_noise, sample
from test_engine import DEVICE


def test_gumbel_noise_depends_only_on_seed_and_step():
    seeds = torch.tensor([1, 2, 1])
    steps = torch.tensor([0, 0, 0])
    n = gumbel_noise(seeds, steps, 1000)
    assert torch.equal(n[0], n[2]) and not torch.equal(n[0], n[1])
    assert torch.isfinite(n).all()
    # the sampled distribution follows softmax(logits)
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).repeat(4000, 1)
    batch = SamplingBatch(torch.ones(4000), torch.ones(4000), torch.zeros(4000, dtype=torch.long),
                          torch.ones(4000), torch.arange(4000), torch.zeros(4000, dtype=torch.long),
                          None, all_greedy=False, any_top=False, any_penalty=False)
    freq = torch.bincount(sample(logits, batch, None), minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)


def test_top_k_top_p_and_penalty():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    n = logits.shape[0]
    batch = SamplingBatch(torch.ones(n), torch.full((n,), 1.0), torch.full((n,), 2),
                          torch.ones(n), torch.arange(n), torch.zeros(n, dtype=torch.long), None,
                          all_greedy=False, any_top=True, any_penalty=False)
    assert set(sample(logits, batch, None).tolist()) == {0, 1}
    batch.top_k = torch.zeros(n, dtype=torch.long)
    batch.top_p = torch.full((n,), 0.5)   # p(0) = 0.64 >= 0.5: only the top token survives
    assert set(sample(logits, batch, None).tolist()) == {0}
    greedy = SamplingBatch(torch.zeros(1), torch.ones(1), torch.zeros(1, dtype=torch.long),
                           torch.full((1,), 3.0), torch.zeros(1, dtype=torch.long),
                           torch.zeros(1, dtype=torch.long), None, all_greedy=True, any_top=False,
                           any_penalty=True)
    presence = torch.tensor([[True, False, False, False, False]])
    # 4/3 < 3: the penalised top token loses to the runner-up
    assert sample(logits[:1], greedy, presence).item() == 1


def test_packed_attention_equals_per_sequence_sdpa():
    """Every implementation (on CUDA: flash and cuDNN called directly, varlen; bf16) against plain
    SDPA per sequence, GQA and MHA, causal and not; no direct-call fallback was needed."""
    from serve_app.engine._private import attention as A

    cuda = DEVICE == "cuda"
    dev, dt = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    impls = ["sdpa", "flash", "cudnn", "varlen"] if cuda else ["sdpa"]
    g = torch.Generator().manual_seed(0)
    lens = [5, 5, 9, 3, 3, 3] if not cuda else [77, 77, 130, 33, 33, 33]
    t = sum(lens)
    for heads, kv_heads, d in ((4, 2, 8), (4, 4, 8)) if not cuda else ((32, 8, 128), (16, 16, 64)):
        q, k, v = (torch.randn(t, h, d, generator=g).to(dev, dt) for h in (heads, kv_heads, kv_heads))
        for causal in (True, False):
            for impl in impls:
                out = A.packed_attention(q, k, v, lens, causal, 0.3, impl, gate=False)
                o = 0
                for n in lens:
                    ref = torch.nn.functional.scaled_dot_product_attention(
                        *(x[o:o + n].transpose(0, 1)[None].float() for x in (q, k, v)),
                        is_causal=causal, scale=0.3, enable_gqa=True)[0].transpose(0, 1)
                    err = ((out[o:o + n].float() - ref).norm() / ref.norm()).item()
                    assert err < (1e-2 if cuda else 1e-5), (impl, heads, kv_heads, causal, err)
                    o += n
    assert not A._DIRECT_FAILED


def test_cudnn_plans_gate_new_shapes():
    """A shape without a cuDNN plan is queued (once) and runs elsewhere; a build that cuDNN
    declines (here: CPU tensors) is not retried. On a GPU, a built shape takes cuDNN after."""
    from serve_app.engine._private.attention import CudnnPlans

    plans = CudnnPlans(limit=3)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    mk = lambda n: [torch.randn(1, 4, n, 64, device=dev, dtype=dt) for _ in range(3)]  # noqa: E731
    a = mk(128)
    assert not plans.ready(*a, True, 0.125) and not plans.ready(*a, True, 0.125)
    assert plans.pending_total == 1
    for n in (64, 256, 512):            # the limit bounds queued + built shapes
        plans.ready(*mk(n), True, 0.125)
    assert plans.pending_total == 3
    assert plans.build_pending(max_seconds=10) == 3 and plans.pending_total == 0
    if dev == "cpu":
        assert plans.built_total == 0
        assert not plans.ready(*a, True, 0.125) and plans.pending_total == 0
    else:
        assert plans.built_total == 3 and plans.ready(*a, True, 0.125)


@pytest.mark.parametrize("spread", [0.05, 1.0, 6.0])
def test_fast_nucleus_matches_sorted_nucleus(spread):
    """The CPU top-p without a vocabulary sort keeps the sorted path's tokens, but for boundary
    tokens whose total probability is float-rounding-sized."""
    from serve_app.engine._private.sampler import _top_k_top_p, _top_k_top_p_fast

    g = torch.Generator().manual_seed(int(spread * 100))
    logits = torch.randn(4, 151936, generator=g) * spread
    logits[:, 3] = float("-inf")                     # banned
    top_k, top_p = torch.tensor([0, 50, 0, 0]), torch.tensor([0.9, 0.95, 0.5, 1.0])
    ref, got = _top_k_top_p(logits, top_k, top_p), _top_k_top_p_fast(logits, top_k, top_p)
    probs = logits.softmax(-1)
    differ = torch.isinf(ref) != torch.isinf(got)
    assert (probs * differ).sum(-1).max().item() < 1e-4
    assert torch.isinf(got[:, 3]).all()
    assert torch.equal(torch.isinf(got[3]), torch.isinf(logits[3]))   # top_p 1: nothing dropped
    kept = ~torch.isinf(got[1])
    assert kept.sum().item() <= 50 and kept[logits[1].argmax()]
