"""How should preprocessed images travel from Preprocess to the VLM? Ray Serve, one local node.

Three deployments shaped like the real ones (Caller ~ Ingress, Pre ~ Preprocess, Sink ~ VLM), all
0-CPU so they fit next to other work. ``Pre`` holds real preprocessed photos (so only transfer is
timed, not decoding) and returns them as the real ``process()`` does: a list of ``ImageInput``.
``Sink`` copies every payload byte into a preallocated staging buffer, as an engine must (into
pinned memory, before a non-blocking H2D copy), so every mode pays for reading what it received.
Timed inside ``Caller`` (both hops), modes interleaved per round:

  a_await_then_pass   imgs = await pre.process(); await vlm.consume(imgs)     float32 pixel_values
  b_pass_response     await vlm.consume(pre.process())  (what the ingress does) float32 pixel_values
  c4_uint8_repeated   as b, uint8 [N, 3*2*16*16]: before normalisation, 4x smaller
  c8_uint8_patches    as b, uint8 [N, 3, 16, 16]: before normalisation and temporal repeat, 8x smaller
  c8_plus_cpu_norm    as c8, and the Sink normalises on the CPU (LUT) into float32: the cost if the
                      engine did it on the host instead of on the GPU
  zero_payload        as b with a 1-patch image: the fixed cost of the two hops

    python benchmarks/transfer_bench.py --n 30 --out benchmarks/out/transfer.json

``--h2d`` (needs torch with CUDA; no Ray) times the engine side instead, per image: float32
``pixel_values`` copied to the GPU from pageable memory (what ``tensor.to("cuda")`` on an array
from the object store does) vs staged through a reused pinned buffer with a non-blocking copy, vs
uint8 patches staged the same way and normalised on the GPU with the same 256-entry LUT (checked
bit-identical to the CPU ``pixel_values``).

    python benchmarks/transfer_bench.py --h2d --n 50 --out benchmarks/out/h2d.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SIZES = {"640x480": (640, 480), "1280x720": (1280, 720), "1920x1080": (1920, 1080)}
MODES = ["a_await_then_pass", "b_pass_response", "c4_uint8_repeated", "c8_uint8_patches",
         "c8_plus_cpu_norm", "zero_payload"]
PAYLOAD = {"a_await_then_pass": "f32", "b_pass_response": "f32", "c4_uint8_repeated": "u8rep",
           "c8_uint8_patches": "u8", "c8_plus_cpu_norm": "u8", "zero_payload": "none"}


def build_app():
    from ray import serve

    from serve_app._image import decode_image, ImageLimits, normalise_patches, patch_order, smart_resize
    from serve_app.engine.protocol import ImageInput

    @serve.deployment(name="Pre", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=16)
    class Pre:
        def __init__(self):
            from PIL import Image

            from preprocess_bench import photo_jpeg
            self.payloads: dict[tuple[str, str], ImageInput] = {}
            for name, (w, h) in SIZES.items():
                im = decode_image(photo_jpeg(w, h, 90), ImageLimits())
                rh, rw = smart_resize(h, w)
                u8 = patch_order(np.asarray(im.resize((rw, rh), Image.Resampling.BICUBIC)))
                grid = (1, rh // 16, rw // 16)
                rep = np.repeat(u8[:, :, None], 2, axis=2).reshape(len(u8), -1)
                for kind, arr in [("f32", normalise_patches(u8)), ("u8", u8), ("u8rep", rep),
                                  ("none", u8[:1].copy())]:
                    self.payloads[(name, kind)] = ImageInput(arr, grid, f"{name}-{kind}")

        def process(self, size: str, kind: str) -> list:
            return [self.payloads[(size, kind)]]

    @serve.deployment(name="Sink", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=16)
    class Sink:
        def __init__(self):
            self.staging: dict[tuple, np.ndarray] = {}  # stands in for a pinned-memory pool

        def _buffer(self, shape: tuple, dtype) -> np.ndarray:
            key = (shape, np.dtype(dtype).str)
            if key not in self.staging:
                self.staging[key] = np.empty(shape, dtype)
            return self.staging[key]

        def consume(self, images: list, normalise: bool = False) -> int:
            n = 0
            for im in images:
                pv = im.pixel_values
                if normalise:
                    out = normalise_patches(pv)
                    np.copyto(self._buffer(out.shape, out.dtype), out)
                else:
                    np.copyto(self._buffer(pv.shape, pv.dtype), pv)
                n += pv.nbytes
            return n

    @serve.deployment(name="Caller", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=16)
    class Caller:
        def __init__(self, pre, sink):
            self.pre, self.sink = pre, sink

        async def run(self, mode: str, size: str) -> dict:
            kind = PAYLOAD[mode]
            t0 = time.perf_counter()
            if mode == "a_await_then_pass":
                imgs = await self.pre.process.remote(size, kind)
                nbytes = await self.sink.consume.remote(imgs)
            else:
                nbytes = await self.sink.consume.remote(self.pre.process.remote(size, kind),
                                                        mode == "c8_plus_cpu_norm")
            return {"ms": (time.perf_counter() - t0) * 1e3, "bytes": nbytes}

    return Caller.bind(Pre.bind(), Sink.bind())


def resized_patches(w: int, h: int) -> np.ndarray:
    """uint8 ``(N, 3, 16, 16)`` patches of a real photo at w x h, as Preprocess computes them."""
    from PIL import Image

    from preprocess_bench import photo_jpeg
    from serve_app._image import ImageLimits, decode_image, patch_order, smart_resize

    im = decode_image(photo_jpeg(w, h, 90), ImageLimits())
    rh, rw = smart_resize(h, w)
    return patch_order(np.asarray(im.resize((rw, rh), Image.Resampling.BICUBIC)))


def h2d(args) -> list[dict]:
    """Engine-side cost of getting one image's model input onto the GPU (see the module doc)."""
    import warnings

    import torch

    from serve_app._image import _LUTS, normalise_patches

    warnings.filterwarnings("ignore", message=".*not writable.*")  # read-only like object-store arrays

    dev = torch.device("cuda")
    lut = torch.from_numpy(_LUTS[0].copy()).to(dev)

    def sync_ms(fn, n: int) -> list[float]:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        out = []
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    rows = []
    for size in args.sizes:
        u8 = resized_patches(*SIZES[size])
        f32 = normalise_patches(u8)
        f32.flags.writeable = False  # as received from the object store
        pin_f32 = torch.empty(f32.shape, dtype=torch.float32, pin_memory=True)
        pin_u8 = torch.empty(u8.shape, dtype=torch.uint8, pin_memory=True)
        n = len(u8)

        def f32_pageable():
            return torch.from_numpy(f32).to(dev)

        def f32_pinned():
            pin_f32.numpy()[...] = f32
            return pin_f32.to(dev, non_blocking=True)

        def f32_stage_only():
            pin_f32.numpy()[...] = f32

        def u8_pinned_gpu_norm():
            pin_u8.numpy()[...] = u8
            g = pin_u8.to(dev, non_blocking=True)
            v = lut[g.long()]  # (N, 3, 16, 16) float32, same LUT as the CPU path
            return v.unsqueeze(2).expand(n, 3, 2, 16, 16).reshape(n, 1536)

        same = bool(torch.equal(u8_pinned_gpu_norm().cpu(), torch.from_numpy(f32.copy())))
        cases = {"f32_pageable": f32_pageable, "f32_pinned_nonblocking": f32_pinned,
                 "f32_stage_into_pinned_only": f32_stage_only, "u8_pinned_gpu_normalise": u8_pinned_gpu_norm}
        for name, fn in cases.items():
            t = sync_ms(fn, args.n)
            rows.append({"size": size, "case": name, "median_ms": statistics.median(t), "min_ms": min(t),
                         "mb": round((u8.nbytes if name.startswith("u8") else f32.nbytes) / 2**20, 2),
                         "bit_identical": same})
    print(f"\nms per image to the GPU ({torch.cuda.get_device_name()}), {args.n} runs\n")
    print("| size | case | host MB | median ms | min ms | GPU-normalised == CPU |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['case']} | {r['mb']} | {r['median_ms']:.2f} | {r['min_ms']:.2f} "
              f"| {r['bit_identical']} |")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=30, help="timed rounds (each runs every mode once)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--h2d", action="store_true", help="time host-to-GPU copies instead (torch + CUDA)")
    args = ap.parse_args()

    if args.h2d:
        rows = h2d(args)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"meta": {"n": args.n, "date": time.strftime("%Y-%m-%d %H:%M"),
                                                     "cpus": os.cpu_count()}, "results": rows}, indent=2))
        return

    import ray
    from ray import serve

    bench_dir = str(Path(__file__).resolve().parent)
    root = str(Path(__file__).resolve().parents[1])
    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([root, bench_dir])}})
    try:
        serve.start(proxy_location="Disabled")  # no HTTP: handles only, no port to collide on
        handle = serve.run(build_app(), name="transfer_bench", route_prefix=None)
        results: dict[tuple[str, str], list[float]] = {}
        nbytes: dict[tuple[str, str], int] = {}
        for size in args.sizes:
            for r in range(args.warmup + args.n):
                for mode in MODES:
                    out = handle.run.remote(mode, size).result(timeout_s=120)
                    if r >= args.warmup:
                        results.setdefault((size, mode), []).append(out["ms"])
                        nbytes[(size, mode)] = out["bytes"]
    finally:
        serve.shutdown()
        ray.shutdown()

    rows = [{"size": size, "mode": mode, "payload_mb": round(nbytes[(size, mode)] / 2**20, 2),
             "median_ms": statistics.median(v), "min_ms": min(v), "p90_ms": sorted(v)[int(0.9 * (len(v) - 1))]}
            for (size, mode), v in results.items()]
    print(f"\nms per request, Caller -> Pre -> Sink, {args.n} rounds; {platform.machine()}, "
          f"{os.cpu_count()} CPUs, Ray cluster num_cpus={args.num_cpus}\n")
    print("| size | mode | payload | median ms | min ms | p90 ms |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['mode']} | {r['payload_mb']} MB | {r['median_ms']:.1f} | {r['min_ms']:.1f} "
              f"| {r['p90_ms']:.1f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {"n": args.n, "cpus": os.cpu_count(), "num_cpus": args.num_cpus,
                "python": sys.version.split()[0], "ray": ray.__version__, "load_avg": os.getloadavg(),
                "date": time.strftime("%Y-%m-%d %H:%M")}
        args.out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
