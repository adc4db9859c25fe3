"""Image decoding, validation and Qwen3-VL preprocessing, in memory, without Ray or torch.

Everything a client can get wrong becomes a :class:`ServeAppError` with a stable ``code``:

============================  ======  ==============================================================
code                          status  when
============================  ======  ==============================================================
``invalid_base64``            400     a data URL that is not (strict, standard-alphabet) base64
``invalid_image_url``         400     a string that is neither ``data:``, ``image://<id>`` nor http(s)
``url_not_allowed``           400     other URL schemes, fetching disabled, host/address refused
``image_fetch_failed``        400     the remote server failed, timed out or redirected too often
``invalid_image``             400     empty, truncated or corrupt data
``bad_aspect_ratio``          400     long side / short side above ``max_aspect_ratio`` (Qwen: 200)
``too_many_images``           400     more than ``max_images_per_request``
``invalid_pixel_limits``      400     a request's min/max_pixels that would *raise* the server's
``image_not_found``           404     ``image://<id>`` that this server does not hold (any more)
``image_too_large``           413     encoded bytes or header-declared pixels over the limits
``unsupported_image_format``  415     SVG, PDF, text, HEIC... anything but JPEG/PNG/WebP/GIF/BMP/TIFF
============================  ======  ==============================================================

The resize/normalise/patchify path is bit-identical to transformers' ``Qwen2VLImageProcessorPil``
configured for Qwen3-VL (PIL bicubic, rescale 1/255 in float64 then float32, mean = std = 0.5):
normalisation is a 256-entry lookup table built with exactly those float operations.
:class:`ImagePipeline` adds identity (content hash), the byte-bounded caches and counters; the Ray
deployment in :mod:`serve_app.preprocess` only wraps it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import math
import re
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, fields
from typing import Protocol, Sequence

import numpy as np
from PIL import Image, ImageOps

from serve_app._fetch import FetchPolicy
from serve_app.engine.protocol import ImageInput
from serve_app.errors import ServeAppError

logger = logging.getLogger(__name__)

# Qwen3-VL vision tower (preprocessor_config.json of Qwen/Qwen3-VL-*).
PATCH_SIZE = 16
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
FACTOR = PATCH_SIZE * MERGE_SIZE  # 32: resized sides are multiples of this
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
DEFAULT_MIN_PIXELS = 65_536
DEFAULT_MAX_PIXELS = 16_777_216

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_SUPPORTED_TEXT = "JPEG, PNG, WebP, GIF, BMP or TIFF"


@dataclass(frozen=True)
class ImageLimits:
    """Per-image and per-request limits (defaults match ``serve_app.config.ImagesConfig``)."""

    max_image_bytes: int = 20 * 1024 * 1024       # encoded size -> 413
    max_decoded_pixels: int = 64_000_000          # width*height from the header -> 413
    max_images_per_request: int = 8               # -> 400
    max_aspect_ratio: float = 200.0               # Qwen's smart_resize rule -> 400


def configure_pil(limits: ImageLimits) -> None:
    """Process-wide PIL settings for a replica: PIL's own bomb check agrees with ours and its
    warning becomes an error (our header check runs first; this is the backstop)."""
    Image.MAX_IMAGE_PIXELS = int(limits.max_decoded_pixels)
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


# ---------------------------------------------------------------------------------------------
# Identity and sources
# ---------------------------------------------------------------------------------------------

_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*):")
_B64_BAD_RE = re.compile(r"[^A-Za-z0-9+/=]")


def image_id_for(data: bytes) -> str:
    """Content hash of the encoded bytes: 32 hex chars (blake2b-128)."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def parse_image_ref(ref: str) -> str:
    """``image://<32 hex>`` -> the id."""
    image_id = ref[len("image://"):].strip().lower()
    if not _ID_RE.match(image_id):
        raise ServeAppError(f"malformed image reference {ref[:80]!r}: expected image://<32 hex chars> "
                            "as returned by POST /v1/images", 400, "invalid_image_url")
    return image_id


