"""Table geometry for :mod:`serve_app._tables`: deskew, ruled grids from line masks, and tables
laid out by text alone.

Why a module of its own: these are pure functions of a grey image and OCR boxes (no model, no
I/O), the half of the table pipeline that decides where cells are; ``_tables`` keeps the models,
the data types and the pipeline that strings them together.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class _Ocr:
    quad: np.ndarray  # (4, 2) float, work coordinates
    text: str
    score: float
    ink: tuple[float, float] | None = None  # top/bottom of the dark pixels (the box is padded)

    @property
    def ink_y(self) -> tuple[float, float]:
        if self.ink is not None:
            return self.ink
        y0, y1 = float(self.quad[:, 1].min()), float(self.quad[:, 1].max())
        return y0 + 0.18 * (y1 - y0), y1 - 0.18 * (y1 - y0)

    @property
    def box(self) -> tuple[float, float, float, float]:
        return (float(self.quad[:, 0].min()), float(self.quad[:, 1].min()),
                float(self.quad[:, 0].max()), float(self.quad[:, 1].max()))


# ----------------------------------------------------------------------------- geometry helpers

def _deskew_angle(gray: np.ndarray, ocr: list[_Ocr], max_deg: float = 5.0) -> float:
    """Rotation (degrees, OpenCV sign) that makes text rows and rulings horizontal: the angle
    whose horizontal ink projection is sharpest (coarse 0.5 deg grid, then 0.1 deg). OCR quads
    are no use here: the detector returns near axis-aligned boxes for short words."""
    import cv2

    x0 = int(max(0, min(o.box[0] for o in ocr)))
    y0 = int(max(0, min(o.box[1] for o in ocr)))
    x1 = int(min(gray.shape[1], max(o.box[2] for o in ocr)))
    y1 = int(min(gray.shape[0], max(o.box[3] for o in ocr)))
    crop = gray[y0:y1, x0:x1]
    if crop.shape[0] < 16 or crop.shape[1] < 16:
        return 0.0
    s = min(1.0, 800 / max(crop.shape))
    if s < 1.0:
        crop = cv2.resize(crop, (int(crop.shape[1] * s), int(crop.shape[0] * s)), interpolation=cv2.INTER_AREA)
    bw = cv2.adaptiveThreshold(crop, 1, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY_INV, 31, 15)
    h, w = bw.shape
    big = int(math.ceil(math.hypot(h, w)))
    canvas = np.zeros((big, big), np.uint8)  # room to rotate without clipping ink
    canvas[(big - h) // 2:(big - h) // 2 + h, (big - w) // 2:(big - w) // 2 + w] = bw

    def sharpness(a: float) -> float:
        m = cv2.getRotationMatrix2D((big / 2, big / 2), float(a), 1.0)
        prof = cv2.warpAffine(canvas, m, (big, big), flags=cv2.INTER_NEAREST).sum(1, dtype=np.float64)
        return float(np.square(np.diff(prof)).sum())

    best = max(np.arange(-max_deg, max_deg + 1e-6, 0.5), key=sharpness)
    best = max(np.arange(best - 0.4, best + 0.41, 0.1), key=sharpness)
    return float(round(best, 2))


def _affine_apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


def _hull(m_inv: np.ndarray, box: Sequence[float], w: int, h: int) -> list[float]:
    x0, y0, x1, y1 = box
    p = _affine_apply(m_inv, np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64))
    return [float(np.clip(p[:, 0].min(), 0, w)), float(np.clip(p[:, 1].min(), 0, h)),
            float(np.clip(p[:, 0].max(), 0, w)), float(np.clip(p[:, 1].max(), 0, h))]


def _join_texts(items: list[_Ocr]) -> str:
    """Reading order: group into lines by vertical centre, left to right; no space between CJK."""
    if not items:
        return ""
    items = sorted(items, key=lambda o: (o.box[1] + o.box[3]) / 2)
    lines: list[list[_Ocr]] = []
    for o in items:
        cy, hh = (o.box[1] + o.box[3]) / 2, o.box[3] - o.box[1]
        if lines:
            last = lines[-1][-1].box
            if abs(cy - (last[1] + last[3]) / 2) < 0.5 * max(hh, last[3] - last[1]):
                lines[-1].append(o)
                continue
        lines.append([o])
    text = ""
    for line in lines:
        for o in sorted(line, key=lambda o: o.box[0]):
            t = o.text.strip()
            if text and t and not (_is_cjk(text[-1]) and _is_cjk(t[0])):
                text += " "
            text += t
    return text


def _is_cjk(ch: str) -> bool:
    return "\u3000" <= ch <= "\u9fff" or "\uff00" <= ch <= "\uffef"


def _inter(a: Sequence[float], b: Sequence[float]) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


# ----------------------------------------------------------------------------- ruled tables

def _runs(profile: np.ndarray, thr: float, merge_gap: int) -> list[tuple[int, int]]:
    """[start, end) runs where ``profile >= thr``, merging runs closer than ``merge_gap``."""
    idx = np.flatnonzero(profile >= thr)
    runs: list[list[int]] = []
    for i in idx:
        if runs and i - runs[-1][1] <= merge_gap:
            runs[-1][1] = i + 1
        else:
            runs.append([i, i + 1])
    return [(a, b) for a, b in runs]


def _line_masks(gray: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    h, w = gray.shape
    # Ink darker than its neighbourhood by a clear margin (photo textures rarely are).
    bw = cv2.adaptiveThreshold(gray, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY_INV, 31, 25)
    hk = max(40, w // 40)
    vk = max(30, h // 40)
    hm = cv2.morphologyEx(bw, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (hk, 1)))
    vm = cv2.morphologyEx(bw, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_RECT, (1, vk)))
    # Re-join short breaks (JPEG, residual skew) along the line direction.
    hm = cv2.dilate(hm, cv2.getStructuringElement(cv2.MORPH_RECT, (9, 3)))
    vm = cv2.dilate(vm, cv2.getStructuringElement(cv2.MORPH_RECT, (3, 9)))
    return hm > 0, vm > 0


def _find_ruled(gray: np.ndarray, ocr: list[_Ocr]) -> list[tuple[list[tuple], list[float], float]]:
    """Fully ruled tables. Returns ``(cells, bbox, score)`` with cells as
    ``(row, col, rowspan, colspan, box)`` in work coordinates."""
    import cv2

    hm, vm = _line_masks(gray)
    n, labels, stats, _ = cv2.connectedComponentsWithStats((hm | vm).astype(np.uint8), connectivity=8)
    found = []
    for k in range(1, n):
        x, y, w, h, _area = stats[k]
        if w < 60 or h < 30:
            continue
        comp = labels[y:y + h, x:x + w] == k
        H, V = hm[y:y + h, x:x + w] & comp, vm[y:y + h, x:x + w] & comp
        rows = [y + (a + b) / 2 for a, b in _runs(H.sum(1), 0.25 * w, 4)]
        cols = [x + (a + b) / 2 for a, b in _runs(V.sum(0), 0.25 * h, 4)]
        rows, cols = _drop_text_crossing(rows, cols, ocr, (x, y, x + w, y + h), hm, vm)
        if len(rows) < 3 or len(cols) < 3:
            continue
        # Outer frame must be present: a fully ruled table.
        if not (_cover(hm, rows[0], cols[0], cols[-1], True) > 0.8 and _cover(hm, rows[-1], cols[0], cols[-1], True) > 0.8
                and _cover(vm, cols[0], rows[0], rows[-1], False) > 0.8 and _cover(vm, cols[-1], rows[0], rows[-1], False) > 0.8):
            continue
        cells, score = _grid_cells(hm, vm, rows, cols)
        if cells is None:
            continue
        inside = [o for o in ocr if cols[0] <= (o.box[0] + o.box[2]) / 2 <= cols[-1] and rows[0] <= (o.box[1] + o.box[3]) / 2 <= rows[-1]]
        if not inside:
            continue
        found.append((cells, [cols[0], rows[0], cols[-1], rows[-1]], score))
    return found


def _cover(mask: np.ndarray, pos: float, a: float, b: float, horizontal: bool) -> float:
    """Fraction of the segment at ``pos`` from ``a`` to ``b`` that is line pixels (+-2 px)."""
    p, a, b = int(round(pos)), int(round(a)), int(round(b))
    if b <= a:
        return 0.0
    band = mask[max(0, p - 2):p + 3, a:b] if horizontal else mask[a:b, max(0, p - 2):p + 3].T
    return float(band.any(0).mean()) if band.size else 0.0


def _drop_text_crossing(rows, cols, ocr, region, hm, vm):
    """A ruling never cuts through a text line: a candidate line that is drawn across the middle
    of an OCR box is texture (or a strike-through), not a table ruling."""
    boxes = [o.box for o in ocr if _inter(o.box, region) > 0]

    def crosses(pos, horizontal):
        for b in boxes:
            lo, hi = (b[1], b[3]) if horizontal else (b[0], b[2])
            m = 0.25 * (hi - lo)
            if lo + m < pos < hi - m:
                a0, a1 = (b[0], b[2]) if horizontal else (b[1], b[3])
                if _cover(hm if horizontal else vm, pos, a0, a1, horizontal) > 0.5:
                    return True
        return False

    return [r for r in rows if not crosses(r, True)], [c for c in cols if not crosses(c, False)]


def _grid_cells(hm, vm, rows, cols):
    """Merge grid slots whose separator is missing; ``None`` if a merged region is not a rectangle."""
    nr, nc = len(rows) - 1, len(cols) - 1
    parent = list(range(nr * nc))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    covers = []
    for i in range(nr):
        for j in range(nc):
            m_y = 0.15 * (rows[i + 1] - rows[i])
            m_x = 0.15 * (cols[j + 1] - cols[j])
            if j + 1 < nc:
                cv_ = _cover(vm, cols[j + 1], rows[i] + m_y, rows[i + 1] - m_y, False)
                covers.append(max(cv_, 1 - cv_))
                if cv_ < 0.5:
                    parent[find(i * nc + j + 1)] = find(i * nc + j)
            if i + 1 < nr:
                ch = _cover(hm, rows[i + 1], cols[j] + m_x, cols[j + 1] - m_x, True)
                covers.append(max(ch, 1 - ch))
                if ch < 0.5:
                    parent[find((i + 1) * nc + j)] = find(i * nc + j)
    groups: dict[int, list[tuple[int, int]]] = {}
    for i in range(nr):
        for j in range(nc):
            groups.setdefault(find(i * nc + j), []).append((i, j))
    cells = []
    for slots in groups.values():
        r0, r1 = min(s[0] for s in slots), max(s[0] for s in slots)
        c0, c1 = min(s[1] for s in slots), max(s[1] for s in slots)
        if len(slots) != (r1 - r0 + 1) * (c1 - c0 + 1):
            return None, 0.0
        cells.append((r0, c0, r1 - r0 + 1, c1 - c0 + 1, [cols[c0], rows[r0], cols[c1 + 1], rows[r1 + 1]]))
    return cells, float(np.mean(covers)) if covers else 1.0


# ----------------------------------------------------------------------------- borderless regions

def _text_grid_regions(ocr: list[_Ocr], exclude: list[list[float]]) -> list[list[float]]:
    """Regions where OCR lines form >= 2 rows with >= 2 horizontally separated, aligned columns."""
    items = [o for o in ocr if not any(_inter(o.box, e) > 0.5 * _area(o.box) for e in exclude)]
    if len(items) < 4:
        return []
    heights = np.median([o.box[3] - o.box[1] for o in items])
    # Runs of consecutive multi-column lines; a single-item line (a rowspan label, a wrapped
    # cell) may sit inside a run but neither starts nor ends one.
    runs: list[list[list[tuple]]] = []
    cur: list[list[tuple]] = []
    held: list[list[tuple]] = []
    for line in ([o.box for o in line] for line in _group_lines(items)):
        multi = len(line) >= 2 and any(line[i + 1][0] - line[i][2] > 0.8 * heights for i in range(len(line) - 1))
        top = min(b[1] for b in line)
        prev = held[-1] if held else (cur[-1] if cur else None)
        near = prev is not None and top - max(b[3] for b in prev) < 2.5 * heights
        if not near:
            runs.append(cur)
            cur, held = [], []
        if multi:
            cur.extend(held + [line] if cur else [line])
            held = []
        elif cur:
            held.append(line)
    runs.append(cur)
    regions = []
    for run in runs:
        if len(run) < 2:
            continue
        bands = _column_bands([b for line in run for b in line])
        if len(bands) < 2:
            continue
        # Most multi-item lines must use at least two of the bands (a real column structure).
        multi = [line for line in run if len(line) >= 2]
        if sum(len({_band_of(b, bands) for b in line}) >= 2 for line in multi) < max(2, 0.6 * len(multi)):
            continue
        allb = [b for line in run for b in line]
        regions.append([min(b[0] for b in allb), min(b[1] for b in allb), max(b[2] for b in allb), max(b[3] for b in allb)])
    return regions


def _area(b) -> float:
    return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])


def _column_bands(boxes: list[tuple]) -> list[tuple[float, float]]:
    bands: list[list[float]] = []
    for b in sorted(boxes, key=lambda b: b[0]):
        if bands and b[0] <= bands[-1][1]:
            bands[-1][1] = max(bands[-1][1], b[2])
        else:
            bands.append([b[0], b[2]])
    return [tuple(x) for x in bands]


def _band_of(b, bands) -> int:
    cx = (b[0] + b[2]) / 2
    return min(range(len(bands)), key=lambda i: 0 if bands[i][0] <= cx <= bands[i][1] else
               min(abs(cx - bands[i][0]), abs(cx - bands[i][1])))


def _group_lines(items: list[_Ocr]) -> list[list[_Ocr]]:
    """OCR boxes -> text lines (top to bottom, each left to right) by vertical-centre overlap."""
    lines: list[list[_Ocr]] = []
    for o in sorted(items, key=lambda o: (o.box[1] + o.box[3]) / 2):
        cy = (o.box[1] + o.box[3]) / 2
        # Same line: centres within 30% of the line height (a box-range test would swallow a
        # rowspan label centred between two rows into the row below).
        if lines and abs(cy - np.median([(x.box[1] + x.box[3]) / 2 for x in lines[-1]])) < \
                0.3 * np.median([x.box[3] - x.box[1] for x in lines[-1] + [o]]):
            lines[-1].append(o)
        else:
            lines.append([o])
    return [sorted(line, key=lambda o: o.box[0]) for line in lines]


def _ink_extent(gray: np.ndarray, box) -> tuple[float, float] | None:
    """Top and bottom of the text strokes inside an OCR box (Otsu threshold of the crop)."""
    import cv2

    x0, y0, x1, y1 = (int(round(v)) for v in box)
    crop = gray[max(0, y0):max(0, y1), max(0, x0):max(0, x1)]
    if crop.size < 16:
        return None
    _, dark = cv2.threshold(crop, 0, 1, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    frac = dark.sum(1) / crop.shape[1]
    rows = np.flatnonzero((frac > 0.03) & (frac < 0.8))  # > 0.8: a ruling crossing the box
    if len(rows) == 0 or rows[-1] - rows[0] > 0.95 * crop.shape[0]:
        return None  # nothing, or background texture: keep the padded-box estimate
    return float(max(0, y0) + rows[0]), float(max(0, y0) + rows[-1] + 1)


def _layout_cells(items: list[_Ocr]):
    """Structure from text geometry alone (for borderless tables). Returns ``(cells, lines)``
    with cells as ``(row, col, rowspan, colspan, box, items)``, or ``None`` when there is no grid.

    Columns are the x-bands of the lines with the most boxes (rows without spans); a box
    reaching across a band gap is a colspan. Rows: text lines closer than 0.4 line heights
    (ink to ink) form a block; in a block, a band holding one line in most bands is one row
    whose extra lines are wrapped text, while k stacked lines in most bands are k rows, and a
    band holding a single line centred between two of them is a rowspan-2 label."""
    lines = _group_lines(items)
    counts = Counter(len(line) for line in lines if len(line) >= 2)
    if len(lines) < 2 or not counts:
        return None
    hgt = float(np.median([o.box[3] - o.box[1] for o in items]))
    ink_h = float(np.median([o.ink_y[1] - o.ink_y[0] for o in items]))
    # Columns come from the fullest lines (rows without spans); bands closer than a column gap
    # are one column whose text the detector split in two.
    bands = []
    for a, b in _column_bands([o.box for line in lines if len(line) == max(counts) for o in line]):
        if bands and a - bands[-1][1] < 0.8 * hgt:
            bands[-1] = (bands[-1][0], b)
        else:
            bands.append((a, b))
    if len(bands) < 2:
        return None

    def band_at(x: float, right: bool) -> int:
        for i, (a, b) in enumerate(bands):
            if a <= x <= b:
                return i
        # in a gap: the band after it for a left edge, before it for a right edge
        after = [i for i, (a, _) in enumerate(bands) if a > x]
        return (after[0] if after else len(bands)) - (1 if right else 0)

    per_line = []  # (cells [c0, c1, items], cy, ink top, ink bottom)
    for line in lines:
        cells: list[list] = []
        for o in line:
            m = 0.1 * (o.box[2] - o.box[0])
            c0, c1 = band_at(o.box[0] + m, False), band_at(o.box[2] - m, True)
            if c0 > c1:  # entirely inside a gap
                c0 = c1 = _band_of(o.box, bands)
            if cells and c0 <= cells[-1][1]:
                cells[-1][1] = max(cells[-1][1], c1)
                cells[-1][2].append(o)
            else:
                cells.append([c0, c1, [o]])
        tops, bots = zip(*(o.ink_y for o in line))
        per_line.append((cells, (min(tops) + max(bots)) / 2, min(tops), max(bots)))
    blocks: list[list] = []
    for ln in per_line:
        if blocks and ln[2] - max(x[3] for x in blocks[-1]) < 0.4 * ink_h:
            blocks[-1].append(ln)
        else:
            blocks.append([ln])
    rows: list[dict] = []  # {"cells": {c0: [c0, c1, items, rowspan]}, "y0", "y1"}
    for block in blocks:
        per_band: dict[int, list] = {}
        for ln in block:
            for c0, c1, _ in ln[0]:
                for b in range(c0, c1 + 1):
                    per_band.setdefault(b, []).append(ln)
        k = max(1, int(np.median([len(v) for v in per_band.values()])))
        anchors = [sorted(v, key=lambda x: x[1]) for v in per_band.values() if len(v) == k]
        centers = [float(np.mean([a[i][1] for a in anchors])) for i in range(k)] if k > 1 and anchors else [0.0]
        k = len(centers)
        base = len(rows)
        rows.extend({"cells": {}, "y0": np.inf, "y1": -np.inf} for _ in range(k))
        for ln in block:
            for c0, c1, its in ln[0]:
                span, r = 1, 0
                if k > 1:
                    r = int(np.argmin([abs(ln[1] - c) for c in centers]))
                    if len(per_band.get(c0, ())) == 1:  # a lone line: centred between two rows?
                        i = min(max(0, int(np.searchsorted(centers, ln[1])) - 1), k - 2)
                        gap = centers[i + 1] - centers[i]
                        if centers[i] + 0.25 * gap < ln[1] < centers[i + 1] - 0.25 * gap:
                            r, span = i, 2
                row = rows[base + r]
                cell = row["cells"].setdefault(c0, [c0, c1, [], span])
                cell[1], cell[3] = max(cell[1], c1), max(cell[3], span)
                cell[2].extend(its)
                row["y0"], row["y1"] = min(row["y0"], ln[2]), max(row["y1"], ln[3])
    rows = [r for r in rows if r["cells"]]
    out, taken = [], set()
    for r, row in enumerate(rows):
        for c0, c1, its, span in sorted(row["cells"].values(), key=lambda c: c[0]):
            span = min(span, len(rows) - r)
            if any((r + i, c) in taken for i in range(span) for c in range(c0, c1 + 1)):
                continue
            taken |= {(r + i, c) for i in range(span) for c in range(c0, c1 + 1)}
            tb = [min(o.box[0] for o in its), min(o.box[1] for o in its), max(o.box[2] for o in its), max(o.box[3] for o in its)]
            box = [min(bands[c0][0], tb[0]), min(row["y0"], tb[1]), max(bands[c1][1], tb[2]), max(rows[r + span - 1]["y1"], tb[3])]
            out.append((r, c0, span, c1 - c0 + 1, box, its))
    for r, row in enumerate(rows):
        for c in range(len(bands)):
            if (r, c) not in taken:
                out.append((r, c, 1, 1, [bands[c][0], row["y0"], bands[c][1], row["y1"]], []))
    return out, lines


def _disagrees(cells: list[tuple], assigned: list[list[_Ocr]], lines: list[list[_Ocr]]) -> bool:
    """Whether a model structure contradicts the text layout: one text line split over rows, two
    column-separated boxes of one line in one cell, or two separate layout rows in one cell."""
    where = {id(o): k for k, items in enumerate(assigned) for o in items}
    line_of = {id(o): i for i, line in enumerate(lines) for o in line}
    hgt = np.median([o.box[3] - o.box[1] for line in lines for o in line])
    for line in lines:
        ks = [where[id(o)] for o in line if id(o) in where]
        if len(ks) >= 2:
            lo = max(cells[k][0] for k in ks)
            hi = min(cells[k][0] + cells[k][2] for k in ks)
            if lo >= hi:
                return True
    for items in assigned:
        by_line: dict[int, list[_Ocr]] = {}
        for o in items:
            by_line.setdefault(line_of.get(id(o), -1), []).append(o)
        for its in by_line.values():
            its.sort(key=lambda o: o.box[0])
            if any(b.box[0] - a.box[2] > 1.2 * hgt for a, b in zip(its, its[1:])):
                return True
    return False


def _assign(cells: list[tuple], ocr: list[_Ocr]) -> list[list[_Ocr]]:
    """Each OCR box goes to the cell it overlaps most (else the nearest cell centre); boxes whose
    centre lies outside the cells' hull are not table text."""
    assigned: list[list[_Ocr]] = [[] for _ in cells]
    if not cells:
        return assigned
    boxes = [c[4] for c in cells]
    region = [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]
    for o in ocr:
        ob = o.box
        cx, cy = (ob[0] + ob[2]) / 2, (ob[1] + ob[3]) / 2
        if not (region[0] <= cx <= region[2] and region[1] <= cy <= region[3]):
            continue
        ov = [_inter(ob, b) for b in boxes]
        k = int(np.argmax(ov))
        if ov[k] <= 0.05 * _area(ob):
            k = min(range(len(boxes)), key=lambda i: math.hypot(cx - (boxes[i][0] + boxes[i][2]) / 2,
                                                               cy - (boxes[i][1] + boxes[i][3]) / 2))
        assigned[k].append(o)
    return assigned
