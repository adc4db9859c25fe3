"""Shared fixtures: one real local Ray cluster + Serve app per test session, on a free port.

Tests talk to it only over real HTTP (httpx and the official ``openai`` client).
"""

from __future__ import annotations

import io
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest

CACHE_DIR = os.environ.get("SERVE_APP_CACHE") or str(Path.home() / ".cache" / "serve_app" / "models")
TINY = "builtin:tiny-qwen3-vl"
_CLUSTER: dict = {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_config(**overrides) -> dict:
    cfg = {
        "engine": {"model": TINY, "engine": "continuous", "device": "cpu", "dtype": "float32",
                   "max_model_len": 4096, "cache_dir": CACHE_DIR},
        "images": {"max_images_per_request": 4, "max_image_bytes": 8 * 1024 * 1024},
        # stream merging on, as in deployments.gpu.yaml (which uses 50 ms; 20 merges less and so
        # exercises more items): the HTTP tests (stream == non-stream, usage, disconnect) run through
        # the VLM's merging; the unmerged path is the CPU demo's (test_00_serve_run)
        "api": {"default_max_tokens": 32, "max_request_bytes": 16 * 1024 * 1024,
                "stream_interval_ms": 20},
    }
    for k, v in overrides.items():
        cfg.setdefault(k, {}).update(v)
    return cfg


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from serve_app.models import resolve_model

    return resolve_model(TINY, CACHE_DIR)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_path):
    from serve_app.models import load_tokenizer

    return load_tokenizer(tiny_model_path)


@pytest.fixture(scope="session")
def serve_url(tiny_model_path):
    """Start Ray (2 CPUs) + Serve on a free port with the tiny model; yield the base URL."""
    import httpx
    import ray
    from ray import serve

    from serve_app.app import build_app

    port = free_port()
    _CLUSTER["metrics_port"] = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _metrics_export_port=_CLUSTER["metrics_port"],
             runtime_env={"env_vars": {"SERVE_APP_CACHE": CACHE_DIR}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(app_config()), name="serve_app", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    else:
        pytest.fail("service did not become ready in 180 s")
    yield url
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def metrics_url(serve_url) -> str:
    """Ray's Prometheus endpoint of the session's cluster."""
    return f"http://127.0.0.1:{_CLUSTER['metrics_port']}/metrics"


@pytest.fixture(scope="session")
def client(serve_url):
    import openai

    return openai.OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def model_name(serve_url) -> str:
    return "tiny-qwen3-vl"


# ---- images -----------------------------------------------------------------------------------
def jpeg_bytes(w: int, h: int, seed: int = 0, quality: int = 85) -> bytes:
    """A real photo (scikit-image's bundled astronaut) resized to w x h, as JPEG."""
    from PIL import Image
    from skimage import data

    rng = np.random.default_rng(seed)
    img = Image.fromarray(data.astronaut()).resize((w, h))
    if seed:  # make different seeds different images (and different content hashes)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-8, 8, (h, w, 3))
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def data_url(data: bytes, mime: str = "image/jpeg") -> str:
    import base64

    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def smart_resize(h: int, w: int, factor: int = 32, min_pixels: int = 65_536,
                 max_pixels: int = 16_777_216) -> tuple[int, int]:
    """Qwen's rule, written out independently of serve_app for the usage tests."""
    import math

    hb = max(factor, round(h / factor) * factor)
    wb = max(factor, round(w / factor) * factor)
    if hb * wb > max_pixels:
        beta = math.sqrt((h * w) / max_pixels)
        hb = max(factor, math.floor(h / beta / factor) * factor)
        wb = max(factor, math.floor(w / beta / factor) * factor)
    elif hb * wb < min_pixels:
        beta = math.sqrt(min_pixels / (h * w))
        hb = math.ceil(h * beta / factor) * factor
        wb = math.ceil(w * beta / factor) * factor
    return hb, wb


def image_tokens(w: int, h: int) -> int:
    hb, wb = smart_resize(h, w)
    return hb * wb // 1024
