"""Per-image preprocessing cost: our pipeline next to transformers' ``Qwen2VLImageProcessorPil``.

Both start from the same JPEG bytes and end with Qwen3-VL ``pixel_values`` + ``grid_thw``
(decode + RGB + smart_resize bicubic + rescale/normalise + patchify), in the same process, one
thread, cases interleaved so background load hits them alike; outputs are checked identical first.
Also reported: our full ``ImagePipeline.process`` on a cache miss (adds hashing and checks) and on
a cache hit, and decode + resize + uint8 patch reorder without normalisation (what Preprocess would
pay if it shipped uint8 patches and the VLM normalised on the GPU; see transfer_bench.py).

From the cache-miss medians it sizes the Preprocess deployment for request rates (sizes equally
likely, a share of requests with 2 images). ``--serve S`` also measures it directly: the real
``Preprocess`` deployment, one replica with 1 CPU and its cache off, saturated for S seconds with
that mix through a Serve handle (so Ray's serialisation of the result is included).

    python benchmarks/preprocess_bench.py --n 40 --serve 20 --out benchmarks/out/preprocess.json

``--hf-device cuda`` adds transformers' torchvision-backed ``Qwen2VLImageProcessor`` on that device
(PIL decode, then resize/normalise/patchify on the GPU, output left there; not bit-identical to
the PIL path, so its max difference from ours is reported).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_app._image import (ImageLimits, decode_image, patch_order, preprocess_rgb,  # noqa: E402
                              smart_resize)
from serve_app._image_pipeline import ImagePipeline, PreprocessOptions  # noqa: E402

SIZES = {"640x480": (640, 480), "1280x720": (1280, 720), "1366x768": (1366, 768), "1600x900": (1600, 900),
         "1920x1080": (1920, 1080)}


def photo_jpeg(w: int, h: int, quality: int, seed: int = 0) -> bytes:
    """A real photo (bundled with scikit-image; falls back to synthetic) at w x h, as JPEG."""
    try:
        from skimage import data as skdata
        src = Image.fromarray(skdata.coffee())
    except Exception:
        y, x = np.mgrid[0:270, 0:480] / 30.0
        src = Image.fromarray(np.stack([128 + 100 * np.sin(x), 128 + 90 * np.cos(y),
                                        128 + 60 * np.sin(x + y)], -1).astype(np.uint8))
    im = src.resize((w, h), Image.Resampling.LANCZOS)
    grain = np.random.default_rng(seed).integers(-4, 5, (h, w, 1), dtype=np.int16)
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


def per_image(args) -> list[dict]:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    hf = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                  image_std=[0.5] * 3, min_pixels=65_536, max_pixels=16_777_216)
    limits = ImageLimits()
    miss = ImagePipeline(PreprocessOptions.from_dict({"cache_mb": 0, "upload_store": "local",
                                                      "resize_threads": args.resize_threads}))
    hit = ImagePipeline(PreprocessOptions.from_dict({"cache_mb": 1024, "upload_store": "local",
                                                     "resize_threads": args.resize_threads}))
    rows = []
    for name in args.sizes:
        w, h = SIZES[name]
        data = photo_jpeg(w, h, args.quality)

        def ours():
            return preprocess_rgb(decode_image(data, limits))

        def ours_uint8():
            im = decode_image(data, limits)
            rh, rw = smart_resize(im.height, im.width)
            return patch_order(np.asarray(im.resize((rw, rh), Image.Resampling.BICUBIC)))

        def theirs():
            out = hf(images=[Image.open(io.BytesIO(data))], return_tensors="np")
            return out["pixel_values"], out["image_grid_thw"]

        cases = {"ours_ms": ours, "hf_ms": theirs, "ours_pipeline_miss_ms": lambda: miss.process([data]),
                 "ours_pipeline_hit_ms": lambda: hit.process([data]), "ours_uint8_ms": ours_uint8}
        extra = {}
        if args.hf_device:
            import torch

            from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
            tv = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                       image_std=[0.5] * 3, min_pixels=65_536, max_pixels=16_777_216)

            def theirs_tv():
                out = tv(images=[Image.open(io.BytesIO(data))], device=args.hf_device, return_tensors="pt")
                if args.hf_device.startswith("cuda"):
                    torch.cuda.synchronize()
                return out["pixel_values"]

            cases["hf_torchvision_ms"] = theirs_tv
            extra["hf_torchvision_max_abs_diff"] = float((theirs_tv().float().cpu() - torch.from_numpy(
                preprocess_rgb(decode_image(data, limits))[0])).abs().max())
        pv, grid = ours()
        ref_pv, ref_grid = theirs()
        identical = bool(grid == tuple(int(v) for v in ref_grid[0]) and np.array_equal(pv, ref_pv))
        if not identical:
            raise SystemExit(f"{name}: outputs differ (max abs {np.abs(pv - ref_pv).max()})")
        hit.process([data])
        t = timed(cases, args.n)
        rows.append({
            "size": name, "jpeg_bytes": len(data), "grid_thw": list(grid), "tokens": grid[1] * grid[2] // 4,
            "pixel_values_mb": round(pv.nbytes / 2**20, 1), "identical": identical,
            **{k: statistics.median(v) for k, v in t.items()},
            "min_ms": {k: min(v) for k, v in t.items()}, **extra,
        })
        rows[-1]["speedup"] = rows[-1]["hf_ms"] / rows[-1]["ours_ms"]
    return rows


def pairs(args) -> list[dict]:
    """A request with two images of one size (the workload's comparison class), cache off: the
    images one after the other, against both at once on a pool (what Preprocess does)."""
    from concurrent.futures import ThreadPoolExecutor
    miss = ImagePipeline(PreprocessOptions.from_dict({"cache_mb": 0, "upload_store": "local",
                                                      "resize_threads": args.resize_threads}))
    rows = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        for name in args.sizes:
            w, h = SIZES[name]
            two = [photo_jpeg(w, h, args.quality, seed=s) for s in (1, 2)]
            t = timed({"sequential_ms": lambda: miss.process(two),
                       "pool_ms": lambda: miss.process(two, pool=pool)}, args.n)
            rows.append({"size": name, **{k: statistics.median(v) for k, v in t.items()},
                         "min_ms": {k: min(v) for k, v in t.items()}})
    return rows


def sizing(rows: list[dict], rates: list[float], two_share: float, util: float) -> list[dict]:
    """Cores for each request rate: images/s x mean per-image cache-miss time (every image a cache
    miss: the worst case), planned at ``util`` utilisation per core. Excludes Ray's per-request
    costs (serialising the result into the object store): see the --serve measurement."""
    miss = statistics.mean(r["ours_pipeline_miss_ms"] for r in rows)
    u8 = statistics.mean(r["ours_uint8_ms"] + r["ours_pipeline_miss_ms"] - r["ours_ms"] for r in rows)
    out = []
    for rate in rates:
        ips = rate * (1 + two_share)
        busy, busy8 = ips * miss / 1e3, ips * u8 / 1e3
        out.append({"rate": rate, "images_per_s": ips, "mean_miss_ms": miss, "busy_cores": busy,
                    "cores": math.ceil(busy / util), "mean_uint8_ms": u8, "busy_cores_uint8": busy8,
                    "cores_uint8": math.ceil(busy8 / util)})
    return out


def serve_saturation(args) -> dict:
    """The real Preprocess deployment (1 replica, 1 CPU, cache off) under the workload mix, driven
    by ``--concurrency`` client threads for ``--serve`` seconds: sustained requests/s per replica."""
    import ray
    from ray import serve

    from serve_app.preprocess import Preprocess

    rng = np.random.default_rng(1)
    pool = {name: [photo_jpeg(w, h, args.quality, seed=s) for s in range(1, 5)] for name, (w, h) in SIZES.items()}
    root = str(Path(__file__).resolve().parents[1])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": root}})
    try:
        serve.start(proxy_location="Disabled")
        app = Preprocess.options(num_replicas=1, max_ongoing_requests=8,
                                 ray_actor_options={"num_cpus": 1}).bind(
            {"cache_mb": 0, "upload_store": "local"})
        handle = serve.run(app, name="preprocess_bench", route_prefix=None)
        names = list(SIZES)

        def request() -> list[bytes]:
            k = 2 if rng.random() < args.two_image_share else 1
            return [pool[names[rng.integers(3)]][rng.integers(4)] for _ in range(k)]

        for _ in range(3):  # warm up
            handle.process.remote(request()).result(timeout_s=60)
        lock, stop = threading.Lock(), time.perf_counter() + args.serve
        done = {"requests": 0, "images": 0}
        lat: list[float] = []

        def client():
            while time.perf_counter() < stop:
                with lock:
                    srcs = request()
                t0 = time.perf_counter()
                out = handle.process.remote(srcs).result(timeout_s=60)
                with lock:
                    lat.append((time.perf_counter() - t0) * 1e3)
                    done["requests"] += 1
                    done["images"] += len(out)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    finally:
        serve.shutdown()
        ray.shutdown()
    lat.sort()
    return {"seconds": wall, "concurrency": args.concurrency, "requests": done["requests"],
            "requests_per_s": done["requests"] / wall, "images_per_s": done["images"] / wall,
            "p50_ms": lat[len(lat) // 2], "p90_ms": lat[int(0.9 * (len(lat) - 1))]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=30, help="timed repetitions per case (median reported)")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality of the inputs")
    ap.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--rates", type=float, nargs="*", default=[12.0, 24.0], help="requests/s to size for")
    ap.add_argument("--two-image-share", type=float, default=0.10, help="share of requests with 2 images")
    ap.add_argument("--target-util", type=float, default=0.6,
                    help="CPU utilisation to plan for per Preprocess core (headroom for bursts)")
    ap.add_argument("--serve", type=float, default=0.0, metavar="S",
                    help="also saturate the real Preprocess deployment for S seconds (starts Ray)")
    ap.add_argument("--concurrency", type=int, default=4, help="client threads for --serve")
    ap.add_argument("--hf-device", help="also time transformers' torchvision processor on this device")
    ap.add_argument("--pairs", action="store_true",
                    help="only time two-image requests, one image after the other against both at once")
    ap.add_argument("--resize-threads", type=int, default=4, help="images.resize_threads of the pipeline "
                    "columns (the 'ours' and HF columns are one thread)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()

    meta = {"n": args.n, "quality": args.quality, "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%d %H:%M"), "cpus": os.cpu_count(),
            "machine": platform.machine(), "load_avg": os.getloadavg(), "argv": sys.argv[1:]}
    host = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}"
    if args.pairs:
        two = pairs(args)
        print(f"\ntwo images per request, median (min) of {args.n}, ms; JPEG q{args.quality}; {host}\n")
        print("| size | one after the other | both at once (pool) |\n|---|---|---|")
        for r in two:
            print(f"| {r['size']} | {r['sequential_ms']:.1f} ({r['min_ms']['sequential_ms']:.1f}) "
                  f"| {r['pool_ms']:.1f} ({r['min_ms']['pool_ms']:.1f}) |")
        write_json(args.out, {"meta": meta, "pairs": two})
        return
    rows = per_image(args)
    print(f"\nmedian (min) of {args.n}, ms per image, JPEG q{args.quality}, one thread; {host}\n")
    print("| size | tokens | pixel_values | ours (decode+resize+patchify) | HF Qwen2VLImageProcessorPil "
          "| speed-up | ours pipeline, cache miss | cache hit | ours uint8, no normalise | identical |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mn = r["min_ms"]
        print(f"| {r['size']} | {r['tokens']} | {r['pixel_values_mb']} MB | {r['ours_ms']:.1f} ({mn['ours_ms']:.1f}) "
              f"| {r['hf_ms']:.1f} ({mn['hf_ms']:.1f}) | {r['speedup']:.2f}x "
              f"| {r['ours_pipeline_miss_ms']:.1f} ({mn['ours_pipeline_miss_ms']:.1f}) "
              f"| {r['ours_pipeline_hit_ms']:.2f} | {r['ours_uint8_ms']:.1f} ({mn['ours_uint8_ms']:.1f}) "
              f"| {r['identical']} |")
    if args.hf_device:
        print(f"\nHF Qwen2VLImageProcessor (torchvision) on {args.hf_device}:")
        for r in rows:
            print(f"  {r['size']}: {r['hf_torchvision_ms']:.1f} ({r['min_ms']['hf_torchvision_ms']:.1f}) ms, "
                  f"max |diff| vs ours {r['hf_torchvision_max_abs_diff']:.3g}")
    plan = sizing(rows, args.rates, args.two_image_share, args.target_util) if len(rows) == len(SIZES) else []
    print()
    for s in plan:
        print(f"{s['rate']:g} req/s = {s['images_per_s']:.1f} images/s x {s['mean_miss_ms']:.1f} ms = "
              f"{s['busy_cores']:.2f} busy cores -> {s['cores']} at {args.target_util:.0%} "
              f"(uint8 output: {s['busy_cores_uint8']:.2f} busy -> {s['cores_uint8']})")
    sat = None
    if args.serve > 0:
        sat = serve_saturation(args)
        print(f"\nPreprocess deployment, 1 replica / 1 CPU, cache off, {sat['concurrency']} clients, "
              f"{sat['seconds']:.0f} s: {sat['requests_per_s']:.1f} req/s, {sat['images_per_s']:.1f} images/s, "
              f"p50 {sat['p50_ms']:.0f} ms, p90 {sat['p90_ms']:.0f} ms")
        for rate in args.rates:
            print(f"  {rate:g} req/s -> {rate / sat['requests_per_s']:.2f} replicas busy, "
                  f"{math.ceil(rate / (sat['requests_per_s'] * args.target_util))} at "
                  f"{args.target_util:.0%}")
    write_json(args.out, {"meta": meta, "results": rows, "sizing": plan, "serve": sat})


def write_json(path: Path | None, obj: dict) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2))
        print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
