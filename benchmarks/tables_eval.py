"""TEDS benchmark for the table extractor on rendered tables (ruled, borderless, merged cells,
English/Chinese, +-3 degree rotation, JPEG noise, photo backgrounds, and "dense": 8-12 rows of
small print with empty and two-line cells).

Caveat: the tables are synthetic and the pipeline's geometric rules were tuned while looking at
this generator, so the scores are optimistic for real scans and photos; ``--structure slanet``
shows what the SLANet-plus model does on its own.

    python benchmarks/tables_eval.py [--quick] [--n 20] [--out results.json] [--structure auto|slanet]
                                     [--min-teds 0.9] [--verbose] [--categories ruled_en dense ...]

TEDS follows PubTabNet (Zhong et al., 2020): each table is a tree table -> tr -> td whose td nodes
carry colspan, rowspan and text; insert/delete cost 1; rename costs 1 if tags or spans differ, else
the normalised Levenshtein distance of the texts; TEDS = 1 - distance / max(#nodes). Trees are
compared with APTED (``apted``, MIT) and texts with ``rapidfuzz`` (MIT). thead/tbody wrappers are
flattened on both sides (our renderings never emit them). The synthetic generator lives in
``benchmarks/_table_render.py``; Chinese needs a CJK font (``apt-get install -y fonts-wqy-microhei``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

from apted import APTED, Config
from rapidfuzz.distance import Levenshtein

if __package__ in (None, ""):  # run as a script: make `serve_app` and `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class _Node:
    __slots__ = ("tag", "colspan", "rowspan", "content", "children")

    def __init__(self, tag: str, colspan: int = 1, rowspan: int = 1, content: str = "", children=None):
        self.tag, self.colspan, self.rowspan, self.content = tag, colspan, rowspan, content
        self.children = children if children is not None else []


class _TedsConfig(Config):
    def __init__(self, structure_only: bool = False):
        self.structure_only = structure_only

    def rename(self, a: _Node, b: _Node) -> float:
        if a.tag != b.tag or a.colspan != b.colspan or a.rowspan != b.rowspan:
            return 1.0
        if a.tag == "td" and not self.structure_only and (a.content or b.content):
            return Levenshtein.normalized_distance(a.content, b.content)
        return 0.0

    def children(self, node: _Node):
        return node.children


class _TableParser(HTMLParser):
    """First <table> of an HTML string -> rows of (text, colspan, rowspan)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.rows: list[list[list]] = []
        self.depth = 0
        self.cell: list | None = None
        self.done = False

    def handle_starttag(self, tag, attrs):
        if self.done:
            return
        if tag == "table":
            self.depth += 1
        elif tag == "tr" and self.depth == 1:
            self.rows.append([])
        elif tag in ("td", "th") and self.depth == 1:
            a = dict(attrs)
            self.cell = ["", _int(a.get("colspan")), _int(a.get("rowspan"))]
            if not self.rows:
                self.rows.append([])
            self.rows[-1].append(self.cell)

    def handle_endtag(self, tag):
        if tag == "table" and self.depth:
            self.depth -= 1
            self.done = self.depth == 0
        elif tag in ("td", "th"):
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell[0] += data


def _int(v) -> int:
    try:
        return max(1, int(v))
    except (TypeError, ValueError):
        return 1


def html_tree(html: str) -> tuple[_Node, int]:
    """The TEDS tree and its node count (tr + td nodes, as PubTabNet counts ``table//*``)."""
    p = _TableParser()
    p.feed(html or "")
    rows = [_Node("tr", children=[_Node("td", c[1], c[2], " ".join(c[0].split())) for c in r]) for r in p.rows]
    return _Node("table", children=rows), len(rows) + sum(len(r.children) for r in rows)


def teds(pred_html: str, true_html: str, structure_only: bool = False) -> float:
    """Tree-edit-distance similarity in [0, 1]; 1.0 means identical structure and text."""
    pt, pn = html_tree(pred_html)
    tt, tn = html_tree(true_html)
    n = max(pn, tn)
    if n == 0:
        return 1.0
    dist = APTED(pt, tt, _TedsConfig(structure_only)).compute_edit_distance()
    return max(0.0, 1.0 - dist / n)


def _best_table(tables: list[dict], gt_bbox: list[float]) -> dict | None:
    """The predicted table overlapping the ground-truth table most."""
    def inter(b):
        return max(0.0, min(b[2], gt_bbox[2]) - max(b[0], gt_bbox[0])) * max(0.0, min(b[3], gt_bbox[3]) - max(b[1], gt_bbox[1]))
    return max(tables, key=lambda t: inter(t["bbox"]), default=None)


