"""Image side of serve_app (no Ray): parity with transformers, limits, odd inputs, caches (inspect and
URL fetching: test_image_inspect_fetch.py)."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from serve_app._image import (ImageLimits, decode_image, image_id_for, num_image_tokens,
                              parse_data_url, preprocess_rgb, smart_resize)
from serve_app._image_pipeline import ImagePipeline, PreprocessOptions
from serve_app.errors import ServeAppError

LIMITS = ImageLimits()


# ------------------------------------------------------------------------------------------ helpers

def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def noise(w: int, h: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "RGB":
        return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (h, w, 4), dtype=np.uint8), "RGBA")
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


def png_bytes(w: int, h: int, bit_depth: int = 8, color_type: int = 0, raw: bytes | None = None,
              chunk_rows: int = 4096) -> bytes:
    """A PNG written by hand: lets a header claim any size, and streams zero rows through zlib
    so a multi-gigapixel decompression bomb costs only milliseconds and kilobytes to build."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    if raw is None:
        comp = zlib.compressobj(9)
        row = b"\x00" * (1 + w * bit_depth // 8)
        block = row * min(h, chunk_rows)
        parts, left = [], h
        while left > 0:
            n = min(left, chunk_rows)
            parts.append(comp.compress(block if n == chunk_rows else row * n))
            left -= n
        parts.append(comp.flush())
        idat = b"".join(parts)
    else:
        idat = zlib.compress(raw)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def err(fn, *args, **kw) -> ServeAppError:
    with pytest.raises(ServeAppError) as ei:
        fn(*args, **kw)
    return ei.value


def pipeline(**cfg) -> ImagePipeline:
    return ImagePipeline(PreprocessOptions.from_dict({"upload_store": "local", **cfg}))


# ------------------------------------------------------------------------------------------ parity

@pytest.fixture(scope="module")
def hf():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    # Qwen3-VL's preprocessor_config.json: patch 16, merge 2, temporal 2, mean = std = 0.5.
    return Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                    image_mean=[0.5] * 3, image_std=[0.5] * 3,
                                    min_pixels=65_536, max_pixels=16_777_216)


def hf_run(hf, im, min_pixels=65_536, max_pixels=16_777_216):
    out = hf(images=[im], min_pixels=min_pixels, max_pixels=max_pixels, return_tensors="np")
    return out["pixel_values"], tuple(int(x) for x in out["image_grid_thw"][0])


PARITY_SIZES = [(1, 1), (2, 3), (15, 17), (31, 33), (32, 32), (100, 37), (224, 224), (333, 517),
                (640, 480), (1000, 7), (7, 1000), (1279, 719), (1920, 1080), (3000, 15)]


@pytest.mark.parametrize("w,h", PARITY_SIZES)
def test_parity_sizes(hf, w, h):
    im = noise(w, h, seed=w * 7919 + h)
    ours, grid = preprocess_rgb(im)
    ref, ref_grid = hf_run(hf, im)
    assert grid == ref_grid
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (grid[1] * grid[2], 1536)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
    assert np.array_equal(ours, ref)  # in fact bit-identical


@pytest.mark.parametrize("w,h", [(1920, 1080), (1280, 720), (1366, 768), (1000, 700), (3000, 2000),
                                 (1919, 1081), (640, 480), (97, 3001)])
@pytest.mark.parametrize("parts", [2, 3, 8])
def test_banded_resize_and_patches_are_bit_identical(hf, w, h, parts):
    """The resize in bands of rows (horizontal pass) and columns (vertical pass), and the patch
    reorder in bands of block rows, on threads (``images.resize_threads``): the same bytes as
    one thread, and as HF's processor; every pass combination (width only, height only, both)."""
    from concurrent.futures import ThreadPoolExecutor
    im = noise(w, h, seed=w + h)
    with ThreadPoolExecutor(parts) as pool:
        for lo, hi in [(65_536, 2_359_296), (65_536, 16_777_216)]:
            one, grid = preprocess_rgb(im, lo, hi, compact=True)
            banded, grid2 = preprocess_rgb(im, lo, hi, compact=True, pool=pool, parts=parts)
            assert grid == grid2 and banded.dtype == np.uint8 and np.array_equal(one, banded)
            full, _ = preprocess_rgb(im, lo, hi, pool=pool, parts=parts)
            ref, ref_grid = hf_run(hf, im, lo, hi)
            assert ref_grid == grid and np.array_equal(full, ref)


