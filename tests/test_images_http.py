"""Images through the real HTTP service: bad-input corpus, odd-but-valid images, uploads + image://.

Every hostile input must get the right 4xx in OpenAI's error JSON, both as a chat ``image_url``
part and as a ``POST /v1/images`` upload, and the next good request must still succeed. The test
app (tests/conftest.py) caps images at 8 MiB, bodies at 16 MiB and has URL fetching off.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from conftest import data_url, image_tokens, jpeg_bytes

pytestmark = pytest.mark.slow

MODEL = "tiny-qwen3-vl"
PROMPT = "Describe the image."


# ------------------------------------------------------------------------------------------ helpers

def encode(im: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def png_bomb(w: int, h: int, idat: bytes | None = None) -> bytes:
    """A grey PNG written by hand. Without ``idat`` it is a real decompression bomb: all h rows of
    zeros, streamed through zlib (12000 x 12000 -> 144 MB of pixels in ~140 kB)."""
    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))
    if idat is None:
        comp, rows = zlib.compressobj(9), b"\x00" * (1 + w) * 1000
        idat = b"".join(comp.compress(rows) for _ in range(h // 1000)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def user(*images: str, text: str = PROMPT) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images]
    return [{"role": "user", "content": parts + [{"type": "text", "text": text}]}]


def chat(serve_url: str, *images: str, **kw) -> httpx.Response:
    body = {"model": MODEL, "max_tokens": 1, "temperature": 0, "messages": user(*images), **kw}
    return httpx.post(f"{serve_url}/v1/chat/completions", json=body, timeout=60)


def upload(serve_url: str, data: bytes | str, how: str = "raw", mime: str = "image/jpeg"
           ) -> httpx.Response:
    url = f"{serve_url}/v1/images"
    if how == "multipart":
        return httpx.post(url, files={"file": ("img", data, mime)}, timeout=60)
    if how == "json":
        return httpx.post(url, json={"image": data}, timeout=60)
    return httpx.post(url, content=data, headers={"content-type": mime}, timeout=60)


def assert_error(r: httpx.Response, status: int, code: str) -> dict:
    """The status, and OpenAI's error shape with a clear (short, non-empty) message."""
    assert r.status_code == status, r.text[:500]
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) >= {"message", "type", "code", "param"}
    assert err["code"] == code, err
    assert isinstance(err["message"], str) and 10 <= len(err["message"]) < 400, err
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    return err


