"""Paged KV cache: one pool of fixed-size pages per layer, handed out per request.

Layout ``[layers, pages, kv_heads, page_size, head_dim]`` keeps one head's page contiguous, which is
what the decode kernel streams. Page 0 is never handed out: padded batch rows write there.
"""

from __future__ import annotations

import torch


class PagedKVCache:
    def __init__(self, num_layers: int, num_pages: int, page_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        if num_pages < 2:
            raise ValueError("KV cache needs at least 2 pages")
        shape = (num_layers, num_pages, num_kv_heads, page_size, head_dim)
        self.k, self.v = (_zeros(shape, dtype, device) for _ in range(2))
        self.page_size = page_size
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def capacity_pages(self) -> int:
        return self.num_pages - 1

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        out = self._free[-n:] if n else []
        del self._free[len(self._free) - n:]
        return out

    def release(self, pages: list[int]) -> None:
        self._free.extend(pages)

    def utilization(self) -> float:
        return 1.0 - len(self._free) / self.capacity_pages


def _zeros(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros; an FP8 pool is made as zero bytes (+0.0 in e4m3), which needs no float8 fill kernel."""
    if dtype == torch.float8_e4m3fn:
        return torch.zeros(shape, dtype=torch.uint8, device=device).view(dtype)
    return torch.zeros(shape, dtype=dtype, device=device)
