"""``POST /v1/images`` inspection: metadata, token count and cheap, documented heuristics.

Validates the whole file (pixels are decoded, at reduced JPEG DCT scale where that is enough) but
never builds model input, so an upload answers in milliseconds whatever its size.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from serve_app._image import (DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, FACTOR, ImageLimits, parser_reason,
                              image_id_for, load_image, open_image, smart_resize, to_rgb)
from serve_app.errors import ServeAppError

_COLOR_SPACES = {
    "1": "bilevel", "L": "grayscale", "LA": "grayscale+alpha", "La": "grayscale+alpha",
    "P": "palette", "PA": "palette+alpha", "RGB": "RGB", "RGBA": "RGB+alpha", "RGBa": "RGB+alpha",
    "RGBX": "RGB", "CMYK": "CMYK", "YCbCr": "YCbCr", "LAB": "Lab", "HSV": "HSV",
    "I": "grayscale (32-bit int)", "F": "grayscale (32-bit float)",
}
_HINT_SIDE = 640  # hints work on a copy at most this big: milliseconds whatever the input


def _clean(value, limit: int = 64) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    s = str(value).replace("\x00", "").strip()
    return s[:limit] or None


def exif_summary(im: Image.Image) -> dict:
    """Camera make/model, orientation and date taken (None where absent or unreadable)."""
    out = {"make": None, "model": None, "orientation": None, "date_taken": None}
    try:
        exif = im.getexif()
        out["make"], out["model"] = _clean(exif.get(0x010F)), _clean(exif.get(0x0110))
        orientation = exif.get(0x0112)
        out["orientation"] = int(orientation) if orientation is not None else None
        date = exif.get_ifd(0x8769).get(0x9003) or exif.get(0x0132)  # DateTimeOriginal, DateTime
        out["date_taken"] = _clean(date)
    except Exception:
        pass
    return out


def _hint_gray(im: Image.Image) -> np.ndarray:
    """A small grayscale copy; JPEGs are decoded at reduced DCT scale (draft), which is fine for
    hints but never used for model input (it would break parity)."""
    w, h = im.size
    if im.format == "JPEG" and max(w, h) > _HINT_SIDE:
        s = max(0.125, 0.75 * _HINT_SIDE / max(w, h))  # DCT scaling goes down to 1/8
        im.draft("L" if im.mode in ("L", "RGB", "YCbCr") else None, (math.ceil(w * s), math.ceil(h * s)))
    im = to_rgb(load_image(im))
    k = max(1, math.ceil(max(im.size) / _HINT_SIDE))
    if k > 1:
        im = im.reduce(k)
    return np.asarray(im.convert("L"))


def _longest_runs(mask: np.ndarray) -> np.ndarray:
    """Longest run of True in each row of a 2-D boolean mask."""
    h, w = mask.shape
    padded = np.zeros((h, w + 2), np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded.ravel())
    starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    best = np.zeros(h, np.int64)
    if starts.size:
        np.maximum.at(best, starts // (w + 2), ends - starts)
    return best


def _count_lines(dark: np.ndarray, min_frac: float = 0.3) -> int:
    """Thin bands of rows whose longest dark run spans >= min_frac of the width."""
    h, w = dark.shape
    rows = _longest_runs(dark) >= max(16, min_frac * w)
    if not rows.any():
        return 0
    edges = np.diff(np.concatenate(([0], rows.astype(np.int8), [0])))
    widths = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)
    return int((widths <= max(3, h // 80)).sum())  # thick dark areas are not ruled lines


def image_hints(gray: np.ndarray) -> dict:
    """Cheap heuristics, not classifiers: ``text_likelihood`` (uniform light/dark background with
    dense sharp edges, as in scans/screenshots of text) and ``table_likelihood`` (>= 2 long
    horizontal and >= 2 long vertical thin lines that contrast with the dominant background:
    ruled tables). Borderless tables, product photos on plain backgrounds and line art can fool
    them; the raw measurements are returned too."""
    g = gray.astype(np.int16)
    hist = np.bincount(gray.ravel(), minlength=256)
    bg = int(hist.argmax())
    lo, hi = max(0, bg - 24), min(255, bg + 24)
    bg_frac = float(hist[lo:hi + 1].sum() / gray.size)
    gx, gy = np.abs(np.diff(g, axis=1))[:-1, :], np.abs(np.diff(g, axis=0))[:, :-1]
    grad = np.maximum(gx, gy) if gx.size else np.zeros((1, 1), np.int16)
    weak = float((grad > 16).mean())
    strong = float((grad > 80).mean())
    sharp = strong / weak if weak > 0 else 0.0
    s_bg = min(1.0, max(0.0, (bg_frac - 0.4) / 0.4))
    s_edge = (min(1.0, weak / 0.02) if weak < 0.25 else max(0.0, 1 - (weak - 0.25) / 0.25))
    s_sharp = min(1.0, max(0.0, (sharp - 0.2) / 0.4))
    text = s_bg * s_edge * (0.4 + 0.6 * s_sharp)
    # lines: pixels clearly darker than a light background (or lighter than a dark one)
    dark = g < bg - 48 if bg >= 128 else g > bg + 48
    n_h, n_v = _count_lines(dark), _count_lines(dark.T)
    if n_h >= 2 and n_v >= 2:
        table = 0.6 + 0.4 * min(1.0, (n_h + n_v - 4) / 8)
    elif n_h >= 3:  # horizontal rules only (booktabs-style tables)
        table = 0.3
    else:
        table = 0.05 * min(n_h + n_v, 2)
    return {
        "text_likelihood": round(text, 3),
        "table_likelihood": round(table * (0.5 + 0.5 * s_bg), 3),
        "edge_density": round(weak, 4),
        "background_fraction": round(bg_frac, 4),
        "horizontal_lines": n_h,
        "vertical_lines": n_v,
        "heuristic": True,
    }


def inspect_image(data: bytes, limits: ImageLimits, min_pixels: int = DEFAULT_MIN_PIXELS,
                  max_pixels: int = DEFAULT_MAX_PIXELS, image_id: str | None = None) -> dict:
    """Metadata, token count and hints for ``POST /v1/images``; validates the whole file."""
    im = open_image(data, limits)
    fmt, mode, (w, h) = im.format, im.mode, im.size
    frames = int(getattr(im, "n_frames", 1) or 1)
    icc = bool(im.info.get("icc_profile"))
    dpi = im.info.get("dpi")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    try:
        gray = _hint_gray(im)  # loads (validates) the pixels
    except ServeAppError:
        raise
    except Exception as e:
        raise ServeAppError(f"invalid {fmt} image: {parser_reason(e)}", 400, "invalid_image") from None
    exif = exif_summary(im)
    if exif["orientation"] in (5, 6, 7, 8):
        w, h = h, w  # what the model sees after EXIF orientation
    rh, rw = smart_resize(h, w, FACTOR, min_pixels, max_pixels)
    image_id = image_id or image_id_for(data)
    return {
        "object": "image",
        "image_id": image_id,
        "url": f"image://{image_id}",
        "bytes": len(data),
        "format": fmt,
        "width": w,
        "height": h,
        "mode": mode,
        "color_space": _COLOR_SPACES.get(mode, "grayscale (16-bit)" if mode.startswith("I;16") else mode),
        "has_alpha": has_alpha,
        "icc_profile": icc,
        "frames": frames,
        "dpi": [round(float(d), 2) for d in dpi[:2]] if isinstance(dpi, tuple) and len(dpi) >= 2 else None,
        "exif": exif,
        "resized_width": rw,
        "resized_height": rh,
        "num_tokens": (rh // FACTOR) * (rw // FACTOR),
        "hints": image_hints(gray),
    }
