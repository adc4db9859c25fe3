"""A request's state in the scheduler, and a sampled step on its way to the host."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from serve_app.engine._private.timing import StepTimer
from serve_app.engine.detokenizer import IncrementalDetokenizer
from serve_app.engine.protocol import EngineRequest


@dataclass
class Seq:
    """One request in the scheduler: its prompt and limits, its slot and KV pages once admitted,
    its image features until its prefill ends, and the tokens launched and seen."""

    req: EngineRequest
    arrival: float
    prompt: list[int]
    max_new: int
    stop_ids: set[int]
    ban_ids: list[int]
    seed: int
    detok: IncrementalDetokenizer
    slot: int = -1
    pages: list[int] = field(default_factory=list)
    pages_dev: torch.Tensor | None = None
    positions: torch.Tensor | None = None      # [3, L] CPU
    rope_delta: int = 0
    vis_index: np.ndarray | None = None       # prompt indices of image tokens
    vis_embeds: torch.Tensor | None = None
    deepstack: list[torch.Tensor] = field(default_factory=list)
    vis_event: Any = None                      # vision_stream: its encoding is done when this is
    computed: int = 0
    out: list[int] = field(default_factory=list)   # tokens the host has seen
    launched: int = 0                              # tokens whose sampling was launched
    done: bool = False
    first_token_at: float | None = None

    @property
    def rid(self) -> str:
        return self.req.request_id


@dataclass
class Launch:
    """Tokens sampled on the device for ``seqs``, on their way to the host."""

    kind: str
    seqs: list[Seq]
    tokens: torch.Tensor
    timer: StepTimer
