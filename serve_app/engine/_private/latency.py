"""Request latencies as the engine sees them, in fixed buckets (as Prometheus histograms keep them).

Why: a client's TTFT or end-to-end tail can be made inside the engine (queueing behind prompts and
decode steps) or in front of it (Serve's router, Preprocess, the Ingress, the proxy); inside, the
queue share says whether requests waited for admission (rows, KV pages) or for their prompt work. A
benchmark differences two ``stats()`` snapshots of these buckets and sets them beside what the
client measured. :class:`AdmissionBlocks` then says which limit the queue waited on.
"""

from __future__ import annotations

# arrival in the engine -> admitted (a decode slot and KV pages): the wait in the engine's FIFO
QUEUE_BOUNDS_S = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.8, 1.6)
# arrival in the engine -> first token on the host; 50 ms apart up to 0.4 s, so that the engine's
# share of a client's P95 near the SLO (0.412 s) reads to 50 ms, not as "somewhere in 0.2-0.4 s"
TTFT_BOUNDS_S = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.5, 0.8, 1.6)
# arrival in the engine -> the finishing token on the host (finished requests only, not cancelled)
E2E_BOUNDS_S = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 8.0)
# one request's arrival in the engine -> the next one's: whether the serving layer delivers the
# clients' arrivals as they came or in clumps (Poisson arrivals at rate r put 1 - exp(-r * b) of
# the gaps under b)
ARRIVAL_GAP_BOUNDS_S = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


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


ADMISSION_LIMITS = ("rows", "prefill_backlog", "kv_pages")


class AdmissionBlocks:
    """Seconds during which the head of the engine's queue could not be admitted, per limit that
    held it: no free row (``max_num_seqs``), prompt tokens already waiting for prefill at
    ``max_prefill_tokens``, no KV pages. Limits can hold at once, so the totals may overlap.

    Why: a queue wait behind full rows is lost time (more rows would cut it); one behind the
    prefill backlog only moves the wait for the prompt work from after admission to before it."""

    def __init__(self):
        self.seconds = dict.fromkeys(ADMISSION_LIMITS, 0.0)
        self._since = 0.0
        self._held: tuple[str, ...] = ()

    def update(self, now: float, rows: bool, prefill_backlog: bool, kv_pages: bool) -> None:
        """At each admission pass: charge the time since the last pass to the limits that held
        then, and remember the ones holding the head of the queue now (none if it is empty)."""
        for limit in self._held:
            self.seconds[limit] += now - self._since
        self._since = now
        self._held = tuple(k for k, held in zip(ADMISSION_LIMITS, (rows, prefill_backlog, kv_pages)) if held)

    def stats(self) -> dict:
        return {f"admission_blocked_{k}_s_total": round(v, 4) for k, v in self.seconds.items()}
