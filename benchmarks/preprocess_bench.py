"""Per-image preprocessing cost: our pipeline next to transformers' ``Qwen2VLImageProcessorPil``.

Both start from the same JPEG bytes and end with Qwen3-VL ``pixel_values`` + ``grid_thw``
(decode + RGB + smart_resize bicubic + rescale/normalise + patchify), in the same process, one
thread. Also reported: our full ``ImagePipeline.process`` on a cache miss (adds hashing and
checks) and on a cache hit. Outputs are checked to be identical before timing.

    python benchmarks/preprocess_bench.py --n 30 --out benchmarks/out/preprocess.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_app._image import ImageLimits, decode_image, preprocess_rgb  # noqa: E402
from serve_app._image_pipeline import ImagePipeline, PreprocessOptions  # noqa: E402

SIZES = {"640x480": (640, 480), "1280x720": (1280, 720), "1920x1080": (1920, 1080)}


def photo_jpeg(w: int, h: int, quality: int) -> bytes:
    """A real photo (bundled with scikit-image; falls back to synthetic) at w x h, as JPEG."""
    try:
        from skimage import data as skdata
        src = Image.fromarray(skdata.coffee())
    except Exception:
        y, x = np.mgrid[0:270, 0:480] / 30.0
        src = Image.fromarray(np.stack([128 + 100 * np.sin(x), 128 + 90 * np.cos(y),
                                        128 + 60 * np.sin(x + y)], -1).astype(np.uint8))
    im = src.resize((w, h), Image.Resampling.LANCZOS)
    grain = np.random.default_rng(0).integers(-4, 5, (h, w, 1), dtype=np.int16)
    im = Image.fromarray((np.asarray(im, np.int16) + grain).clip(0, 255).astype(np.uint8))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def timed(fns: dict, n: int, warmup: int = 2) -> dict[str, list[float]]:
    """Interleaved: every round runs each case once, so background load hits all cases alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(n):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            out[k].append((time.perf_counter() - t0) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=30, help="timed repetitions per case (median reported)")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality of the inputs")
    ap.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    hf = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                  image_std=[0.5] * 3, min_pixels=65_536, max_pixels=16_777_216)
    limits = ImageLimits()
    miss = ImagePipeline(PreprocessOptions.from_dict({"cache_mb": 0, "upload_store": "local"}))
    hit = ImagePipeline(PreprocessOptions.from_dict({"cache_mb": 1024, "upload_store": "local"}))

    rows = []
    for name in args.sizes:
        w, h = SIZES[name]
        data = photo_jpeg(w, h, args.quality)

        def ours():
            return preprocess_rgb(decode_image(data, limits))

        def theirs():
            out = hf(images=[Image.open(io.BytesIO(data))], return_tensors="np")
            return out["pixel_values"], out["image_grid_thw"]

        pv, grid = ours()
        ref_pv, ref_grid = theirs()
        identical = bool(grid == tuple(int(v) for v in ref_grid[0]) and np.array_equal(pv, ref_pv))
        if not identical:
            raise SystemExit(f"{name}: outputs differ (max abs {np.abs(pv - ref_pv).max()})")
        hit.process([data])
        t = timed({"ours_ms": ours, "hf_ms": theirs, "ours_pipeline_miss_ms": lambda: miss.process([data]),
                   "ours_pipeline_hit_ms": lambda: hit.process([data])}, args.n)
        rows.append({
            "size": name, "jpeg_bytes": len(data), "grid_thw": list(grid), "tokens": grid[1] * grid[2] // 4,
            "pixel_values_mb": round(pv.nbytes / 2**20, 1), "identical": identical,
            **{k: statistics.median(v) for k, v in t.items()},
            "min_ms": {k: min(v) for k, v in t.items()},
        })
        rows[-1]["speedup"] = rows[-1]["hf_ms"] / rows[-1]["ours_ms"]

    print(f"\nmedian of {args.n} (ms per image, JPEG q{args.quality}, one thread; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)\n")
    print("| size | tokens | pixel_values | ours (decode+resize+patchify) | HF Qwen2VLImageProcessorPil "
          "| speed-up | ours pipeline, cache miss | cache hit | identical |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['tokens']} | {r['pixel_values_mb']} MB | {r['ours_ms']:.1f} | {r['hf_ms']:.1f} "
              f"| {r['speedup']:.2f}x | {r['ours_pipeline_miss_ms']:.1f} | {r['ours_pipeline_hit_ms']:.3f} "
              f"| {r['identical']} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"n": args.n, "quality": args.quality, "python": sys.version.split()[0],
                "cpus": os.cpu_count(), "machine": platform.machine(), "load_avg": os.getloadavg()}
        args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