def test_resize_threads_setting():
    assert pipeline(resize_threads=1)._bands is None and pipeline()._bands is not None
    with pytest.raises(ValueError, match="resize_threads"):
        pipeline(resize_threads=0)


@pytest.mark.parametrize("min_pixels,max_pixels", [(1024, 1024), (4096, 200_000), (65_536, 500_000),
                                                   (1024, 16_777_216)])
def test_parity_lowered_pixel_limits(hf, min_pixels, max_pixels):
    for w, h in [(1920, 1080), (45, 301), (800, 800)]:
        im = noise(w, h, seed=h)
        ours, grid = preprocess_rgb(im, min_pixels, max_pixels)
        ref, ref_grid = hf_run(hf, im, min_pixels, max_pixels)
        assert grid == ref_grid and np.array_equal(ours, ref)


@pytest.mark.parametrize("mode", ["RGB", "L", "P", "CMYK", "1", "RGBA", "LA", "I;16"])
def test_parity_modes_through_decode(hf, mode):
    """Whole path (encode -> our decode -> patchify) against HF fed the same decoded RGB; for modes
    where PIL's own convert('RGB') is right, also against HF fed the raw decoded image."""
    base = noise(97, 61, seed=3)
    if mode == "I;16":
        im = Image.fromarray((np.asarray(base.convert("L")).astype(np.uint16) * 257))
    elif mode == "LA":
        im = base.convert("LA")
    else:
        im = noise(97, 61, mode, seed=3)
    fmt = "TIFF" if mode == "CMYK" else "PNG"
    data = encode(im, fmt)
    rgb = decode_image(data, LIMITS)
    assert rgb.mode == "RGB" and rgb.size == (97, 61)
    ours = pipeline().process([data])[0]
    ref, grid = hf_run(hf, rgb)
    assert ours.grid_thw == grid and ours.compact and np.array_equal(ours.float_pixels(), ref)
    if mode in ("RGB", "L", "P", "CMYK", "1"):
        raw_ref, _ = hf_run(hf, Image.open(io.BytesIO(data)))
        assert np.array_equal(ours.float_pixels(), raw_ref)


def test_parity_jpeg_end_to_end(hf):
    data = encode(noise(1280, 720, seed=5), "JPEG", quality=85)
    ours = pipeline().process([data])[0]
    ref, grid = hf_run(hf, Image.open(io.BytesIO(data)))
    assert ours.grid_thw == grid == (1, 44, 80)  # 720/32 = 22.5 rounds half-to-even: 704
    assert np.array_equal(ours.float_pixels(), ref)


# ---------------------------------------------------------------------------- smart_resize / tokens

def test_smart_resize_matches_transformers():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_resize
    rng = np.random.default_rng(0)
    sizes = [(1, 1), (1, 200), (200, 1), (32, 32), (1080, 1920), (4000, 3000), (16384, 16384)]
    sizes += [tuple(int(v) for v in rng.integers(1, 5000, 2)) for _ in range(400)]
    for h, w in sizes:
        if max(h, w) / min(h, w) > 200:
            continue
        for lo, hi in [(65_536, 16_777_216), (1024, 1024), (3136, 1_003_520), (65_536, 262_144)]:
            assert smart_resize(h, w, 32, lo, hi) == hf_resize(h, w, 32, lo, hi)


def test_token_count_formula(hf):
    for h, w in [(1, 1), (480, 640), (1080, 1920), (2000, 30), (3024, 4032), (257, 255)]:
        rh, rw = smart_resize(h, w)
        n = num_image_tokens(h, w)
        assert n == rh * rw // 1024 == hf.get_number_of_image_patches(h, w) // 4
        assert rh % 32 == 0 and rw % 32 == 0
    assert num_image_tokens(1080, 1920) == 34 * 60  # 1088 x 1920
    assert num_image_tokens(1, 1) == 64             # upscaled to min_pixels 256 x 256
    assert num_image_tokens(10_000, 10_000) == 16_384  # capped at max_pixels (4096 x 4096)
    im = pipeline().process([encode(noise(640, 480))])[0]
    assert im.num_tokens() == num_image_tokens(480, 640) == 300