@pytest.fixture(scope="module")
def prompt_text_tokens(tokenizer):
    """Text tokens of the chat template around ``k`` images (image pads removed)."""
    def count(k: int = 1) -> int:
        msgs = [{"role": "user", "content": [{"type": "image"}] * k + [{"type": "text", "text": PROMPT}]}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert text.count("<|image_pad|>") == k
        return len(tokenizer.encode(text.replace("<|image_pad|>", ""), add_special_tokens=False))
    return count


GOOD = jpeg_bytes(96, 64, seed=11)


def assert_still_serving(serve_url: str) -> None:
    r = chat(serve_url, data_url(GOOD))
    assert r.status_code == 200, r.text[:300]
    assert r.json()["usage"]["completion_tokens"] == 1
    r = upload(serve_url, GOOD)
    assert r.status_code == 200 and r.json()["width"] == 96, r.text[:300]


# ------------------------------------------------------------------------------ bad-input corpus

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# name -> (image bytes, status, code); each goes through both chat and upload
BAD_BYTES = {
    "truncated_jpeg": (lambda: jpeg_bytes(400, 300, seed=1)[:2000], 400, "invalid_image"),
    "zero_bytes": (lambda: b"", 400, "invalid_image"),
    "random_bytes": (lambda: np.random.default_rng(7).integers(0, 256, 5000, np.uint8).tobytes(), 415,
                     "unsupported_image_format"),
    "png_header_60000x60000": (lambda: png_bomb(60000, 60000, idat=zlib.compress(b"\x00")), 413,
                               "image_too_large"),
    "decompression_bomb_png": (lambda: png_bomb(12000, 12000), 413, "image_too_large"),
    "svg": (lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"><circle r="4"/></svg>',
            415, "unsupported_image_format"),
    "text": (lambda: b"Dear server, I am a plain text file.\n" * 20, 415, "unsupported_image_format"),
    "aspect_10000x10": (lambda: encode(Image.new("L", (10000, 10), 200)), 400, "bad_aspect_ratio"),
    "over_max_image_bytes": (lambda: b"\xff\xd8\xff\xe0" + b"\x00" * (9 * 2**20), 413, "image_too_large"),
}


@pytest.mark.parametrize("name", list(BAD_BYTES))
def test_bad_image_bytes(serve_url, name):
    make, status, code = BAD_BYTES[name]
    data = make()
    mime = "image/svg+xml" if name == "svg" else "image/png"
    url = f"data:{mime};base64,{_b64(data)}"
    err = assert_error(chat(serve_url, url), status, code)
    if code == "image_too_large":
        assert "limit" in err["message"]
    assert_error(upload(serve_url, data, "raw", "image/png"), status, code)
    assert_error(upload(serve_url, data, "multipart", mime), status, code)
    assert_error(upload(serve_url, url, "json"), status, code)
    assert_still_serving(serve_url)


# chat image_url strings (and the same string as a JSON upload) -> (status, code, words in message)
BAD_URLS = {
    "file_url": ("file:///etc/passwd", 400, "url_not_allowed", "scheme 'file'"),
    "loopback_url": ("http://127.0.0.1:8000/v1/models", 400, "url_not_allowed", "disabled"),
    "metadata_url": ("http://169.254.169.254/latest/meta-data/", 400, "url_not_allowed", "disabled"),
    "wrong_mime_text_plain": ("data:text/plain;base64," + _b64(GOOD), 415, "unsupported_image_format",
                              "text/plain"),
    "svg_data_url": ("data:image/svg+xml;base64," + _b64(b"<svg/>"), 415, "unsupported_image_format",
                     "SVG"),
    "not_base64": ("data:image/jpeg;base64,@@not*base64@@", 400, "invalid_base64", "base64"),
    "malformed_ref": ("image://not-an-id", 400, "invalid_image_url", "image://"),
}


@pytest.mark.parametrize("name", list(BAD_URLS))
def test_bad_image_urls(serve_url, name):
    url, status, code, words = BAD_URLS[name]
    assert words in assert_error(chat(serve_url, url), status, code)["message"]
    assert words in assert_error(upload(serve_url, url, "json"), status, code)["message"]
    assert_still_serving(serve_url)


def test_wrong_upload_content_type(serve_url):
    assert_error(upload(serve_url, GOOD, "raw", "text/plain"), 415, "unsupported_media_type")
    # a JPEG labelled as PNG is fine: the bytes decide, not the label
    r = upload(serve_url, GOOD, "raw", "image/png")
    assert r.status_code == 200 and r.json()["format"] == "JPEG"
    assert chat(serve_url, data_url(GOOD, "image/png")).status_code == 200


def test_64mb_base64_body_is_refused_at_the_door(serve_url):
    """64 MB of base64 exceeds the app's 16 MiB body cap: 413 from the ingress before parsing."""
    url = "data:image/jpeg;base64," + "A" * (64 * 2**20)
    body = json.dumps({"model": MODEL, "messages": user(url)}).encode()
    r = httpx.post(f"{serve_url}/v1/chat/completions", content=body,
                   headers={"content-type": "application/json"}, timeout=120)
    assert "16777216 bytes" in assert_error(r, 413, "request_too_large")["message"]
    assert_error(upload(serve_url, url, "json"), 413, "request_too_large")
    assert_error(upload(serve_url, b"\xff\xd8\xff" + bytes(64 * 2**20), "multipart"), 413,
                 "request_too_large")
    assert_still_serving(serve_url)


def test_too_many_images_and_pixel_limits(serve_url):
    small = data_url(jpeg_bytes(32, 32, seed=2))
    assert_error(chat(serve_url, *[small] * 5), 400, "too_many_images")
    assert_error(chat(serve_url, small, max_pixels=10**9), 400, "invalid_value")
    assert_still_serving(serve_url)


# ------------------------------------------------------------------------------ odd-but-valid images

def _exif_rotated() -> bytes:
    im = Image.new("RGB", (128, 64), (255, 0, 0))
    im.paste((0, 0, 255), (64, 0, 128, 64))  # left red, right blue; displayed rotated 90 CW
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(im, "JPEG", quality=95, exif=exif)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (90, 60), c).convert("P") for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def _palette() -> bytes:
    p = Image.new("P", (70, 50), 1)
    p.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    return encode(p)


