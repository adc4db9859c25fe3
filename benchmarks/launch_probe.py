"""Is an eager prefill or vision-tower call bound by its kernel launches? Host time to launch it
(no sync) against its GPU time (events), alone and behind ~30 ms of queued GPU work (which hides
launches that the GPU does not wait for), plus the host cost of single launches.

Prefill and the vision tower run eagerly (their shapes change with every request; only decode
steps are CUDA graphs), so each of their ~400 kernels costs a Python launch. When launching
takes as long as the GPU work, the GPU idles between kernels and the engine's step timers count
that idle time as prefill or vision time.

    python benchmarks/launch_probe.py OUT.json MODEL [fp8]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._cuda_timing import measure  # noqa: E402
from benchmarks._host import host_speed  # noqa: E402
from serve_app.engine._private import fp8  # noqa: E402
from serve_app.engine._private import kernels as K  # noqa: E402
from serve_app.engine._private.runner import ModelRunner, PrefillChunk  # noqa: E402
from serve_app.models import load_model  # noqa: E402


def prompt_chunk(n: int, page_size: int, device: torch.device) -> PrefillChunk:
    """A whole text prompt of ``n`` random tokens on pages 1.. (page 0 is the padding sink), as
    the scheduler hands it to prefill (graph-eligible: ``pages_host`` given)."""
    pages = list(range(1, -(-n // page_size) + 2))
    return PrefillChunk(ids=torch.randint(100, 50000, (n,)),
                        positions=torch.arange(n).view(1, -1).expand(3, -1).contiguous(), start=0,
                        pages=torch.tensor(pages, device=device), want_logits=True, pages_host=pages)


def launch_us(fn, n: int = 500) -> float:
    """Host us per call of ``fn`` (compiled and warm first), calls queued without syncs."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n * 1e6
    torch.cuda.synchronize()
    return round(t, 1)


@torch.inference_mode()
def main(out: str, model_path: str, quantization: str = "") -> None:
    dev = torch.device("cuda")
    r = ModelRunner(load_model(model_path, dtype=torch.bfloat16, device="cpu").eval(), dev, 64, 4096,
                    quantization=quantization or None)
    r.allocate_kv(64 * 1200)
    big = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    queue_ms = measure(lambda: [big @ big for _ in range(20)])["gpu_ms"]
    res: dict = {"gpu": torch.cuda.get_device_name(), "quantization": quantization or None,
                 "host": host_speed(), "queued_work_ms": queue_ms}
    for n in (300, 1250, 2500):
        chunk = prompt_chunk(n, r.page_size, dev)
        res[f"prefill_{n}"] = measure(lambda: r.prefill([chunk]))

        def queued():
            for _ in range(20):
                big @ big
            r.prefill([chunk])
        res[f"prefill_{n}_behind_queue"] = measure(queued)
    # The same prompts through prefill graphs (engine.prefill_graph_tokens), when this build has them.
    if hasattr(r, "setup_prefill_graphs"):
        r.setup_prefill_graphs(4096)
        for n in (300, 1250, 2500):
            chunk = prompt_chunk(n, r.page_size, dev)
            res[f"prefill_graph_{n}"] = measure(lambda: r.prefill([chunk]))
        r._pg = None
    for grid in [(1, 30, 40), (1, 46, 80), (1, 68, 120)]:
        pix = torch.randint(0, 255, (grid[0] * grid[1] * grid[2], 3, 16, 16), dtype=torch.uint8).numpy()
        res[f"vision_{grid[1]}x{grid[2]}"] = measure(lambda: r.encode_images([pix], [grid]))
        if hasattr(r, "setup_vision_graphs"):       # the same grid through its vision graph
            r.setup_vision_graphs(max_grids=4, max_patches=8192)
            r.encode_images([pix], [grid])
            r.encode_images([pix], [grid])
            if r.capture_pending_vision_graph():
                res[f"vision_graph_{grid[1]}x{grid[2]}"] = measure(lambda: r.encode_images([pix], [grid]))
            r._vg = None
    x = torch.randn(8, 2560, device=dev, dtype=torch.bfloat16)
    w = torch.ones(2560, device=dev, dtype=torch.bfloat16)
    res["launch_us"] = {"torch_add": launch_us(lambda: x + x),
                        "triton_rms_norm": launch_us(lambda: K.rms_norm(x, w, 1e-6)),
                        "triton_rms_norm_res_quant": launch_us(lambda: K.rms_norm(x, w, 1e-6, residual=x, quant=True))}
    if r.fp8:
        xq = K.quantize_rows(torch.randn(1250, 2560, device=dev, dtype=torch.bfloat16))
        res["launch_us"]["scaled_mm_1250_rows"] = launch_us(lambda: fp8.linear(xq, r.w[0]["qkv"], torch.bfloat16))
    for k, v in res.items():
        print(k, v, flush=True)
    Path(out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
