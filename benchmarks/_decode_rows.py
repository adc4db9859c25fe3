"""Decode rows of mixed lengths, as the app's are, for the decode benchmarks.

Why: the app's rows hold 300-4,300 tokens (one or two images of 640x480-1920x1080), and the
splits of the longest row set a split-K attention call's time. Rows of one length hid two
effects there (RESULTS.md "Decode attention with rows of mixed lengths").
"""

from __future__ import annotations

import torch


def row_lengths(batch: int, context: int, mixed: bool) -> list[int]:
    """``context`` for every row, or (mixed) seeded lengths spread over 0.25x-2x ``context``."""
    if not mixed:
        return [context] * batch
    g = torch.Generator().manual_seed(batch)
    return [int(x) for x in torch.randint(context // 4, 2 * context + 1, (batch,), generator=g)]