def parse_data_url(url: str, max_bytes: int) -> bytes:
    """Decode ``data:image/...;base64,...`` strictly; the size is checked before decoding."""
    comma = url.find(",", 0, 256)
    if comma < 0:
        raise ServeAppError("malformed data URL: expected data:image/<type>;base64,<data>", 400,
                            "invalid_image_url")
    header = url[5:comma].strip().lower()
    parts = [p.strip() for p in header.split(";")]
    media_type, params = parts[0], parts[1:]
    if "base64" not in params:
        raise ServeAppError("data URL must be base64-encoded (data:image/<type>;base64,<data>)", 400,
                            "invalid_base64")
    if media_type in ("image/svg+xml", "image/svg"):
        raise ServeAppError(f"unsupported image format (SVG); send {_SUPPORTED_TEXT}", 415,
                            "unsupported_image_format")
    if not (media_type.startswith("image/") or media_type == "application/octet-stream"):
        raise ServeAppError(f"data URL media type {media_type or '(none)'!r} is not an image; "
                            f"send {_SUPPORTED_TEXT}", 415, "unsupported_image_format")
    n = len(url) - comma - 1
    if n == 0:
        raise ServeAppError("data URL has no data", 400, "invalid_image")
    if n // 4 * 3 - 2 > max_bytes:
        raise ServeAppError(f"image is too large: about {n // 4 * 3} bytes encoded, limit {max_bytes}",
                            413, "image_too_large")
    payload = url[comma + 1:]
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        bad = _B64_BAD_RE.search(payload)
        if bad is not None:
            ch = bad.group()
            hint = " (URL-safe alphabet; use standard base64)" if ch in "-_" else ""
            raise ServeAppError(f"invalid base64 in data URL: character {ch!r} at offset {bad.start()}"
                                f"{hint}", 400, "invalid_base64") from None
        raise ServeAppError(f"invalid base64 in data URL: {e}", 400, "invalid_base64") from None
    if len(data) > max_bytes:
        raise ServeAppError(f"image is too large: {len(data)} bytes, limit {max_bytes}", 413,
                            "image_too_large")
    return data


def classify_source(source: str | bytes) -> str:
    """``"bytes" | "data" | "ref" | "url"``; refuses other schemes and garbage."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "bytes"
    if not isinstance(source, str):
        raise ServeAppError(f"image source must be a string or bytes, got {type(source).__name__}", 400,
                            "invalid_image_url")
    head = source[:16].lower()
    if head.startswith("data:"):
        return "data"
    if head.startswith("image://"):
        return "ref"
    if head.startswith(("http://", "https://")):
        return "url"
    m = _SCHEME_RE.match(source[:64])
    if m:
        raise ServeAppError(f"URL scheme {m.group(1).lower()!r} is not allowed; send a data: URL, an "
                            "image://<id> from POST /v1/images, or an http(s) URL", 400, "url_not_allowed")
    raise ServeAppError("image URL must be a data: URL, image://<id> or http(s) URL", 400,
                        "invalid_image_url")


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------

def sniff_format(data: bytes) -> str:
    """PIL format name from magic bytes; anything else is a 415 naming what it looks like."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM":
        return "BMP"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    head = data[:512].lstrip()
    if head[:5] == b"%PDF-":
        what = "PDF"
    elif b"<svg" in data[:4096].lower():
        what = "SVG"
    elif data[4:8] == b"ftyp":
        what = "HEIF/AVIF" if data[8:12] in (b"heic", b"heix", b"mif1", b"avif", b"msf1") else "video/ISO-BMFF"
    elif _looks_like_text(data[:4096]):
        what = "text"
    else:
        what = "unknown format"
    raise ServeAppError(f"unsupported image format ({what}); send {_SUPPORTED_TEXT}", 415,
                        "unsupported_image_format")


def _looks_like_text(head: bytes) -> bool:
    try:
        s = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return bool(s) and sum(c.isprintable() or c.isspace() for c in s) >= 0.95 * len(s)


