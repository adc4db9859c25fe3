"""Generation engines behind one protocol (no Ray in here).

``create_engine(config)`` picks the implementation named by ``config.engine``.
"""

from __future__ import annotations

import importlib

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
        if config.separate_process:
            from serve_app.engine.process import ProcessEngine
            return ProcessEngine(config)
        from serve_app.engine.continuous import ContinuousEngine
        return ContinuousEngine(config)
    if ":" in config.engine:  # module:Class, like Serve's import_path
        module, _, name = config.engine.partition(":")
        try:
            cls = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"engine {config.engine!r} cannot be imported: {e}") from e
        try:
            engine = cls(config)
        except TypeError as e:
            raise TypeError(f"engine {config.engine!r} cannot be built as {name}(engine_config): {e}") from e
        missing = [m for m in ("start", "generate", "cancel", "health", "stats", "shutdown")
                   if not callable(getattr(engine, m, None))]
        if missing:
            raise TypeError(f"engine {config.engine!r} lacks {', '.join(missing)} (see "
                            f"serve_app.engine.protocol.Engine)")
        return engine
    raise ValueError(f"unknown engine {config.engine!r}; choose one of {ENGINES}")


__all__ = ["ENGINES", "Engine", "EngineConfig", "EngineRequest", "ImageInput", "SamplingParams",
           "TokenDelta", "create_engine"]