# name -> (bytes, format, mode, displayed (w, h))
ODD = {
    "exif_rotated_jpeg": (_exif_rotated, "JPEG", "RGB", (64, 128)),
    "cmyk_jpeg": (lambda: encode(Image.new("CMYK", (80, 40), (0, 255, 255, 0)), "JPEG"), "JPEG", "CMYK",
                  (80, 40)),
    "animated_gif": (_animated_gif, "GIF", "P", (90, 60)),
    "png_16bit": (lambda: encode(Image.fromarray(np.full((48, 64), 40000, np.uint16))), "PNG", "I;16",
                  (64, 48)),
    "rgba_png": (lambda: encode(Image.new("RGBA", (50, 75), (10, 20, 30, 0))), "PNG", "RGBA", (50, 75)),
    "palette_png": (_palette, "PNG", "P", (70, 50)),
    "one_pixel": (lambda: encode(Image.new("RGB", (1, 1), (0, 255, 0))), "PNG", "RGB", (1, 1)),
    "webp": (lambda: encode(Image.new("RGB", (100, 30), (0, 255, 0)), "WEBP"), "WEBP", "RGB", (100, 30)),
    "bmp": (lambda: encode(Image.new("RGB", (33, 77), (0, 0, 255)), "BMP"), "BMP", "RGB", (33, 77)),
    "large_photo": (lambda: jpeg_bytes(1280, 720, seed=5), "JPEG", "RGB", (1280, 720)),
}


@pytest.mark.parametrize("name", list(ODD))
def test_odd_but_valid_images(serve_url, client, prompt_text_tokens, name):
    make, fmt, mode, (w, h) = ODD[name]
    data = make()
    r = upload(serve_url, data, "multipart", "application/octet-stream")
    assert r.status_code == 200, r.text[:300]
    info = r.json()
    assert (info["format"], info["mode"]) == (fmt, mode)
    assert (info["width"], info["height"]) == (w, h)  # as displayed, i.e. after EXIF orientation
    assert info["num_tokens"] == image_tokens(w, h)
    mime = "image/" + fmt.lower()
    resp = client.chat.completions.create(model=MODEL, messages=user(data_url(data, mime)), max_tokens=1,
                                          temperature=0)
    # Qwen's token count is symmetric in (w, h), so this checks the size; the orientation of the
    # pixels themselves is checked through the deployed Preprocess below.
    assert resp.usage.prompt_tokens == prompt_text_tokens(1) + image_tokens(w, h)


