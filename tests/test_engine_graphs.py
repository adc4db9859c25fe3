"""The engine's graph paths against the eager ones: prefill of one request's whole prompt padded
to a bucket, and the vision tower per recurring grid. Same logits, K/V, embeddings and greedy
tokens. On the CPU the static-buffer functions run eagerly; the GPU captures themselves need
ENGINE_TEST_DEVICE=cuda."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve_app.engine._private.runner import ModelRunner, PrefillChunk

from test_engine import (DEVICE, _assert_greedy, _collect, _config, _image, _image_request, _request,  # noqa: F401
                         _run, hf_model, model_dir)


def _runner(model_dir: str, dt: torch.dtype | None = None) -> ModelRunner:  # noqa: F811
    from serve_app.models import load_model
    dt = dt or (torch.float32 if DEVICE == "cpu" else torch.bfloat16)
    model = load_model(model_dir, dtype=dt, device="cpu" if DEVICE != "cpu" else DEVICE).eval()
    r = ModelRunner(model, torch.device(DEVICE), 4, 1024)
    r.allocate_kv(4096)
    return r


def _assert_close(got: torch.Tensor, want: torch.Tensor, cpu_tol: float) -> None:
    """fp32 on the CPU: elementwise. bf16 on the GPU: a padded pass has other GEMM shapes, so
    other rounding in every layer, and the graphs may run another attention kernel than eager
    (cuDNN against flash: up to 3.6 % measured on an H200); the relative error of the whole
    tensor stays at bf16 noise, where a masking or indexing bug would be of order 1."""
    if DEVICE == "cpu":
        assert torch.allclose(got, want, rtol=cpu_tol, atol=cpu_tol)
        return
    err = ((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-6)).item()
    assert err < 5e-2, f"relative error {err:.4f}"


@pytest.mark.parametrize("n", [1, 37, 255, 256, 300])
def test_padded_prefill_equals_eager(model_dir, n):  # noqa: F811
    r = _runner(model_dir)
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(100, 5000, (n,), generator=g)
    pages = r.kv.allocate(r.kv.pages_for(n + 8))
    chunk = PrefillChunk(ids=ids, positions=torch.arange(n).view(1, -1).expand(3, -1).contiguous(), start=0,
                         pages=torch.tensor(pages, device=r.device), want_logits=True, pages_host=pages)
    eager = r.prefill([chunk])
    kv_idx = torch.tensor([pages[t // r.page_size] for t in range(n)])
    kv_off = torch.tensor([t % r.page_size for t in range(n)])
    k_eager = r.kv.k[:, kv_idx, :, kv_off].clone()
    r.kv.k.zero_()
    r.kv.v.zero_()
    r.setup_prefill_graphs(512)
    padded = r.prefill([chunk])
    assert r._pg.replays == 1 and r._pg.bucket_for(n) == (256 if n < 256 else 512)
    _assert_close(padded, eager, 1e-4)
    _assert_close(r.kv.k[:, kv_idx, :, kv_off], k_eager, 1e-4)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"] if DEVICE == "cuda" else ["float32"])
def test_padded_prefill_with_images_equals_eager(model_dir, dtype):  # noqa: F811
    """An image prompt (image rows, deepstack, distinct M-RoPE rows) then a text prompt through
    the same graph: each equals its eager pass, so nothing of the first leaks into the second."""
    r = _runner(model_dir, getattr(torch, dtype))
    g = torch.Generator().manual_seed(3)
    levels = len(r.model.config.vision_config.deepstack_visual_indexes)

    def chunk(n, img):
        ids = torch.randint(100, 5000, (n,), generator=g)
        pos = torch.arange(n).view(1, -1).repeat(3, 1)
        pages = r.kv.allocate(r.kv.pages_for(n + 8))
        c = PrefillChunk(ids=ids, positions=pos, start=0, pages=torch.tensor(pages, device=r.device),
                         want_logits=True, pages_host=pages)
        if img:
            lo, hi = 10, 26
            pos[1, lo:hi] = 10 + torch.arange(16) // 4         # an image's row and column indices
            pos[2, lo:hi] = 10 + torch.arange(16) % 4
            pos[:, hi:] -= 12
            c.vis_local = torch.arange(lo, hi)
            c.vis_embeds = torch.randn(16, r.hidden, generator=g).to(r.device, r.dtype)
            c.deepstack = [torch.randn(16, r.hidden, generator=g).to(r.device, r.dtype) for _ in range(levels)]
        return c, pages

    (a, pa), (b, _) = chunk(60, True), chunk(30, False)
    want = [r.prefill([a]).clone(), r.prefill([b]).clone()]
    kv_idx = torch.tensor([pa[t // r.page_size] for t in range(60)])
    kv_off = torch.tensor([t % r.page_size for t in range(60)])
    k_want = r.kv.k[:, kv_idx, :, kv_off].clone()
    r.kv.k.zero_()
    r.kv.v.zero_()
    r.setup_prefill_graphs(512)
    got = [r.prefill([a]).clone(), r.prefill([b]).clone()]
    assert r._pg.replays == 2
    if DEVICE == "cuda":    # captured on the first choice (cuDNN where start-up picked it), no fallback
        from serve_app.engine._private.attention import capturable_impls
        assert r._pg.attn_impl == capturable_impls(r.dtype, r.prefill_attn_impl)[0]
        print("prefill graphs:", dtype, "start-up pick", r.prefill_attn_impl, "captured with", r._pg.attn_impl)
    for x, y in zip(got, want):
        _assert_close(x, y, 1e-4)
    _assert_close(r.kv.k[:, kv_idx, :, kv_off], k_want, 1e-4)


def test_padded_prefill_takes_only_whole_prompts(model_dir):  # noqa: F811
    r = _runner(model_dir)
    r.setup_prefill_graphs(512)

    def chunk(n, start=0, want=True, host=True):
        return PrefillChunk(ids=torch.zeros(n, dtype=torch.long), positions=torch.zeros(3, n, dtype=torch.long),
                            start=start, pages=torch.zeros(1), want_logits=want, pages_host=[1] if host else None)

    takes = r._pg.takes
    assert takes(chunk(100)) and takes(chunk(511))
    assert not takes(chunk(512))                        # no sink row left in the largest bucket
    assert not takes(chunk(10, start=64))               # a continuation: eager
    assert not takes(chunk(10, want=False))             # a first chunk of a longer prompt: eager
    assert not takes(chunk(10, host=False))
    with pytest.raises(ValueError):
        r.setup_prefill_graphs(100)


def test_mixed_prefill_step_replays_whole_prompts(model_dir):  # noqa: F811
    """One prefill step with whole prompts (two in one bucket, one in the next), a continuation
    and the first chunk of a longer prompt: the whole prompts replay graphs, the other two run
    packed eagerly, and logits (in chunk order) and K/V equal an all-eager step's."""
    r = _runner(model_dir)
    g = torch.Generator().manual_seed(7)

    def chunk(n, start=0, want=True, pages=None):
        pages = pages or r.kv.allocate(r.kv.pages_for(start + n + 8))
        return PrefillChunk(ids=torch.randint(100, 5000, (n,), generator=g),
                            positions=torch.arange(start, start + n).view(1, -1).expand(3, -1).contiguous(),
                            start=start, pages=torch.tensor(pages, device=r.device), want_logits=want,
                            pages_host=pages), pages

    pb = r.kv.allocate(r.kv.pages_for(80))
    (b0, _), (a, pa), (c, pc), (d, _), (e, pe) = chunk(40, want=False, pages=pb), chunk(50), chunk(90), \
        chunk(64, want=False), chunk(300)
    b1, _ = chunk(30, start=40, pages=pb)
    step = [a, b1, c, d, e]

    def kv_rows(pages, n):
        idx = torch.tensor([pages[t // r.page_size] for t in range(n)])
        off = torch.tensor([t % r.page_size for t in range(n)])
        return r.kv.k[:, idx, :, off].clone()

    r.prefill([b0])
    want = r.prefill(step).clone()
    k_want = [kv_rows(p, n) for p, n in ((pa, 50), (pb, 70), (pc, 90), (pe, 300))]
    r.kv.k.zero_()
    r.kv.v.zero_()
    r.setup_prefill_graphs(512)
    r.prefill([b0])                                      # a first chunk only: eager
    assert r._pg.replays == 0
    got = r.prefill(step)
    assert r._pg.replays == 3 and got.shape == want.shape == (4, r.vocab)
    _assert_close(got, want, 1e-4)
    for k, (p, n) in zip(k_want, ((pa, 50), (pb, 70), (pc, 90), (pe, 300))):
        _assert_close(kv_rows(p, n), k, 1e-4)
    assert r._pg.bucket_for(50) == r._pg.bucket_for(90) != r._pg.bucket_for(300)


def test_engine_with_prefill_graphs_matches_hf(model_dir, hf_model):  # noqa: F811
    """Text and image requests through the engine with padded prefills, first staggered, then
    arriving together (several whole prompts per prefill step): greedy tokens equal HF generate's,
    graphs served more prompts than there were steps, and no prompt was cut to fill a step's
    budget (both pieces would have run eagerly): every pass replayed a graph."""
    rng = np.random.default_rng(21)
    reqs = [_request(i, rng, i % 3, 10) for i in range(6)]
    burst = [_request(10 + i, rng, i % 3, 10) for i in range(8)]

    async def scenario(engine):
        import asyncio
        res = await asyncio.gather(*[_collect(engine, r, 0.15 * i) for i, r in enumerate(reqs)])
        steps = engine.stats()["prefill_steps"]
        res += await asyncio.gather(*[_collect(engine, r) for r in burst])
        await asyncio.sleep(0.2)    # the engine thread past its last step (its timers then agree)
        return res, engine.stats(), engine.health(), steps

    res, stats, health, steps = _run(
        _config(model_dir, max_prefill_tokens=256, prefill_graph_tokens=256, max_num_seqs=8), scenario)
    assert health["prefill_graph_buckets"] == 1
    assert stats["prefill_graph_replays"] >= 3
    assert stats["prefill_steps"] - steps < len(burst)          # several prompts in one step
    assert stats["prefill_eager_passes"] == 0 and stats["prefill_eager_tokens"] == 0
    assert stats["prefill_graph_replays"] == len(reqs) + len(burst)
    assert stats["host_step_s_total"] >= stats["host_wait_s_total"] > 0
    # the loop's own timers: its turns hold the steps, the idle waits and the rest
    assert stats["host_loop_s_total"] >= stats["host_step_s_total"] + stats["host_idle_s_total"] > 0
    assert 0 < stats["host_emit_s_total"] < stats["host_step_s_total"]
    assert stats["host_inbox_s_total"] > 0 and stats["host_tick_s_total"] == 0   # in-process: no tick
    for req, (toks, _, _) in zip(reqs + burst, res):
        _assert_greedy(hf_model, req, toks)


def test_prefill_graph_step_sets_the_buckets(model_dir, hf_model):  # noqa: F811
    """engine.prefill_graph_step 64: buckets of 64 tokens up to prefill_graph_tokens; prompts of
    different sizes replay different buckets and greedy tokens equal HF generate's."""
    import asyncio
    rng = np.random.default_rng(22)
    reqs = [_request(0, rng, 0, 6)] + [_image_request(1 + i, rng, [n], 6) for i, n in enumerate((8, 16, 24))]
    with pytest.raises(ValueError):
        _config(model_dir, prefill_graph_step=100)

    async def scenario(engine):
        res = await asyncio.gather(*[_collect(engine, r, 0.1 * i) for i, r in enumerate(reqs)])
        return res, engine.health(), engine.stats()

    res, health, stats = _run(_config(model_dir, max_prefill_tokens=256, prefill_graph_tokens=256,
                               prefill_graph_step=64), scenario)
    assert health["prefill_graph_buckets"] == 4 and stats["prefill_graph_replays"] == len(reqs)
    assert len({(len(r.prompt_token_ids) // 64) for r in reqs}) == 3     # prompts in three buckets
    for req, (toks, _, _) in zip(reqs, res):
        _assert_greedy(hf_model, req, toks)


def test_prefill_graph_capture_failure_leaves_prefill_eager(model_dir, hf_model, monkeypatch):  # noqa: F811
    """Capturing the prefill graphs at start-up raises (out of memory, say): the engine starts
    anyway, says so in its health info, and serves with eager prefill."""
    def boom(self, max_tokens, step=256):
        raise torch.OutOfMemoryError("CUDA out of memory (test)")

    monkeypatch.setattr(ModelRunner, "setup_prefill_graphs", boom)
    rng = np.random.default_rng(3)
    req = _request(0, rng, 1, 6)

    async def scenario(engine):
        return await _collect(engine, req), engine.stats(), engine.health()

    (toks, _, _), stats, health = _run(_config(model_dir, max_prefill_tokens=256, prefill_graph_tokens=256),
                                       scenario)
    assert health["prefill_graph_buckets"] == 0 and "out of memory" in health["prefill_graph_error"]
    assert stats["prefill_graph_replays"] == 0
    _assert_greedy(hf_model, req, toks)


def test_vision_graphs_per_recurring_grid(model_dir):  # noqa: F811
    """A grid seen twice is queued, captured when idle, then served by its graph: embeddings equal
    the eager tower's, two images of one grid in one call do not share outputs, other grids and
    grids above the size limit stay eager."""
    r = _runner(model_dir)
    rng = np.random.default_rng(4)
    a1, a2, a3, b = _image(rng, 4, 6), _image(rng, 4, 6), _image(rng, 4, 6), _image(rng, 8, 8)
    big = _image(rng, 8, 10)

    def eager(ims):
        return r.encode_images([im.pixel_values for im in ims], [im.grid_thw for im in ims])

    want = eager([a1, a2, b, big])
    r.setup_vision_graphs(max_grids=4, max_patches=64)
    eager([a1])
    eager([big])
    eager([big])
    assert not r._vg.pending and not r.capture_pending_vision_graph()   # a1 seen once; big too big
    eager([a3, b])
    assert list(r._vg.pending) == [(1, 4, 6)]             # seen twice; big (80 patches) never
    assert r.capture_pending_vision_graph() and not r.capture_pending_vision_graph()
    if DEVICE == "cuda":
        from serve_app.engine._private.attention import capturable_impls
        assert r._vg.attn_impl == capturable_impls(r.dtype, r.vision_attn_impl)[0]
        print("vision graphs: start-up pick", r.vision_attn_impl, "captured with", r._vg.attn_impl)
    got = eager([a1, b, a2, big])
    assert r._vg.replays == 2
    for (e, d), (we, wd) in zip([got[0], got[2], got[1], got[3]], want):
        _assert_close(e, we, 1e-5)
        for x, y in zip(d, wd):
            _assert_close(x, y, 1e-5)
    assert got[0][0].data_ptr() != got[2][0].data_ptr()
    c1, c2 = _image(rng, 2, 4), _image(rng, 2, 4)
    eager([c1])
    eager([c2])
    assert list(r._vg.pending) == [(1, 8, 8), (1, 2, 4)]   # b's second sighting was in `got`
    assert not r.capture_pending_vision_graph(busy=True)    # busy: one capture per second
    assert r.capture_pending_vision_graph() and r._vg.has((1, 8, 8))   # idle: at once, in order
    assert not r.capture_pending_vision_graph(busy=True)


def test_vision_graph_capture_failure_leaves_the_grid_eager(model_dir, monkeypatch):  # noqa: F811
    """A capture that raises (out of memory, say) costs that grid its graph, not the engine: the
    grid is never queued again and its images keep the eager tower's embeddings."""
    r = _runner(model_dir)
    rng = np.random.default_rng(5)
    a1, a2 = _image(rng, 4, 6), _image(rng, 4, 6)
    r.setup_vision_graphs(max_grids=4, max_patches=64)

    def eager(ims):
        return r.encode_images([im.pixel_values for im in ims], [im.grid_thw for im in ims])

    want = eager([a1])
    eager([a2])
    assert list(r._vg.pending) == [(1, 4, 6)]

    def boom(grid):
        raise torch.OutOfMemoryError("CUDA out of memory (test)")

    monkeypatch.setattr(r.vision, "_grid_tables", boom, raising=False)
    assert not r.capture_pending_vision_graph()
    monkeypatch.undo()
    assert r._vg.failed == {(1, 4, 6)} and not r._vg.has((1, 4, 6))
    got = eager([a1])
    eager([a2])
    assert not r._vg.pending and r._vg.replays == 0
    _assert_close(got[0][0], want[0][0], 1e-5)


def test_engine_with_vision_graphs_matches_hf(model_dir, hf_model):  # noqa: F811
    """Requests with a recurring image size: after an idle moment the tower runs as a graph for
    them, and greedy tokens still equal HF generate's."""
    import asyncio
    rng = np.random.default_rng(8)
    first = [_image_request(i, rng, [6], 6) for i in range(2)]
    later = [_image_request(10 + i, rng, [6], 6) for i in range(2)]

    async def scenario(engine):
        res = [await _collect(engine, r) for r in first]
        for _ in range(100):                                  # idle: the engine captures
            if engine.stats()["vision_graphs"]:
                break
            await asyncio.sleep(0.05)
        res += await asyncio.gather(*[_collect(engine, r) for r in later])
        return res, engine.stats()

    res, stats = _run(_config(model_dir, vision_graph_grids=2), scenario)
    assert stats["vision_graphs"] == 1 and stats["vision_graph_replays"] == 2
    for req, (toks, _, _) in zip(first + later, res):
        _assert_greedy(hf_model, req, toks)


def test_graph_captures_pin_cudnn_then_flash():
    """Captures try cuDNN (no plan gate: the warm-up builds it) where start-up picked cuDNN,
    then flash; fp32 gets plain SDPA. A failed try falls through to the next, the attention
    setting is restored either way, and if all fail the last error is raised."""
    from serve_app.engine._private.attention import capturable_impls, capture_pinned
    assert capturable_impls(torch.bfloat16, "cudnn") == ["cudnn_ungated", "flash"]
    assert capturable_impls(torch.float16, "flash") == ["flash"]
    assert capturable_impls(torch.float32, "cudnn") == ["sdpa"]

    class Owner:
        attn = "cudnn"

    o, seen = Owner(), []

    def cudnn_fails():
        seen.append(o.attn)
        if o.attn == "cudnn_ungated":
            raise RuntimeError("cuDNN declined the capture (test)")
        return "graphs"

    assert capture_pinned(o, "attn", torch.bfloat16, cudnn_fails) == ("graphs", "flash")
    assert seen == ["cudnn_ungated", "flash"] and o.attn == "cudnn"

    def all_fail():
        raise torch.OutOfMemoryError(f"out of memory with {o.attn} (test)")

    with pytest.raises(torch.OutOfMemoryError, match="with flash"):
        capture_pinned(o, "attn", torch.bfloat16, all_fail)
    assert o.attn == "cudnn"


def test_packed_attention_cudnn_ungated_is_cudnn_without_the_plan_gate(monkeypatch):
    """``cudnn_ungated`` calls cuDNN even for a shape without a plan (a capture's warm-up builds
    it), where gated ``cudnn`` runs flash and queues the plan."""
    from serve_app.engine._private import attention
    used = []
    monkeypatch.setattr(attention, "_sdpa", lambda use, *a: (used.append(use), a[0])[1])
    q = torch.randn(6, 4, 8)
    lens = [3, 3]
    attention.packed_attention(q, q, q, lens, False, 0.3, "cudnn")
    attention.packed_attention(q, q, q, lens, False, 0.3, "cudnn_ungated")
    assert used == ["flash", "cudnn"]
