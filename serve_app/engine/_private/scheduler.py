"""Iteration-level scheduler: admission by free KV pages, chunked prefill, batched decode.

Runs on the engine thread only. Every request reserves the KV pages for prompt + max new tokens
when it is admitted, so a running request can never run out of memory; requests that do not fit
wait in arrival order (no failure, no OOM).

Steps overlap the host and the GPU: step N+1 is launched (its input tokens read on the device from
``runner.last_tok``) before the host has seen step N's tokens; then the host detokenises and
streams step N while the GPU runs N+1. A request that hits a stop token at step N has one wasted
token computed at N+1, which is dropped.

With ``engine.vision_stream`` the vision tower runs on a second CUDA stream (``image_encoding``)
and a request's prefill waits for its images; with ``engine.prefill_stream`` each prefill step
runs there too, one at a time, and its rows join the decode batch once it is done. Decode steps
stay on the main stream either way. With ``engine.max_decode_rows`` below ``max_num_seqs`` the rows
past it wait after their first token until a decode row frees (``engine.decode_order``: the first
joined, or the one with the least laxity).
"""

from __future__ import annotations

import logging
import random
import time
from collections import deque
from typing import Any, Callable

import numpy as np
import torch

from serve_app.engine._private.attention import cudnn_plans
from serve_app.engine._private import decode_rows, gc_control, startup
from serve_app.engine._private.limits import RequestLimits
from serve_app.engine._private.latency import (ARRIVAL_GAP_BOUNDS_S, E2E_BOUNDS_S, QUEUE_BOUNDS_S, TTFT_BOUNDS_S,
                                              AdmissionBlocks, LatencyBuckets)
from serve_app.engine._private.image_encoding import ImageEncoding
from serve_app.engine._private.memory import vision_patch_budget
from serve_app.engine._private.runner import ModelRunner, PrefillChunk
from serve_app.engine._private.sampler import SlotSampling
from serve_app.engine._private.sequence import Launch, Seq
from serve_app.engine._private.timing import StepTimer
from serve_app.engine._private.transfer import upload
from serve_app.engine._private.vision_cache import VisionCache
from serve_app.engine.config import EngineConfig
from serve_app.engine.detokenizer import IncrementalDetokenizer
from serve_app.engine.protocol import EngineRequest, TokenDelta
from serve_app.errors import ServeAppError

logger = logging.getLogger(__name__)

Emit = Callable[[list[tuple[str, Any]]], None]


