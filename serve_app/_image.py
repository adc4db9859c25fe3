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
:mod:`serve_app._image_inspect` adds metadata and hints for ``POST /v1/images``;
:mod:`serve_app._image_pipeline` adds identity (content hash), the byte-bounded caches and
counters; the Ray deployment in :mod:`serve_app.preprocess` only wraps that.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import math
import re
import warnings
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from serve_app._image_stripes import patch_order_split, resize_rgb
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


_OBJECT_REPR = re.compile(r"<[^<>]*? at 0x[0-9a-fA-F]+>")


def parser_reason(e: Exception) -> str:
    """A parser's message as a client may read it: without object reprs (``<_io.BytesIO object at
    0x..>``: memory addresses of this process), and capped in length."""
    msg = " ".join(_OBJECT_REPR.sub("", str(e)).split()) or type(e).__name__
    return msg if len(msg) <= 160 else msg[:157] + "..."


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
        raise ServeAppError(f"image is too large to decode safely: {parser_reason(e)}", 413,
                            "image_too_large") from None
    except Exception as e:  # untrusted input: any parser failure is the client's corrupt file
        raise ServeAppError(f"invalid {fmt} image: {parser_reason(e)}", 400, "invalid_image") from None
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
        raise ServeAppError(f"image is too large to decode safely: {parser_reason(e)}", 413,
                            "image_too_large") from None
    except Exception as e:
        raise ServeAppError(f"invalid {im.format} image (truncated or corrupt): {parser_reason(e)}", 400,
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
        raise ServeAppError(f"invalid {im.format} image: {parser_reason(e)}", 400, "invalid_image") from None


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


def patch_order(rgb: np.ndarray, patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE
                ) -> np.ndarray:
    """uint8 ``(H, W, C)`` -> uint8 ``(gh*gw, C, p, p)`` in transformers' patch order
    ``(gh/m, gw/m, m, m)``: the model input before normalisation and temporal repeat, 8x smaller
    than ``pixel_values`` (a cheaper thing to ship to the VLM; see benchmarks/transfer_bench.py)."""
    return patch_order_split(rgb, patch_size, merge_size)


def normalise_patches(patches: np.ndarray, temporal_patch_size: int = TEMPORAL_PATCH_SIZE
                      ) -> np.ndarray:
    """uint8 ``(N, C, p, p)`` from :func:`patch_order` -> float32 ``pixel_values``
    ``(N, C*T*p*p)``: one LUT pass (bit-identical to transformers), a still image repeated in T."""
    n, c, p, _ = patches.shape
    vals = _LUTS[0][patches] if _SAME_LUT else _LUTS[np.arange(c).reshape(1, c, 1, 1), patches]
    out = np.empty((n, c, temporal_patch_size, p, p), np.float32)
    for t in range(temporal_patch_size):
        out[:, :, t] = vals
    return out.reshape(n, c * temporal_patch_size * p * p)


def patchify(rgb: np.ndarray, patch_size: int = PATCH_SIZE, merge_size: int = MERGE_SIZE,
             temporal_patch_size: int = TEMPORAL_PATCH_SIZE) -> np.ndarray:
    """uint8 ``(H, W, 3)`` -> normalised float32 ``(gh*gw, 3*T*p*p)`` in transformers' order
    ``(gh/m, gw/m, m, m, C, T, p, p)``; reorders the 1-byte pixels, then one LUT pass."""
    return normalise_patches(patch_order(rgb, patch_size, merge_size), temporal_patch_size)


def preprocess_rgb(im: Image.Image, min_pixels: int = DEFAULT_MIN_PIXELS,
                   max_pixels: int = DEFAULT_MAX_PIXELS, compact: bool = False,
                   pool: Executor | None = None, parts: int = 1
                   ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """RGB PIL image -> ``(pixel_values, grid_thw)`` exactly as Qwen2VLImageProcessorPil; with
    ``compact`` the uint8 patches of :func:`patch_order` instead (normalised later, on the GPU).
    ``pool``/``parts``: the resize and the patch reorder in bands on threads, same bytes
    (``_image_stripes``)."""
    if im.mode != "RGB":
        raise ValueError(f"expected an RGB image, got {im.mode}")
    w, h = im.size
    rh, rw = smart_resize(h, w, FACTOR, min_pixels, max_pixels)
    patches = patch_order_split(resize_rgb(im, (rw, rh), pool, parts), PATCH_SIZE, MERGE_SIZE, pool, parts)
    return (patches if compact else normalise_patches(patches)), (1, rh // PATCH_SIZE, rw // PATCH_SIZE)
