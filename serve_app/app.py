"""The Serve application: Ingress -> Preprocess / VLM / TableExtractor, composed with handles.

``build_app(args)`` is the application builder named in ``deployments.yaml`` (``args:`` is an
:class:`AppConfig`); ``app`` is the same graph with defaults, for ``serve build serve_app.app:app``
and ``serve run serve_app.app:app``.
"""

from __future__ import annotations

from ray.serve import Application

from serve_app.config import AppConfig
from serve_app.ingress import Ingress
from serve_app.preprocess import Preprocess
from serve_app.vlm import VLM


def build_app(args: dict) -> Application:
    cfg = AppConfig.model_validate(args or {})
    config = cfg.model_dump(mode="json")
    preprocess = Preprocess.bind(config["images"])
    vlm = VLM.bind(config["engine"], cfg.api.default_max_tokens, cfg.api.stream_interval_ms)
    tables = None
    if cfg.tables.enabled:  # imported only when used: it pulls in the OCR stack
        from serve_app.table_extractor import TableExtractor

        tables = TableExtractor.bind(config["tables"])
    return Ingress.bind(preprocess, vlm, tables, config)


def __getattr__(name: str):
    # `serve_app.app:app` (for `serve build` / `serve run`) is built on first access, not on import.
    if name == "app":
        return build_app({})
    raise AttributeError(name)
