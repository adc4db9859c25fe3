"""Image inspection (/v1/images/inspect's fields and hints) and URL fetching (the address policy,
a local server, pinned and re-vetted redirects), without Ray."""

from __future__ import annotations

import asyncio
import http.server
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from serve_app._fetch import FetchPolicy, address_refusal, fetch_image, host_allowed
from serve_app._image import image_id_for, num_image_tokens
from serve_app._image_inspect import inspect_image
from serve_app.errors import ServeAppError
from test_image import LIMITS, _jpeg, encode, err, noise


# ------------------------------------------------------------------------------------------ inspect

_FONT = ImageFont.load_default(size=22)
_WORDS = "the quick brown fox jumps over the lazy dog invoice total amount due".split()


def _document(table: bool) -> Image.Image:
    im = Image.new("RGB", (1240, 1754), "white")
    d = ImageDraw.Draw(im)
    rng = np.random.default_rng(1)
    if table:
        x0, y0, cw, ch, nc, nr = 100, 200, 260, 60, 4, 12
        for r in range(nr + 1):
            d.line([(x0, y0 + r * ch), (x0 + nc * cw, y0 + r * ch)], fill="black", width=2)
        for c in range(nc + 1):
            d.line([(x0 + c * cw, y0), (x0 + c * cw, y0 + nr * ch)], fill="black", width=2)
        for r in range(nr):
            for c in range(nc):
                d.text((x0 + c * cw + 10, y0 + r * ch + 18), " ".join(rng.choice(_WORDS, 2)),
                       fill="black", font=_FONT)
    else:
        for i in range(50):
            d.text((100, 100 + i * 32), " ".join(rng.choice(_WORDS, 9)), fill="black", font=_FONT)
    return im


def _photo(w: int = 1600, h: int = 1200) -> Image.Image:
    """Smooth colour fields plus sensor-like noise (built small, then upscaled: cheap)."""
    sw, sh = w // 8, h // 8
    y, x = np.mgrid[0:sh, 0:sw] / 12.5
    a = np.stack([128 + 100 * np.sin(x * 0.7 + y * 0.3), 128 + 90 * np.cos(y * 0.5),
                  128 + 60 * np.sin((x + y) * 0.2)], -1)
    big = np.asarray(Image.fromarray(a.clip(0, 255).astype(np.uint8)).resize((w, h), Image.BILINEAR))
    grain = np.random.default_rng(0).integers(-6, 7, (h, w, 1), dtype=np.int16)
    return Image.fromarray((big + grain).clip(0, 255).astype(np.uint8))


def test_inspect_fields():
    exif = Image.Exif()
    exif[0x010F], exif[0x0110], exif[0x0112] = "Canon", "EOS R5", 6
    exif.get_ifd(0x8769)[0x9003] = "2024:05:06 07:08:09"
    data = encode(_photo(4000, 3000), "JPEG", exif=exif, dpi=(300, 300), quality=85)
    t0 = time.perf_counter()
    info = inspect_image(data, LIMITS)
    ms = (time.perf_counter() - t0) * 1e3
    print(f"inspect 4000x3000 JPEG: {ms:.1f} ms")
    assert info["format"] == "JPEG" and info["mode"] == "RGB" and info["color_space"] == "RGB"
    assert (info["width"], info["height"]) == (3000, 4000)  # as displayed (orientation 6)
    assert info["exif"] == {"make": "Canon", "model": "EOS R5", "orientation": 6,
                            "date_taken": "2024:05:06 07:08:09"}
    assert info["dpi"] == [300.0, 300.0] and info["bytes"] == len(data)
    assert info["num_tokens"] == num_image_tokens(4000, 3000) == 11_750
    assert info["image_id"] == image_id_for(data) and info["frames"] == 1 and not info["has_alpha"]
    assert info["hints"]["heuristic"] is True
    assert ms < 1000, ms  # typically ~10 ms (draft decode at 1/8 scale); generous for shared CI