def test_deployed_preprocess_orients_and_converts_pixels(serve_url):
    """The model input from the running Preprocess replica: EXIF rotation applied (red on top,
    blue below), CMYK converted to RGB (red), transparency composited on white."""
    from ray import serve

    handle = serve.get_deployment_handle("Preprocess", app_name="serve_app")
    rot, cmyk, rgba = handle.process.remote(
        [_exif_rotated(), ODD["cmyk_jpeg"][0](), ODD["rgba_png"][0]()]).result(timeout_s=60)

    def rgb_image(im) -> np.ndarray:
        """Undo patchify: [gh*gw, 3*2*16*16] in (gh/2, gw/2, 2, 2) order -> (H, W, 3) in [0, 255]."""
        _, gh, gw = im.grid_thw
        p = im.float_pixels().reshape(gh // 2, gw // 2, 2, 2, 3, 2, 16, 16)[:, :, :, :, :, 0]
        p = p.transpose(0, 2, 5, 1, 3, 6, 4).reshape(gh * 16, gw * 16, 3)
        return (p * 0.5 + 0.5) * 255

    a = rgb_image(rot)
    assert rot.grid_thw == (1, 24, 12)  # 64 x 128 (w x h) -> 192 x 384: portrait
    top, bottom = a[: a.shape[0] // 4].mean((0, 1)), a[-a.shape[0] // 4:].mean((0, 1))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60
    assert np.abs(rgb_image(cmyk).mean((0, 1)) - [255, 0, 0]).max() < 8
    assert np.abs(rgb_image(rgba).mean((0, 1)) - [255, 255, 255]).max() < 1


# ------------------------------------------------------------------------- upload, then reference

def test_upload_then_reference_by_id(serve_url, client, prompt_text_tokens):
    data = jpeg_bytes(640, 480, seed=21)
    infos = [upload(serve_url, data, "multipart").json(), upload(serve_url, data_url(data), "json").json(),
             upload(serve_url, data, "raw").json()]
    image_id = infos[0]["image_id"]
    assert len(image_id) == 32 and all(i["image_id"] == image_id for i in infos)
    info = infos[0]
    assert info["url"] == f"image://{image_id}" and info["object"] == "image"
    assert (info["width"], info["height"], info["format"], info["bytes"]) == (640, 480, "JPEG", len(data))
    assert info["num_tokens"] == image_tokens(640, 480) == 300
    assert info["hints"]["heuristic"] is True and 0 <= info["hints"]["text_likelihood"] <= 1

    by_ref = client.chat.completions.create(model=MODEL, messages=user(info["url"]), max_tokens=4,
                                            temperature=0)
    by_data = client.chat.completions.create(model=MODEL, messages=user(data_url(data)), max_tokens=4,
                                             temperature=0)
    assert by_ref.usage.prompt_tokens == by_data.usage.prompt_tokens == prompt_text_tokens(1) + 300
    assert by_ref.choices[0].message.content == by_data.choices[0].message.content  # same pixels
    # references mix with inline images, and an id can be re-inspected
    two = client.chat.completions.create(model=MODEL, messages=user(info["url"], data_url(GOOD)),
                                         max_tokens=1, temperature=0)
    assert two.usage.prompt_tokens == prompt_text_tokens(2) + 300 + image_tokens(96, 64)
    again = upload(serve_url, info["url"], "json")
    assert again.status_code == 200 and again.json()["image_id"] == image_id


def test_unknown_image_id_is_404(serve_url, client):
    missing = "image://" + "0" * 32
    with pytest.raises(openai.NotFoundError) as ei:
        client.chat.completions.create(model=MODEL, messages=user(missing), max_tokens=1)
    assert ei.value.code == "image_not_found" and "POST /v1/images" in ei.value.message
    assert_error(chat(serve_url, missing), 404, "image_not_found")
    assert_error(upload(serve_url, missing, "json"), 404, "image_not_found")
    assert_still_serving(serve_url)


def test_repeated_image_hits_the_preprocess_cache(serve_url):
    def cache() -> dict:
        r = httpx.get(f"{serve_url}/v1/stats", timeout=30)
        assert r.status_code == 200
        return r.json()["preprocess"]["cache"]

    img = data_url(jpeg_bytes(320, 240, seed=33))
    before = cache()
    assert chat(serve_url, img).status_code == 200
    mid = cache()
    assert mid["misses"] == before["misses"] + 1 and mid["hits"] == before["hits"]
    for _ in range(2):
        assert chat(serve_url, img).status_code == 200
    after = cache()
    assert after["hits"] == mid["hits"] + 2 and after["misses"] == mid["misses"]
    assert after["entries"] >= 1 and 0 < after["bytes"] <= after["capacity_bytes"]
