"""One image's bicubic resize and patch reorder split over threads, bit-identical to one thread.

Why: the resize is the largest part of Preprocess's time per image, and it sits on every
request's path to its first token (RESULTS.md "the serving layer's share of TTFT"). PIL resamples one axis per pass: when only the height changes
(1920x1080 -> 1920x1088, 1280x720 -> 1280x704) each output column reads one input column, and when
only the width changes each output row reads one input row. So such a resize runs on bands of
columns (or rows) in threads (PIL releases the GIL while it resamples), and the result is the same
bytes as ``im.resize`` (tests/test_image.py checks it against HF's processor too). A resize of
both axes stays on one thread: Pillow 13 picks which pass goes first by cost (it rounds to 8 bits
between them), so bands of one order need not give its bytes.
"""

from __future__ import annotations

from concurrent.futures import Executor

import numpy as np
from PIL import Image

# Below this many output pixels one thread is as fast: the bands' setup costs more than they save.
MIN_SPLIT_PIXELS = 300_000


def _bounds(n: int, parts: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, n, parts + 1).astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _run(pool: Executor, fn, bands) -> None:
    for f in [pool.submit(fn, a, b) for a, b in bands]:
        f.result()


def resize_rgb(im: Image.Image, size: tuple[int, int], pool: Executor | None = None,
               parts: int = 1) -> np.ndarray:
    """``np.asarray(im.resize(size, BICUBIC))`` for an RGB image, in ``parts`` bands on ``pool``."""
    rw, rh = size
    w, h = im.size
    bicubic = Image.Resampling.BICUBIC
    if (rw, rh) == (w, h):
        return np.asarray(im)
    if pool is None or parts < 2 or rw * rh < MIN_SPLIT_PIXELS or (rw != w and rh != h):
        return np.asarray(im.resize((rw, rh), bicubic))
    out = np.empty((rh, rw, 3), np.uint8)
    if rw != w:                                     # width only: bands of rows

        def rows(y0: int, y1: int) -> None:
            out[y0:y1] = np.asarray(im.crop((0, y0, w, y1)).resize((rw, y1 - y0), bicubic))
        _run(pool, rows, _bounds(h, parts))
    else:                                           # height only: bands of columns

        def cols(x0: int, x1: int) -> None:
            out[:, x0:x1] = np.asarray(im.crop((x0, 0, x1, h)).resize((x1 - x0, rh), bicubic))
        _run(pool, cols, _bounds(w, parts))
    return out


def patch_order_split(rgb: np.ndarray, patch_size: int, merge_size: int, pool: Executor | None = None,
                      parts: int = 1) -> np.ndarray:
    """uint8 ``(H, W, C)`` -> ``(gh*gw, C, p, p)`` in transformers' order ``(gh/m, gw/m, m, m)``;
    with ``pool``, bands of merge-block rows are reordered in threads (each is a contiguous run
    of the output)."""
    h, w, c = rgb.shape
    gh, gw = h // patch_size, w // patch_size
    band_rows = patch_size * merge_size           # pixel rows per row of merged blocks
    out = np.empty((gh * gw, c, patch_size, patch_size), np.uint8)
    per_band = gw * merge_size                      # patches per row of merged blocks

    def blocks(r0: int, r1: int) -> None:
        part = rgb[r0 * band_rows:r1 * band_rows].reshape(
            r1 - r0, merge_size, patch_size, gw // merge_size, merge_size, patch_size, c)
        dst = out[r0 * per_band:r1 * per_band].reshape(
            r1 - r0, gw // merge_size, merge_size, merge_size, c, patch_size, patch_size)
        dst[...] = part.transpose(0, 3, 1, 4, 6, 2, 5)   # one strided copy into the output
    n = gh // merge_size
    if pool is None or parts < 2 or h * w < MIN_SPLIT_PIXELS:
        blocks(0, n)
    else:
        _run(pool, blocks, _bounds(n, parts))
    return out
