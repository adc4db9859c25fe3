"""Caches, options and the synchronous pipeline that the Preprocess deployment runs in threads.

Sources (data URL, bytes, ``image://<id>``) -> :class:`ImageInput`, with identity (content hash),
a byte-bounded LRU of results and an :class:`ImageStore` for uploads. No Ray here: the deployment
in :mod:`serve_app.preprocess` supplies the shared (actor) store, async URL fetching and metrics.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, fields
from typing import Protocol, Sequence

import numpy as np

from serve_app._fetch import FetchPolicy
from serve_app._image import (DEFAULT_MAX_PIXELS, DEFAULT_MIN_PIXELS, FACTOR, ImageLimits,
                              classify_source, decode_image, image_id_for, parse_data_url,
                              parse_image_ref, preprocess_rgb)
from serve_app._image_inspect import inspect_image
from serve_app.engine.protocol import ImageInput
from serve_app.errors import ServeAppError

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
    resize_threads: int = 4
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
                   upload_store=str(cfg.pop("upload_store", "actor")),
                   resize_threads=int(cfg.pop("resize_threads", 4)))
        if cfg:
            raise ValueError(f"unknown Preprocess settings: {sorted(cfg)}")
        if not FACTOR * FACTOR <= opts.min_pixels <= opts.max_pixels:
            raise ValueError(f"need {FACTOR * FACTOR} <= min_pixels <= max_pixels, got "
                             f"{opts.min_pixels}, {opts.max_pixels}")
        if not 1 <= opts.resize_threads <= 32:
            raise ValueError(f"resize_threads must be 1-32, got {opts.resize_threads}")
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
        # bands of one image's resize and patch reorder (leaf tasks only, so a pool apart from
        # the per-image one the deployment passes to process(): no task waits on its own pool)
        n = self.options.resize_threads
        self._bands = ThreadPoolExecutor(n, thread_name_prefix="preprocess-band") if n > 1 else None
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
                max_pixels: int | None = None, pool: Executor | None = None) -> list[ImageInput]:
        """One ``ImageInput`` per source, in order. With ``pool``, every image is processed on its
        threads, a request's images at once (decoding and resizing release the GIL): a two-image
        request's wait is about one image's, not two, and the pool's size bounds how many images
        (up to 64 MP each) are decoded at once however many requests come. An error names the
        first failing image in order."""
        self.check_count(len(sources))
        lo, hi = self.pixel_bounds(min_pixels, max_pixels)
        futures = [pool.submit(self.process_one, src, lo, hi) for src in sources] if pool is not None else None
        out = []
        try:
            for i, src in enumerate(sources):
                try:
                    out.append(futures[i].result() if futures else self.process_one(src, lo, hi))
                except ServeAppError as e:
                    raise with_index(e, i, len(sources)) from None
        finally:
            for f in futures or ():
                f.cancel()                     # the ones not started, once one failed
        return out

    def process_one(self, source: str | bytes, min_pixels: int, max_pixels: int) -> ImageInput:
        if classify_source(source) == "ref":  # a cache hit needs no trip to the upload store
            hit = self.cache.get((parse_image_ref(source), min_pixels, max_pixels))
            if hit is not None:
                return hit
        image_id, data = self.encoded(source)
        hit = self.cache.get((image_id, min_pixels, max_pixels))
        if hit is not None:
            return hit
        pixel_values, grid_thw = preprocess_rgb(decode_image(data, self.limits), min_pixels, max_pixels,
                                                compact=True,   # 8x fewer bytes to the VLM
                                                pool=self._bands, parts=self.options.resize_threads)
        pixel_values.flags.writeable = False  # shared by cache hits
        result = ImageInput(pixel_values, grid_thw, image_id)
        self.cache.put((image_id, min_pixels, max_pixels), result, pixel_values.nbytes)
        with self._lock:
            self.images_processed += 1
        return result

    def encoded(self, source: str | bytes) -> tuple[str, bytes]:
        """``(image_id, encoded bytes)`` of a data URL, raw bytes or ``image://`` reference."""
        kind = classify_source(source)
        if kind == "ref":
            image_id = parse_image_ref(source)
            data = self.store.get(image_id)
            if data is None:
                raise ServeAppError(f"image {image_id} not found: upload it with POST /v1/images (uploads "
                                    "are kept in a bounded cache and may expire)", 404, "image_not_found")
            return image_id, data
        if kind == "url":
            raise ServeAppError("fetching image URLs is disabled on this server; send a data: URL or "
                                "upload with POST /v1/images", 400, "url_not_allowed")
        data = self.source_bytes(source)
        return image_id_for(data), data

    def decode_rgb(self, source: str | bytes) -> np.ndarray:
        """Oriented 8-bit RGB pixels (H, W, 3) of one source, every limit enforced (for tables)."""
        _, data = self.encoded(source)
        return np.asarray(decode_image(data, self.limits))

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
