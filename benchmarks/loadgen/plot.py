"""PNG plots (matplotlib, a benchmark-only dependency): latency percentiles against offered load,
and replica counts over time for the autoscaling run. Small figures, so they can be committed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
_STYLES = {"p50": ":", "p95": "-", "p99": "--"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    """Write a small PNG: rendered by matplotlib, then quantised to a 64-colour palette (PIL)."""
    import io

    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(64).save(path, optimize=True)
    return path


def plot_sweeps(sweeps: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """TTFT, TPOT and e2e P50/P95/P99 against offered load, one colour per sweep, SLO lines."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=80)
    mode = sweeps[0]["mode"] if sweeps else "open"
    xlabel = "offered load (QPS, Poisson)" if mode == "open" else "concurrent sessions"
    for i, sw in enumerate(sweeps):
        steps = sorted(sw["steps"], key=lambda s: s["summary"]["offered"])
        x = [s["summary"]["offered"] for s in steps]
        c = _COLOURS[i % len(_COLOURS)]
        for ax, key in zip(axes, ("ttft_s", "tpot_s", "e2e_s")):
            for p, ls in _STYLES.items():
                y = [s["summary"][key][p] for s in steps]
                xs = [a for a, b in zip(x, y) if b is not None]
                ys = [b * 1000 for b in y if b is not None]
                ax.plot(xs, ys, ls, marker="o", ms=3, color=c, label=f"{sw['engine']} {p}")
        for s in steps:  # mark steps with errors
            if s["summary"]["errors"]:
                axes[2].plot(s["summary"]["offered"], (s["summary"]["e2e_s"]["p95"] or 0) * 1000, "x",
                             color="black", ms=8)
    slo = (sweeps[0].get("slo") if sweeps else None) or {}
    for ax, key, name in ((axes[0], "ttft_p95_s", "TTFT"), (axes[1], None, "TPOT"),
                          (axes[2], "e2e_p95_s", "end-to-end")):
        if key and key in slo:
            ax.axhline(slo[key] * 1000, color="grey", lw=1, ls="-.", label="P95 SLO")
        ax.set_title(f"{name} latency")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=6, ncol=1)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_autoscale(timeline: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Offered/completed QPS and P95 latency over time (top), replicas per deployment (bottom)."""
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 5.5), dpi=80, sharex=True)
    t = [p["t"] for p in timeline]
    ax1.step(t, [p["offered_qps"] for p in timeline], where="post", color="black", label="offered QPS")
    ax1.plot(t, [p.get("completed_qps") for p in timeline], color="tab:blue", label="completed QPS")
    ax1.set_ylabel("QPS")
    ax1b = ax1.twinx()
    ax1b.plot(t, [(p.get("e2e_p95_s") or float("nan")) for p in timeline], color="tab:red", lw=1,
              alpha=0.7, label="P95 e2e (10 s window)")
    ax1b.set_ylabel("s", color="tab:red")
    h1, l1 = ax1.get_legend_handles_labels()
    h2, l2 = ax1b.get_legend_handles_labels()
    ax1.legend(h1 + h2, l1 + l2, fontsize=7, loc="upper left")
    ax1.grid(alpha=0.3)
    names = sorted({n for p in timeline for n in p.get("replicas", {})})
    for i, name in enumerate(names):
        ax2.step(t, [p["replicas"].get(name, {}).get("RUNNING", 0) for p in timeline], where="post",
                 color=_COLOURS[i % len(_COLOURS)], label=f"{name} RUNNING")
        starting = [p["replicas"].get(name, {}).get("STARTING", 0) for p in timeline]
        if any(starting):
            ax2.step(t, starting, where="post", color=_COLOURS[i % len(_COLOURS)], ls=":",
                     label=f"{name} STARTING")
    ax2.set_ylabel("replicas")
    ax2.set_xlabel("time (s)")
    ax2.legend(fontsize=7, loc="upper left")
    ax2.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    out = _save(fig, path)
    plt.close(fig)
    return out
