"""Attention backends at the engine's shapes, eager and inside a CUDA graph.

Why: with the prefill and vision-tower graphs every pass runs flash attention (graph capture pins
it, `attention.capturable_impl`), and `fp8_probe.py passes` found that kernel at half of the
tower's GPU time (5.0 of 9.9 ms for a 1280x720 image) and a quarter of a 1,250-token prefill.
cuDNN's SDPA is the faster kernel on Hopper in eager mode; this measures by how much at these
shapes, and whether it can be captured in a CUDA graph and replay the same numbers.

    python benchmarks/attn_probe.py OUT_JSON [REPEATS]

On a machine without CUDA it only checks its own code path (no timings) and writes that.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._cuda_timing import measure  # noqa: E402

# (name, tokens, q heads, kv heads, head_dim, causal)
SHAPES = [
    ("vision_46x80", 3680, 16, 16, 64, False),     # a 1280x720 image: 46x80 patches of 16 px
    ("vision_68x120", 8160, 16, 16, 64, False),    # 1920x1080
    ("prefill_1280", 1280, 32, 8, 128, True),      # the article's ~1.25k-token prompt (bucket)
    ("prefill_2560", 2560, 32, 8, 128, True),
]


def _call(backend: str, q, k, v, causal: bool):
    if backend == "flash":
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False)[0]
    if backend == "cudnn":
        return torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, False, 0.0, causal, False)[0]
    from torch.nn.attention import SDPBackend, sdpa_kernel
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal,
                                                                enable_gqa=k.shape[1] != q.shape[1])


def probe(repeats: int = 20) -> dict:
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dt = torch.bfloat16 if cuda else torch.float32
    out: dict = {"gpu": torch.cuda.get_device_name() if cuda else None, "torch": torch.__version__,
                 "cudnn": torch.backends.cudnn.version() if cuda else None}
    g = torch.Generator(device=dev).manual_seed(0)
    for name, t, hq, hk, d, causal in SHAPES:
        if not cuda:
            t = min(t, 64)
        q = torch.randn(1, hq, t, d, device=dev, dtype=dt, generator=g)
        # GQA K/V as they are: the engine passes them so to the direct ops (`attention._sdpa`)
        k = torch.randn(1, hk, t, d, device=dev, dtype=dt, generator=g)
        v = torch.randn(1, hk, t, d, device=dev, dtype=dt, generator=g)
        flops = 4 * t * t * d * hq / (2 if causal else 1)
        ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=causal,
                                                               enable_gqa=hk != hq)
        row: dict = {"tokens": t, "heads": hq, "head_dim": d, "causal": causal}
        for be in (("flash", "cudnn", "efficient") if cuda else ()):
            r: dict = {}
            try:
                o = _call(be, q, k, v, causal)
                torch.cuda.synchronize()
                r["rel_err"] = float((o.float() - ref).norm() / ref.norm())
                r["eager_ms"] = measure(lambda: _call(be, q, k, v, causal), repeats + 1, 4)["gpu_ms"]
                r["tflops"] = round(flops / r["eager_ms"] / 1e9, 1)
            except Exception as e:  # noqa: BLE001 - a backend that declines a shape is a result
                r["eager_error"] = repr(e)[:300]
                row[be] = r
                continue
            try:                       # captured: warm-up on a side stream, then one capture
                s = torch.cuda.Stream()
                s.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(s):
                    _call(be, q, k, v, causal)
                torch.cuda.current_stream().wait_stream(s)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    go = _call(be, q, k, v, causal)
                q0 = q.clone()
                q.copy_(torch.randn_like(q))   # new inputs: the graph's output must follow them
                graph.replay()
                torch.cuda.synchronize()
                want = _call(be, q, k, v, causal)
                r["graph_vs_eager_max_abs"] = float((go.float() - want.float()).abs().max())
                r["graph_ms"] = measure(graph.replay, repeats + 1, 4)["gpu_ms"]
                q.copy_(q0)                    # the next backend is checked against ``ref``
            except Exception as e:  # noqa: BLE001
                r["graph_error"] = repr(e)[:300]
            row[be] = r
        if not cuda:
            row["cpu_ref_ok"] = bool(torch.isfinite(ref).all())
        out[name] = row
        print(name, json.dumps(row), flush=True)
    return out


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    t0 = time.time()
    res = probe(int(sys.argv[2]) if len(sys.argv) > 2 else 20)
    res["wall_s"] = round(time.time() - t0, 1)
    with open(sys.argv[1], "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
