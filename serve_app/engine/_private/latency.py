"""Request latencies as the engine sees them, in fixed buckets (as Prometheus histograms keep them).

Why: a client's TTFT or end-to-end tail can be made inside the engine (queueing behind prompts and
decode steps) or in front of it (Serve's router, Preprocess, the Ingress, the proxy); inside, the
queue share says whether requests waited for admission (rows, KV pages) or for their prompt work. A
benchmark differences two ``stats()`` snapshots of these buckets and sets them beside what the
client measured.
"""

from __future__ import annotations

# arrival in the engine -> admitted (a decode slot and KV pages): the wait in the engine's FIFO
QUEUE_BOUNDS_S = (0.01, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
# arrival in the engine -> first token on the host
TTFT_BOUNDS_S = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
# arrival in the engine -> the finishing token on the host (finished requests only, not cancelled)
E2E_BOUNDS_S = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 8.0)


class LatencyBuckets:
    """Counts per bucket (the last one open-ended) and the sum, under ``name`` in ``stats()``."""

    def __init__(self, name: str, bounds: tuple[float, ...]):
        self.name, self.bounds = name, bounds
        self.total = 0.0
        self.counts = [0] * (len(bounds) + 1)

    def observe(self, seconds: float) -> None:
        self.total += seconds
        self.counts[sum(seconds > b for b in self.bounds)] += 1

    def stats(self) -> dict:
        return {f"{self.name}_s_total": round(self.total, 4),
                f"{self.name}_bucket_counts": list(self.counts),
                f"{self.name}_bucket_bounds_s": list(self.bounds)}
