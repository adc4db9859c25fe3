"""The engine protocol: what the VLM deployment needs from a generation engine.

It knows nothing about Ray (as in Ray Serve LLM, the deployment is a thin wrapper).
An engine takes already-tokenised prompts plus preprocessed images and returns an
async stream of :class:`TokenDelta` per request. Two implementations exist:
``hf-generate`` (the measured baseline, HF ``generate`` + a streamer) and
``continuous`` (iteration-level batching, see ``serve_app/engine/``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, AsyncIterator, Callable, Protocol, Sequence, runtime_checkable

import numpy as np


@dataclass
class ImageInput:
    """One preprocessed image, as Qwen3-VL's vision tower wants it.

    ``pixel_values`` is either float32 ``[t*h*w, 3*temporal_patch*patch*patch]`` (patchified,
    normalised: what HF's processor returns) or, for a still image, the compact form Preprocess
    ships: uint8 ``[h*w, 3, patch, patch]`` in the same patch order, before normalisation and
    temporal repeat (8x fewer bytes; the engine normalises on the device, bit-identical).
    ``grid_thw`` is ``(t, h, w)`` in patches. The LM sees ``t*h*w // merge**2`` image tokens.
    ``image_id`` is a content hash of the source bytes, usable as a cache key.
    """

    pixel_values: np.ndarray
    grid_thw: tuple[int, int, int]
    image_id: str = ""

    def num_tokens(self, merge_size: int = 2) -> int:
        t, h, w = self.grid_thw
        return t * h * w // (merge_size * merge_size)

    @property
    def compact(self) -> bool:
        return self.pixel_values.dtype == np.uint8

    def float_pixels(self) -> np.ndarray:
        """The float32 ``pixel_values`` (normalised on the host when compact)."""
        if not self.compact:
            return self.pixel_values
        from serve_app._image import normalise_patches
        return normalise_patches(self.pixel_values)


@dataclass
class SamplingParams:
    """Per-request sampling. ``temperature == 0`` means greedy; ``top_k <= 0`` disables top-k."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    # Benchmark-only: random weights stop at random places; these make output lengths fixed.
    ignore_eos: bool = False
    min_tokens: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    images: list[ImageInput] = field(default_factory=list)
    sampling: SamplingParams = field(default_factory=SamplingParams)
    # Merge the stream's deltas into at most one item per interval (first text and the end go out
    # at once; :class:`DeltaCoalescer`). 0: one item per engine step.
    stream_interval_s: float = 0.0


@dataclass
class TokenDelta:
    """Output of one request: one engine step, or several consecutive ones merged
    (:func:`merge_deltas`) when the consumer was slower than the engine.

    ``text`` is the newly decoded text (may be empty while a multi-byte character is incomplete);
    ``finish_reason`` is set on the last delta only: ``"stop"`` (EOS, stop token or stop string),
    ``"length"`` (max_tokens) or ``"cancelled"``.
    """

    request_id: str
    text: str
    token_ids: list[int]
    num_prompt_tokens: int
    num_generated_tokens: int
    finish_reason: str | None = None


def merge_deltas(deltas: Sequence[TokenDelta]) -> TokenDelta:
    """Consecutive deltas of one request as one: text and token ids concatenated, counts and
    ``finish_reason`` from the last. Used to stream fewer, bigger items (engine queue draining, the
    VLM's ``stream_interval_ms``); a single delta is returned as is."""
    if not deltas:
        raise ValueError("merge_deltas needs at least one delta")
    if len(deltas) == 1:
        return deltas[0]
    last = deltas[-1]
    return TokenDelta(deltas[0].request_id, "".join(d.text for d in deltas),
                      [t for d in deltas for t in d.token_ids], last.num_prompt_tokens,
                      last.num_generated_tokens, last.finish_reason)


class DeltaCoalescer:
    """The rule for merging one stream's deltas, as Ray Serve LLM's ``stream_batching_interval_ms``.

    Deltas pass through until one carrying text has gone out (time to first token is not
    delayed); after that they are held and sent merged once ``interval_s`` has passed since the
    last item sent. A finished delta flushes at once. The rule is checked when a delta arrives,
    with no timer: an engine makes a delta per step, so a held token waits at most the interval
    plus one step. The continuous engine applies it where the engine thread's outputs reach the
    event loop, so a consumer is woken once per interval, not once per decode step.
    """

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic):
        self.interval_s, self.clock = interval_s, clock
        self.pending: list[TokenDelta] = []
        self.last_sent, self.text_sent = 0.0, False

    def offer(self, delta: TokenDelta) -> TokenDelta | None:
        """Take a delta; return what to send now (merged with held ones), or None to hold it."""
        self.pending.append(delta)
        now = self.clock()
        if delta.finish_reason is None and self.text_sent and now - self.last_sent < self.interval_s:
            return None
        out = merge_deltas(self.pending)
        self.pending = []
        self.text_sent = self.text_sent or bool(out.text)
        self.last_sent = now
        return out

    def drain(self) -> TokenDelta | None:
        """The held deltas as one (before an error is passed on), or None."""
        if not self.pending:
            return None
        out, self.pending = merge_deltas(self.pending), []
        return out