# ------------------------------------------------------------------------------ bad-input corpus

def _jpeg(w=64, h=48, **kw) -> bytes:
    return encode(noise(w, h), "JPEG", **kw)


BAD_INPUTS = {
    "truncated_jpeg": (lambda: _jpeg(256, 256)[:1500], 400, "invalid_image"),
    "truncated_png": (lambda: encode(noise(256, 256))[:3000], 400, "invalid_image"),
    "zero_bytes": (lambda: b"", 400, "invalid_image"),
    "random_bytes": (lambda: np.random.default_rng(1).integers(0, 256, 4096, np.uint8).tobytes(),
                     415, "unsupported_image_format"),
    "png_header_60000x60000": (lambda: png_bytes(60000, 60000, raw=b"\x00"), 413, "image_too_large"),
    "bomb_png_12000x12000": (lambda: png_bytes(12000, 12000), 413, "image_too_large"),
    "svg": (lambda: b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" '
                    b'height="10"><rect width="10" height="10"/></svg>', 415, "unsupported_image_format"),
    "text": (lambda: b"hello, this is not an image\n" * 10, 415, "unsupported_image_format"),
    "pdf": (lambda: b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n", 415,
            "unsupported_image_format"),
    "heic": (lambda: b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", 415, "unsupported_image_format"),
    "aspect_10000x10": (lambda: encode(Image.new("L", (10000, 10))), 400, "bad_aspect_ratio"),
    "over_20MB": (lambda: b"\xff\xd8\xff" + b"\x00" * (20 * 1024 * 1024), 413, "image_too_large"),
    "gif_garbage": (lambda: b"GIF89a" + b"\x01" * 40, 400, "invalid_image"),
    "png_signature_then_garbage": (lambda: b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2, 400, "invalid_image"),
}


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # we refuse it: 413
@pytest.mark.parametrize("name", sorted(BAD_INPUTS))
def test_bad_input_corpus(name):
    make, status, code = BAD_INPUTS[name]
    data = make()
    t0 = time.perf_counter()
    e = err(pipeline().process, [data])
    assert (e.status, e.code) == (status, code), e
    assert e.message and len(e.message) < 300
    assert " at 0x" not in e.message and "object" not in e.message, e.message   # no reprs of ours
    assert time.perf_counter() - t0 < 2.0  # refused before any big allocation
    # the same bytes as a data URL give the same answer (unless the URL layer refuses first)
    if data:
        e2 = err(pipeline().process, [data_url(data)])
        assert (e2.status, e2.code) == (status, code)


def test_decompression_bomb_pil_backstop():
    """With our own limit set absurdly high, PIL's DecompressionBombError still becomes a 413."""
    limits = ImageLimits(max_decoded_pixels=10**12)
    e = err(decode_image, png_bytes(60000, 60000, raw=b"\x00"), limits)
    assert (e.status, e.code) == (413, "image_too_large")


def test_configure_pil_turns_bomb_warning_into_413(monkeypatch):
    """PIL warns (does not refuse) between MAX_IMAGE_PIXELS and twice that; after configure_pil a
    replica refuses those too, even where its own header check would let the size through."""
    import warnings
    from serve_app._image import configure_pil
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)
    with warnings.catch_warnings():
        configure_pil(ImageLimits(max_decoded_pixels=100_000_000))
        assert Image.MAX_IMAGE_PIXELS == 100_000_000
        e = err(decode_image, png_bytes(12000, 12000), ImageLimits(max_decoded_pixels=10**9))
    assert (e.status, e.code) == (413, "image_too_large") and "decompression bomb" in e.message


