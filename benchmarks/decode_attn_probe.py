"""Split-K decode attention configs at the engine's decode shapes, timed as a step runs them (GPU).

Why: at the app's decode batch (~10 rows of ~1.3k tokens) a step reads ~1.9 GB of 16-bit KV,
~0.45 ms at an H200's copy rate, and its 36 attention calls are a large part of the 3.4 ms
step. (This probe was written when the engine's config, BLOCK_N 64 with 4 warps, seemed to hold
255 registers and spill; that was the AOT compile lacking the JIT's specialisations. As the GPU
runs it, it holds 80 and does not spill: RESULTS.md "Kernel resources", correction.)
This times every ``attention.DECODE_CONFIGS`` entry per (KV dtype, batch, context): 36 layers'
caches in turn inside one CUDA graph, pages scattered, the engine's split rule, with each
config's error against the torch reference.

    python benchmarks/decode_attn_probe.py OUT_JSON [BATCHES=1,10,32,64] [CONTEXT=1300] \
        [--splits-x 1,2] [--mixed] [--balanced 2,4,8]

``--splits-x`` times each config at multiples of the engine's split count (more programs in
flight per SM, more partials to merge); where the engine doubles the plain split count (16-bit
cache, 5-24 rows), the plain count is timed too (key suffix ``_plain``). ``--mixed`` gives the rows seeded lengths from 0.25x to 2x
CONTEXT instead of CONTEXT each: the app's rows hold 300-4,300 tokens (one or two images of
640x480-1920x1080), and there, unlike in the engine bench, an FP8 cache made decode steps longer
(RESULTS.md "FP8 KV in the app"). ``--balanced`` also times balanced chunks
(``decode_attention_triton(balanced=...)``: one chunk length for all rows) aiming at that many
programs per SM, in a grid of up to 4x the plain split count (at most 16) chunks a row.

Without CUDA it writes the configs it would time and exits.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._cuda_timing import measure  # noqa: E402
from benchmarks._decode_rows import row_lengths  # noqa: E402
from serve_app.engine._private import attention  # noqa: E402

LAYERS, HQ, HK, D, PAGE = 36, 32, 8, 128, 16        # Qwen3-VL-4B's text model, the engine's pages


def _caches(batch: int, context: int, dtype: torch.dtype, g: torch.Generator):
    """Per layer (k, v) caches [pages, HK, PAGE, D] of ``batch`` rows of up to ``context`` tokens,
    and scattered tables."""
    per = -(-context // PAGE)
    pages = batch * per + 1
    layers = []
    for _ in range(LAYERS):
        k = torch.randn(pages, HK, PAGE, D, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(pages, HK, PAGE, D, device="cuda", dtype=torch.bfloat16, generator=g)
        layers.append((attention.to_cache_dtype(k, dtype), attention.to_cache_dtype(v, dtype)))
    perm = torch.randperm(pages - 1, device="cuda", generator=g) + 1
    tables = [perm[i * per:(i + 1) * per] for i in range(batch)]
    bt = torch.stack(tables).int()
    return layers, tables, bt


def probe(out: str, batches: list[int], context: int, splits_x: list[int] = (1,), mixed: bool = False,
          balanced: list[int] = ()) -> dict:
    res: dict = {"configs": attention.DECODE_CONFIGS, "engine_config": attention.DECODE_CONFIG,
                 "batches": batches, "context": context, "layers": LAYERS, "splits_x": list(splits_x),
                 "mixed": mixed, "balanced_per_sm": list(balanced)}
    if not torch.cuda.is_available():
        res["note"] = "no CUDA: nothing timed"
        Path(out).write_text(json.dumps(res, indent=1))
        return res
    props = torch.cuda.get_device_properties(0)
    res.update(gpu=props.name, sms=props.multi_processor_count, torch=torch.__version__)
    g = torch.Generator(device="cuda").manual_seed(0)
    scale = D ** -0.5
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        for b in batches:
            lengths = row_lengths(b, context, mixed)
            layers, tables, bt = _caches(b, max(lengths), dtype, g)
            lens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
            q = torch.randn(b, HQ, D, device="cuda", dtype=torch.bfloat16, generator=g)
            engine_splits = attention.num_splits_for(b, HK, props.multi_processor_count, dtype)
            kv_bytes = sum(lengths) * HK * D * layers[0][0].element_size() * 2 * LAYERS
            want = attention.decode_attention_torch(q, *layers[0], tables, lengths, scale).float()
            plain = attention.num_splits_for(b, HK, props.multi_processor_count)
            variants = [(f"_x{x}" if x != 1 else "", engine_splits * x, 0) for x in splits_x]
            if plain != engine_splits:             # the split rule before its doubling, for comparison
                variants.append(("_plain", plain, 0))
            grid = attention.balanced_splits_for(b, HK, props.multi_processor_count)
            variants += [(f"_bal{t}", grid, t * props.multi_processor_count) for t in balanced]
            for suffix, splits, target in variants:
                row = {"splits": splits, "engine_splits": engine_splits, "balanced_target": target,
                       "lengths": lengths, "kv_gb_per_step": round(kv_bytes / 1e9, 3)}
                for config in attention.DECODE_CONFIGS:
                    row[str(config)] = _time(config, q, layers, bt, lens, scale, splits, want, kv_bytes, target)
                best = min((c for c in row if c.startswith("(") and "step_ms" in row[c]),
                           key=lambda c: row[c]["step_ms"], default=None)
                row["best"] = best
                key = f"{str(dtype).replace('torch.', '')}_b{b}{suffix}"
                res[key] = row
                print(dtype, b, "splits", splits, json.dumps({k: v for k, v in row.items() if k != "lengths"}),
                      flush=True)
            torch.cuda.empty_cache()
    Path(out).write_text(json.dumps(res, indent=1))
    return res


def _time(config, q, layers, bt, lens, scale: float, splits: int, want, kv_bytes: int, balanced: int = 0) -> dict:
    """One config: its error on layer 0, and 36 layers' calls replayed as one CUDA graph."""
    def step():
        for k, v in layers:
            attention.decode_attention_triton(q, k, v, bt, lens, scale, splits, PAGE, config, balanced)
    r: dict = {}
    try:
        got = attention.decode_attention_triton(q, *layers[0], bt, lens, scale, splits, PAGE, config, balanced)
        r["rel_err"] = float((got.float() - want).norm() / want.norm())
        step()                                    # compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        ms = measure(graph.replay, 8, 4)["gpu_ms"]
        r.update(step_ms=ms, us_per_call=round(1e3 * ms / LAYERS, 2), gb_per_s=round(kv_bytes / ms / 1e6, 1))
    except Exception as e:  # noqa: BLE001 - a config that fails is a result
        r["error"] = repr(e)[:300]
    return r


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("batches", nargs="?", default="1,10,32,64")
    ap.add_argument("context", nargs="?", type=int, default=1300)
    ap.add_argument("--splits-x", default="1", help="multiples of the engine's split count to time")
    ap.add_argument("--mixed", action="store_true", help="rows of 0.25x-2x CONTEXT tokens")
    ap.add_argument("--balanced", default="", help="programs per SM to aim balanced chunks at, e.g. 2,4,8")
    a = ap.parse_args()
    t0 = time.time()
    res = probe(a.out, [int(x) for x in a.batches.split(",")], a.context,
                [int(x) for x in a.splits_x.split(",")], a.mixed,
                [int(x) for x in a.balanced.split(",") if x])
    print("wall_s", round(time.time() - t0, 1), "configs", res["configs"])


if __name__ == "__main__":
    main()