async def coalesce_deltas(stream: AsyncIterator[TokenDelta], interval_s: float,
                          clock: Callable[[], float] = time.monotonic) -> AsyncGenerator[TokenDelta, None]:
    """Re-stream ``stream`` under :class:`DeltaCoalescer`'s rule: how an engine that makes one
    delta per step honours ``EngineRequest.stream_interval_s``. Held deltas are sent before an
    exception from ``stream`` is re-raised. This owns ``stream``: closing this closes it (so a
    client leaving still cancels the request)."""
    merger = DeltaCoalescer(interval_s, clock)
    try:
        async for delta in stream:
            out = merger.offer(delta)
            if out is not None:
                yield out
    except Exception:
        held = merger.drain()
        if held is not None:
            yield held
        raise
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
    held = merger.drain()
    if held is not None:       # the engine ended without a finished delta (not expected): lose nothing
        yield held


def merged(stream: AsyncIterator[TokenDelta], request: EngineRequest) -> AsyncIterator[TokenDelta]:
    """``stream`` as ``request.stream_interval_s`` asks (itself when the interval is 0)."""
    return coalesce_deltas(stream, request.stream_interval_s) if request.stream_interval_s > 0 else stream


@runtime_checkable
class Engine(Protocol):
    """Generation engine. All methods are called from one asyncio event loop."""

    tokenizer: Any  # a transformers tokenizer (used for prompts, stop strings, detokenising)

    async def start(self) -> None:
        """Load weights and warm up; after it returns ``health()`` is ready."""

    def generate(self, request: EngineRequest) -> AsyncIterator[TokenDelta]:
        """Submit a request and stream its deltas, merged per ``request.stream_interval_s``.
        Closing the iterator early cancels it."""

    async def cancel(self, request_id: str) -> None:
        """Stop a request and free its resources; its stream ends with ``finish_reason='cancelled'``."""

    def health(self) -> dict:
        """``{"ready": bool, ...}``; raise if the engine is broken (the replica is then restarted)."""

    def stats(self) -> dict:
        """Counters and gauges: running, waiting, finished/cancelled totals, tokens, KV use..."""

    async def shutdown(self) -> None:
        """Stop background work and release the device."""


def validate_images(images: Sequence[ImageInput], patch_dim: int) -> None:
    """Cheap shape checks shared by engines (a malformed tensor is a programming error upstream)."""
    for im in images:
        t, h, w = im.grid_thw
        pv = im.pixel_values
        if im.compact:
            if pv.ndim != 4 or t != 1 or pv.shape[0] != h * w or pv.shape[2] != pv.shape[3] \
                    or patch_dim % (pv.shape[1] * pv.shape[2] * pv.shape[3]):
                raise ValueError(f"image {im.image_id!r}: compact pixel_values {tuple(pv.shape)} do "
                                 f"not match grid_thw {im.grid_thw} with patch dim {patch_dim}")
        elif pv.ndim != 2 or pv.shape != (t * h * w, patch_dim):
            raise ValueError(
                f"image {im.image_id!r}: pixel_values {tuple(im.pixel_values.shape)} does not match "
                f"grid_thw {im.grid_thw} with patch dim {patch_dim}")
