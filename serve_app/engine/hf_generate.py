"""Baseline engine: Hugging Face ``generate`` with a streamer, one request at a time.

This is the naive reference every benchmark compares against, and the correctness oracle for
the continuous-batching engine. Requests queue in arrival order; generation runs in a worker
thread so the event loop stays free to stream tokens and accept cancellations.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

import numpy as np
import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from serve_app.engine.config import EngineConfig
from serve_app.engine.detokenizer import IncrementalDetokenizer
from serve_app.engine.device import apply_memory_cap, pick_device, pick_dtype
from serve_app.engine.protocol import EngineRequest, TokenDelta, merged, validate_images

logger = logging.getLogger(__name__)

_NO_TOKEN = 2**31 - 1  # an id no vocabulary has


@dataclass
class _Job:
    request: EngineRequest
    out: asyncio.Queue  # list[int] token ids per step, None at the end, or an Exception
    cancel: threading.Event = field(default_factory=threading.Event)
    started: bool = False


class _Streamer(BaseStreamer):
    """HF streamer protocol: ``put`` gets the prompt first, then one tensor per new token."""

    def __init__(self, loop: asyncio.AbstractEventLoop, job: _Job):
        self._loop, self._job, self._seen_prompt = loop, job, False

    def put(self, value: torch.Tensor) -> None:
        if not self._seen_prompt:
            self._seen_prompt = True
            return
        self._loop.call_soon_threadsafe(self._job.out.put_nowait, value.reshape(-1).tolist())

    def end(self) -> None:
        self._loop.call_soon_threadsafe(self._job.out.put_nowait, None)


class _CancelCriteria(StoppingCriteria):
    """A StoppingCriteria-compatible callable that stops when the job is cancelled."""

    def __init__(self, job: _Job):
        self._job = job

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        stop = self._job.cancel.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class HFGenerateEngine:
    """Implements :class:`serve_app.engine.protocol.Engine` with ``model.generate``."""

    def __init__(self, config: EngineConfig):
        self.config = config
        self.tokenizer = None
        self.model = None
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self.eos_token_ids: list[int] = []
        self._queue: asyncio.Queue[_Job] | None = None
        self._jobs: dict[str, _Job] = {}
        self._worker: asyncio.Task | None = None
        self._ready = False
        self._running = 0
        self._counters = {"requests_total": 0, "finished_total": 0, "cancelled_total": 0,
                          "failed_total": 0, "prompt_tokens_total": 0, "generation_tokens_total": 0}
        self._patch_dim = 0
        self.image_token_id = -1

    # ---- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        self._queue = asyncio.Queue()
        self._worker = asyncio.get_running_loop().create_task(self._work(), name="hf-generate-worker")
        self._ready = True

    def _load(self) -> None:
        from serve_app.models import load_model, load_tokenizer, resolve_model

        path = resolve_model(self.config.model, self.config.cache_dir)
        self.device = pick_device(self.config)
        self.dtype = pick_dtype(self.config, self.device)
        apply_memory_cap(self.config, self.device)
        self.tokenizer = load_tokenizer(path)
        self.model = load_model(path, dtype=self.dtype, device=self.device)
        self.model.eval()
        gen = self.model.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_token_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self.image_token_id = self.model.config.image_token_id
        vc = self.model.config.vision_config
        self._patch_dim = 3 * vc.temporal_patch_size * vc.patch_size**2
        logger.info("hf-generate engine: %s on %s (%s)", path, self.device, self.dtype)

    async def shutdown(self) -> None:
        self._ready = False
        for job in self._jobs.values():
            job.cancel.set()
        if self._worker:
            self._worker.cancel()
        self.model = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def health(self) -> dict:
        if self._worker is not None and self._worker.done():
            raise RuntimeError(f"hf-generate worker died: {self._worker.exception()!r}")
        return {"ready": self._ready, "engine": "hf-generate"}

    def stats(self) -> dict:
        return {"engine": "hf-generate", "running": self._running,
                "waiting": self._queue.qsize() if self._queue else 0, **self._counters}

    # ---- requests --------------------------------------------------------------------------
    async def cancel(self, request_id: str) -> None:
        job = self._jobs.get(request_id)
        if job is not None:
            job.cancel.set()

    def generate(self, request: EngineRequest) -> AsyncIterator[TokenDelta]:
        return merged(self._generate(request), request)

    async def _generate(self, request: EngineRequest) -> AsyncIterator[TokenDelta]:
        """One delta per step of HF ``generate`` (its streamer's token ids, detokenised here)."""
        if not self._ready:
            raise RuntimeError("engine is not started")
        validate_images(request.images, self._patch_dim)
        if request.request_id in self._jobs:
            raise ValueError(f"duplicate request id {request.request_id!r}")
        job = _Job(request, asyncio.Queue())
        self._jobs[request.request_id] = job
        self._counters["requests_total"] += 1
        await self._queue.put(job)
        sp = request.sampling
        detok = IncrementalDetokenizer(self.tokenizer, sp.stop)
        n_prompt, n_gen, finish = len(request.prompt_token_ids), 0, None
        stop_ids = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(self.eos_token_ids))
        try:
            while finish is None:
                item = await job.out.get()
                if isinstance(item, Exception):
                    raise item
                if item is None:  # generate() returned
                    text = detok.flush()
                    finish = "cancelled" if job.cancel.is_set() else "length"
                    yield TokenDelta(request.request_id, text, [], n_prompt, n_gen, finish)
                    break
                ids = [t for t in item if t not in stop_ids] if item and item[-1] in stop_ids else item
                n_gen += len(item)
                text = detok.add(ids)
                if detok.stopped or (item and item[-1] in stop_ids and n_gen >= sp.min_tokens):
                    finish = "stop"
                    text += detok.flush()
                elif n_gen >= sp.max_tokens:
                    finish = "length"
                    text += detok.flush()
                yield TokenDelta(request.request_id, text, item, n_prompt, n_gen, finish)
        finally:
            job.cancel.set()  # stops the worker's generate() if we leave early (client gone)
            self._jobs.pop(request.request_id, None)
            if finish == "cancelled" or finish is None:
                self._counters["cancelled_total"] += 1
            else:
                self._counters["finished_total"] += 1
            self._counters["generation_tokens_total"] += n_gen

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self._queue.get()
            if job.cancel.is_set():
                job.out.put_nowait(None)
                continue
            self._running = 1
            self._counters["prompt_tokens_total"] += len(job.request.prompt_token_ids)
            try:
                await asyncio.to_thread(self._generate_blocking, loop, job)
            except Exception as e:  # surfaced to the caller; the worker keeps serving
                logger.exception("generate failed for %s", job.request.request_id)
                self._counters["failed_total"] += 1
                job.out.put_nowait(e)
            finally:
                self._running = 0

    def _generate_blocking(self, loop: asyncio.AbstractEventLoop, job: _Job) -> None:
        req, sp = job.request, job.request.sampling
        dev = self.device
        inputs = {"input_ids": torch.tensor([req.prompt_token_ids], device=dev)}
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        if req.images:
            # M-RoPE needs to know which positions are image tokens (the processor's output)
            ids = inputs["input_ids"]
            inputs["mm_token_type_ids"] = (ids == self.image_token_id).to(torch.int32)
            pv = np.concatenate([im.float_pixels() for im in req.images], axis=0)
            inputs["pixel_values"] = torch.from_numpy(pv).to(dev, self.dtype, non_blocking=True)
            inputs["image_grid_thw"] = torch.tensor([im.grid_thw for im in req.images], device=dev)
        # ignore_eos: EOS may be sampled but does not stop (unlike min_new_tokens, which bans it);
        # a never-generated id keeps HF from falling back to the model's default EOS.
        eos = list(sp.stop_token_ids) + ([] if sp.ignore_eos else self.eos_token_ids)
        kwargs = dict(max_new_tokens=sp.max_tokens, eos_token_id=eos or [_NO_TOKEN],
                      pad_token_id=self.tokenizer.pad_token_id or (eos[0] if eos else 0),
                      min_new_tokens=None if sp.ignore_eos else (sp.min_tokens or None),
                      repetition_penalty=sp.repetition_penalty if sp.repetition_penalty != 1.0 else None,
                      streamer=_Streamer(loop, job), stopping_criteria=[_CancelCriteria(job)])
        if sp.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=sp.temperature, top_p=sp.top_p,
                          top_k=sp.top_k if sp.top_k > 0 else None)
            torch.manual_seed(sp.seed if sp.seed is not None else int(time.time_ns() % 2**63))
        kwargs["stopping_criteria"] = StoppingCriteriaList(kwargs["stopping_criteria"])
        with torch.inference_mode():
            self.model.generate(**inputs, **kwargs)
