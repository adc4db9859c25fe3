"""FP8 KV cache (``kv_cache_dtype: fp8``): what is stored, what it costs in bytes, and the engine
end to end against a 32-bit cache whose writes round through e4m3 (the same values, so the same
greedy tokens). The GPU kernels that write (fused q/k-norm + RoPE + store) and read (split-K
decode attention) the FP8 cache are checked against the torch path on a GPU."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from serve_app.engine._private import attention
from serve_app.engine._private import prefill_pass as prefill_mod
from serve_app.engine._private import runner as runner_mod
from serve_app.engine._private.kv_cache import PagedKVCache
from serve_app.engine._private.runner import ModelRunner
from serve_app.engine.config import EngineConfig

from test_engine import DEVICE, _request, _burst_cpu_tokens, model_dir  # noqa: F401  (fixture)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
E4M3 = torch.float8_e4m3fn


def test_cache_stores_clamped_e4m3():
    cache = PagedKVCache(1, 4, 4, 2, 8, E4M3, torch.device("cpu"))
    torch.manual_seed(0)
    k = torch.randn(3, 2, 8) * 3
    k[0, 0, 0], k[1, 1, 1] = 1000.0, -7e4          # beyond e4m3's +-448
    v = torch.randn(3, 2, 8)
    page, off = torch.tensor([1, 1, 2]), torch.tensor([0, 1, 0])
    attention.write_kv(cache.k[0], cache.v[0], k, v, page, off)
    got = attention.gather_kv(cache.k[0], torch.tensor([1, 2]), 5)      # [kv, 5, D]
    assert got.dtype == E4M3
    want = k.clamp(-448, 448).to(E4M3).float()
    assert torch.equal(got[:, :2].float(), want[:2].transpose(0, 1))
    assert torch.equal(got[:, 4].float(), want[2])
    assert got.float()[0, 0, 0] == 448.0 and got.float()[1, 1, 1] == -448.0
    # rounding: e4m3 keeps 3 mantissa bits, so each normal value (2^-6 <= |x| <= 448) is within
    # 1/16 of itself; subnormals keep fewer bits (an unseeded draw once hit 0.082)
    rel = ((got[:, :2].float() - k[:2].transpose(0, 1)).abs() / k[:2].transpose(0, 1).abs())
    mag = k[:2].transpose(0, 1).abs()
    assert rel[(mag >= 2 ** -6) & (mag < 448)].max() <= 1 / 16 + 1e-6
    assert torch.isfinite(got.float()).all()


def test_fp8_cache_halves_bytes_per_token(model_dir):  # noqa: F811
    from serve_app.models import load_model
    model = load_model(model_dir, dtype=torch.bfloat16, device="cpu").eval()
    r16 = ModelRunner(model, torch.device("cpu"), 2, 128)
    model = load_model(model_dir, dtype=torch.bfloat16, device="cpu").eval()
    r8 = ModelRunner(model, torch.device("cpu"), 2, 128, kv_cache_dtype="fp8")
    assert r8.kv_bytes_per_token() * 2 == r16.kv_bytes_per_token()
    assert r8.kv_bytes_per_token() == 2 * r8.num_layers * r8.num_kv_heads * r8.head_dim
    r8.allocate_kv(64)
    assert r8.kv.k.dtype == E4M3 and r8.kv.v.dtype == E4M3
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        ModelRunner(model, torch.device("cpu"), 2, 128, kv_cache_dtype="int8")


def test_config_rejects_fp8_kv_without_continuous_engine():
    with pytest.raises(ValueError, match="continuous"):
        EngineConfig(engine="hf-generate", kv_cache_dtype="fp8")
    with pytest.raises(ValueError):
        EngineConfig(kv_cache_dtype="fp4")


def test_engine_fp8_kv_equals_e4m3_rounded_32bit_kv(model_dir, monkeypatch):  # noqa: F811
    """Requests with images arriving together, prompts chunked (later chunks read the cache),
    decode in batches: the engine on an FP8 cache gives the greedy tokens of an engine on an fp32
    cache whose writes round through e4m3 (CPU, torch path). So the FP8 cache changes nothing but
    the stored values: every read upcasts them exactly."""
    if DEVICE != "cpu":
        pytest.skip("the emulation patches the torch write path the CPU runs")
    rng = np.random.default_rng(11)
    reqs = [_request(i, rng, i % 3, int(rng.integers(4, 20))) for i in range(6)]

    def run(kv_dtype):
        return _burst_cpu_tokens(model_dir, reqs, kv_cache_dtype=kv_dtype)

    got, health = run("fp8")
    assert health["kv_dtype"] == "float8_e4m3fn"
    real_write = attention.write_kv

    def rounded_write(ck, cv, k, v, page_idx, offset):
        real_write(ck, cv, attention.to_cache_dtype(k, E4M3).to(k.dtype),
                   attention.to_cache_dtype(v, E4M3).to(v.dtype), page_idx, offset)

    for mod in (runner_mod, prefill_mod):          # decode (torch path) and prefill
        monkeypatch.setattr(mod, "write_kv", rounded_write)
    ref, health32 = run("auto")
    assert health32["kv_dtype"] == "float32"
    assert got == ref and all(len(t) > 0 for t in got)


def test_runner_logits_on_fp8_cache_equal_rounded_cache_only(model_dir, monkeypatch):  # noqa: F811
    """A prompt's prefill in two chunks (the second reads the cache), then decode steps: logits on
    the FP8 cache equal those on an fp32 cache with e4m3-rounded writes, and differ from an
    unrounded cache's (so the comparison can tell them apart)."""
    from serve_app.engine._private.runner import PrefillChunk
    from serve_app.models import load_model

    def logits(kv_dtype):
        model = load_model(model_dir, dtype=torch.float32, device="cpu").eval()
        r = ModelRunner(model, torch.device("cpu"), 2, 256, kv_cache_dtype=kv_dtype)
        r.allocate_kv(256)
        g = torch.Generator().manual_seed(5)
        ids = torch.randint(100, 5000, (60,), generator=g)
        pages = r.kv.allocate(r.kv.pages_for(80))
        r.set_block_table(0, pages)
        pt = torch.tensor(pages)
        out = []
        for a, b in ((0, 40), (40, 60)):
            c = PrefillChunk(ids=ids[a:b], positions=torch.arange(a, b).view(1, -1).expand(3, -1).contiguous(),
                             start=a, pages=pt, want_logits=b == 60, pages_host=pages)
            x = r.prefill([c])
            if x is not None:
                out.append(x)
        for t in range(60, 64):
            out.append(r.decode([1000 + t], [t], [pages[t // r.page_size]], [t % r.page_size],   # fixed
                                [t + 1], [0], reference=True))                                   # inputs
        return torch.cat([o.reshape(-1) for o in out])

    got = logits("fp8")
    real_write = attention.write_kv
    for mod in (runner_mod, prefill_mod):          # decode (torch path) and prefill
        monkeypatch.setattr(mod, "write_kv", lambda ck, cv, k, v, pi, po: real_write(
            ck, cv, attention.to_cache_dtype(k, E4M3).float(), attention.to_cache_dtype(v, E4M3).float(), pi, po))
    rounded = logits("auto")
    for mod in (runner_mod, prefill_mod):
        monkeypatch.setattr(mod, "write_kv", real_write)
    plain = logits("auto")

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(got, rounded) < 1e-6
    # e4m3 rounds each value by up to 1/16; this sharp random model (weights 0.2 x N(0,1))
    # amplifies that through its layers to ~0.27 here; garbage reads would be of order 1
    assert 1e-3 < rel(got, plain) < 0.5


def _runner_with_random_kv(model_dir, kv_cache_dtype="auto", b=5, ctx=70, quantization=None, **runner_kw):  # noqa: F811
    """A bf16 GPU runner and the decode args of ``b`` rows over ``ctx`` tokens of random K/V
    (never zeros), the same values for every cache dtype."""
    from serve_app.models import load_model
    model = load_model(model_dir, dtype=torch.bfloat16, device="cpu").eval()
    r = ModelRunner(model, torch.device("cuda"), 8, 256, kv_cache_dtype=kv_cache_dtype, quantization=quantization,
                    **runner_kw)
    r.allocate_kv(8 * 96)
    g = torch.Generator(device="cuda").manual_seed(1)
    pages = []
    for s in range(b):
        pages.append(r.kv.allocate(r.kv.pages_for(ctx + 1)))
        r.set_block_table(s, pages[-1])
    for layer in range(r.kv.k.shape[0]):       # the same values in both runners, then stored
        r.kv.k[layer].copy_(attention.to_cache_dtype(torch.randn(r.kv.k[layer].shape, generator=g, device="cuda"),
                                                     r.kv.k.dtype))
        r.kv.v[layer].copy_(attention.to_cache_dtype(torch.randn(r.kv.v[layer].shape, generator=g, device="cuda"),
                                                     r.kv.v.dtype))
    args = ([1000 + 7 * s for s in range(b)], [ctx] * b, [pages[s][ctx // r.page_size] for s in range(b)],
            [ctx % r.page_size] * b, [ctx + 1] * b, list(range(b)))
    return r, args


@cuda
def test_fused_decode_on_fp8_cache_matches_torch_path(model_dir):  # noqa: F811
    """The fused decode step (Triton store into and split-K attention over the FP8 cache) against
    the torch reference step over the same FP8 state: the same stored values, upcast the same way,
    so only kernel rounding differs (2 % measured on an H200, about what the two paths differ
    by over a 16-bit cache; a misread cache would be off by order 1); and both stay near a bf16
    cache's logits."""
    def rel(a, b):
        return ((a.float() - b.float()).norm() / b.float().norm()).item()

    r8, args = _runner_with_random_kv(model_dir, "fp8")
    k_before = r8.kv.k.clone()
    ref8 = r8.decode(*args, reference=True)
    r8.kv.k.copy_(k_before)
    got8 = r8.decode(*args)
    assert r8.kv.k.dtype == E4M3 and torch.isfinite(got8).all()
    assert rel(got8, ref8) < 5e-2, rel(got8, ref8)
    # the new token's K went into the cache as e4m3 by the Triton store, as the torch path stores it
    r16, args16 = _runner_with_random_kv(model_dir, "auto")
    k16_before = r16.kv.k.clone()
    ref16 = r16.decode(*args16, reference=True)
    r16.kv.k.copy_(k16_before)
    got16 = r16.decode(*args16)
    print(f"fused vs torch decode logits: fp8 KV {rel(got8, ref8):.4f}, 16-bit KV {rel(got16, ref16):.4f}")
    assert rel(got8, got16) < 0.5, rel(got8, got16)     # the sharp random model amplifies rounding
    # layer 0's new K comes from the same input in both: e4m3 rounding of the same rotated K
    page, off = args[2][0], args[3][0]
    k_new16 = r16.kv.k[0, page, :, off].float()
    k_new8 = r8.kv.k[0, page, :, off].float()
    assert rel(k_new8, k_new16) < 0.07


@cuda
@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, E4M3], ids=["bf16", "fp8"])
def test_triton_decode_attention_every_config(kv_dtype):
    """Split-K decode attention, in every (BLOCK_N, num_warps) the probe times, over a 16-bit and
    an FP8 cache with scattered pages, equals the torch reference over that cache."""
    torch.manual_seed(0)
    b, h, kv, d, page = 4, 16, 4, 128, 16
    lens = [37, 130, 5, 300]
    pages_per = [-(-n // page) for n in lens]
    cache_k = attention.to_cache_dtype(torch.randn(sum(pages_per) + 1, kv, page, d, device="cuda") * 2, kv_dtype)
    cache_v = attention.to_cache_dtype(torch.randn(sum(pages_per) + 1, kv, page, d, device="cuda"), kv_dtype)
    perm = torch.randperm(sum(pages_per), device="cuda") + 1
    tables, start = [], 0
    for n in pages_per:
        tables.append(perm[start:start + n])
        start += n
    bt = torch.zeros(b, max(pages_per), dtype=torch.int32, device="cuda")
    for i, t in enumerate(tables):
        bt[i, :len(t)] = t
    q = torch.randn(b, h, d, device="cuda", dtype=torch.bfloat16)
    want = attention.decode_attention_torch(q, cache_k, cache_v, tables, lens, d ** -0.5)
    picks = {attention.decode_config_for(dt, s) for dt in (torch.bfloat16, E4M3) for s in (1, 2, 4, 6, 10, 16)}
    assert picks <= set(attention.DECODE_CONFIGS)
    for config in attention.DECODE_CONFIGS:
        # 6 and 10: a 16-bit cache at 12-16 and 8 rows; then balanced chunks, few and many
        for splits, balanced in ((1, 0), (4, 0), (6, 0), (10, 0), (8, 64), (16, 1000)):
            got = attention.decode_attention_triton(q, cache_k, cache_v, bt,
                                                    torch.tensor(lens, dtype=torch.int32, device="cuda"),
                                                    d ** -0.5, splits, page, config, balanced)
            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            assert err < 1e-2, (config, splits, balanced, err)


@cuda
def test_fused_store_rounds_like_torch():
    """The fused q/k-norm + RoPE + store kernel writes into an FP8 cache what torch's e4m3 cast
    of its 16-bit output gives: the same value, or at a rounding tie the neighbour (one e4m3
    step), and +-448 for what lies beyond. (Triton's CPU interpreter emulates this cast loosely,
    so this runs on a GPU only.)"""
    from serve_app.engine._private import kernels as K
    torch.manual_seed(0)
    hq, hk, d, b = 32, 8, 128, 64
    dev = "cuda"
    qkv = torch.randn(b, (hq + 2 * hk) * d, dtype=torch.bfloat16, device=dev) * 3
    qkv[0, (hq + hk) * d] = 900.0                    # a V value beyond e4m3's range
    qn = torch.rand(d, dtype=torch.bfloat16, device=dev) + 0.5
    kn = torch.rand(d, dtype=torch.bfloat16, device=dev) + 0.5
    cos = torch.randn(256, d, dtype=torch.bfloat16, device=dev)
    sin = torch.randn(256, d, dtype=torch.bfloat16, device=dev)
    pos = torch.randint(0, 256, (b,), device=dev)
    page = 1 + torch.arange(b, device=dev) // 16
    off = torch.arange(b, device=dev) % 16
    caches = {}
    for dt in (torch.bfloat16, E4M3):
        ck = torch.zeros(6, hk, 16, d, dtype=dt, device=dev)
        cv = torch.zeros_like(ck)
        q = K.qk_norm_rope_store(qkv, qn, kn, cos, sin, pos, page, off, ck, cv, hq, hk, d, 1e-6)
        caches[dt] = (q, ck, cv)
    assert torch.equal(caches[torch.bfloat16][0], caches[E4M3][0])     # q does not change
    for i in (1, 2):
        want = attention.to_cache_dtype(caches[torch.bfloat16][i].float(), E4M3).float()
        got = caches[E4M3][i].float()
        diff = (got - want).abs()
        step = 2.0 ** (torch.floor(torch.log2(want.abs().clamp_min(2 ** -6))) - 3)
        assert (diff <= step + 1e-12).all()
        assert (diff > 0).float().mean() < 0.02
    assert caches[E4M3][2].float().max() == 448.0


def test_fp8_cache_needs_an_fp8_gpu(model_dir, monkeypatch):  # noqa: F811
    """An A10 (8.6) has no e4m3 conversions for the Triton store and decode attention: start-up
    says so instead of failing inside a kernel compile."""
    from serve_app.engine._private import fp8
    from serve_app.models import load_model
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A10")
    assert "8.6" in fp8.supported(torch.device("cuda"))
    model = load_model(model_dir, dtype=torch.float32, device="cpu").eval()
    with pytest.raises(ValueError, match=r"kv_cache_dtype='fp8'.*NVIDIA A10 is 8\.6"):
        ModelRunner(model, torch.device("cuda"), 2, 256, kv_cache_dtype="fp8")


def test_decode_balance_settings(model_dir):  # noqa: F811
    """engine.decode_balance: continuous engine only, and a GPU (it shapes the Triton attention)."""
    from serve_app.engine.config import EngineConfig
    from serve_app.models import load_model
    assert EngineConfig(decode_balance=4).decode_balance == 4
    with pytest.raises(ValueError, match="needs engine='continuous'"):
        EngineConfig(engine="hf-generate", decode_balance=4)
    with pytest.raises(ValueError):
        EngineConfig(decode_balance=-1)
    model = load_model(model_dir, dtype=torch.float32, device="cpu").eval()
    with pytest.raises(ValueError, match="decode_balance needs a CUDA GPU"):
        ModelRunner(model, torch.device("cpu"), 2, 256, decode_balance=4)


@cuda
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_balanced_decode_step_matches_the_split_rule(model_dir, kv_cache_dtype):  # noqa: F811
    """The fused decode step with balanced chunks gives the split rule's logits (only the order of
    the partial sums differs), eager and in the captured graphs."""
    r, args = _runner_with_random_kv(model_dir, kv_cache_dtype)
    k0, v0 = r.kv.k.clone(), r.kv.v.clone()

    def step(balance: int, graphs: bool) -> torch.Tensor:
        r.kv.k.copy_(k0)
        r.kv.v.copy_(v0)
        r.decode_balance = balance
        r._graphs = {}
        if graphs:
            r.capture_graphs()
        return r.decode(*args).float().clone()

    for graphs in (False, True):
        want, got = step(0, graphs), step(4, graphs)
        err = ((got - want).norm() / want.norm()).item()
        assert err < 2e-2, (graphs, err)
