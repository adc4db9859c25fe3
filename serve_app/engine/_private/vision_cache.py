"""LRU of vision-tower outputs by image id, bounded in bytes.

A multi-turn conversation re-sends the same image every turn; with the cache it is encoded once.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

Feats = tuple[torch.Tensor, list[torch.Tensor]]  # (merged embeds, deepstack levels)


def _nbytes(feats: Feats) -> int:
    return sum(t.numel() * t.element_size() for t in [feats[0], *feats[1]])


class VisionCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._d: OrderedDict[str, Feats] = OrderedDict()

    def get(self, key: str) -> Feats | None:
        feats = self._d.get(key)
        if feats is not None:
            self._d.move_to_end(key)
        return feats

    def put(self, key: str, feats: Feats) -> None:
        size = _nbytes(feats)
        if size > self.max_bytes:
            return
        if key in self._d:
            self.bytes -= _nbytes(self._d.pop(key))
        self._d[key] = feats
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, old = self._d.popitem(last=False)
            self.bytes -= _nbytes(old)

    def __len__(self) -> int:
        return len(self._d)
