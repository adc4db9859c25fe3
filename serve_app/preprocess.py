"""Preprocess deployment: image sources -> Qwen3-VL ``ImageInput`` tensors, as a thin Ray Serve shell.

All logic is in :mod:`serve_app._image` (decode, limits, resize, patchify),
:mod:`serve_app._image_pipeline` (caches, options, identity), :mod:`serve_app._image_inspect`
(``POST /v1/images`` metadata) and :mod:`serve_app._fetch` (URL fetching); this module adds threads,
the shared upload store and metrics.

Uploads (``POST /v1/images`` -> ``image://<id>``) must be visible to every replica, since the
reference may land on a different one. With ``upload_store: actor`` (the default) the bytes live in
one small named, detached actor (``serve_app_image_store``, 0 CPUs, byte-bounded LRU) that all
replicas share; it outlives replica restarts and redeploys (it goes with the Ray cluster).
``upload_store: local`` keeps them per replica: correct only with a single replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray
from ray import serve
from ray.serve.metrics import Counter, Histogram

from serve_app._fetch import fetch_image
from serve_app._image import configure_pil
from serve_app._image_pipeline import ImagePipeline, LocalImageStore, PreprocessOptions, with_index
from serve_app.engine.protocol import ImageInput
from serve_app.errors import ServeAppError

logger = logging.getLogger("ray.serve")

STORE_ACTOR_NAME = "serve_app_image_store"
STORE_NAMESPACE = "serve_app"


class ActorImageStore:
    """:class:`serve_app._image_pipeline.ImageStore` backed by one named actor; called from worker
    threads."""

    def __init__(self, capacity_bytes: int, timeout_s: float = 10.0):
        self.capacity_bytes = capacity_bytes
        self.timeout_s = timeout_s
        self._actor = self._connect()

    def _connect(self):
        return (ray.remote(LocalImageStore)
                .options(name=STORE_ACTOR_NAME, namespace=STORE_NAMESPACE, get_if_exists=True,
                         lifetime="detached", num_cpus=0, max_concurrency=32)
                .remote(self.capacity_bytes))

    def _call(self, method: str, *args):
        for attempt in range(2):
            try:
                return ray.get(getattr(self._actor, method).remote(*args), timeout=self.timeout_s)
            except ray.exceptions.RayTaskError as e:
                if isinstance(e.cause, ServeAppError):
                    raise e.cause from None
                raise
            except ray.exceptions.RayActorError:
                if attempt:
                    raise
                self._actor = self._connect()  # the store died: start a fresh (empty) one

    def get(self, image_id: str) -> bytes | None:
        return self._call("get", image_id)

    def put(self, image_id: str, data: bytes) -> None:
        self._call("put", image_id, data)

    def stats(self) -> dict:
        return self._call("stats")


@serve.deployment(name="Preprocess", max_ongoing_requests=16, ray_actor_options={"num_cpus": 0.5})
class Preprocess:
    """Takes ``serve_app.config.ImagesConfig`` as a dict (see ``PreprocessOptions.from_dict``)."""

    def __init__(self, config: dict | None = None):
        self.options = PreprocessOptions.from_dict(config)
        configure_pil(self.options.limits)
        store = (ActorImageStore(self.options.upload_cache_bytes) if self.options.upload_store == "actor"
                 else None)
        self.pipeline = ImagePipeline(self.options, store)
        # Every image is decoded here (chat images, uploads, table images), a multi-image request's
        # at once (PIL's decode and resize release the GIL); 4 workers: at most 4 decodes (up to
        # 64 MP each) in memory at a time, whatever the mix of requests.
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="preprocess-image")
        self._m_errors = Counter("serve_app_preprocess_errors", "refused images", tag_keys=("code",))
        self._m_images = Counter("serve_app_preprocess_images", "images returned (cache hits included)")
        self._m_latency = Histogram("serve_app_preprocess_seconds", "process() latency per request",
                                    boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5])

    async def process(self, sources: list[str | bytes], min_pixels: int | None = None,
                      max_pixels: int | None = None) -> list[ImageInput]:
        """data URLs, http(s) URLs, ``image://<id>`` or raw bytes -> one ImageInput each, in order."""
        t0 = time.perf_counter()
        try:
            self.pipeline.check_count(len(sources))
            lo, hi = self.pipeline.pixel_bounds(min_pixels, max_pixels)
            sources = await self._fetch_urls(list(sources))
            out = await asyncio.to_thread(self.pipeline.process, sources, lo, hi, self._pool)
        except ServeAppError as e:
            self._error(e)
            raise
        self._m_images.inc(len(out))
        self._m_latency.observe(time.perf_counter() - t0)
        return out

    async def upload(self, data: bytes | str) -> dict:
        """Validate, inspect and keep an image; returns the ``POST /v1/images`` body."""
        try:
            if isinstance(data, str) and _is_http(data):
                data = (await self._fetch_urls([data]))[0]
            return await asyncio.get_running_loop().run_in_executor(self._pool, self.pipeline.upload, data)
        except ServeAppError as e:
            self._error(e)
            raise

    async def decode(self, source: str | bytes) -> "np.ndarray":
        """One source -> oriented RGB uint8 pixels (H, W, 3): what TableExtractor reads."""
        try:
            if isinstance(source, str) and _is_http(source):
                source = (await self._fetch_urls([source]))[0]
            return await asyncio.get_running_loop().run_in_executor(self._pool, self.pipeline.decode_rgb, source)
        except ServeAppError as e:
            self._error(e)
            raise

    async def stats(self) -> dict:
        """Cache hits/misses/bytes, images processed, uploads, errors by code."""
        return await asyncio.to_thread(self.pipeline.stats)

    async def _fetch_urls(self, sources: list) -> list:
        """Fetch http(s) sources concurrently (when enabled); others pass through unchanged."""
        if not self.options.fetch.enabled:
            return sources  # the pipeline refuses URL strings with url_not_allowed
        idx = [i for i, s in enumerate(sources) if isinstance(s, str) and _is_http(s)]
        if not idx:
            return sources
        results = await asyncio.gather(*(fetch_image(sources[i], self.options.fetch) for i in idx),
                                       return_exceptions=True)
        for i, r in zip(idx, results):
            if isinstance(r, ServeAppError):
                raise with_index(r, i, len(sources))
            if isinstance(r, BaseException):
                raise r
            sources[i] = r
        return sources

    def _error(self, e: ServeAppError) -> None:
        self.pipeline.count_error(e.code)
        self._m_errors.inc(tags={"code": e.code or "unknown"})


def _is_http(s: str) -> bool:
    return s[:8].lower().startswith(("http://", "https://"))
