"""FP8 GEMMs at Qwen3-VL-4B's shapes on the GPU, and where a bf16 decode step's time goes.

    python benchmarks/fp8_probe.py gemm OUT.json             # bf16 cuBLAS vs cuBLASLt row-wise FP8, M 1..4096
    python benchmarks/fp8_probe.py decode OUT.json [8,16,32] # decode sizes: every FP8 kernel kind's best config
    python benchmarks/fp8_probe.py rows OUT.json             # the row kernels (norm, SiLU, quant) per num_warps
    python benchmarks/fp8_probe.py profile OUT.json MODEL [fp8]  # kernel times of one eager decode step
    python benchmarks/fp8_probe.py passes OUT.json MODEL [fp8|fp8+vision] [TOKENS] [GRIDS]  # ... of a prefill
        # pass (1250 tokens) and vision-tower calls (46x80,68x120 patches), by kernel kind

Times come from CUDA graphs of repeated calls (launch costs excluded, as in the captured decode
step). ``gemm`` loops over ONE weight, so weights that fit the GPU's L2 (an H200 has 50 MB) read
faster there than in a step; ``decode`` cycles through 12 layers' weights, as a step and the
engine's own start-up timing (``fp8_gemv.plan_decode``) read them. RESULTS.md quotes runs in
"GPU: FP8 decoder linears" and "GPU: FP8 decode kernels with swapped roles".
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_app.engine._private import fp8  # noqa: E402

LM = {"qkv": (6144, 2560), "o": (2560, 4096), "gu": (19456, 2560), "down": (2560, 9728),
      "lm_head": (151936, 2560)}
VISION = {"v_qkv": (3072, 1024), "v_fc1": (4096, 1024), "v_fc2": (1024, 4096)}


def gtime(fn, reps: int = 20) -> float:
    """us per call of ``fn`` from a CUDA graph of ``reps`` calls (the engine's own timer)."""
    from serve_app.engine._private.fp8_gemv import _graph_time_us
    return _graph_time_us([fn] * reps)


def gemm(out: str) -> None:
    from serve_app.engine._private import kernels as K

    rows = []
    for name, (n, k) in {**LM, **VISION}.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        wq = fp8.quantize_weight(w)
        for m in [1, 8, 16, 32, 64, 256, 1024, 4096]:
            if name == "lm_head" and m > 64:
                continue
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq = K.quantize_rows(x)
            t_bf = gtime(lambda: F.linear(x, w))
            t_mm = gtime(lambda: torch._scaled_mm(xq[0], wq.q.t(), scale_a=xq[1], scale_b=wq.scale,
                                                  out_dtype=torch.bfloat16))
            ref = F.linear(x, w).float()
            err = ((fp8.linear(x, wq, torch.bfloat16).float() - ref).norm() / ref.norm()).item()
            flop = 2 * m * n * k
            r = dict(name=name, M=m, N=n, K=k, bf16_us=round(t_bf, 2), fp8_mm_us=round(t_mm, 2),
                     quant_us=round(gtime(lambda: K.quantize_rows(x)), 2),
                     bf16_tflops=round(flop / t_bf / 1e6, 1), fp8_tflops=round(flop / t_mm / 1e6, 1),
                     rel_err_vs_bf16=round(err, 4))
            print(json.dumps(r), flush=True)
            rows.append(r)
    json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
              open(out, "w"), indent=1)