def test_inspect_png_metadata():
    info = inspect_image(encode(Image.new("RGBA", (50, 40)), "PNG"), LIMITS)
    assert info["has_alpha"] and info["color_space"] == "RGB+alpha" and info["exif"]["make"] is None
    assert info["dpi"] is None and info["num_tokens"] == num_image_tokens(40, 50)


@pytest.mark.parametrize("mode,fmt,size", [("CMYK", "JPEG", (1500, 1000)), ("L", "JPEG", (1500, 1000)),
                                           ("RGB", "PNG", (1, 1)), ("RGB", "PNG", (200, 1)),
                                           ("I;16", "PNG", (700, 300)), ("P", "GIF", (900, 900))])
def test_inspect_any_mode_and_shape(mode, fmt, size):
    im = noise(*size).convert(mode) if mode != "I;16" else Image.fromarray(
        np.full(size[::-1], 30000, np.uint16))
    info = inspect_image(encode(im, fmt), LIMITS)
    assert (info["width"], info["height"]) == size and info["format"] == fmt
    assert info["mode"] == mode and 0 <= info["hints"]["text_likelihood"] <= 1
    assert info["num_tokens"] == num_image_tokens(size[1], size[0])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_hints_separate_documents_tables_photos(fmt):
    doc = inspect_image(encode(_document(False), fmt), LIMITS)["hints"]
    table = inspect_image(encode(_document(True), fmt), LIMITS)["hints"]
    photo = inspect_image(encode(_photo(), fmt), LIMITS)["hints"]
    assert doc["text_likelihood"] >= 0.6 and doc["table_likelihood"] < 0.3
    assert table["table_likelihood"] >= 0.6 and table["horizontal_lines"] >= 10
    assert table["vertical_lines"] >= 4
    assert photo["text_likelihood"] < 0.3 and photo["table_likelihood"] < 0.3


def test_inspect_refuses_corrupt():
    assert err(inspect_image, _jpeg(512, 512)[:2000], LIMITS).code == "invalid_image"


# ------------------------------------------------------------------------------------------ URL fetch

def test_address_policy():
    import ipaddress as ipa
    refused = ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.100.100.200",
               "100.64.0.1", "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255", "::1", "fe80::1",
               "fc00::1", "fd00:ec2::254", "::ffff:127.0.0.1", "64:ff9b::a00:1", "2002:7f00:1::1", "ff02::1"]
    for a in refused:
        assert address_refusal(ipa.ip_address(a)) is not None, a
    for a in ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111"]:
        assert address_refusal(ipa.ip_address(a)) is None, a
    assert address_refusal(ipa.ip_address("127.0.0.1"), ("127.0.0.0/8",)) is None
    assert address_refusal(ipa.ip_address("169.254.169.254"), ("169.254.0.0/16",)) is not None
    assert host_allowed("img.example.com", ("*.example.com",)) and not host_allowed("example.com", ("*.example.com",))
    assert not host_allowed("evilexample.com", ("*.example.com",)) and host_allowed("A.com.", ("a.com",))


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}

    def do_GET(self):  # noqa: N802
        status, headers, body, delay = self.routes.get(self.path, (404, {}, b"", 0))
        time.sleep(delay)
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", _Handler.routes
    srv.shutdown()


LOOPBACK_OK = FetchPolicy(enabled=True, allowed_hosts=("127.0.0.1",), allowed_networks=("127.0.0.0/8",),
                          timeout_s=2.0, max_redirects=2, max_bytes=200_000)


def fetch(url, policy=LOOPBACK_OK):
    return asyncio.run(fetch_image(url, policy))


def afetch_err(url, policy=LOOPBACK_OK) -> ServeAppError:
    return err(fetch, url, policy)