def open_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Open (header only) and check size, pixel count and aspect ratio before any pixel decode."""
    if not data:
        raise ServeAppError("image is empty (0 bytes)", 400, "invalid_image")
    if len(data) > limits.max_image_bytes:
        raise ServeAppError(f"image is too large: {len(data)} bytes, limit {limits.max_image_bytes}",
                            413, "image_too_large")
    fmt = sniff_format(data)
    try:
        im = Image.open(io.BytesIO(data), formats=[fmt])
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ServeAppError(f"image is too large to decode safely: {e}", 413, "image_too_large") from None
    except Exception as e:  # untrusted input: any parser failure is the client's corrupt file
        raise ServeAppError(f"invalid {fmt} image: {e}", 400, "invalid_image") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise ServeAppError(f"invalid {fmt} image: size {w}x{h}", 400, "invalid_image")
    if w * h > limits.max_decoded_pixels:
        raise ServeAppError(f"image is too large: {w}x{h} = {w * h} pixels, limit "
                            f"{limits.max_decoded_pixels}", 413, "image_too_large")
    check_aspect_ratio(w, h, limits.max_aspect_ratio)
    return im


def check_aspect_ratio(width: int, height: int, max_ratio: float) -> None:
    ratio = max(width, height) / min(width, height)
    if ratio > max_ratio:
        raise ServeAppError(f"image aspect ratio {ratio:.1f} ({width}x{height}) is above {max_ratio:g}",
                            400, "bad_aspect_ratio")


def load_image(im: Image.Image) -> Image.Image:
    """Decode the first frame's pixels; truncated or corrupt data is a 400."""
    try:
        im.seek(0)
        im.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ServeAppError(f"image is too large to decode safely: {e}", 413, "image_too_large") from None
    except Exception as e:
        raise ServeAppError(f"invalid {im.format} image (truncated or corrupt): {e}", 400,
                            "invalid_image") from None
    return im


def exif_orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(0x0112, 1)
        return int(value) if 1 <= int(value) <= 8 else 1
    except Exception:  # malformed EXIF: ignore orientation rather than refuse the photo
        return 1


def apply_orientation(im: Image.Image) -> Image.Image:
    """``ImageOps.exif_transpose`` only when needed (it copies the image even for orientation 1)."""
    if exif_orientation(im) == 1:
        return im
    try:
        return ImageOps.exif_transpose(im)
    except Exception as e:
        logger.warning("ignoring unusable EXIF orientation: %s", e)
        return im


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB; transparency is composited onto white, high bit depths scaled."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        out = Image.new("RGB", im.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im)
        if mode == "F":
            a = a.astype(np.float32)
            a = a * 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else a  # [0,1] floats, else [0,255]
            a = np.nan_to_num(a)
        else:  # 16-bit data (PNG/TIFF 16-bit greyscale): keep the top 8 bits
            a = a.astype(np.float32) / 257.0
        g = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(g, "L").convert("RGB")
    try:
        return im.convert("RGB")  # L, 1, P, CMYK, YCbCr, RGBX...
    except Exception as e:
        raise ServeAppError(f"unsupported colour mode {mode!r}: {e}", 415, "unsupported_image_format") from None


def decode_image(data: bytes, limits: ImageLimits) -> Image.Image:
    """Bytes -> oriented 8-bit RGB PIL image (first frame), with every limit enforced."""
    im = load_image(open_image(data, limits))
    try:
        return to_rgb(apply_orientation(im))
    except ServeAppError:
        raise
    except Exception as e:
        raise ServeAppError(f"invalid {im.format} image: {e}", 400, "invalid_image") from None


# ---------------------------------------------------------------------------------------------
# Qwen3-VL preprocessing
# ---------------------------------------------------------------------------------------------

