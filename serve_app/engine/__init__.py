"""Generation engines behind one protocol (no Ray in here).

``create_engine(config)`` picks the implementation named by ``config.engine``.
"""

from __future__ import annotations

from serve_app.engine.config import EngineConfig
from serve_app.engine.protocol import (Engine, EngineRequest, ImageInput, SamplingParams,
                                       TokenDelta)

ENGINES = ("hf-generate", "continuous")


def create_engine(config: EngineConfig) -> Engine:
    """Build (but do not start) the engine named by ``config.engine``."""
    if config.engine == "hf-generate":
        from serve_app.engine.hf_generate import HFGenerateEngine
        return HFGenerateEngine(config)
    if config.engine == "continuous":
        from serve_app.engine.continuous import ContinuousEngine
        return ContinuousEngine(config)
    raise ValueError(f"unknown engine {config.engine!r}; choose one of {ENGINES}")


__all__ = ["ENGINES", "Engine", "EngineConfig", "EngineRequest", "ImageInput", "SamplingParams",
           "TokenDelta", "create_engine"]