class Scheduler:
    def __init__(self, config: EngineConfig, runner: ModelRunner, tokenizer: Any, emit: Emit,
                 eos_ids: list[int], info: dict):
        self.config = config
        self.runner = runner
        self.tokenizer = tokenizer
        self._emit = emit
        self.eos_ids = eos_ids
        self.info = info
        self.vision_budget = vision_patch_budget(config.max_prefill_tokens, runner.merge)
        self.kv = runner.kv
        # what a request may ask of this replica, checked on the event loop before it is queued
        self.limits = RequestLimits(config.max_model_len, runner.merge, runner.image_token_id,
                                    self.vision_budget, self.kv.page_size, self.kv.capacity_pages,
                                    runner.patch_dim)
        self.waiting: deque[Seq] = deque()
        self.prefilling: list[Seq] = []
        self.running: list[Seq] = []
        self.by_id: dict[str, Seq] = {}
        self.free_slots = list(range(config.max_num_seqs - 1, -1, -1))
        self._decode_rows = config.max_decode_rows or config.max_num_seqs
        self._deferred = 0
        self._step_s: float | None = None      # recent decode step time (decode_order "laxity")
        self.vision_cache = VisionCache(config.vision_cache_mb * 2 ** 20)
        # stream_priority "decode": the engine thread's work on a high-priority stream of its own
        # (enter_thread), the side stream below it
        self._main = torch.cuda.Stream(runner.device, priority=-1) \
            if config.stream_priority == "decode" and runner.is_cuda else None   # (else ImageEncoding says why)
        self.images = ImageEncoding(runner, self.vision_cache, self.vision_budget,
                                    config.vision_stream or config.prefill_stream, config.prefill_stream, self._main)
        # prefill_stream: prefill steps run on the images' stream; one at a time is in flight there,
        # and its rows join the decode batch once it is done (_join_side_prefill).
        self._side = self.images.stream if config.prefill_stream else None
        self._side_prefill: Launch | None = None
        self.slots = SlotSampling(config.max_num_seqs, runner.vocab, runner.device)
        self._inflight: list[Launch] = []
        self._inflight_timers: list[tuple[str, StepTimer]] = []
        self.counters = dict(requests_total=0, finished_total=0, cancelled_total=0,
                             prompt_tokens_total=0, generation_tokens_total=0, prefill_steps=0,
                             decode_steps=0, images_encoded=0, vision_cache_hits=0,
                             vision_calls=0, failed_oom_total=0)
        self._time = {"prefill": 0.0, "decode": 0.0, "vision": 0.0}   # GPU seconds on CUDA
        # Engine-thread seconds: in step() (wall and thread CPU), and of those, waiting for the
        # GPU. Busy minus waiting near the wall time means the host, not the GPU, sets the pace.
        # emit: handing outputs over (inside step); loop/inbox/tick/idle: engine_loop.run's turns.
        self._host = dict.fromkeys(("step", "cpu", "wait", "emit", "loop", "inbox", "tick", "idle"), 0.0)
        self._pending: list[tuple[str, Any]] = []
        self._queue = LatencyBuckets("queue", QUEUE_BOUNDS_S)
        self._blocks = AdmissionBlocks()
        self._gaps, self._last_arrival = LatencyBuckets("arrival_gap", ARRIVAL_GAP_BOUNDS_S), None
        self._ttft = LatencyBuckets("ttft", TTFT_BOUNDS_S)
        self._e2e = LatencyBuckets("e2e", E2E_BOUNDS_S)

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def load(cls, config: EngineConfig, emit: Emit) -> "Scheduler":
        """Resolve, load and set up the model (``startup.load_model_for``), then the runner."""
        model, tokenizer, device, eos_ids, budget = startup.load_model_for(config)
        return cls.from_model(config, model, tokenizer, emit, device, eos_ids, budget)

    @classmethod
    def from_model(cls, config: EngineConfig, model, tokenizer, emit: Emit, device: torch.device,
                   eos_ids: list[int], budget: int | None = None) -> "Scheduler":
        runner, info = startup.build_runner(config, model, device, budget)
        logger.info("continuous engine ready: %s", info)
        return cls(config, runner, tokenizer, emit, eos_ids, info)

    def close(self) -> None:
        self.runner.kv = None
        self.runner = None

    # --------------------------------------------------------------------------- requests
    def add(self, req: EngineRequest, arrival: float) -> None:
        sp = req.sampling
        stop_ids = set(sp.stop_token_ids) | (set() if sp.ignore_eos else set(self.eos_ids))
        seed = sp.seed if sp.seed is not None else random.getrandbits(62)
        seq = Seq(req=req, arrival=arrival, prompt=list(req.prompt_token_ids), max_new=self.limits.max_new(req),
                   stop_ids=stop_ids, ban_ids=sorted(stop_ids),
                   seed=seed, detok=IncrementalDetokenizer(self.tokenizer, sp.stop))
        self.by_id[req.request_id] = seq
        self.waiting.append(seq)
        self.counters["requests_total"] += 1
        if self._last_arrival is not None:
            self._gaps.observe(max(0.0, arrival - self._last_arrival))
        self._last_arrival = arrival

    def cancel(self, rid: str) -> None:
        seq = self.by_id.get(rid)
        if seq is None:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
        self._finish(seq, "cancelled", [], [])
        self._flush()

    @property
    def host_times(self) -> dict[str, float]:
        """The engine thread's seconds by kind (``step``, ``cpu``, ``wait``, and the loop's own:
        ``engine_loop.run``); /v1/stats shows each as ``host_<kind>_s_total``."""
        return self._host

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running or self._inflight or self._side_prefill)

    def idle_work(self) -> bool:
        """Work for a moment with no requests: build one queued cuDNN attention plan (~30 ms)
        or capture one queued vision-tower graph, which would otherwise stall running streams;
        one at a time, so that a request arriving meanwhile waits for one at most. True if it
        did something."""
        if self.runner.is_cuda and cudnn_plans.build_pending(max_plans=1) > 0:
            return True
        return self.runner.capture_pending_vision_graph()

    # ------------------------------------------------------------------------------- step
    def step(self) -> None:
        """Launch this iteration's GPU work, then take in the previous iteration's tokens."""
        t0, c0 = time.perf_counter(), time.thread_time()
        try:
            self._step()
        finally:
            self._host["step"] += time.perf_counter() - t0
            self._host["cpu"] += time.thread_time() - c0

    def _step(self) -> None:
        self._admit()
        launched = []
        if self.prefilling and self._side is None:
            launched.append(self._prefill_step())
        elif self.prefilling and self._side_prefill is None:
            self._side.wait_stream(self.images.main)   # after the main stream's KV pages, tables, slots
            with torch.cuda.stream(self._side):
                self._side_prefill = self._prefill_step()
        rows = [s for s in self.running if not s.done and s.launched < s.max_new]
        self._deferred = max(0, len(rows) - self._decode_rows)   # first token out, waiting for a row
        rows = decode_rows.pick(rows, self._decode_rows, self.config.decode_order, self._step_s or 0.0)
        if rows:
            launched.append(self._decode_step(rows))
        launched = [x for x in launched if x is not None]
        previous, self._inflight = self._inflight, launched
        for launch in previous:
            self._collect(launch)
        if launched and launched[0].kind == "prefill":
            # First tokens go out when the prefill is done, not a step later: its end event comes
            # before the decode step just launched, which keeps the GPU busy meanwhile.
            self._collect(launched[0])
            self._inflight = launched[1:]
        if self._side_prefill is not None:
            if not launched or self._side_prefill.timer.done():   # done, or nothing else to run
                self._join_side_prefill()
        elif not launched and self.prefilling:
            # Only images on the vision stream are left: wait for the first, not a busy loop.
            self._wait_for_images()
        if not rows and not self.prefilling and self._side_prefill is None:
            # nothing will follow: take in this launch too
            for launch in self._inflight:
                self._collect(launch)
            self._inflight = []
        self._flush()

    def _join_side_prefill(self) -> None:
        """Take in the side stream's prefill: its first tokens, and its rows into the decode batch,
        the main stream ordered after it (the rows' KV, last tokens and sampling state)."""
        launch, self._side_prefill = self._side_prefill, None
        self._collect(launch)
        launch.timer.order(self.images.main)
        for s in launch.seqs:
            if s.done:
                self._free_slot(s)             # cancelled while its prefill ran: the slot is free now
            else:
                self.running.append(s)

    def _wait_for_images(self) -> None:
        t0 = time.perf_counter()
        ev = next((s.vis_event for s in self.prefilling if s.vis_event is not None), None)
        if ev is not None:
            ev.synchronize()
        self._host["wait"] += time.perf_counter() - t0

    def _out(self, rid: str, item) -> None:
        self._pending.append((rid, item))

    def _flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, []
            t0 = time.perf_counter()
            self._emit(pending)
            self._host["emit"] += time.perf_counter() - t0

    def _admit(self) -> None:
        # Admit only about one prefill step ahead: KV is reserved late and the vision features of
        # admitted requests (kept until their prefill ends) stay bounded.
        backlog = sum(len(s.prompt) - s.computed for s in self.prefilling)
        admitted, now, no_pages = [], time.monotonic(), False
        while self.waiting and self.free_slots and backlog < self.config.max_prefill_tokens:
            seq = self.waiting[0]
            need = self.kv.pages_for(len(seq.prompt) + seq.max_new)
            pages = self.kv.allocate(need)
            if pages is None:
                no_pages = True
                break  # head of line waits for pages (FIFO keeps latency fair)
            self.waiting.popleft()
            self._queue.observe(now - seq.arrival)
            seq.pages = pages
            seq.slot = self.free_slots.pop()
            self.prefilling.append(seq)
            admitted.append(seq)
            backlog += len(seq.prompt)
            self.counters["prompt_tokens_total"] += len(seq.prompt)
        queued = bool(self.waiting)
        self._blocks.update(now, queued and not self.free_slots,
                            queued and backlog >= self.config.max_prefill_tokens, queued and no_pages)
        # The vision tower goes first: the host work below (M-RoPE positions, block tables,
        # sampling rows) then runs while the GPU encodes, instead of before it.
        self._encode_new_images()
        self.runner.capture_pending_vision_graph(busy=True)
        dev = self.runner.device
        for seq in admitted:
            if seq.done:
                continue                        # its images ran out of memory: failed
            seq.pages_dev = upload(seq.pages, dev, torch.int64)
            self.runner.set_block_table(seq.slot, seq.pages)
            self.slots.assign(seq.slot, seq.req.sampling, seq.seed, seq.prompt)
            self._prepare_positions(seq)

    def _prepare_positions(self, seq: Seq) -> None:
        ids = torch.tensor([seq.prompt], dtype=torch.long)
        if seq.req.images:
            mm = (ids == self.runner.image_token_id).int()
            grid = torch.tensor([im.grid_thw for im in seq.req.images], dtype=torch.long)
            pos, delta = self.runner.model.model.get_rope_index(ids, mm, image_grid_thw=grid)
            seq.positions = pos[:, 0].contiguous()
            seq.rope_delta = int(delta.reshape(-1)[0])
            seq.vis_index = np.flatnonzero(np.asarray(seq.prompt) == self.runner.image_token_id)
        else:
            seq.positions = torch.arange(len(seq.prompt)).view(1, -1).expand(3, -1).contiguous()
            seq.rope_delta = 0

    def _encode_new_images(self) -> None:
        """Vision tower once over every not-yet-encoded image of the admitted requests."""
        todo = [s for s in self.prefilling if s.req.images and s.vis_embeds is None and not s.done]
        self.images.encode(todo, self.counters, self._inflight_timers, self._fail_oom)

    def _prefill_step(self) -> "Launch | None":
        timer = StepTimer(self.runner.is_cuda)
        budget = self.config.max_prefill_tokens
        whole = self.runner.prefill_graph_tokens   # 0: no prefill graphs
        chunks, seqs = [], []
        for s in self.prefilling:
            if budget <= 0:
                break
            if not self.images.ready(s):
                continue                       # its images are still on the vision stream
            self.images.wait_main(s)
            left = len(s.prompt) - s.computed
            if chunks and s.computed == 0 and budget < left < whole:
                # Next step it is a whole prompt that replays a graph; cut here, both of its
                # pieces would run as launch-bound eager passes.
                break
            n = min(left, budget)
            a, b = s.computed, s.computed + n
            c = PrefillChunk(ids=torch.tensor(s.prompt[a:b], dtype=torch.long),
                             positions=s.positions[:, a:b], start=a, pages=s.pages_dev,
                             want_logits=(b == len(s.prompt)), pages_host=s.pages)
            if s.vis_index is not None:
                lo, hi = np.searchsorted(s.vis_index, [a, b])
                if hi > lo:
                    c.vis_local = torch.from_numpy(s.vis_index[lo:hi] - a)
                    c.vis_embeds = s.vis_embeds[lo:hi]
                    c.deepstack = [d[lo:hi] for d in s.deepstack]
            chunks.append(c)
            seqs.append(s)
            budget -= n
        if not chunks:
            return None
        try:
            logits = self.runner.prefill(chunks)
        except torch.OutOfMemoryError as e:     # fail these requests, not the whole replica
            logger.warning("prefill of %d tokens out of memory: %s", sum(len(c.ids) for c in chunks), e)
            for s in seqs:
                self._fail_oom(s, "its prefill")
            return None
        done = [s for s, c in zip(seqs, chunks) if c.want_logits]
        for s, c in zip(seqs, chunks):
            s.computed += len(c.ids)
        self.counters["prefill_steps"] += 1
        if not done:
            self._inflight_timers.append(("prefill", timer.stop()))
            return None
        for s in done:
            self.prefilling.remove(s)
            s.vis_embeds, s.deepstack = None, []   # only needed during prefill
            if self._side is None:
                self.running.append(s)          # else when the side stream's prefill is done
        dev = self.runner.device
        slots = upload([s.slot for s in done], dev, torch.int64)
        steps = torch.zeros(len(done), dtype=torch.int64, device=dev)
        return self._launch_sample("prefill", timer, logits, done, slots, steps)

    def _decode_step(self, rows: list[Seq]) -> "Launch":
        timer = StepTimer(self.runner.is_cuda)
        p = self.runner.page_size
        pos, pages, offs, lens, slots, steps = [], [], [], [], [], []
        for s in rows:
            t = len(s.prompt) + s.launched - 1     # index of the token being fed
            pos.append(t + s.rope_delta)
            pages.append(s.pages[t // p])
            offs.append(t % p)
            lens.append(t + 1)
            slots.append(s.slot)
            steps.append(s.launched)
        logits = self.runner.decode(None, pos, pages, offs, lens, slots, steps)
        slot_dev, step_dev = self.runner.step_inputs(len(rows))
        self.counters["decode_steps"] += 1
        return self._launch_sample("decode", timer, logits, rows, slot_dev, step_dev)

    def _launch_sample(self, kind: str, timer: "StepTimer", logits: torch.Tensor, seqs: list[Seq],
                       slots: torch.Tensor, steps: torch.Tensor) -> "Launch":
        """Sample on the device, feed the tokens back as the slots' next inputs, start the copy
        to the host; the host reads them in :meth:`_collect`, after launching the next step."""
        banned = None
        if any(s.launched < s.req.sampling.min_tokens and s.ban_ids for s in seqs):
            width = max(len(s.ban_ids) for s in seqs)
            ban = [(s.ban_ids + [-1] * width)[:width] if s.launched < s.req.sampling.min_tokens
                   else [-1] * width for s in seqs]
            banned = upload(ban, logits.device, torch.int64)
        tokens = self.slots.sample(logits, slots, steps, [s.req.sampling for s in seqs], banned)
        self.runner.last_tok.index_copy_(0, slots, tokens)
        for s in seqs:
            s.launched += 1
        if self.runner.is_cuda:
            host = torch.empty(len(seqs), dtype=torch.int64, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
        else:
            host = tokens
        return Launch(kind, seqs, host, timer.stop())

    def _collect(self, launch: "Launch") -> None:
        """Wait for a launch's tokens and take them in (stream, stop, finish)."""
        t0 = time.perf_counter()
        launch.timer.synchronize()
        self._host["wait"] += time.perf_counter() - t0
        took = launch.timer.seconds()
        self._time[launch.kind] += took
        if launch.kind == "decode":              # a moving mean over ~20 steps
            self._step_s = took if self._step_s is None else self._step_s + 0.05 * (took - self._step_s)
        left = []
        for kind, t in self._inflight_timers:   # vision / partial prefill chunks that are done
            if t.done():
                self._time[kind] += t.seconds()
            else:
                left.append((kind, t))
        self._inflight_timers = left
        now = time.monotonic()
        for s, tok in zip(launch.seqs, launch.tokens.tolist()):
            if s.done:
                continue                        # stopped or cancelled after this was launched
            if s.first_token_at is None:
                s.first_token_at = now
                self._ttft.observe(now - s.arrival)
            self._accept(s, tok)


    def _accept(self, s: Seq, tok: int) -> None:
        """Take one sampled token: stream it, or finish the request."""
        s.out.append(tok)
        sp = s.req.sampling
        if tok in s.stop_ids and len(s.out) >= sp.min_tokens:
            self._finish(s, "stop", [tok], [])
            return
        text = s.detok.add([tok])
        if s.detok.stopped:
            self._finish(s, "stop", [tok], [text])
        elif len(s.out) >= s.max_new:
            self._finish(s, "length", [tok], [text])
        else:
            self._out(s.rid, TokenDelta(s.rid, text, [tok], len(s.prompt), len(s.out)))

    def _finish(self, s: Seq, reason: str, toks: list[int], texts: list[str]) -> None:
        text = "".join(texts) + ("" if reason == "cancelled" else s.detok.flush())
        self._out(s.rid, TokenDelta(s.rid, text, toks, len(s.prompt), len(s.out), reason))
        self._release(s)
        self.counters["cancelled_total" if reason == "cancelled" else "finished_total"] += 1
        if reason != "cancelled":
            self._e2e.observe(time.monotonic() - s.arrival)
        self.counters["generation_tokens_total"] += len(s.out)

    def _fail_oom(self, s: Seq, during: str) -> None:
        """A request the GPU had no memory for: a retryable 503 for it, the engine goes on."""
        self._out(s.rid, ServeAppError(f"the GPU ran out of memory {during}; retry the request",
                                       503, "gpu_out_of_memory", retry_after_s=1))
        self._release(s)
        self.counters["failed_oom_total"] += 1

    def _release(self, s: Seq) -> None:
        s.done = True
        if s in self.running:
            self.running.remove(s)
        if s in self.prefilling:
            self.prefilling.remove(s)
        if not (self._side_prefill is not None and s in self._side_prefill.seqs):
            self._free_slot(s)    # else at the join: the side stream may still write the slot's rows
        if s.pages:
            self.kv.release(s.pages)
            s.pages = []
        self.by_id.pop(s.rid, None)

    def _free_slot(self, s: Seq) -> None:
        if s.slot >= 0:
            self.free_slots.append(s.slot)
            s.slot = -1

    # ------------------------------------------------------------------------------ stats
    def stats(self) -> dict:
        c = self.counters
        return {**c, "running": len(self.running), "prefilling": len(self.prefilling),
                "waiting": len(self.waiting), "decode_deferred": self._deferred,
                "kv_utilization": round(self.kv.utilization(), 4) if self.kv else 0.0,
                "kv_pages_free": self.kv.free_pages if self.kv else 0,
                "kv_pages_total": self.kv.capacity_pages if self.kv else 0,
                "vision_cache_bytes": self.vision_cache.bytes,
                **self._plan_stats(),
                **(self.runner.graph_stats() if self.runner else {}),
                **self._queue.stats(), **self._blocks.stats(), **self._gaps.stats(), **self._ttft.stats(),
                **self._e2e.stats(), **gc_control.PAUSES.stats(),
                "decode_ms_avg": round(1000 * self._time["decode"] / max(1, c["decode_steps"]), 3),
                "prefill_ms_avg": round(1000 * self._time["prefill"] / max(1, c["prefill_steps"]), 3),
                **{f"{k}_s_total": round(v, 4) for k, v in self._time.items()},
                **{f"host_{k}_s_total": round(v, 4) for k, v in self._host.items()}}

    def _plan_stats(self) -> dict:
        if not self.runner or not self.runner.is_cuda:
            return {}
        return {"attn_plans_built": cudnn_plans.built_total, "attn_plans_pending": cudnn_plans.pending_total}

    def enter_thread(self) -> None:
        """Called first on the thread that steps the scheduler: with stream_priority "decode" its
        work goes on the high-priority main stream, ordered after start-up's (default stream).
        The caching allocator keeps blocks per stream: what start-up left cached on the default
        stream goes back to the driver, so it stays inside the memory budget for this stream."""
        if self._main is not None:
            self._main.wait_stream(torch.cuda.current_stream(self.runner.device))
            torch.cuda.empty_cache()
            torch.cuda.set_stream(self._main)

    def describe(self) -> dict:
        return dict(self.info)