def smart_resize(height: int, width: int, factor: int = FACTOR, min_pixels: int = DEFAULT_MIN_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Qwen's rule (same arithmetic as transformers): sides multiple of ``factor``, area within
    [min_pixels, max_pixels] where possible, aspect ratio kept. Callers check the ratio first."""
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def num_image_tokens(height: int, width: int, min_pixels: int = DEFAULT_MIN_PIXELS,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> int:
    """LM tokens for one image: resized h * w / (patch * merge)**2."""
    h, w = smart_resize(height, width, FACTOR, min_pixels, max_pixels)
    return (h // FACTOR) * (w // FACTOR)


def _norm_lut(mean: float, std: float) -> np.ndarray:
    # transformers: uint8 -> float64 * (1/255) -> float32, then (x - mean) / std in float32
    x = (np.arange(256, dtype=np.float64) * (1 / 255)).astype(np.float32)
    return (x - np.float32(mean)) / np.float32(std)


_LUTS = np.stack([_norm_lut(m, s) for m, s in zip(IMAGE_MEAN, IMAGE_STD)])  # (3, 256)
_SAME_LUT = bool((_LUTS == _LUTS[0]).all())


def patchify(rgb: np.ndarray, patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE,
             temporal_patch_size: int = TEMPORAL_PATCH_SIZE) -> np.ndarray:
    """uint8 ``(H, W, 3)`` -> normalised float32 ``(gh*gw, 3*T*p*p)`` in transformers' order
    ``(gh/m, gw/m, m, m, C, T, p, p)``; reorders the 1-byte pixels, then one LUT pass."""
    h, w, c = rgb.shape
    gh, gw = h // patch_size, w // patch_size
    blocks = rgb.reshape(gh // merge_size, merge_size, patch_size, gw // merge_size, merge_size,
                         patch_size, c).transpose(0, 3, 1, 4, 6, 2, 5)
    blocks = np.ascontiguousarray(blocks)  # (GH, GW, m, m, C, p, p) uint8
    if _SAME_LUT:
        vals = _LUTS[0][blocks]
    else:
        vals = _LUTS[np.arange(c).reshape(1, 1, 1, 1, c, 1, 1), blocks]
    out = np.empty(blocks.shape[:5] + (temporal_patch_size, patch_size, patch_size), np.float32)
    for t in range(temporal_patch_size):  # a still image is repeated in time
        out[:, :, :, :, :, t] = vals
    return out.reshape(gh * gw, c * temporal_patch_size * patch_size * patch_size)


def preprocess_rgb(im: Image.Image, min_pixels: int = DEFAULT_MIN_PIXELS,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int, int]]:
    """RGB PIL image -> ``(pixel_values, grid_thw)`` exactly as Qwen2VLImageProcessorPil."""
    if im.mode != "RGB":
        raise ValueError(f"expected an RGB image, got {im.mode}")
    w, h = im.size
    rh, rw = smart_resize(h, w, FACTOR, min_pixels, max_pixels)
    if (rh, rw) != (h, w):
        im = im.resize((rw, rh), Image.Resampling.BICUBIC)
    pixel_values = patchify(np.asarray(im))
    return pixel_values, (1, rh // PATCH_SIZE, rw // PATCH_SIZE)


# ---------------------------------------------------------------------------------------------
# Inspection (POST /v1/images)
# ---------------------------------------------------------------------------------------------

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
        raise ServeAppError(f"invalid {fmt} image: {e}", 400, "invalid_image") from None
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


# ---------------------------------------------------------------------------------------------
# Caches and the pipeline used by the Preprocess deployment
# ---------------------------------------------------------------------------------------------

class ByteLRU:
    """Thread-safe LRU bounded by the total ``size`` of its values (bytes). Items bigger than
    half the capacity are not kept (one huge image must not flush everything else)."""

    def __init__(self, capacity_bytes: int):
        self.capacity = max(0, int(capacity_bytes))
        self._items: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key):
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item[0]

    def put(self, key, value, size: int) -> bool:
        if size > self.capacity // 2:
            return False
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            self._items[key] = (value, size)
            self.bytes += size
            while self.bytes > self.capacity:
                _, (_, s) = self._items.popitem(last=False)
                self.bytes -= s
                self.evictions += 1
        return True

    def __contains__(self, key) -> bool:
        with self._lock:
            return key in self._items

    def stats(self) -> dict:
        with self._lock:
            return {"hits": self.hits, "misses": self.misses, "bytes": self.bytes,
                    "entries": len(self._items), "evictions": self.evictions,
                    "capacity_bytes": self.capacity}


class ImageStore(Protocol):
    """Where uploaded source bytes live for ``image://<id>``; ``get`` returns None when unknown."""

    def get(self, image_id: str) -> bytes | None: ...

    def put(self, image_id: str, data: bytes) -> None: ...

    def stats(self) -> dict: ...


class LocalImageStore:
    """In-process :class:`ImageStore` (one replica, or tests)."""

    def __init__(self, capacity_bytes: int):
        self._lru = ByteLRU(capacity_bytes)

    def get(self, image_id: str) -> bytes | None:
        return self._lru.get(image_id)

    def put(self, image_id: str, data: bytes) -> None:
        if not self._lru.put(image_id, bytes(data), len(data)):
            raise ServeAppError(f"image of {len(data)} bytes does not fit the upload store", 413,
                                "image_too_large")

    def stats(self) -> dict:
        return self._lru.stats()


@dataclass(frozen=True)
class PreprocessOptions:
    """The Preprocess deployment's settings: ``serve_app.config.ImagesConfig`` keys plus
    ``url_allowed_networks`` (CIDRs exempt from the private-address refusal; tests only) and
    ``upload_store`` ("actor": shared by all replicas, "local": per replica)."""

    limits: ImageLimits = ImageLimits()
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = DEFAULT_MAX_PIXELS
    cache_bytes: int = 512 * 2**20
    upload_cache_bytes: int = 256 * 2**20
    upload_store: str = "actor"
    fetch: FetchPolicy = FetchPolicy()

    @classmethod
    def from_dict(cls, cfg: dict | None) -> "PreprocessOptions":
        cfg = dict(cfg or {})
        limit_keys = {f.name for f in fields(ImageLimits)}
        limits = ImageLimits(**{k: cfg.pop(k) for k in list(cfg) if k in limit_keys})
        fetch = FetchPolicy(
            enabled=bool(cfg.pop("allow_remote_urls", False)),
            allowed_hosts=tuple(cfg.pop("url_allowlist", ())),
            allowed_networks=tuple(cfg.pop("url_allowed_networks", ())),
            timeout_s=float(cfg.pop("url_timeout_s", 5.0)),
            max_redirects=int(cfg.pop("url_max_redirects", 3)),
            max_bytes=limits.max_image_bytes)
        opts = cls(limits=limits, fetch=fetch,
                   min_pixels=int(cfg.pop("min_pixels", DEFAULT_MIN_PIXELS)),
                   max_pixels=int(cfg.pop("max_pixels", DEFAULT_MAX_PIXELS)),
                   cache_bytes=int(cfg.pop("cache_mb", 512)) * 2**20,
                   upload_cache_bytes=int(cfg.pop("upload_cache_mb", 256)) * 2**20,
                   upload_store=str(cfg.pop("upload_store", "actor")))
        if cfg:
            raise ValueError(f"unknown Preprocess settings: {sorted(cfg)}")
        if not FACTOR * FACTOR <= opts.min_pixels <= opts.max_pixels:
            raise ValueError(f"need {FACTOR * FACTOR} <= min_pixels <= max_pixels, got "
                             f"{opts.min_pixels}, {opts.max_pixels}")
        if opts.upload_store not in ("actor", "local"):
            raise ValueError(f"upload_store must be 'actor' or 'local', got {opts.upload_store!r}")
        return opts


class ImagePipeline:
    """Sources -> :class:`ImageInput`, with a byte-bounded LRU of results keyed by
    ``(image_id, min_pixels, max_pixels)`` and an :class:`ImageStore` for uploads. Synchronous and
    thread-safe: the deployment runs it in worker threads. http(s) sources must be fetched by the
    caller (async) and passed as bytes; a URL string reaching here means fetching is disabled."""

    def __init__(self, options: PreprocessOptions | None = None, store: ImageStore | None = None):
        self.options = options or PreprocessOptions()
        self.limits = self.options.limits
        self.store = store if store is not None else LocalImageStore(self.options.upload_cache_bytes)
        self.cache = ByteLRU(self.options.cache_bytes)
        self._lock = threading.Lock()
        self.images_processed = 0
        self.uploads = 0
        self.errors: dict[str, int] = {}

    def pixel_bounds(self, min_pixels: int | None, max_pixels: int | None) -> tuple[int, int]:
        """A request may lower the server's min/max_pixels, never raise them."""
        hi = self.options.max_pixels if max_pixels is None else int(max_pixels)
        lo = min(self.options.min_pixels, hi) if min_pixels is None else int(min_pixels)
        if hi > self.options.max_pixels:
            raise ServeAppError(f"max_pixels {hi} is above this server's limit {self.options.max_pixels}",
                                400, "invalid_pixel_limits", "max_pixels")
        if lo > self.options.min_pixels:
            raise ServeAppError(f"min_pixels {lo} is above this server's setting {self.options.min_pixels}",
                                400, "invalid_pixel_limits", "min_pixels")
        if lo < FACTOR * FACTOR or hi < lo:
            raise ServeAppError(f"need {FACTOR * FACTOR} <= min_pixels <= max_pixels, got {lo}, {hi}",
                                400, "invalid_pixel_limits", "min_pixels")
        return lo, hi

    def check_count(self, n: int) -> None:
        if n > self.limits.max_images_per_request:
            raise ServeAppError(f"too many images: {n}, limit {self.limits.max_images_per_request} per "
                                "request", 400, "too_many_images")

    def process(self, sources: Sequence[str | bytes], min_pixels: int | None = None,
                max_pixels: int | None = None) -> list[ImageInput]:
        self.check_count(len(sources))
        lo, hi = self.pixel_bounds(min_pixels, max_pixels)
        out = []
        for i, src in enumerate(sources):
            try:
                out.append(self.process_one(src, lo, hi))
            except ServeAppError as e:
                raise with_index(e, i, len(sources)) from None
        return out

    def process_one(self, source: str | bytes, min_pixels: int, max_pixels: int) -> ImageInput:
        kind = classify_source(source)
        if kind == "ref":
            image_id = parse_image_ref(source)
            hit = self.cache.get((image_id, min_pixels, max_pixels))
            if hit is not None:
                return hit
            data = self.store.get(image_id)
            if data is None:
                raise ServeAppError(f"image {image_id} not found: upload it with POST /v1/images (uploads "
                                    "are kept in a bounded cache and may expire)", 404, "image_not_found")
        elif kind == "url":
            raise ServeAppError("fetching image URLs is disabled on this server; send a data: URL or "
                                "upload with POST /v1/images", 400, "url_not_allowed")
        else:
            data = self.source_bytes(source)
            image_id = image_id_for(data)
            hit = self.cache.get((image_id, min_pixels, max_pixels))
            if hit is not None:
                return hit
        pixel_values, grid_thw = preprocess_rgb(decode_image(data, self.limits), min_pixels, max_pixels)
        pixel_values.flags.writeable = False  # shared by cache hits
        result = ImageInput(pixel_values, grid_thw, image_id)
        self.cache.put((image_id, min_pixels, max_pixels), result, pixel_values.nbytes)
        with self._lock:
            self.images_processed += 1
        return result

    def source_bytes(self, source: str | bytes) -> bytes:
        """bytes or a data URL -> encoded image bytes (size-checked)."""
        if isinstance(source, str):
            return parse_data_url(source, self.limits.max_image_bytes)
        data = bytes(source)
        if len(data) > self.limits.max_image_bytes:
            raise ServeAppError(f"image is too large: {len(data)} bytes, limit {self.limits.max_image_bytes}",
                                413, "image_too_large")
        return data

    def upload(self, source: str | bytes) -> dict:
        """Validate + inspect, then keep the bytes for ``image://<id>``."""
        kind = classify_source(source)
        if kind == "ref":
            image_id = parse_image_ref(source)
            data = self.store.get(image_id)
            if data is None:
                raise ServeAppError(f"image {image_id} not found", 404, "image_not_found")
        elif kind == "url":
            raise ServeAppError("fetching image URLs is disabled on this server", 400, "url_not_allowed")
        else:
            data = self.source_bytes(source)
            image_id = image_id_for(data)
        info = inspect_image(data, self.limits, self.options.min_pixels, self.options.max_pixels, image_id)
        self.store.put(image_id, data)
        with self._lock:
            self.uploads += 1
        return info

    def count_error(self, code: str | None) -> None:
        with self._lock:
            self.errors[code or "unknown"] = self.errors.get(code or "unknown", 0) + 1

    def stats(self) -> dict:
        with self._lock:
            counters = {"images_processed": self.images_processed, "uploads": self.uploads,
                        "errors": dict(self.errors)}
        return {**counters, "cache": self.cache.stats(), "upload_store": self.store.stats()}


def with_index(e: ServeAppError, i: int, n: int) -> ServeAppError:
    """Name the failing image when a request has several."""
    if n <= 1:
        return e
    return ServeAppError(f"image {i}: {e.message}", e.status, e.code, e.param, e.type)