def test_huge_base64_string_refused_without_decoding(monkeypatch):
    """A 64 MiB data URL is refused from its length: the base64 decoder is never called."""
    import types

    import serve_app._image as image_mod

    def boom(*a, **k):
        raise AssertionError("the payload was decoded")
    monkeypatch.setattr(image_mod, "base64", types.SimpleNamespace(b64decode=boom))
    s = "data:image/png;base64," + "A" * (64 * 1024 * 1024)
    e = err(pipeline().process, [s])
    assert (e.status, e.code) == (413, "image_too_large")


@pytest.mark.parametrize("url,status,code", [
    ("data:text/plain;base64,aGVsbG8=", 415, "unsupported_image_format"),
    ("data:application/pdf;base64,JVBERi0xLjc=", 415, "unsupported_image_format"),
    ("data:image/svg+xml;base64,PHN2Zz48L3N2Zz4=", 415, "unsupported_image_format"),
    ("data:;base64,aGVsbG8=", 415, "unsupported_image_format"),
    ("data:image/png,rawnotbase64", 400, "invalid_base64"),
    ("data:image/png;base64,iVBORw0KGgo*AAAA", 400, "invalid_base64"),
    ("data:image/png;base64,iVBORw0KGgo_AAAA", 400, "invalid_base64"),
    ("data:image/png;base64,iVBORw0KGgoAAA", 400, "invalid_base64"),
    ("data:image/png;base64,iVBO Rw0K", 400, "invalid_base64"),
    ("data:image/png;base64,", 400, "invalid_image"),
    ("data:image/png;base64", 400, "invalid_image_url"),
    ("file:///etc/passwd", 400, "url_not_allowed"),
    ("ftp://example.com/a.png", 400, "url_not_allowed"),
    ("gopher://example.com/", 400, "url_not_allowed"),
    ("http://127.0.0.1/a.png", 400, "url_not_allowed"),      # fetching is off by default
    ("https://169.254.169.254/latest/meta-data", 400, "url_not_allowed"),
    ("image://0123456789abcdef0123456789abcdef", 404, "image_not_found"),
    ("image://nope", 400, "invalid_image_url"),
    ("just some text", 400, "invalid_image_url"),
])
def test_bad_sources(url, status, code):
    e = err(pipeline().process, [url])
    assert (e.status, e.code) == (status, code), e


def test_base64_errors_are_clear():
    e = err(parse_data_url, "data:image/png;base64,iVBORw0KGgo_AAAA", 10**6)
    assert "URL-safe" in e.message and "offset 11" in e.message
    # a JPEG sent with the PNG media type is fine: the bytes decide
    jpeg = _jpeg()
    assert pipeline().process([data_url(jpeg, "image/png")])[0].image_id == image_id_for(jpeg)


def test_request_limits():
    p = pipeline()
    png = encode(noise(8, 8))
    e = err(p.process, [png] * 9)
    assert (e.status, e.code) == (400, "too_many_images")
    assert len(p.process([png] * 8)) == 8
    for kw, param in [({"max_pixels": 16_777_217}, "max_pixels"), ({"min_pixels": 70_000}, "min_pixels"),
                      ({"min_pixels": 512}, "min_pixels"), ({"min_pixels": 4096, "max_pixels": 2048}, "min_pixels")]:
        e = err(p.process, [png], **kw)
        assert (e.status, e.code, e.param) == (400, "invalid_pixel_limits", param)
    im = p.process([encode(noise(1920, 1080))], min_pixels=1024, max_pixels=200_000)[0]
    assert im.grid_thw[1] * im.grid_thw[2] * 256 <= 200_000
    # lowering only max_pixels below the server's min_pixels lowers the floor with it
    assert p.pixel_bounds(None, 50_000) == (50_000, 50_000)
    tiny = p.process([encode(noise(64, 64))], max_pixels=4096)[0]
    assert tiny.grid_thw == (1, 4, 4)


def test_error_names_the_failing_image():
    e = err(pipeline().process, [encode(noise(8, 8)), b"junk"])
    assert e.message.startswith("image 1:") and e.code == "unsupported_image_format"


