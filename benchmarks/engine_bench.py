"""Benchmark of the continuous engine next to naive HF ``generate`` (GPU, bf16), one process.

Measures what issue 3 asks for: decode-step ms at batch 1/8/32/64 (~1.1k-token contexts) next to
the floor (weight bytes / HBM bandwidth); requests/s, tokens/s and TTFT for N concurrent requests
(one 1280x720 image, 128 output tokens each) next to naive HF ``generate`` on the same requests;
prefill tokens/s when 1, 4 and 16 requests arrive together. Also a GPU correctness spot check:
the Triton decode attention against the torch reference, and greedy tokens against HF.

    python benchmarks/engine_bench.py --model /tmp/m --out benchmarks/out/engine
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import gc
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._decode_rows import row_lengths  # noqa: E402
from benchmarks._host import host_speed  # noqa: E402
from serve_app.engine._private.fp8 import Fp8Weight  # noqa: E402
from serve_app.engine.config import EngineConfig  # noqa: E402
from serve_app.engine.continuous import ContinuousEngine  # noqa: E402
from serve_app.engine.protocol import EngineRequest, ImageInput, SamplingParams  # noqa: E402

IMG, VS, VE = 151655, 151652, 151653
# the Qwen chat template around a user turn: system/user header ... end of turn, assistant header
CHAT_HEAD, CHAT_TAIL = [151644, 872, 198], [151645, 198, 151644, 77091, 198]
GRID = (1, 46, 80)          # a 1280x720 image after Qwen's resize to multiples of 32 (1280x736)
HBM_BYTES_PER_S = 3.35e12   # H100 SXM datasheet


PIXELS = {"format": "uint8"}   # what Preprocess ships (compact uint8 patches); --pixels float32


def make_request(i: int, rng: np.random.Generator, max_tokens: int, greedy: bool = True) -> EngineRequest:
    t, h, w = GRID
    px = (rng.integers(0, 256, size=(t * h * w, 3, 16, 16), dtype=np.uint8) if PIXELS["format"] == "uint8"
          else rng.standard_normal((t * h * w, 1536)).astype(np.float32))
    im = ImageInput(px, GRID, f"bench-{i}-{rng.integers(1 << 40)}")
    # chat-template shape: system/user header, the image, a question, the assistant header
    tail = [int(x) for x in rng.integers(1000, 30000, size=6)] + CHAT_TAIL
    ids = CHAT_HEAD + [VS] + [IMG] * im.num_tokens() + [VE] + tail
    sp = SamplingParams(max_tokens=max_tokens, temperature=0.0 if greedy else 0.7, ignore_eos=True)
    return EngineRequest(f"bench-{i}", ids, [im], sp)


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


# ------------------------------------------------------------------------------ HF baseline
def hf_baseline(path: str, n: int, out_tokens: int, check_tokens: int) -> dict:
    from serve_app.models import load_model

    model = load_model(path, dtype=torch.bfloat16, device="cuda")
    rng = np.random.default_rng(123)
    reqs = [make_request(i, rng, out_tokens) for i in range(n)]

    def inputs(req):
        ids = torch.tensor([req.prompt_token_ids], device="cuda")
        return dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                    pixel_values=torch.from_numpy(req.images[0].float_pixels()).to("cuda", torch.bfloat16),
                    image_grid_thw=torch.tensor([req.images[0].grid_thw], device="cuda"),
                    mm_token_type_ids=(ids == IMG).int())

    greedy = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    with torch.inference_mode():
        model.generate(**inputs(reqs[0]), max_new_tokens=4, min_new_tokens=4, **greedy)   # warm-up
        torch.cuda.synchronize()
        ttft = []
        for r in reqs[:2]:
            t0 = time.perf_counter()
            model.generate(**inputs(r), max_new_tokens=1, min_new_tokens=1, **greedy)
            torch.cuda.synchronize()
            ttft.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for r in reqs:
            model.generate(**inputs(r), max_new_tokens=out_tokens, min_new_tokens=out_tokens, **greedy)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        ref = model.generate(**inputs(reqs[0]), max_new_tokens=check_tokens, min_new_tokens=check_tokens,
                             **greedy)[0, len(reqs[0].prompt_token_ids):].tolist()
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"requests": n, "wall_s": wall, "req_per_s": n / wall, "tok_per_s": n * out_tokens / wall,
            "ms_per_token": 1000 * wall / (n * out_tokens), "ttft_s_mean": statistics.mean(ttft),
            "check_request": reqs[0], "check_tokens": ref}


# --------------------------------------------------------------------------------- checks
def _fill_random(cache: torch.Tensor, layer: int, pages: torch.Tensor, g=None) -> None:
    """Random 16-bit rows into ``pages`` of one layer, stored as the cache stores them (an FP8
    cache: clamped e4m3, written through its bytes: randn and indexing have no float8 kernels)."""
    from serve_app.engine._private.attention import _bytes, to_cache_dtype
    x = torch.randn(len(pages), *cache.shape[2:], generator=g, device=cache.device, dtype=torch.bfloat16)
    _bytes(cache[layer])[pages] = _bytes(to_cache_dtype(x, cache.dtype))


def attention_check(runner) -> dict:
    """Triton split-K decode attention vs the torch reference, fresh random data."""
    from serve_app.engine._private.attention import decode_attention_torch, decode_attention_triton
    kv = runner.kv
    g = torch.Generator(device="cuda").manual_seed(1)
    lens = [1, 17, 300, 1100, 2049]
    pages_needed = [-(-n // runner.page_size) for n in lens]
    pages = kv.allocate(sum(pages_needed))
    idx = torch.tensor(pages, device="cuda")
    _fill_random(kv.k, 0, idx, g)
    _fill_random(kv.v, 0, idx, g)
    rows, o = [], 0
    bt = torch.zeros(len(lens), runner.max_pages, dtype=torch.int32, device="cuda")
    for i, n in enumerate(pages_needed):
        rows.append(idx[o:o + n])
        bt[i, :n] = idx[o:o + n].int()
        o += n
    q = torch.randn(len(lens), runner.num_heads, runner.head_dim, generator=g, device="cuda", dtype=torch.bfloat16)
    ref = decode_attention_torch(q.float(), kv.k[0].float(), kv.v[0].float(), rows, lens, runner.scale)
    out = {}
    for splits in (1, 4, 16):
        got = decode_attention_triton(q, kv.k[0], kv.v[0], bt, torch.tensor(lens, dtype=torch.int32, device="cuda"),
                                      runner.scale, splits, runner.page_size).float()
        out[f"splits_{splits}_rel_err"] = float((got - ref).norm() / ref.norm())
    kv.release(pages)
    return out


def decode_microbench(runner, batches: list[int], context: int, iters: int = 50, mixed: bool = False) -> dict:
    """Model step (inputs copy + graph replay) at fixed ~context-token rows, median of ``iters``.
    ``mixed``: rows of 0.25x-2x ``context`` tokens on pages scattered over the cache, as the
    app's (the graphs' split-K attention is set by the longest row)."""
    kv = runner.kv
    res = {}
    for b in batches:
        if b > runner.max_num_seqs:
            continue
        ctx = row_lengths(b, context, mixed)
        need = [-(-(n + 1) // runner.page_size) for n in ctx]
        if sum(need) > kv.free_pages:
            res[b] = {"skipped": f"KV holds {kv.free_pages * runner.page_size} tokens < {sum(ctx)}"}
            print(f"decode batch {b}: {res[b]['skipped']}", flush=True)
            continue
        pool = kv.allocate(sum(need))
        if pool is None:
            raise RuntimeError("KV too small for the decode micro-benchmark")
        if mixed:
            pool = [pool[i] for i in torch.randperm(len(pool), generator=torch.Generator().manual_seed(b))]
        all_pages, start = [], 0
        for s, n in enumerate(need):
            all_pages.append(pool[start:start + n])
            start += n
            runner.set_block_table(s, all_pages[-1])
        flat = torch.tensor(pool, device=kv.k.device)
        for layer in range(kv.k.shape[0]):  # never time over zeros
            _fill_random(kv.k, layer, flat)
            _fill_random(kv.v, layer, flat)
        ids = [1000 + s for s in range(b)]
        pos = [max(0, n - 50) for n in ctx]
        pg = [all_pages[s][n // runner.page_size] for s, n in enumerate(ctx)]
        off = [n % runner.page_size for n in ctx]
        lens = [n + 1 for n in ctx]
        slots = list(range(b))
        if b == 8:  # graph + fused kernels vs the plain torch path on the same state
            ref = runner.decode(ids, pos, pg, off, lens, slots, reference=True)
            got = runner.decode(ids, pos, pg, off, lens, slots)
            res["fused_vs_reference"] = {
                "logits_rel_err": float((got - ref).norm() / ref.norm()),
                "argmax_agree": float((got.argmax(-1) == ref.argmax(-1)).float().mean())}
            print("fused vs reference:", res["fused_vs_reference"], flush=True)
        times = []
        for i in range(iters + 5):
            st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            st.record()
            runner.decode(ids, pos, pg, off, lens, slots)
            en.record()
            torch.cuda.synchronize()
            if i >= 5:
                times.append(st.elapsed_time(en))
        kv.release(pool)
        res[b] = {"ms_median": statistics.median(times), "ms_min": min(times),
                  "kv_bytes": sum(ctx) * runner.kv_bytes_per_token(), "max_context": max(ctx)}
        print(f"decode batch {b}: {res[b]['ms_median']:.2f} ms", flush=True)
    return res


def sampler_microbench(batches: list[int], vocab: int, iters: int = 30) -> dict:
    """Per-row sampling (temperature 0.7, top-p 0.95, the load workload's) over the full vocabulary:
    the torch path (sort + int64 Gumbel hash) vs the Triton kernel, and how often they agree."""
    from serve_app.engine._private.sampler import SamplingBatch, _sample_cuda, sample_torch

    res = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    for b in batches:
        row = {}
        for spread in (2.0, 8.0):         # flat (random weights) and peaked (trained-model-like) logits
            logits = torch.randn(b, vocab, device="cuda", generator=g) * spread
            batch = SamplingBatch(torch.full((b,), 0.7, device="cuda"), torch.full((b,), 0.95, device="cuda"),
                                  torch.zeros(b, dtype=torch.int64, device="cuda"), torch.ones(b, device="cuda"),
                                  torch.arange(b, device="cuda") + 11, torch.full((b,), 5, device="cuda"),
                                  None, all_greedy=False, any_top=True, any_penalty=False, top_k_max=0)
            def sort_path(lg, bt):
                return sample_torch(lg, bt, sort_nucleus=True)

            agree = float((sort_path(logits, batch) == _sample_cuda(logits, batch)).float().mean())
            times = {}
            for name, fn in (("torch", sort_path), ("triton", _sample_cuda)):
                ts = []
                for i in range(iters + 3):
                    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    st.record()
                    fn(logits, batch)
                    en.record()
                    torch.cuda.synchronize()
                    if i >= 3:
                        ts.append(st.elapsed_time(en))
                times[name] = statistics.median(ts)
            row[f"spread_{spread:g}"] = {"torch_ms": times["torch"], "triton_ms": times["triton"],
                                         "agree": agree}
        res[b] = row
        print(f"sampling batch {b}: {row}", flush=True)
    return res


def profile_prefill(runner, rng, n: int = 4) -> dict:
    """Where prefill time goes (one step of n requests, synchronised): HF's vision module + plain
    torch LM layers (the previous path) vs our vision tower + fused LM layers; bf16 agreement of
    the two vision towers; attention implementations; the top CUDA kernels of the new path."""
    from torch.profiler import ProfilerActivity, profile

    from serve_app.engine._private.attention import pick_packed_impl
    from serve_app.engine._private.runner import PrefillChunk
    reqs = [make_request(9000 + i, rng, 1) for i in range(n)]
    pix = [r.images[0].pixel_values for r in reqs]
    grids = [r.images[0].grid_thw for r in reqs]
    kv = runner.kv

    def run(encode, fused: bool):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        feats = encode(pix, grids)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        chunks, pages = [], []
        for r, (emb, deep) in zip(reqs, feats):
            ids = torch.tensor(r.prompt_token_ids)
            pg = kv.allocate(kv.pages_for(len(ids)))
            pages.append(pg)
            vis = torch.nonzero(ids == IMG).flatten()
            chunks.append(PrefillChunk(ids=ids, positions=torch.arange(len(ids)).view(1, -1).expand(3, -1),
                                       start=0, pages=torch.tensor(pg, device="cuda"), vis_local=vis,
                                       vis_embeds=emb, deepstack=deep, want_logits=True))
        runner.fused_prefill = fused
        logits = runner.prefill(chunks)
        runner.fused_prefill = True
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        for pg in pages:
            kv.release(pg)
        return t1 - t0, t2 - t1, logits

    toks = sum(len(r.prompt_token_ids) for r in reqs)
    out = {"requests": n, "tokens": toks, "attn_impl": {"vision": runner.vision_attn_impl,
                                                        "prefill": runner.prefill_attn_impl},
           "attn_autotune_ms": runner.attn_timings}
    for name, enc, fused in (("previous", runner.encode_images_hf, False), ("new", runner.encode_images, True)):
        run(enc, fused)
        best = min((run(enc, fused) for _ in range(3)), key=lambda x: x[0] + x[1])
        out[name] = {"vision_s": best[0], "lm_s": best[1], "tok_per_s_model_only": toks / (best[0] + best[1])}
        print("prefill profile", name, out[name], flush=True)
    a = runner.encode_images(pix, grids)
    b = runner.encode_images_hf(pix, grids)
    rel = lambda x, y: ((x.float() - y.float()).norm() / y.float().norm()).item()  # noqa: E731
    out["vision_bf16_rel_err"] = max(max(rel(x[0], y[0]), *(rel(p, q) for p, q in zip(x[1], y[1])))
                                     for x, y in zip(a, b))
    _, _, la = run(runner.encode_images, True)
    _, _, lb = run(runner.encode_images_hf, False)
    out["logits_new_vs_previous"] = {"rel_err": rel(la, lb),
                                     "argmax_agree": (la.argmax(-1) == lb.argmax(-1)).float().mean().item()}
    vc = runner.model.config.vision_config
    _, out["vision_attn_ms_4x3680"] = pick_packed_impl(
        runner.device, vc.num_heads, vc.num_heads, vc.hidden_size // vc.num_heads, [3680] * 4, False,
        runner.dtype, candidates=("sdpa", "flash", "cudnn", "varlen"))
    _, out["prefill_attn_ms_4x936"] = pick_packed_impl(
        runner.device, runner.num_heads, runner.num_kv_heads, runner.head_dim, [936] * 4, True,
        runner.dtype, candidates=("sdpa", "flash", "cudnn", "varlen"))
    print("prefill profile:", out, flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run(runner.encode_images, True)
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70),
          flush=True)
    return out


def lm_weight_bytes(runner) -> int:
    """Bytes a decode step must read: every LM weight once (the embedding only for B rows)."""
    n = 0
    def size(t) -> int:       # FP8 weights: e4m3 values plus their per-channel scales
        if isinstance(t, Fp8Weight):
            return size(t.q) + size(t.scale)
        return t.numel() * t.element_size()

    for w in runner.w:
        n += sum(size(t) for t in w.values())
    n += runner.lm_head.weight.numel() * runner.lm_head.weight.element_size()
    n += runner.final_norm.numel() * runner.final_norm.element_size()
    return n


# -------------------------------------------------------------------------------- engine runs
async def wait_plans_built(engine, timeout: float = 10.0) -> None:
    """Until the engine has built every queued cuDNN attention plan (it does so when idle)."""
    t0 = time.perf_counter()
    while engine.stats().get("attn_plans_pending", 0) and time.perf_counter() - t0 < timeout:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.05)


async def run_requests(engine, reqs: list[EngineRequest]) -> dict:
    t0 = time.perf_counter()
    ttft, done_at, ntoks = [], [], 0

    async def one(r):
        nonlocal ntoks
        first = None
        async for d in engine.generate(r):
            if first is None:
                first = time.perf_counter() - t0
            ntoks += len(d.token_ids)
        ttft.append(first)
        done_at.append(time.perf_counter() - t0)

    await asyncio.gather(*[one(r) for r in reqs])
    wall = time.perf_counter() - t0
    return {"requests": len(reqs), "wall_s": wall, "req_per_s": len(reqs) / wall,
            "tok_per_s": ntoks / wall, "ttft_s_mean": statistics.mean(ttft), "ttft_s_p50": pct(ttft, 50),
            "ttft_s_p90": pct(ttft, 90), "ttft_s_max": max(ttft), "output_tokens": ntoks}


async def bench_engine(args, hf: dict | None) -> dict:
    kw = dict(model=args.model, engine="continuous", device="cuda", dtype="bfloat16",
              max_gpu_memory_gb=args.max_gpu_memory_gb, max_num_seqs=args.max_num_seqs,
              max_model_len=args.max_model_len, max_prefill_tokens=args.max_prefill_tokens,
              quantization=args.quantization)
    cfg = EngineConfig(**{**kw, **json.loads(args.engine_json or "{}")})
    engine = ContinuousEngine(cfg)
    t0 = time.perf_counter()
    await engine.start()
    out = {"startup_s": time.perf_counter() - t0, "health": engine.health(), "config": cfg.model_dump()}
    runner = engine._sched.runner
    print("engine up:", json.dumps(out["health"]), flush=True)
    out["attention_check"] = attention_check(runner)
    print("attention check:", out["attention_check"], flush=True)
    if hf is not None:
        req = hf["check_request"]
        req.request_id = "check"
        req.sampling.max_tokens = len(hf["check_tokens"])
        got = []
        async for d in engine.generate(req):
            got += d.token_ids
        same = next((i for i, (a, b) in enumerate(zip(got, hf["check_tokens"])) if a != b), len(got))
        out["greedy_vs_hf"] = {"tokens": len(got), "matching_prefix": same}
        print("greedy vs HF:", out["greedy_vs_hf"], got[:12], hf["check_tokens"][:12], flush=True)
    if args.profile_prefill:
        out["prefill_profile"] = profile_prefill(runner, np.random.default_rng(3))
    wbytes = lm_weight_bytes(runner)
    out["decode"] = decode_microbench(runner, args.decode_batches, args.context, mixed=args.mixed_context)
    fused_check = out["decode"].pop("fused_vs_reference", None)
    if fused_check:
        out["fused_vs_reference"] = fused_check
    for b, r in out["decode"].items():
        if "skipped" in r:
            continue
        r["floor_weights_ms"] = 1000 * wbytes / HBM_BYTES_PER_S
        r["floor_weights_kv_ms"] = 1000 * (wbytes + r["kv_bytes"]) / HBM_BYTES_PER_S
    out["lm_weight_gb"] = wbytes / 1e9
    if runner.fp8_timings:    # the decode kernel picks and their timings (us), per projection@rows
        out["fp8_decode_timings"] = runner.fp8_timings
    rng = np.random.default_rng(7)
    # warm-up the full path (vision, prefill shapes, sampling)
    await run_requests(engine, [make_request(1000 + i, rng, 8) for i in range(4)])
    out["sampling"] = sampler_microbench(args.decode_batches, runner.vocab)
    for key, greedy in (("throughput", True), ("throughput_sampled", False)):
        if key == "throughput_sampled" and not args.sampled:
            continue
        s0 = engine.stats()
        out[key] = await run_requests(engine, [make_request(i, rng, args.output_tokens, greedy)
                                               for i in range(args.requests)])
        s1 = engine.stats()
        print(f"{key}:", {k: v for k, v in out[key].items()}, s1, flush=True)
        steps = s1["decode_steps"] - s0["decode_steps"]
        out[key]["engine_decode_steps"] = steps
        # GPU time per decode step (CUDA events), sampling included
        out[key]["engine_decode_ms_per_step"] = 1000 * (s1["decode_s_total"] - s0["decode_s_total"]) / max(1, steps)
        out[key]["stats_after"] = s1
    out["prefill"] = {}
    for n in args.prefill_counts:
        # Steady state: a first, untimed round of the same shapes lets the engine build their
        # cuDNN plans while idle; each timed round starts once no build is pending, so that no
        # request lands during an idle-time build (a service sees its common shapes again and again).
        await run_requests(engine, [make_request(5000 + i, rng, 1) for i in range(n)])
        rates = []
        for _ in range(3):
            await wait_plans_built(engine)
            reqs = [make_request(5000 + i, rng, 1) for i in range(n)]
            r = await run_requests(engine, reqs)
            toks = sum(len(x.prompt_token_ids) for x in reqs)
            rates.append((toks / r["wall_s"], r["wall_s"]))
        best = max(rates)
        out["prefill"][n] = {"requests": n, "prompt_tokens": toks, "wall_s": best[1], "prompt_tok_per_s": best[0],
                             "prompt_tok_per_s_median": statistics.median(x[0] for x in rates),
                             "rounds": len(rates)}
        print("prefill:", out["prefill"][n], flush=True)
    await engine.shutdown()
    return out


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"Machine: {m['gpu']}, torch {m['torch']}, {m['date']}; host CPU {m.get('cpu_model')}, "
             f"Python loop {m.get('python_loop_3m_s')} s", "",
             f"Command: `{m['command']}`", ""]
    e = res["engine"]
    h = e["health"]
    lines += [f"Engine: dtype {h.get('dtype')}, budget {h.get('budget_gib')} GiB (weights "
              f"{h.get('weights_gib')} GiB, activation peak {h.get('activation_peak_gib')} GiB, KV "
              f"{h.get('kv_gib')} GiB = {h.get('kv_tokens')} tokens), start-up {e['startup_s']:.1f} s "
              f"(graph capture {h.get('graph_capture_s')} s)", ""]
    lines += ["| decode batch | step ms (median) | floor ms (weights) | floor ms (weights + KV) |",
              "| --- | --- | --- | --- |"]
    for b, r in e["decode"].items():
        if "skipped" in r:
            lines.append(f"| {b} | skipped: {r['skipped']} | | |")
            continue
        lines.append(f"| {b} | {r['ms_median']:.2f} | {r['floor_weights_ms']:.2f} | {r['floor_weights_kv_ms']:.2f} |")
    t = e["throughput"]
    lines += ["", "| run | requests | req/s | output tok/s | TTFT mean s | TTFT p90 s |", "| --- | --- | --- | --- | --- | --- |"]
    if res.get("hf"):
        hf = res["hf"]
        lines.append(f"| naive HF generate (sequential) | {hf['requests']} | {hf['req_per_s']:.3f} | "
                     f"{hf['tok_per_s']:.1f} | {hf['ttft_s_mean']:.3f} (alone) | - |")
    for key, label in (("throughput", "greedy"), ("throughput_sampled", "temperature 0.7")):
        if key in e:
            t2 = e[key]
            lines.append(f"| continuous engine, {label} (decode {t2['engine_decode_ms_per_step']:.2f} ms/step "
                         f"GPU) | {t2['requests']} | {t2['req_per_s']:.2f} | {t2['tok_per_s']:.0f} | "
                         f"{t2['ttft_s_mean']:.2f} | {t2['ttft_s_p90']:.2f} |")
    if res.get("hf"):
        lines.append(f"\nSpeed-up in requests/s over naive HF: {t['req_per_s'] / res['hf']['req_per_s']:.1f}x")
    if e.get("sampling"):
        lines += ["", "| sampling batch (V=151,936, T 0.7, top-p 0.95) | logits spread | torch sort path ms | "
                  "Triton kernel ms | same token |", "| --- | --- | --- | --- | --- |"]
        for b, row in e["sampling"].items():
            for spread, r in row.items():
                lines.append(f"| {b} | {spread} | {r['torch_ms']:.3f} | {r['triton_ms']:.3f} | {r['agree']:.3f} |")
    lines += ["", "| requests arriving together | prompt tokens | prefill tok/s (best of rounds) | median |",
              "| --- | --- | --- | --- |"]
    for n, p in e["prefill"].items():
        med = p.get("prompt_tok_per_s_median")
        lines.append(f"| {n} | {p['prompt_tokens']} | {p['prompt_tok_per_s']:.0f} | "
                     f"{'-' if med is None else f'{med:.0f}'} |")
    if "prefill_profile" in e:
        pp = e["prefill_profile"]
        pv, nw = pp["previous"], pp["new"]
        lines += ["", f"Prefill breakdown ({pp['requests']} requests, {pp['tokens']} tokens, one step, "
                  f"synchronised): previous path (HF vision module, plain torch LM layers) vision "
                  f"{1000 * pv['vision_s']:.0f} ms + LM {1000 * pv['lm_s']:.0f} ms "
                  f"({pv['tok_per_s_model_only']:.0f} tok/s); new path vision {1000 * nw['vision_s']:.0f} ms + "
                  f"LM {1000 * nw['lm_s']:.0f} ms ({nw['tok_per_s_model_only']:.0f} tok/s). Attention: "
                  f"{pp['attn_impl']}. New vs HF vision tower in bf16: rel. error "
                  f"{pp['vision_bf16_rel_err']:.1e}; logits new vs previous path: rel. error "
                  f"{pp['logits_new_vs_previous']['rel_err']:.1e}, argmax agreement "
                  f"{pp['logits_new_vs_previous']['argmax_agree']:.2f}."]
    lines += ["", "Checks: Triton decode attention rel. error vs fp32 torch: "
              + ", ".join(f"{k} {v:.1e}" for k, v in e["attention_check"].items())]
    if "fused_vs_reference" in e:
        f = e["fused_vs_reference"]
        lines.append(f"; graph decode (fused kernels) vs plain torch decode at batch 8: logits rel. error "
                     f"{f['logits_rel_err']:.1e}, argmax agreement {f['argmax_agree']:.2f}")
    if "greedy_vs_hf" in e:
        g = e["greedy_vs_hf"]
        lines.append(f"; greedy bf16 tokens equal to HF generate for the first {g['matching_prefix']} of {g['tokens']}.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="builtin:qwen3-vl-4b-random")
    ap.add_argument("--out", default="benchmarks/out/engine")
    ap.add_argument("--max-gpu-memory-gb", type=float, default=24.0)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--max-prefill-tokens", type=int, default=8192)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--output-tokens", type=int, default=128)
    ap.add_argument("--hf-requests", type=int, default=3)
    ap.add_argument("--context", type=int, default=1100)
    ap.add_argument("--mixed-context", action="store_true",
                    help="decode rows of 0.25x-2x --context tokens on scattered pages, as the app's")
    ap.add_argument("--decode-batches", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32, 64])
    ap.add_argument("--prefill-counts", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16])
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--engine-json", default=None, metavar="JSON",
                    help='more engine settings, e.g. \'{"vision_cache_mb": 0}\'')
    ap.add_argument("--quantization", choices=["fp8"], default=None,
                    help="the engine's quantization (the HF baseline stays in bf16)")
    ap.add_argument("--sampled", action="store_true",
                    help="also run the concurrent requests with temperature 0.7 sampling")
    ap.add_argument("--profile-prefill", action="store_true")
    ap.add_argument("--pixels", choices=["uint8", "float32"], default="uint8",
                    help="image payload: Preprocess's compact uint8 patches or float32 pixel_values")
    args = ap.parse_args()
    PIXELS["format"] = args.pixels
    from serve_app.models import resolve_model
    args.model = resolve_model(args.model)
    res = {"meta": {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__,
                    "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                    "host": platform.node(), "command": " ".join(["python"] + sys.argv), **host_speed()}}
    hf = None
    if not args.skip_hf:
        hf = hf_baseline(args.model, args.hf_requests, args.output_tokens, check_tokens=32)
        print(f"HF generate: {hf['req_per_s']:.3f} req/s, {hf['ms_per_token']:.1f} ms/token", flush=True)
    res["engine"] = asyncio.run(bench_engine(args, hf))
    if hf is not None:
        res["hf"] = {k: v for k, v in hf.items() if k not in ("check_request", "check_tokens")}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "engine_bench.json").write_text(json.dumps(res, indent=2, default=str))
    md = markdown(res)
    (out / "engine_bench.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
