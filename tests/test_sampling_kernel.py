"""The Triton sampling kernel against the torch reference sampler (GPU only: run with a GPU,
e.g. ``pytest tests/test_sampling_kernel.py`` on the device machine)."""

import pytest
import torch

from serve_app.engine._private.sampler import SamplingBatch, _sample_cuda, sample_torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _batch(b: int, temperature, top_p, top_k, dev="cuda") -> SamplingBatch:
    t = torch.as_tensor(temperature, dtype=torch.float32, device=dev).expand(b).contiguous()
    p = torch.as_tensor(top_p, dtype=torch.float32, device=dev).expand(b).contiguous()
    k = torch.as_tensor(top_k, dtype=torch.int64, device=dev).expand(b).contiguous()
    return SamplingBatch(t, p, k, torch.ones(b, device=dev), torch.arange(b, device=dev) * 3 + 1,
                         torch.arange(b, device=dev), None, all_greedy=False, any_top=True,
                         any_penalty=False)


@pytest.mark.parametrize("spread", [0.5, 3.0, 10.0])
def test_kernel_equals_torch_path_full_vocab(spread):
    g = torch.Generator(device="cuda").manual_seed(int(spread * 10))
    b, v = 48, 151936
    logits = torch.randn(b, v, device="cuda", generator=g) * spread
    logits[:, 7] = float("-inf")                     # a banned token is never drawn
    temp = [0.0, 0.7, 1.0, 1.5] * 12                 # greedy rows mixed in
    top_p = [1.0, 0.95, 0.5, 0.9] * 12
    top_k = [0, 0, 40, 0, 0, 5, 0, 0] * 6
    batch = _batch(b, temp, top_p, top_k)
    ref, got = sample_torch(logits, batch, sort_nucleus=True), _sample_cuda(logits, batch)
    assert (got != 7).all()
    assert (got[::4] == logits[::4].argmax(-1)).all()
    # equal but for tokens within float rounding of the nucleus edge or a Gumbel near-tie
    assert (ref == got).float().mean().item() >= 0.97


def test_kernel_distribution_follows_nucleus():
    n = 4000
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05], device="cuda")).repeat(n, 1)
    batch = _batch(n, 1.0, 0.8, 0)                   # nucleus {0, 1}: 0.5 + 0.3 >= 0.8
    batch.seeds = torch.arange(n, device="cuda")
    freq = torch.bincount(_sample_cuda(logits, batch), minlength=4).float() / n
    assert torch.allclose(freq.cpu(), torch.tensor([0.625, 0.375, 0.0, 0.0]), atol=0.03)
    batch.top_k = torch.full((n,), 1, device="cuda")
    assert set(_sample_cuda(logits, batch).tolist()) == {0}


def test_kernel_draw_depends_only_on_seed_and_step():
    g = torch.Generator(device="cuda").manual_seed(5)
    logits = torch.randn(8, 151936, device="cuda", generator=g)
    batch = _batch(8, 0.8, 0.9, 0)
    alone = _sample_cuda(logits[3:4], SamplingBatch(
        batch.temperature[3:4], batch.top_p[3:4], batch.top_k[3:4], batch.repetition_penalty[3:4],
        batch.seeds[3:4], batch.steps[3:4], None, all_greedy=False, any_top=True, any_penalty=False))
    assert alone.item() == _sample_cuda(logits, batch)[3].item()


@pytest.mark.parametrize("b", [1, 3, 64])
@pytest.mark.parametrize("spread", [0.5, 3.0, 10.0])
def test_split_rows_equal_single_program_kernel(b, spread):
    from serve_app.engine._private.sampling_kernel import sample_rows, sample_rows_single

    g = torch.Generator(device="cuda").manual_seed(b * 100 + int(spread * 10))
    v = 151936
    logits = torch.randn(b, v, device="cuda", generator=g) * spread
    temp = torch.tensor([0.0, 0.7, 1.0, 1.5] * b, device="cuda")[:b]
    top_p = torch.tensor([1.0, 0.95, 0.5, 0.9, 0.3, 0.99] * b, device="cuda")[:b]
    kth = torch.full((b,), float("-inf"), device="cuda")
    kth[2::5] = logits[2::5].topk(20, dim=-1).values[:, -1]      # some rows with top-k 20
    seeds, steps = torch.arange(b, device="cuda") * 5 + 2, torch.arange(b, device="cuda") + 9
    args = (logits, temp, top_p, kth, seeds, steps)
    got, single = sample_rows(*args), sample_rows_single(*args)
    assert (got == sample_rows(*args)).all()                     # deterministic
    assert (got[temp <= 0] == logits[temp <= 0].argmax(-1)).all()
    # equal but for tokens within float rounding of the nucleus edge (the single-program kernel's
    # threshold is on a 5e-7 grid, the split one's is exact)
    assert (got == single).float().mean().item() >= 0.99


def test_warm_up_and_shared_scratch_give_the_same_draws():
    """After ``warm_up`` (every batch size compiled, work buffers grown to the largest batch per
    split count), smaller batches use row prefixes of those buffers: the draws are unchanged."""
    from serve_app.engine._private import sampling_kernel as K

    g = torch.Generator(device="cuda").manual_seed(3)
    v = 151936
    logits = torch.randn(3, v, device="cuda", generator=g) * 3.0
    args = lambda b: (logits[:b], torch.full((b,), 0.8, device="cuda"), torch.full((b,), 0.9, device="cuda"),  # noqa: E731
                      torch.full((b,), float("-inf"), device="cuda"), torch.arange(b, device="cuda") + 1,
                      torch.arange(b, device="cuda"))
    before = [K.sample_rows(*args(b)) for b in (1, 2, 3)]
    assert K.warm_up(16, v, torch.device("cuda")) >= 0
    after = [K.sample_rows(*args(b)) for b in (1, 2, 3)]
    for x, y in zip(before, after):
        assert torch.equal(x, y)
    assert torch.equal(after[2][:2], after[1]) and torch.equal(after[1][:1], after[0])