def test_images_of_a_request_at_once_on_a_pool():
    """With a pool, a request's images are processed at once on its threads (the first two meet
    at a barrier, which only two concurrent calls can pass): the same outputs in order, and an
    error still names the first failing image in order."""
    import threading
    from concurrent.futures import ThreadPoolExecutor
    imgs = [encode(noise(w, h, seed=w)) for w, h in [(300, 200), (64, 64), (500, 90)]]
    seq = pipeline().process(imgs)
    p = pipeline()
    meet, calls = threading.Barrier(2, timeout=10), []
    one = p.process_one

    def process_one(*a):
        calls.append(threading.get_ident())
        if len(calls) <= 2:
            meet.wait()                  # BrokenBarrierError unless a second call runs meanwhile
        return one(*a)
    p.process_one = process_one
    with ThreadPoolExecutor(max_workers=3) as pool:
        par = p.process(imgs, pool=pool)
        assert [x.grid_thw for x in par] == [x.grid_thw for x in seq]
        assert all(np.array_equal(x.pixel_values, y.pixel_values) for x, y in zip(par, seq))
        assert len(set(calls[:2])) == 2 and threading.get_ident() not in calls
        e = err(pipeline().process, [imgs[0], b"junk", b"more junk"], pool=pool)
        assert e.message.startswith("image 1:") and e.code == "unsupported_image_format"


# ------------------------------------------------------------------------------ odd-but-valid images

def test_exif_orientation_6_is_applied():
    im = Image.new("RGB", (64, 32))
    im.paste((255, 0, 0), (0, 0, 32, 32))    # left half red
    im.paste((0, 0, 255), (32, 0, 64, 32))   # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rgb = decode_image(encode(im, "JPEG", exif=exif, quality=95), LIMITS)
    assert rgb.size == (32, 64)
    top, bottom = rgb.getpixel((16, 8)), rgb.getpixel((16, 56))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60
    out = pipeline().process([encode(im, "JPEG", exif=exif)], min_pixels=1024, max_pixels=2048)[0]
    assert out.grid_thw == (1, 4, 2)  # 64 x 32 after rotation: taller than wide


@pytest.mark.parametrize("name", ["cmyk_jpeg", "cmyk_tiff", "animated_gif", "png16", "tiff16",
                                  "rgba_transparent", "rgba_half", "palette_transparency", "la",
                                  "bilevel", "webp", "bmp", "tiff", "float_tiff", "one_pixel"])
def test_odd_but_valid(name):
    red = Image.new("RGB", (40, 30), (255, 0, 0))
    if name == "cmyk_jpeg":
        data, want = encode(Image.new("CMYK", (40, 30), (255, 0, 0, 0)), "JPEG", quality=95), (0, 255, 255)
    elif name == "cmyk_tiff":
        data, want = encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "TIFF"), (255, 0, 0)
    elif name == "animated_gif":
        frames = [red.convert("P"), Image.new("RGB", (40, 30), (0, 0, 255)).convert("P")]
        buf = io.BytesIO()
        frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
        data, want = buf.getvalue(), (255, 0, 0)
    elif name == "png16":
        a = np.full((30, 40), 40000, np.uint16)
        im16 = Image.fromarray(a)
        assert im16.mode == "I;16"
        data, want = encode(im16), (156, 156, 156)  # 40000 / 257, not clipped to white
    elif name == "tiff16":
        data, want = encode(Image.fromarray(np.full((30, 40), 65535, np.uint16)), "TIFF"), (255, 255, 255)
    elif name == "rgba_transparent":
        data, want = encode(Image.new("RGBA", (40, 30), (255, 0, 0, 0))), (255, 255, 255)
    elif name == "rgba_half":
        data, want = encode(Image.new("RGBA", (40, 30), (0, 0, 0, 128))), (127, 127, 127)
    elif name == "palette_transparency":
        p = Image.new("P", (40, 30), 0)
        p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
        p.info["transparency"] = 0
        data, want = encode(p, transparency=0), (255, 255, 255)
    elif name == "la":
        data, want = encode(Image.new("LA", (40, 30), (0, 0))), (255, 255, 255)
    elif name == "bilevel":
        data, want = encode(Image.new("1", (40, 30), 1)), (255, 255, 255)
    elif name == "webp":
        data, want = encode(red, "WEBP", lossless=True), (255, 0, 0)
    elif name == "bmp":
        data, want = encode(red, "BMP"), (255, 0, 0)
    elif name == "tiff":
        data, want = encode(red, "TIFF", compression="tiff_deflate"), (255, 0, 0)
    elif name == "float_tiff":
        data, want = encode(Image.fromarray(np.full((30, 40), 0.5, np.float32), "F"), "TIFF"), (128, 128, 128)
    else:
        data, want = encode(Image.new("RGB", (1, 1), (0, 255, 0))), (0, 255, 0)
    rgb = decode_image(data, LIMITS)
    assert rgb.mode == "RGB"
    assert rgb.size == ((1, 1) if name == "one_pixel" else (40, 30))
    got = np.asarray(rgb).reshape(-1, 3).mean(0)
    assert np.abs(got - np.array(want)).max() <= 3, (name, got)
    out = pipeline().process([data])[0]
    t, gh, gw = out.grid_thw
    assert out.pixel_values.shape == (t * gh * gw, 3, 16, 16) and out.pixel_values.dtype == np.uint8
    assert out.float_pixels().shape == (t * gh * gw, 1536) and np.isfinite(out.float_pixels()).all()


