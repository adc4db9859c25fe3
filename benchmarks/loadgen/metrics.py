"""Summaries of a run: latency percentiles, throughput, errors, GPU/CPU samples, engine time split."""

from __future__ import annotations

import math
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable

from benchmarks.loadgen.client import RunResult
from serve_app.engine._private.latency import ADMISSION_LIMITS  # the engine's names for its limits

# The article's service-level objective (A10, 12 sessions).
SLO_TTFT_P95_S = 0.412
SLO_E2E_P95_S = 1.86


def percentile(values: Iterable[float], p: float) -> float | None:
    """The ``p``-th percentile (0..100) with linear interpolation (numpy's default); None if empty."""
    xs = sorted(values)
    if not xs:
        return None
    if not 0 <= p <= 100:
        raise ValueError("p must be within [0, 100]")
    k = (len(xs) - 1) * p / 100
    lo, hi = math.floor(k), math.ceil(k)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def _dist(values: list[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {f"p{p}": percentile(values, p) for p in (50, 95, 99)}
    out["mean"] = sum(values) / len(values) if values else None
    out["max"] = max(values) if values else None
    return {k: (round(v, 5) if v is not None else None) for k, v in out.items()}


SLICE_S = 60.0


def summarize(run: RunResult, warmup_s: float = 0.0, slice_s: float = SLICE_S) -> dict[str, Any]:
    """Metrics over the requests *started* in ``[warmup_s, window end)``.

    ``achieved_qps`` is throughput: successful requests that *finished* inside the window (whenever
    they started) per second, so a server that keeps up shows the offered rate and one that falls
    behind shows its capacity (not the rate the client sent at). ``completed_qps``: requests started
    in the window that succeeded, per second of window. A window of two ``slice_s`` or more also
    gets ``slices``: the same latencies per ``slice_s`` of start times, so a 5-minute run shows
    whether its tail came from all of it or from a few bursts.
    """
    lo, hi = warmup_s, run.wall_s
    window = max(1e-9, hi - lo)
    rs = [r for r in run.results if lo <= r.start < hi]
    ok = [r for r in rs if r.ok]
    errors = Counter(r.error for r in rs if not r.ok)
    statuses = Counter(str(r.status) if r.status is not None else "none" for r in rs)
    finished_in_window = [r for r in run.results if r.ok and lo <= r.end < hi]
    out_tokens = sum(r.output_tokens for r in ok)
    mismatched = sum(1 for r in ok if r.expected_tokens and r.output_tokens != r.expected_tokens)
    per_class: dict[str, Any] = {}
    for name in sorted({r.cls for r in rs}):
        cr = [r for r in ok if r.cls == name]
        per_class[name] = {"requests": sum(r.cls == name for r in rs), "ok": len(cr),
                           "ttft_p95": _dist([r.ttft for r in cr if r.ttft is not None])["p95"],
                           "e2e_p95": _dist([r.e2e for r in cr])["p95"],
                           "mean_output_tokens": round(sum(r.output_tokens for r in cr) / len(cr), 1)
                           if cr else None}
    prompts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    return {
        "mode": run.spec.mode, "offered": run.spec.offered,
        "offered_qps_actual": round(len(rs) / window, 4) if run.spec.mode == "open" else None,
        "window_s": round(window, 3), "requests": len(rs), "ok": len(ok),
        "achieved_qps": round(len(finished_in_window) / window, 4),
        "completed_qps": round(len(ok) / window, 4),
        "output_tokens_per_s": round(out_tokens / window, 2),
        "ttft_s": _dist([r.ttft for r in ok if r.ttft is not None]),
        "tpot_s": _dist([r.tpot for r in ok if r.tpot is not None]),
        "e2e_s": _dist([r.e2e for r in ok]),
        "errors": dict(errors),
        # first message per error kind: a load run's errors say why without the server's logs
        "error_examples": {e: next((r.error_message for r in rs if r.error == e and r.error_message), None)
                           for e in errors},
        "error_rate": round(len(rs) and sum(errors.values()) / len(rs), 4),
        "status_counts": dict(statuses),
        "mean_prompt_tokens": round(sum(prompts) / len(prompts), 1) if prompts else None,
        "mean_output_tokens": round(out_tokens / len(ok), 1) if ok else None,
        "output_length_mismatches": mismatched,
        "per_class": per_class,
        "slices": _slices(rs, lo, hi, slice_s) if hi - lo >= 2 * slice_s else [],
    }


def _slices(rs: list, lo: float, hi: float, slice_s: float) -> list[dict[str, Any]]:
    """Per ``slice_s`` of start times from ``lo`` (the last slice may be shorter): requests,
    errors, TTFT and e2e P95."""
    out = []
    for i in range(math.ceil((hi - lo) / slice_s - 1e-9)):
        a, b = lo + i * slice_s, min(hi, lo + (i + 1) * slice_s)
        part = [r for r in rs if a <= r.start < b]
        ok = [r for r in part if r.ok]
        out.append({"start_s": round(a - lo, 1), "seconds": round(b - a, 1), "requests": len(part),
                    "errors": len(part) - len(ok),
                    "ttft_p95": _dist([r.ttft for r in ok if r.ttft is not None])["p95"],
                    "e2e_p95": _dist([r.e2e for r in ok])["p95"]})
    return out


def slo_check(summary: dict[str, Any], ttft_p95_s: float = SLO_TTFT_P95_S,
              e2e_p95_s: float = SLO_E2E_P95_S) -> list[str]:
    """Reasons this step breaks the SLO (empty list: it meets it)."""
    why = []
    if summary["ok"] == 0:
        why.append("no successful requests")
    if summary["errors"]:
        why.append(f"errors {summary['errors']}")
    t, e = summary["ttft_s"]["p95"], summary["e2e_s"]["p95"]
    if t is not None and t > ttft_p95_s:
        why.append(f"P95 TTFT {t * 1000:.0f} ms > {ttft_p95_s * 1000:.0f} ms")
    if e is not None and e > e2e_p95_s:
        why.append(f"P95 e2e {e:.2f} s > {e2e_p95_s:.2f} s")
    return why


# ------------------------------------------------------------------------- resource sampling
def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies from /proc/stat: the fallback when psutil is missing."""
    with open("/proc/stat") as f:
        vals = [float(x) for x in f.readline().split()[1:]]
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0.0)
    return sum(vals) - idle, sum(vals)


class ResourceSampler:
    """Background thread: GPU memory/utilisation via NVML (None without a GPU) and host CPU %.

    CPU % is the whole host's (all cores, 100 = every core busy), client included.
    """

    def __init__(self, interval_s: float = 0.25):
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._gpu_mem: list[float] = []
        self._gpu_peak: list[float] = []     # per device: with one replica per GPU, per replica
        self._gpu_util: list[float] = []
        self._cpu: list[float] = []
        self._handles: list[Any] = []
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            idx = range(pynvml.nvmlDeviceGetCount())
            if visible:
                idx = [int(x) for x in visible.split(",") if x.strip().isdigit()]
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in idx]
            self._gpu_peak = [0.0] * len(self._handles)
            self._nvml = pynvml
        except Exception:
            self._handles = []
        try:
            import psutil

            self._psutil = psutil
            psutil.cpu_percent(None)
        except ImportError:
            self._psutil = None

    @property
    def has_gpu(self) -> bool:
        return bool(self._handles)

    def _sample_cpu(self, prev: tuple[float, float] | None) -> tuple[float | None, Any]:
        if self._psutil is not None:
            return self._psutil.cpu_percent(None), None
        cur = _cpu_times()
        if prev is None or cur[1] <= prev[1]:
            return None, cur
        return 100.0 * (cur[0] - prev[0]) / (cur[1] - prev[1]), cur

    def _loop(self) -> None:
        prev = None if self._psutil else _cpu_times()
        while not self._stop.wait(self.interval_s):
            cpu, prev = self._sample_cpu(prev)
            if cpu is not None:
                self._cpu.append(cpu)
            for i, h in enumerate(self._handles):
                try:
                    used = self._nvml.nvmlDeviceGetMemoryInfo(h).used / 2**30
                    self._gpu_mem.append(used)
                    self._gpu_peak[i] = max(self._gpu_peak[i], used)
                    self._gpu_util.append(float(self._nvml.nvmlDeviceGetUtilizationRates(h).gpu))
                except Exception:
                    pass

    def __enter__(self) -> "ResourceSampler":
        self._thread = threading.Thread(target=self._loop, name="loadgen-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)

    def summary(self) -> dict[str, Any]:
        def mean(xs):
            return round(sum(xs) / len(xs), 2) if xs else None

        return {"gpu_mem_peak_gb": round(max(self._gpu_mem), 3) if self._gpu_mem else None,
                "gpu_mem_peak_gb_per_device": [round(x, 3) for x in self._gpu_peak] or None,
                "gpu_util_mean_pct": mean(self._gpu_util),
                "gpu_util_max_pct": max(self._gpu_util) if self._gpu_util else None,
                "cpu_mean_pct": mean(self._cpu),
                "cpu_max_pct": max(self._cpu) if self._cpu else None,
                "cpu_cores": os.cpu_count(), "samples": len(self._cpu)}


# ---------------------------------------------------------------------- engine time split
@dataclass
class EngineTimes:
    prefill_s: float | None
    decode_s: float | None
    vision_s: float | None


def _engine_times(vlm: dict[str, Any]) -> EngineTimes:
    """Cumulative engine seconds from a ``/v1/stats`` ``vlm`` block (totals if exposed, else avg*n)."""
    def total(name: str) -> float | None:
        if f"{name}_s_total" in vlm:
            return float(vlm[f"{name}_s_total"])
        avg, n = vlm.get(f"{name}_ms_avg"), vlm.get(f"{name}_steps")
        if avg is None or n is None:
            return None
        return float(avg) * float(n) / 1000
    return EngineTimes(total("prefill"), total("decode"), total("vision"))


def engine_breakdown(before: dict[str, Any] | None, after: dict[str, Any] | None,
                     wall_s: float) -> dict[str, Any] | None:
    """Where the engine's time went between two ``/v1/stats`` snapshots (one VLM replica).

    Shares of the wall time: prefill, vision tower and decode as the engine times them; ``other``
    is the rest (scheduling and idle; vision too for an engine that does not time it).
    """
    if not before or not after or "vlm" not in before or "vlm" not in after:
        return None
    b, a = before["vlm"], after["vlm"]
    if not isinstance(a, dict) or "error" in a:
        return None
    counters = {}
    for k in ("requests_total", "finished_total", "prompt_tokens_total", "generation_tokens_total",
              "prefill_steps", "decode_steps", "images_encoded", "vision_cache_hits",
              "prefill_graph_replays", "prefill_eager_passes", "prefill_eager_tokens"):
        if k in a and k in b:
            counters[k] = a[k] - b[k]
    tb, ta = _engine_times(b), _engine_times(a)
    out: dict[str, Any] = {"engine": a.get("engine"), "counters": counters,
                           **engine_latency(b, a, "queue"), **admission_blocks(b, a, wall_s),
                           **engine_latency(b, a, "ttft"), **engine_latency(b, a, "e2e")}
    if "gc_collections" in a and "gc_collections" in b and "gc_pause_s_total" in a:
        # Python's collections in the VLM process and the time they held the GIL (every thread's)
        out["gc_collections"] = [x - y for x, y in zip(a["gc_collections"], b["gc_collections"])]
        out["gc_pause_s"] = round(a["gc_pause_s_total"] - b.get("gc_pause_s_total", 0.0), 4)
        out["gc_pause_max_s"] = a.get("gc_pause_max_s")      # the longest since the engine started
    if ta.prefill_s is None or ta.decode_s is None:
        return out
    pre, dec = ta.prefill_s - tb.prefill_s, ta.decode_s - tb.decode_s
    vis = (ta.vision_s - tb.vision_s) if ta.vision_s is not None and tb.vision_s is not None else None
    busy = pre + dec + (vis or 0.0)
    out.update({"prefill_s": round(pre, 3), "decode_s": round(dec, 3),
                "vision_s": round(vis, 3) if vis is not None else None,
                "prefill_pct": round(100 * pre / wall_s, 1), "decode_pct": round(100 * dec / wall_s, 1),
                "vision_pct": round(100 * vis / wall_s, 1) if vis is not None else None,
                "other_pct": round(100 * max(0.0, wall_s - busy) / wall_s, 1)})
    host = {k: a[f"host_{k}_s_total"] - b[f"host_{k}_s_total"]
            for k in ("step", "cpu", "wait", "loop", "idle", "inbox", "tick", "emit")
            if f"host_{k}_s_total" in a and f"host_{k}_s_total" in b}
    if {"step", "cpu", "wait"} <= host.keys():
        # the engine thread's share of the wall time launching and bookkeeping (not waiting for
        # the GPU), and its CPU time: busy near 100 % means the host sets the pace
        out["host_busy_pct"] = round(100 * (host["step"] - host["wait"]) / wall_s, 1)
        out["host_cpu_pct"] = round(100 * host["cpu"] / wall_s, 1)
    if {"step", "loop", "idle", "inbox", "tick", "emit"} <= host.keys():
        # the engine thread outside step(): idle (no work), taking requests, the engine process's
        # stats push, and the rest ("gap": between turns, e.g. waiting for the GIL); emit is the
        # hand-off of outputs inside step() (a socket send in the engine process)
        gap = host["loop"] - host["step"] - host["idle"] - host["inbox"] - host["tick"]
        out.update({f"host_{k}_pct": round(100 * host[k] / wall_s, 1) for k in ("idle", "inbox", "tick", "emit")})
        out["host_gap_pct"] = round(100 * max(0.0, gap) / wall_s, 1)
    if counters.get("decode_steps"):
        out["decode_ms_per_step"] = round(1000 * dec / counters["decode_steps"], 3)
        # first tokens come from prefill, so generated - finished tokens came from decode steps
        dec_tokens = counters.get("generation_tokens_total", 0) - counters.get("finished_total", 0)
        out["mean_decode_batch"] = round(dec_tokens / counters["decode_steps"], 2)
    if counters.get("prompt_tokens_total") and pre > 0:
        out["prefill_tokens_per_s"] = round(counters["prompt_tokens_total"] / pre, 1)
    return out


def admission_blocks(b: dict[str, Any], a: dict[str, Any], wall_s: float) -> dict[str, Any]:
    """Shares of the wall time during which the head of the engine's queue was held, per limit
    (``rows``: no free row; ``prefill_backlog``: max_prefill_tokens of prompts already waiting for
    prefill; ``kv_pages``); they may overlap. Behind full rows a request loses time that more rows
    would give back; behind the backlog it only waits for the prompt work before admission rather
    than after."""
    out = {}
    for k in ADMISSION_LIMITS:
        key = f"admission_blocked_{k}_s_total"
        if key in a and key in b and wall_s > 0:
            out[f"engine_blocked_{k}_pct"] = round(100 * (a[key] - b[key]) / wall_s, 1)
    return out


CLUMP_S = 0.01     # a bound of the engine's arrival-gap buckets


def arrival_clumping(b: dict[str, Any], a: dict[str, Any], rate: float | None) -> dict[str, Any]:
    """The share of requests that reached the engine within 10 ms (``CLUMP_S``) of the one before,
    between two snapshots, beside what Poisson arrivals at ``rate`` (the clients' rate) would give
    (1 - exp(-rate * CLUMP_S)). Above it, the serving layer hands the clients' arrivals to the
    engine in clumps, and clumps queue for rows and prompt work."""
    key, bounds = "arrival_gap_bucket_counts", a.get("arrival_gap_bucket_bounds_s") or []
    if key not in a or key not in b or CLUMP_S not in bounds or not rate:
        return {}
    counts = [x - y for x, y in zip(a[key], b[key])]
    n = sum(counts)
    if n < 20:
        return {}
    within = sum(counts[:bounds.index(CLUMP_S) + 1])
    return {"engine_gaps_within_10ms_pct": round(100 * within / n, 1),
            "poisson_gaps_within_10ms_pct": round(100 * (1 - math.exp(-rate * CLUMP_S)), 1)}


def blocked_cell(et: dict[str, Any]) -> str:
    """``admission_blocks``' shares as one table cell: rows / prefill backlog / KV pages."""
    return " / ".join(str(et.get(f"engine_blocked_{k}_pct", "-")) for k in ADMISSION_LIMITS)


def engine_latency(b: dict[str, Any], a: dict[str, Any], name: str) -> dict[str, Any]:
    """One of the engine's latency bucket sets (``queue``: arrival in the engine -> admitted;
    ``ttft``: -> first token; ``e2e``: -> last token) between two snapshots: the mean, and the bucket bounds under which 50 %
    and 95 % fall (``None`` past the last bound). Against the client's figures this says whether a
    tail is made in the engine or in front of it (router, Preprocess, Ingress, proxy)."""
    key, bounds = f"{name}_bucket_counts", a.get(f"{name}_bucket_bounds_s")
    if not bounds or key not in b or key not in a:
        return {}
    counts = [x - y for x, y in zip(a[key], b[key])]
    n = sum(counts)
    if n <= 0:
        return {}

    def bound_at(q: float) -> int | None:
        seen = 0
        for bound, c in zip(list(bounds) + [None], counts):
            seen += c
            if seen >= q * n:
                return None if bound is None else round(1000 * bound)
        return None
    total = a[f"{name}_s_total"] - b[f"{name}_s_total"]
    return {f"engine_{name}_mean_ms": round(1000 * total / n, 1),
            f"engine_{name}_p50_le_ms": bound_at(0.5), f"engine_{name}_p95_le_ms": bound_at(0.95)}


# -------------------------------------------------------------------------------- markdown
def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.0f}"


def markdown_table(steps: list[dict[str, Any]], offered_label: str = "offered QPS") -> str:
    """One row per sweep step / run (each a dict with ``summary``, optional ``resources``,
    ``engine_time``, ``slo_violations``)."""
    head = (f"| engine | {offered_label} | achieved QPS | TTFT P50/P95/P99 ms | TPOT P50/P95 ms | "
            "e2e P50/P95/P99 ms | out tok/s | prompt tok/req | errors | GPU mem peak GB | GPU util % | "
            "CPU % | prefill/vision/decode/other % | SLO |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for st in steps:
        s, r, et = st["summary"], st.get("resources") or {}, st.get("engine_time") or {}
        t, p, e = s["ttft_s"], s["tpot_s"], s["e2e_s"]
        split = "-"
        if et.get("prefill_pct") is not None:
            vis = "-" if et.get("vision_pct") is None else f"{et['vision_pct']:.0f}"
            split = f"{et['prefill_pct']:.0f}/{vis}/{et['decode_pct']:.0f}/{et['other_pct']:.0f}"
        errs = sum(s["errors"].values())
        err_txt = "0" if not errs else f"{errs} ({', '.join(f'{k}:{v}' for k, v in s['errors'].items())})"
        slo = "-" if "slo_violations" not in st else ("ok" if not st["slo_violations"] else "miss")
        lines.append(
            f"| {st.get('engine', '-')} | {s['offered']:g} | {s['achieved_qps']:.2f} | "
            f"{_ms(t['p50'])}/{_ms(t['p95'])}/{_ms(t['p99'])} | {_ms(p['p50'])}/{_ms(p['p95'])} | "
            f"{_ms(e['p50'])}/{_ms(e['p95'])}/{_ms(e['p99'])} | {s['output_tokens_per_s']:.0f} | "
            f"{_fmt(s.get('mean_prompt_tokens'), 0)} | {err_txt} | {_fmt(r.get('gpu_mem_peak_gb'))} | "
            f"{_fmt(r.get('gpu_util_mean_pct'))} | {_fmt(r.get('cpu_mean_pct'))} | {split} | {slo} |")
    return "\n".join(lines)


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def now_stamp() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")