def evaluate(n_per_category: int, structure: str = "auto", threads: int = 2, seed0: int = 0,
             categories=None, verbose: bool = False) -> dict:
    from benchmarks._table_render import CATEGORIES, make_sample, no_table_images
    from serve_app._tables import TablePipeline

    pipe = TablePipeline(threads=threads, structure=structure)
    pipe(make_sample("ruled_en", 10_000).image)  # warm-up (session init, allocator)
    per_cat: dict[str, dict] = {}
    all_teds, all_s, all_ms, all_cpu = [], [], [], []
    for cat in categories or CATEGORIES:
        scores, s_scores, times, cpu = [], [], [], []
        for i in range(n_per_category):
            s = make_sample(cat, seed0 + i)
            t0, c0 = time.perf_counter(), time.process_time()
            tables = pipe(s.image)
            times.append((time.perf_counter() - t0) * 1000)
            cpu.append((time.process_time() - c0) * 1000)
            gt_bbox = [min(c.bbox[0] for c in s.cells), min(c.bbox[1] for c in s.cells),
                       max(c.bbox[2] for c in s.cells), max(c.bbox[3] for c in s.cells)]
            best = _best_table(tables, gt_bbox)
            pred = best["html"] if best else "<table></table>"
            scores.append(teds(pred, s.html()))
            s_scores.append(teds(pred, s.html(), structure_only=True))
            if verbose and scores[-1] < 0.9:
                print(f"  {cat}#{seed0 + i}: TEDS {scores[-1]:.3f}\n    pred {pred}\n    true {s.html()}", flush=True)
        per_cat[cat] = {"teds": statistics.mean(scores), "teds_struct": statistics.mean(s_scores),
                        "ms_per_image": statistics.mean(times), "cpu_ms_per_image": statistics.mean(cpu),
                        "n": len(scores), "min_teds": min(scores)}
        all_teds += scores
        all_s += s_scores
        all_ms += times
        all_cpu += cpu
        print(f"{cat:18s} TEDS {per_cat[cat]['teds']:.3f}  TEDS-S {per_cat[cat]['teds_struct']:.3f}  "
              f"{per_cat[cat]['ms_per_image']:6.0f} ms/img ({per_cat[cat]['cpu_ms_per_image']:6.0f} CPU-ms)  "
              f"(n={len(scores)}, min {min(scores):.3f})", flush=True)
    false_pos = sum(bool(pipe(img)) for img in no_table_images())
    result = {
        "overall": {"teds": statistics.mean(all_teds), "teds_struct": statistics.mean(all_s),
                    "ms_per_image": statistics.mean(all_ms), "p50_ms": statistics.median(all_ms),
                    "cpu_ms_per_image": statistics.mean(all_cpu),
                    "n": len(all_teds)},
        "categories": per_cat,
        "no_table_false_positives": f"{false_pos}/{len(no_table_images())}",
        "config": {"structure": structure, "threads": threads, "n_per_category": n_per_category,
                   "providers": pipe.providers, "cpu_count": os.cpu_count(),
                   "load_avg_at_end": os.getloadavg()[0]},
    }
    o = result["overall"]
    print(f"{'OVERALL':18s} TEDS {o['teds']:.3f}  TEDS-S {o['teds_struct']:.3f}  {o['ms_per_image']:6.0f} ms/img "
          f"({o['cpu_ms_per_image']:6.0f} CPU-ms) "
          f"(n={o['n']}); no-table false positives {result['no_table_false_positives']}")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 images per category (CI)")
    ap.add_argument("--n", type=int, default=20, help="images per category")
    ap.add_argument("--structure", choices=("auto", "slanet"), default="auto")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--categories", nargs="*")
    ap.add_argument("--verbose", action="store_true", help="print failures (TEDS < 0.9)")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    ap.add_argument("--min-teds", type=float, help="exit 1 if the overall TEDS is below this")
    args = ap.parse_args(argv)
    res = evaluate(3 if args.quick else args.n, args.structure, args.threads, args.seed, args.categories, args.verbose)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2, ensure_ascii=False))
    if args.min_teds is not None and res["overall"]["teds"] < args.min_teds:
        print(f"overall TEDS {res['overall']['teds']:.3f} is below --min-teds {args.min_teds}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