def swap_candidates(k: int) -> list[tuple]:
    """Configs tried for the swapped-role kernels (weight rows as the MMA's M side)."""
    out = [(bn, bk, sp, 4, st, "swap8") for bn in (64, 128) for bk in (128, 256) for sp in (1, 2, 4, 8)
           for st in (3, 4)]
    out += [(256, 128, sp, 8, 3, "swap8") for sp in (1, 2, 4)]
    return [c for c in out if -(-k // c[1]) >= c[2]]


def decode(out: str, ms: str = "8,16,32", layers: int = 12) -> None:
    """Decode-sized FP8 GEMMs: each kernel kind's best config, timed as a decode step reads the
    weights (cycling through ``layers`` different weights, so nothing is served from L2), and
    checked against the dequantised product. Kinds: cuBLAS bf16 (bf16 weights), cuBLASLt W8A8,
    the Triton kernels "a16" and "swap8" (fp8_gemv). (A third, "swap16": swapped roles with bf16
    activations, measured slower than both on an H200 and was dropped.)"""
    from serve_app.engine._private import fp8_gemv as G
    from serve_app.engine._private import kernels as K

    dt, rows = torch.bfloat16, []
    for name, (n, k) in LM.items():
        if name == "lm_head":
            continue
        wb = [torch.randn(n, k, device="cuda", dtype=dt) * 0.02 for _ in range(layers)]
        ws = [fp8.quantize_weight(w, name) for w in wb]
        deq = ws[0].q.float() * ws[0].scale.reshape(-1, 1)
        partial = name in ("o", "down")          # the engine hands these partials to a norm
        for m in (int(v) for v in ms.split(",")):
            x = torch.randn(m, k, device="cuda", dtype=dt)
            xq = K.quantize_rows(x)
            refs = {"a16": x.float() @ deq.t(), "swap8": (xq[0].float() * xq[1]) @ deq.t()}
            r = {"name": name, "M": m, "N": n, "K": k, "fp8_MB": round(n * k / 1e6, 1),
                 "bf16_us": G._graph_time_us([lambda w=w: F.linear(x, w) for w in wb]),
                 "w8a8_us": G._graph_time_us([lambda w=w: fp8.linear(xq, w, dt) for w in ws])}
            best, bad = {}, []
            for cfg in G.candidates(k) + swap_candidates(k):
                kind = cfg[5] if len(cfg) > 5 else "a16"
                xin = xq if kind == "swap8" else x
                try:
                    y = G.linear(xin, ws[0].q, ws[0].scale, cfg, partial)
                    y = (y.sum(0) if y.dim() == 3 else y).float()
                except Exception as e:   # a config this Triton cannot build: skip it, say so
                    bad.append(f"{cfg}: {type(e).__name__}: {str(e)[:120]}")
                    continue
                ref = refs[kind]
                err = ((y - ref).norm() / ref.norm()).item()
                if not err < 2e-2:
                    bad.append(f"{cfg}: rel err {err:.3g}")
                    continue
                t = G._graph_time_us([lambda w=w: G.linear(xin, w.q, w.scale, cfg, partial) for w in ws])
                if kind not in best or t < best[kind][0]:
                    best[kind] = (round(t, 2), str(cfg), round(err, 5))
            r.update({f"{kd}_us": v[0] for kd, v in best.items()})
            r.update({f"{kd}_cfg": v[1] for kd, v in best.items()}, errors=bad[:6], n_bad=len(bad))
            r["GBps"] = {kd: round(n * k * (2 if kd == "bf16" else 1) / r[f"{kd}_us"] / 1e3)
                         for kd in ("bf16", "w8a8", "a16", "swap8") if f"{kd}_us" in r}
            print(json.dumps(r), flush=True)
            rows.append(r)
    for m in sorted({r["M"] for r in rows}):     # per layer: the engine's kinds vs with the swaps
        sel = [r for r in rows if r["M"] == m]
        now = sum(min(r["w8a8_us"], r.get("a16_us", 1e9)) for r in sel)
        new = sum(min(r["w8a8_us"], r.get("a16_us", 1e9), r.get("swap8_us", 1e9))
                  for r in sel)
        print(f"M={m}: per layer {now:.1f} us (w8a8/a16) -> {new:.1f} us with swap kernels; "
              f"x36 layers: {36 * now / 1e3:.2f} -> {36 * new / 1e3:.2f} ms", flush=True)
    json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, open(out, "w"), indent=1)


def rows(out: str) -> None:
    """The row kernels (one row per program: RMSNorm, SiLU x up, per-row quantisation) at decode
    and prefill row counts, per ``num_warps`` ("auto": ``kernels.row_warps``, the engine's)."""
    from serve_app.engine._private import kernels as K
    from serve_app.engine._private.fp8_gemv import _graph_time_us

    auto, res = K.row_warps, []
    for n_rows in (8, 32, 2048):
        x = torch.randn(n_rows, 2560, device="cuda", dtype=torch.bfloat16)
        r = torch.randn_like(x)
        parts = torch.randn(8, n_rows, 2560, device="cuda")
        w = torch.rand(2560, device="cuda", dtype=torch.bfloat16) + 0.5
        gu = torch.randn(n_rows, 19456, device="cuda", dtype=torch.bfloat16)
        a = torch.randn(n_rows, 4096, device="cuda", dtype=torch.bfloat16)
        cases = {"rms_res": lambda: K.rms_norm(x, w, 1e-6, residual=r),
                 "rms_res_quant": lambda: K.rms_norm(x, w, 1e-6, residual=r, quant=True),
                 "rms_parts8_res_quant": lambda: K.rms_norm(parts, w, 1e-6, residual=r, quant=True),
                 "silu_quant": lambda: K.silu_mul(gu, quant=True),
                 "silu": lambda: K.silu_mul(gu),
                 "quant_rows_4096": lambda: K.quantize_rows(a)}
        for name, fn in cases.items():
            row = {"rows": n_rows, "case": name}
            for wp in ("auto", 4, 8, 16, 32):
                K.row_warps = auto if wp == "auto" else (lambda e, wp=wp: wp)
                try:
                    row[str(wp)] = round(_graph_time_us([fn] * 20), 2)
                finally:
                    K.row_warps = auto
            print(json.dumps(row), flush=True)
            res.append(row)
    gu = torch.randn(33, 19456, device="cuda", dtype=torch.bfloat16)
    q, s = K.silu_mul(gu, quant=True)
    ref = F.silu(gu[:, :9728]).float() * gu[:, 9728:].float()
    err = (((q.float() * s) - ref).norm() / ref.norm()).item()
    print("silu_quant rel err vs fp32", err, flush=True)
    json.dump({"gpu": torch.cuda.get_device_name(), "rows": res, "silu_quant_rel_err": err},
              open(out, "w"), indent=1)


def profile(out: str, model_path: str, quantization: str = "", context: int = 1100) -> None:
    from serve_app.engine._private.runner import ModelRunner
    from serve_app.models import load_model

    dev = torch.device("cuda")
    r = ModelRunner(load_model(model_path, dtype=torch.bfloat16, device="cpu").eval(), dev, 64, 4096,
                    quantization=quantization or None)
    if r.fp8:
        r.tune_fp8_decode()          # the engine's start-up plan: kernels per projection
    r.allocate_kv(64 * 1200)
    res = {}
    for b in (8, 32):
        st = r._staging
        st.zero_()
        pages = -(-context // r.page_size)
        for s in range(b):
            r.block_tables[s, :pages] = torch.arange(pages, device=dev, dtype=torch.int32) + s * pages
        st[4, :b] = context
        st[5, :b] = torch.arange(b, device=dev)
        st[2, :b] = r.block_tables[:b, (context - 1) // r.page_size].long()
        st[3, :b] = (context - 1) % r.page_size
        st[1, :b] = context - 1
        res[b] = kernel_times(lambda: r._decode_forward(st, b))
        print(b, json.dumps(res[b], indent=0), flush=True)
    json.dump(res, open(out, "w"), indent=1)


def kernel_times(fn, reps: int = 5) -> dict:
    """GPU time per kernel name of one ``fn()`` call (us, calls), longest first, from the torch
    profiler over ``reps`` calls after 3 warm-ups; ``_kernels_us`` is their sum."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(3):
        fn()
    sync()
    activity = ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU
    with torch_profile(activities=[activity]) as p:
        for _ in range(reps):
            fn()
        sync()
    agg = {}
    for e in p.key_averages():
        t = getattr(e, "self_device_time_total", 0)
        if t > 0:
            agg[e.key[:90]] = (round(t / reps, 1), e.count // reps)     # us per call, calls per call
    res = dict(sorted(agg.items(), key=lambda kv: -kv[1][0]))
    res["_kernels_us"] = round(sum(v[0] for v in agg.values()), 1)
    return res


_KINDS = [("attention", ("flash", "fmha", "attention", "cudnn", "sdpa")),
          ("fp8 gemm", ("scaled_mm", "f8", "e4m3", "fp8")),
          ("gemm", ("gemm", "cutlass", "sm90_xmma", "nvjet", "ampere", "sm80")),
          ("quantise", ("quant",)), ("norm", ("norm", "rms")), ("rope", ("rope", "rotary")),
          ("copy/index", ("copy", "index", "cat", "scatter", "gather"))]


def _kind(name: str) -> str:
    low = name.lower()
    return next((k for k, keys in _KINDS if any(x in low for x in keys)), "other")


@torch.inference_mode()
def passes(out: str, model_path: str, quantization: str = "", tokens: str = "1250",
           grids: str = "46x80,68x120") -> None:
    """Where the GPU time of a prefill pass and of a vision-tower call goes: per kernel and per
    kind (GEMM, FP8 GEMM, attention, norms, quantisation, RoPE, copies), with the GEMMs' achieved
    TFLOP/s (decoder or tower block weights only: no LM head, mergers or patch embedding). Eager
    calls: a graph replays the same kernels without the launch gaps."""
    from benchmarks.launch_probe import prompt_chunk
    from serve_app.engine._private.runner import ModelRunner
    from serve_app.models import load_model

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")   # CPU: a dry run of the code
    # "fp8+vision": the vision tower's linears in FP8 too (engine.vision_quantization)
    r = ModelRunner(load_model(model_path, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32,
                               device="cpu").eval(), dev, 64, 4096, quantization=quantization.split("+")[0] or None,
                    vision_quantization="fp8" if quantization == "fp8+vision" else None)
    r.allocate_kv(64 * 1200)
    cfg = r.model.config
    # GEMM weights per token/patch from the config (the runner has fused or quantised the modules)
    t, v = cfg.text_config, cfg.vision_config
    hd = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    lm_params = t.num_hidden_layers * (t.hidden_size * (t.num_attention_heads + 2 * t.num_key_value_heads) * hd
                                       + t.num_attention_heads * hd * t.hidden_size
                                       + 3 * t.hidden_size * t.intermediate_size)
    vis_params = v.depth * (4 * v.hidden_size ** 2 + 2 * v.hidden_size * v.intermediate_size)
    res: dict = {"gpu": torch.cuda.get_device_name() if dev.type == "cuda" else None,
                 "quantization": quantization or None}

    def summarise(key, times, flops):
        kinds: dict[str, float] = {}
        for name, v in times.items():
            if name != "_kernels_us":             # Triton kernels' names start with "_" too
                kinds[_kind(name)] = round(kinds.get(_kind(name), 0.0) + v[0], 1)
        gemm_us = kinds.get("gemm", 0.0) + kinds.get("fp8 gemm", 0.0)
        res[key] = {"kernels_us": times["_kernels_us"], "by_kind_us": kinds,
                    "gemm_tflops": round(flops / gemm_us / 1e6, 1) if gemm_us else None,
                    "top": dict(list(times.items())[:25])}
        print(key, json.dumps({k: v for k, v in res[key].items() if k != "top"}), flush=True)

    for n in (int(x) for x in tokens.split(",")):
        chunk = prompt_chunk(n, r.page_size, dev)
        summarise(f"prefill_{n}", kernel_times(lambda: r.prefill([chunk])), 2 * lm_params * n)
    for g in grids.split(","):
        h, w = (int(x) for x in g.split("x"))
        grid = (1, h, w)
        ps = cfg.vision_config.patch_size           # compact uint8 patches, as launch_probe sends
        pix = torch.randint(0, 255, (h * w, 3, ps, ps), dtype=torch.uint8).numpy()
        summarise(f"vision_{g}", kernel_times(lambda: r.encode_images([pix], [grid])), 2 * vis_params * h * w)
    Path(out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    {"gemm": gemm, "decode": decode, "rows": rows, "profile": profile, "passes": passes}[mode](*rest)
