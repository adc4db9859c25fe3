"""VLM deployment: a thin Ray Serve wrapper around a generation engine.

It owns prompt building (chat template + image tokens) and the context-length check, so errors
surface before the first token; generation itself belongs to the engine, which knows nothing about
Ray. The first item of every stream is an empty "accepted" delta carrying the prompt token count,
which lets the ingress answer 4xx instead of a broken 200 stream.

Every streamed item costs the replica's event loop (and the GIL the engine thread needs), so with
``stream_interval_ms`` the engine merges a request's deltas and hands them over at most once per
interval, as Ray Serve LLM's ``stream_batching_interval_ms`` does: the first text goes out at once
(TTFT unchanged) and the final delta is never held back (``engine.protocol.DeltaCoalescer``). The
continuous engine merges where its thread's outputs reach the loop, so a stream's task wakes once
per interval rather than once per decode step.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, AsyncGenerator, Sequence

import ray
from ray import serve
from ray.serve.metrics import Counter, Gauge, Histogram

from serve_app.engine import EngineConfig, EngineRequest, ImageInput, SamplingParams, TokenDelta
from serve_app.engine import create_engine
from serve_app.errors import ServeAppError
from serve_app import _engine_metrics
from serve_app._prompt import PromptBuilder

logger = logging.getLogger("ray.serve")

_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty")


@dataclass(frozen=True)
class PendingImages:
    """A request's images while Preprocess still works on them: the ``ObjectRef`` of its
    ``list[ImageInput]`` result, which :meth:`VLM.generate` awaits.

    Why: passed as a top-level argument, Serve's router holds the VLM call until Preprocess has
    finished, then routes it; nested here, the call is routed while Preprocess runs and only the
    VLM replica waits for the pixels (``RESULTS.md``, "the Preprocess -> VLM hop")."""

    ref: "ray.ObjectRef"   # of list[ImageInput]; a refused image raises Preprocess's own error


@serve.deployment(name="VLM", max_ongoing_requests=64, health_check_period_s=10,
                  health_check_timeout_s=30, graceful_shutdown_timeout_s=30,
                  ray_actor_options={"num_cpus": 1})
class VLM:
    async def __init__(self, engine_config: dict, default_max_tokens: int = 512,
                       stream_interval_ms: float = 0):
        if not (math.isfinite(stream_interval_ms) and stream_interval_ms >= 0):
            raise ValueError(f"stream_interval_ms must be a finite number >= 0 (0 = no time-based "
                             f"merging), got {stream_interval_ms!r}")
        self.config = EngineConfig.model_validate(engine_config)
        self.default_max_tokens = default_max_tokens
        self.stream_interval_s = stream_interval_ms / 1000
        self.engine = create_engine(self.config)
        await self.engine.start()
        self.prompts = PromptBuilder(self.engine.tokenizer)
        self.defaults = self._generation_defaults()
        tags = ("engine", "finish_reason")
        self._m_requests = Counter("serve_app_vlm_requests", "finished requests", tag_keys=tags)
        self._m_prompt = Counter("serve_app_vlm_prompt_tokens", "prompt tokens (image tokens included)")
        self._m_gen = Counter("serve_app_vlm_generation_tokens", "generated tokens")
        self._m_ttft = Histogram("serve_app_vlm_ttft_seconds", "time to first token in the VLM",
                                 boundaries=[0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8])
        self._m_running = Gauge("serve_app_vlm_running", "requests generating in this replica")
        self._running = 0
        self._engine_metrics = _engine_metrics.EngineMetrics()
        self._metrics_task = asyncio.get_running_loop().create_task(self._export_engine_metrics())

    async def _export_engine_metrics(self) -> None:
        """The engine's KV use, queue and GPU time on Prometheus (``_engine_metrics``)."""
        logged = False
        while True:
            try:
                self._engine_metrics.update(self.engine.stats())
            except Exception:  # noqa: BLE001 - metrics must never take the replica down
                if not logged:
                    logger.exception("exporting engine metrics failed (logged once)")
                    logged = True
            await asyncio.sleep(_engine_metrics.INTERVAL_S)

    def _generation_defaults(self) -> dict[str, Any]:
        """Sampling defaults from the model's generation_config.json (as vLLM does)."""
        gen = getattr(getattr(self.engine, "model", None), "generation_config", None)
        out: dict[str, Any] = {}
        if gen is not None and getattr(gen, "do_sample", False):
            for k in _SAMPLING_FIELDS:
                v = getattr(gen, k, None)
                if v is not None:
                    out[k] = v
        else:
            out["temperature"] = 1.0
        return out

    def _sampling(self, overrides: dict[str, Any], n_prompt: int) -> SamplingParams:
        room = self.config.max_model_len - n_prompt
        if room < 1:
            raise ServeAppError(
                f"This model's maximum context length is {self.config.max_model_len} tokens, but the "
                f"prompt has {n_prompt} tokens (images included). Send fewer or smaller images, or "
                f"lower max_pixels.", 400, "context_length_exceeded", "messages")
        max_tokens = overrides.get("max_tokens")
        if max_tokens is not None and max_tokens > room:
            raise ServeAppError(
                f"This model's maximum context length is {self.config.max_model_len} tokens. However, "
                f"you requested {n_prompt + max_tokens} tokens ({n_prompt} in the messages, "
                f"{max_tokens} in the completion).", 400, "context_length_exceeded", "max_tokens")
        params = {**self.defaults, **{k: v for k, v in overrides.items() if k != "max_tokens"}}
        params["max_tokens"] = max_tokens or min(self.default_max_tokens, room)
        if params.get("top_k") == -1:
            params["top_k"] = 0
        return SamplingParams(**params)

    async def generate(self, request_id: str, messages: list[dict],
                       images: "Sequence[ImageInput] | PendingImages",
                       sampling: dict[str, Any]) -> AsyncGenerator[TokenDelta, None]:
        if isinstance(images, PendingImages):
            images = await images.ref
        t0 = time.perf_counter()              # the VLM's TTFT: from the pixels in hand
        ids = self.prompts.build(messages, images)
        request = EngineRequest(request_id, ids, list(images), self._sampling(sampling, len(ids)),
                                stream_interval_s=self.stream_interval_s)
        yield TokenDelta(request_id, "", [], len(ids), 0, None)  # accepted
        stream = self.engine.generate(request)
        finish, n_gen, first = None, 0, True
        self._running += 1
        self._m_running.set(self._running)
        try:
            async for delta in stream:
                if first and delta.token_ids:
                    self._m_ttft.observe(time.perf_counter() - t0)
                    first = False
                finish, n_gen = delta.finish_reason, delta.num_generated_tokens
                yield delta
        except ServeAppError:
            finish = "error"   # e.g. gpu_out_of_memory: counted apart from client cancels
            raise
        finally:
            await stream.aclose()  # on client disconnect this cancels the engine request
            self._running -= 1
            self._m_running.set(self._running)
            self._m_requests.inc(tags={"engine": self.config.engine,
                                       "finish_reason": finish or "cancelled"})
            self._m_prompt.inc(len(ids))
            if n_gen:
                self._m_gen.inc(n_gen)

    async def info(self) -> dict:
        return {"model": self.config.model, "engine": self.config.engine,
                "max_model_len": self.config.max_model_len, **self.engine.health()}

    async def stats(self) -> dict:
        return self.engine.stats()

    async def check_health(self) -> None:
        self.engine.health()  # raises when broken: Serve restarts the replica

    async def __del__(self):
        if getattr(self, "_metrics_task", None) is not None:
            self._metrics_task.cancel()
        await self.engine.shutdown()
