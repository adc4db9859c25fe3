"""FP8 GEMMs at Qwen3-VL-4B's shapes on the GPU, and where a bf16 decode step's time goes.

    python benchmarks/fp8_probe.py gemm OUT.json             # bf16 cuBLAS vs cuBLASLt row-wise FP8, M 1..4096
    python benchmarks/fp8_probe.py decode OUT.json           # + the Triton W8A16 kernel's configs, M <= 64
    python benchmarks/fp8_probe.py profile OUT.json MODEL    # kernel times of one eager bf16 decode step

Times come from CUDA graphs of repeated calls (launch costs excluded, as in the captured decode
step). They loop over ONE weight, so weights that fit the GPU's L2 (an H200 has 50 MB) read
faster here than in a step: the engine's own start-up timing (``fp8_gemv.plan_decode``) cycles
through 12 layers' weights instead. RESULTS.md, section "GPU: FP8 decoder linears", quotes a run.
"""

from __future__ import annotations

import itertools
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


def decode(out: str) -> None:
    from serve_app.engine._private import fp8_gemv as G
    from serve_app.engine._private import kernels as K

    rows = []
    for name, (n, k) in LM.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        wq = fp8.quantize_weight(w)
        for m in [1, 8, 32, 64]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq = K.quantize_rows(x)
            r = {"name": name, "M": m, "bf16_us": gtime(lambda: F.linear(x, w)),
                 "scaled_mm_us": gtime(lambda: fp8.linear(xq, wq, torch.bfloat16))}
            best = None
            for bn, bk, sp, st in itertools.product([32, 64, 128], [128, 256], [1, 2, 4, 8], [3, 4]):
                if (name == "lm_head" and sp > 1) or -(-k // bk) < sp:
                    continue
                cfg = (bn, bk, sp, 4, st)
                t = gtime(lambda: G.linear(x, wq.q, wq.scale, cfg, partial=True))
                if best is None or t < best[0]:
                    best = (t, cfg)
            deq = x.float() @ (wq.q.float() * wq.scale.reshape(-1, 1)).t()
            y = G.linear(x, wq.q, wq.scale, best[1]).float()
            r.update(triton_us=best[0], triton_cfg=best[1],
                     rel_err_vs_dequantised=((y - deq).norm() / deq.norm()).item(),
                     GBps_bf16=n * k * 2 / r["bf16_us"] / 1e3, GBps_triton_fp8=n * k / best[0] / 1e3)
            print(json.dumps(r), flush=True)
            rows.append(r)
    json.dump({"gpu": torch.cuda.get_device_name(), "rows": rows}, open(out, "w"), indent=1)


def profile(out: str, model_path: str, context: int = 1100) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from serve_app.engine._private.runner import ModelRunner
    from serve_app.models import load_model

    dev = torch.device("cuda")
    r = ModelRunner(load_model(model_path, dtype=torch.bfloat16, device="cpu").eval(), dev, 64, 4096)
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
        for _ in range(3):
            r._decode_forward(st, b)
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CUDA]) as p:
            for _ in range(5):
                r._decode_forward(st, b)
            torch.cuda.synchronize()
        agg = {}
        for e in p.key_averages():
            t = getattr(e, "self_device_time_total", 0)
            if t > 0:
                agg[e.key[:90]] = (round(t / 5, 1), e.count // 5)     # us per step, calls per step
        res[b] = dict(sorted(agg.items(), key=lambda kv: -kv[1][0]))
        print(b, json.dumps(res[b], indent=0), flush=True)
    json.dump(res, open(out, "w"), indent=1)


if __name__ == "__main__":
    mode, rest = sys.argv[1], sys.argv[2:]
    {"gemm": gemm, "decode": decode, "profile": profile}[mode](*rest)
