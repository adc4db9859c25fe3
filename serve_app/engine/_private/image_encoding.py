"""The vision tower for admitted requests: once per image (an LRU by image id), in calls of at most
the patch budget the start-up memory profile measured, optionally on a CUDA stream of its own.

Why a stream of its own (``engine.vision_stream``): on one stream the tower's ~12 ms of GPU time
per request (compute-bound GEMMs and attention) stalls every decoding row, and decode steps are
bound by memory reads. On a second stream the tower runs beside the decode steps; the requests
whose images are still being encoded wait for their prefill, the others go on. Tensors made on
the side stream and read on the main one are recorded on it (``Tensor.record_stream``), so the
allocator does not hand their memory back to the side stream while a prefill still reads it.
The allocator keeps each stream's free blocks apart, so with the tower alone on the side stream
its activations and the prefill's are cached separately; at the memory cap it frees cached blocks
and retries (a device sync) before it raises out of memory.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Callable

import torch

from serve_app.engine._private.memory import split_by_budget
from serve_app.engine._private.timing import StepTimer
from serve_app.engine._private.vision_cache import VisionCache

logger = logging.getLogger(__name__)


def side_priority(main_is_own: bool) -> int:
    """The side stream's priority: above the main stream when that is the current (default-priority)
    one (engine.stream_priority "prompt"), below it when the engine thread runs on a high-priority
    stream of its own ("decode")."""
    return 0 if main_is_own else -1


class ImageEncoding:
    """``side_stream``: the tower on a stream of its own (:attr:`stream`); ``prefill_on_side``:
    the prefill reads the features on that stream too (``engine.prefill_stream``), so nothing
    crosses streams and there is nothing to wait for."""

    def __init__(self, runner, cache: VisionCache, budget: int, side_stream: bool, prefill_on_side: bool = False,
                 main: "torch.cuda.Stream | None" = None):
        if side_stream and not runner.is_cuda:
            raise ValueError("vision_stream and prefill_stream need a CUDA GPU (they run work on a second stream)")
        self.runner = runner
        self.cache = cache
        self.budget = budget
        # With the main stream the current one (engine.stream_priority "prompt"), the side stream
        # ranks higher: when SMs free up, prompt work (which sets TTFT, the SLO that binds first)
        # gets them before decode kernels, as on one stream where it ran first. Given a ``main``
        # stream ("decode": a high-priority one the engine thread runs on), it ranks lower.
        # engine.prompt_sms: the runner's SM-limited stream (made with side_priority too)
        green = getattr(runner, "prompt_stream", None)
        self.stream = None if not side_stream else green if green is not None else \
            torch.cuda.Stream(runner.device, priority=side_priority(main is not None))
        self.main = (main or torch.cuda.current_stream(runner.device)) if side_stream else None
        self._cross = side_stream and not prefill_on_side

    def encode(self, todo: list, counters: dict, timers: list, fail: Callable[[Any, str], None]) -> None:
        """Launch the tower over every not-yet-encoded image of ``todo`` (sequences with
        ``req.images``); set each sequence's ``vis_embeds``/``deepstack``, and with a side stream
        its ``vis_event`` (the prefill waits for it). A sequence whose images ran out of memory
        is ``fail``-ed. ``timers`` gets the calls' ``("vision", StepTimer)``."""
        if not todo:
            return
        with torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext():
            self._encode(todo, counters, timers, fail)

    def _encode(self, todo: list, counters: dict, timers: list, fail) -> None:
        known: dict = {}
        pixel, grids, owners = [], [], []
        for s in todo:
            for j, im in enumerate(s.req.images):
                if im.image_id:
                    if im.image_id in known or im.image_id in owners:
                        continue
                    cached = self.cache.get(im.image_id)
                    if cached is not None:
                        known[im.image_id] = cached
                        counters["vision_cache_hits"] += 1
                        continue
                pixel.append(im.pixel_values)
                grids.append(tuple(int(x) for x in im.grid_thw))
                owners.append(im.image_id or (id(s), j))
        for group in split_by_budget([t * h * w for t, h, w in grids], self.budget):
            timer = StepTimer(self.runner.is_cuda)
            try:
                encoded = self.runner.encode_images([pixel[i] for i in group], [grids[i] for i in group])
            except torch.OutOfMemoryError as e:   # fail these requests, not the whole replica
                logger.warning("vision tower out of memory on %d images: %s", len(group), e)
                continue
            timers.append(("vision", timer.stop()))
            for i, feats in zip(group, encoded):
                known[owners[i]] = feats
                if isinstance(owners[i], str):
                    self.cache.put(owners[i], feats)
            counters["images_encoded"] += len(group)
            counters["vision_calls"] += 1
        for s in todo:
            keys = [im.image_id or (id(s), j) for j, im in enumerate(s.req.images)]
            if any(k not in known for k in keys):
                fail(s, "encoding its images")
                continue
            parts = [known[k] for k in keys]
            s.vis_embeds = torch.cat([p[0] for p in parts])
            s.deepstack = [torch.cat([p[1][i] for p in parts]) for i in range(len(parts[0][1]))]
            if self._cross:
                for t in (s.vis_embeds, *s.deepstack):
                    t.record_stream(self.main)
                s.vis_event = torch.cuda.Event()
                s.vis_event.record(self.stream)

    @staticmethod
    def ready(s) -> bool:
        """Whether ``s``'s image features are on the device (always, without a side stream)."""
        return s.vis_event is None or s.vis_event.query()

    def wait_main(self, s) -> None:
        """Order the main stream after ``s``'s encoding, once, before its prefill reads it."""
        if s.vis_event is not None:
            if self.stream is not None:
                self.main.wait_event(s.vis_event)
            s.vis_event = None