def test_fetch_local_server(server):
    base, routes = server
    png = encode(noise(64, 64))
    routes.update({
        "/a.png": (200, {"Content-Type": "image/png"}, png, 0),
        "/hop": (302, {"Location": "/a.png"}, b"", 0),
        "/loop": (302, {"Location": "/loop"}, b"", 0),
        "/meta": (302, {"Location": "http://169.254.169.254/latest/meta-data/"}, b"", 0),
        "/elsewhere": (302, {"Location": "http://evil.example.net/x.png"}, b"", 0),
        "/file": (302, {"Location": "file:///etc/passwd"}, b"", 0),
        "/big": (200, {}, b"\xff\xd8\xff" + b"\x00" * 300_000, 0),
        "/slow": (200, {}, png, 3),
    })
    assert fetch(base + "/a.png") == png
    assert fetch(base + "/hop") == png
    # by default loopback is refused even when the host is allow-listed
    default = FetchPolicy(enabled=True, allowed_hosts=("127.0.0.1", "localhost"))
    e = afetch_err(base + "/a.png", default)
    assert (e.status, e.code) == (400, "url_not_allowed") and "loopback" in e.message
    port = base.rsplit(":", 1)[1]
    assert afetch_err(f"http://localhost:{port}/a.png", default).code == "url_not_allowed"
    assert afetch_err(base + "/a.png", FetchPolicy(enabled=False)).code == "url_not_allowed"
    assert afetch_err(base + "/a.png", FetchPolicy(enabled=True, allowed_hosts=("example.com",))
                      ).code == "url_not_allowed"
    for path, status, code in [("/loop", 400, "image_fetch_failed"), ("/meta", 400, "url_not_allowed"),
                               ("/elsewhere", 400, "url_not_allowed"), ("/file", 400, "url_not_allowed"),
                               ("/big", 413, "image_too_large"), ("/missing", 400, "image_fetch_failed")]:
        e = afetch_err(base + path)
        assert (e.status, e.code) == (status, code), (path, e)
    star = FetchPolicy(enabled=True, allowed_hosts=("*",), allowed_networks=("127.0.0.0/8",))
    assert afetch_err(base + "/meta", star).code == "url_not_allowed"  # metadata: never
    t0 = time.perf_counter()
    e = afetch_err(base + "/slow", FetchPolicy(**{**LOOPBACK_OK.__dict__, "timeout_s": 0.5}))
    assert e.code == "image_fetch_failed" and "timed out" in e.message
    assert time.perf_counter() - t0 < 2.0
    assert afetch_err("http://user:pw@127.0.0.1/a.png").code == "url_not_allowed"


def test_fetch_pins_vetted_ip_and_revets_every_hop(monkeypatch):
    """DNS rebinding: the request goes to the address that was vetted (Host/SNI keep the name),
    and a later answer pointing inside the network is refused."""
    import httpx
    answers = {"img.example.com": ["93.184.215.14"], "rebind.example.com": ["93.184.215.15", "10.0.0.5"]}

    async def fake_getaddrinfo(self, host, port, *a, **kw):
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in answers[host]]

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", fake_getaddrinfo)
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.host, request.headers["host"], request.extensions.get("sni_hostname")))
        if request.url.path == "/r":
            return httpx.Response(302, headers={"Location": "https://rebind.example.com/x.png"})
        return httpx.Response(200, content=b"img")

    policy = FetchPolicy(enabled=True, allowed_hosts=("*.example.com",), timeout_s=2)
    got = asyncio.run(fetch_image("https://img.example.com/x.png", policy, httpx.MockTransport(handler)))
    assert got == b"img" and seen == [("93.184.215.14", "img.example.com", "img.example.com")]
    with pytest.raises(ServeAppError) as ei:
        asyncio.run(fetch_image("https://img.example.com/r", policy, httpx.MockTransport(handler)))
    assert ei.value.code == "url_not_allowed" and "10.0.0.5" in ei.value.message
    with pytest.raises(ServeAppError) as ei:
        asyncio.run(fetch_image("https://nx.example.com/a", policy, httpx.MockTransport(handler)))
    assert ei.value.code == "image_fetch_failed"