def test_one_pixel_grid():
    out = pipeline().process([encode(Image.new("RGB", (1, 1), (0, 255, 0)))])[0]
    assert out.grid_thw == (1, 16, 16) and out.num_tokens() == 64
    px = out.float_pixels().reshape(-1, 3, 2, 16, 16)
    assert np.allclose(px[:, 0], -1) and np.allclose(px[:, 1], 1) and np.allclose(px[:, 2], -1)


# ------------------------------------------------------------------------------------------ caches

def test_cache_hits_and_identity():
    p = pipeline()
    data = encode(noise(300, 200))
    a = p.process([data])[0]
    b = p.process([data_url(data)])[0]  # same bytes through a data URL: same id, cache hit
    assert a.image_id == b.image_id == image_id_for(data) and len(a.image_id) == 32
    assert b is a and not a.pixel_values.flags.writeable
    c = p.process([data], max_pixels=65_536)[0]  # other pixel bounds: another entry
    assert c is not a
    s = p.stats()
    assert s["cache"]["hits"] == 1 and s["cache"]["misses"] == 2 and s["images_processed"] == 2
    assert s["cache"]["bytes"] == a.pixel_values.nbytes + c.pixel_values.nbytes


def test_cache_is_bounded_in_bytes():
    p = pipeline(cache_mb=1)  # each 512x512 image is 1024 patches * 768 B (uint8) = 0.75 MiB > half: not kept
    big = encode(noise(512, 512))
    p.process([big]); p.process([big])
    assert p.stats()["cache"]["entries"] == 0 and p.stats()["images_processed"] == 2
    small = [encode(noise(384, 384, seed=i)) for i in range(3)]  # 432 KiB each
    for d in small:
        p.process([d])
    s = p.stats()["cache"]
    assert s["entries"] == 2 and s["evictions"] == 1 and s["bytes"] <= 2**20


def test_upload_then_reference():
    p = pipeline()
    data = encode(noise(320, 240), "JPEG")
    info = p.upload(data_url(data, "image/jpeg"))
    assert info["image_id"] == image_id_for(data) and info["url"] == f"image://{info['image_id']}"
    first = p.process([info["url"]])[0]
    assert first.image_id == info["image_id"] and first.grid_thw == (1, 16, 20)  # 240/32 = 7.5 -> 8
    assert p.process([info["url"].upper().replace("IMAGE://", "image://")])[0] is first
    assert p.upload(data)["image_id"] == info["image_id"]  # idempotent
    assert p.stats()["uploads"] == 2
    e = err(p.upload, b"not an image")
    assert e.code == "unsupported_image_format" and p.stats()["upload_store"]["entries"] == 1


def test_image_modules_import_neither_ray_nor_torch():
    import subprocess
    import sys
    code = ("import sys, serve_app._image, serve_app._image_inspect, serve_app._image_pipeline, "
            "serve_app._fetch; "
            "print(sorted(m for m in ('ray', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
