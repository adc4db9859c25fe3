"""Table extraction on rendered tables: real OCR + SLANet-plus / ruling-line models from the
installed wheels, checked against the exact ground truth the renderer produced.

Chinese rendering needs a CJK font (Debian: ``apt-get install -y fonts-wqy-microhei``).
"""

from __future__ import annotations

import asyncio
import random
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a plain folder next to `serve_app`
    sys.path.insert(0, str(ROOT))

from benchmarks._table_render import GtCell, Sample, cells_to_html, make_sample, no_table_images, render_table, rotate  # noqa: E402
from benchmarks.tables_eval import html_tree, teds  # noqa: E402
from serve_app._tables import TablePipeline, as_rgb, resolve_model_paths, table_grid, table_to_csv, table_to_html  # noqa: E402


@pytest.fixture(scope="module")
def pipe() -> TablePipeline:
    return TablePipeline(threads=2)


def _grid(spec: list[list[str]]) -> list[GtCell]:
    return [GtCell(t, r, c) for r, row in enumerate(spec) for c, t in enumerate(row)]


def _render(cells, n_rows, n_cols, *, zh=False, ruled=True, seed=0, **kw) -> Sample:
    return render_table(cells, n_rows, n_cols, zh=zh, ruled=ruled, rng=random.Random(seed), **kw)


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _by_pos(table: dict) -> dict[tuple[int, int], dict]:
    return {(c["row"], c["col"]): c for c in table["cells"]}


EN = [["Region", "Q1 sales", "Q2 sales"],
      ["North", "1,204", "1,377"],
      ["South", "987.50", "1,020.25"],
      ["West", "45%", "Pending"]]


def test_ruled_english_texts_and_positions(pipe):
    s = _render(_grid(EN), 4, 3, font_size=22)
    tables = pipe(s.image)
    assert len(tables) == 1
    t = tables[0]
    assert (t["n_rows"], t["n_cols"]) == (4, 3)
    assert table_grid(t) == EN
    got = _by_pos(t)
    for g in s.cells:  # every cell's box matches the drawn cell
        c = got[(g.row, g.col)]
        assert (c["rowspan"], c["colspan"]) == (1, 1)
        assert _iou(c["bbox"], g.bbox) > 0.85, (g.text, c["bbox"], g.bbox)
        assert 0.5 < c["confidence"] <= 1.0
    tb = t["bbox"]
    assert abs(tb[0] - s.cells[0].bbox[0]) < 4 and abs(tb[3] - s.cells[-1].bbox[3]) < 4


def test_chinese_table(pipe):
    spec = [["部门", "人数", "预算（万元）"],
            ["技术部", "42", "350.5"],
            ["市场部", "17", "120"],
            ["财务部", "8", "66.8"]]
    s = _render(_grid(spec), 4, 3, zh=True, ruled=False, seed=3, font_size=24)
    tables = pipe(s.image)
    assert len(tables) == 1
    assert table_grid(tables[0]) == spec
    for g in s.cells:  # each text sits inside the cell reported for it
        c = _by_pos(tables[0])[(g.row, g.col)]
        cx, cy = (g.text_bbox[0] + g.text_bbox[2]) / 2, (g.text_bbox[1] + g.text_bbox[3]) / 2
        assert c["bbox"][0] <= cx <= c["bbox"][2] and c["bbox"][1] <= cy <= c["bbox"][3]


def test_merged_cells_ruled(pipe):
    cells = [GtCell("Item", 0, 0, rowspan=2), GtCell("Sales", 0, 1, colspan=2), GtCell("Note", 0, 3, rowspan=2),
             GtCell("2023", 1, 1), GtCell("2024", 1, 2),
             GtCell("Apples", 2, 0), GtCell("120", 2, 1), GtCell("135", 2, 2), GtCell("ok", 2, 3),
             GtCell("Pears", 3, 0), GtCell("80", 3, 1), GtCell("95", 3, 2), GtCell("late", 3, 3)]
    s = _render(cells, 4, 4, seed=5, font_size=22)
    t = pipe(s.image)[0]
    assert t["method"] == "lines"
    assert teds(t["html"], cells_to_html(cells, 4)) == 1.0
    got = _by_pos(t)
    assert (got[(0, 1)]["colspan"], got[(0, 0)]["rowspan"], got[(0, 3)]["rowspan"]) == (2, 2, 2)
    assert _iou(got[(0, 1)]["bbox"], cells[1].bbox) > 0.85  # the merged cell's box spans both columns


def test_merged_cells_borderless(pipe):
    cells = [GtCell("城市", 0, 0), GtCell("第一季度", 0, 1, colspan=2), GtCell("备注", 0, 3),
             GtCell("北京", 1, 0, rowspan=2), GtCell("12", 1, 1), GtCell("34", 1, 2), GtCell("正常", 1, 3),
             GtCell("56", 2, 1), GtCell("78", 2, 2), GtCell("延迟", 2, 3),
             GtCell("上海", 3, 0), GtCell("90", 3, 1), GtCell("11", 3, 2), GtCell("正常", 3, 3)]
    s = _render(cells, 4, 4, zh=True, ruled=False, seed=2, font_size=24)
    t = pipe(s.image)[0]
    assert t["method"] in ("slanet", "layout")
    # Text and rowspan exact; the centred colspan header is the one known weak spot (TEDS tells).
    assert teds(t["html"], cells_to_html(cells, 4)) > 0.9
    grid = table_grid(t)
    assert [row[0] for row in grid] == ["城市", "北京", "", "上海"]
    assert grid[2][1:] == ["56", "78", "延迟"]


def test_rotated_table(pipe):
    s = rotate(_render(_grid(EN), 4, 3, seed=1, font_size=22), 2.5)
    t = pipe(s.image)[0]
    assert table_grid(t) == EN
    for g in s.cells:  # boxes come back in the rotated image's pixels
        c = _by_pos(t)[(g.row, g.col)]
        cx, cy = (g.text_bbox[0] + g.text_bbox[2]) / 2, (g.text_bbox[1] + g.text_bbox[3]) / 2
        assert c["bbox"][0] <= cx <= c["bbox"][2] and c["bbox"][1] <= cy <= c["bbox"][3]


def test_photo_background_and_noise(pipe):
    s = make_sample("photo_bg", 4)  # rotated table on a photo, JPEG-compressed
    tables = pipe(s.image)
    assert len(tables) == 1
    assert teds(tables[0]["html"], s.html()) > 0.95


@pytest.mark.parametrize("k", range(6))
def test_no_table_gives_empty_list(pipe, k):
    """A photo, a paragraph, a caption, a scanned page, printed text, a chessboard."""
    assert pipe(no_table_images()[k]) == []


def test_blank_and_tiny_images(pipe):
    assert pipe(np.full((200, 300, 3), 255, np.uint8)) == []
    assert pipe(np.zeros((8, 8, 3), np.uint8)) == []


def test_runs_with_network_blocked(monkeypatch):
    """Build a fresh pipeline and extract with every socket connection refused: all model files
    must come from the installed wheels (rapidocr would otherwise download models/fonts)."""
    attempts = []

    def refuse(*a, **k):
        attempts.append(a[1:] if a else k)
        raise OSError("network blocked by test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    with pytest.raises(OSError):
        socket.create_connection(("example.com", 80))  # the block itself works
    attempts.clear()
    p = TablePipeline(threads=2)
    assert table_grid(p.warmup()[0]) == [["Name", "Qty"], ["Apple", "42"]]
    s = make_sample("merged_ruled", 1)
    assert teds(p(s.image)[0]["html"], s.html()) == 1.0
    assert attempts == []


def test_missing_model_file_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="table: .*nope.onnx"):
        resolve_model_paths({"table": tmp_path / "nope.onnx"})


def test_as_rgb_validation():
    assert as_rgb(np.zeros((4, 5), np.uint8), 100).shape == (4, 5, 3)
    assert as_rgb(np.zeros((4, 5, 4), np.uint8), 100).shape == (4, 5, 3)
    with pytest.raises(ValueError, match="uint8"):
        as_rgb(np.zeros((4, 5, 3), np.float32), 100)
    with pytest.raises(ValueError, match="HxWx3"):
        as_rgb(np.zeros((4, 5, 2), np.uint8), 100)
    with pytest.raises(OverflowError):
        as_rgb(np.zeros((20, 20, 3), np.uint8), 100)


def test_html_csv_rendering():
    t = {"n_rows": 3, "n_cols": 3, "cells": [
        {"text": "a<b", "row": 0, "col": 0, "rowspan": 2, "colspan": 1},
        {"text": 'say "hi", ok', "row": 0, "col": 1, "rowspan": 1, "colspan": 2},
        {"text": "x&y", "row": 1, "col": 1, "rowspan": 1, "colspan": 1},
        {"text": "", "row": 1, "col": 2, "rowspan": 1, "colspan": 1},
        {"text": "1", "row": 2, "col": 0, "rowspan": 1, "colspan": 1},
        {"text": "2", "row": 2, "col": 1, "rowspan": 1, "colspan": 1},
        {"text": "3", "row": 2, "col": 2, "rowspan": 1, "colspan": 1}]}
    assert table_to_html(t) == ('<table><tr><td rowspan="2">a&lt;b</td><td colspan="2">say &quot;hi&quot;, ok</td></tr>'
                                "<tr><td>x&amp;y</td><td></td></tr><tr><td>1</td><td>2</td><td>3</td></tr></table>")
    assert table_to_csv(t) == 'a<b,"say ""hi"", ok",\n,x&y,\n1,2,3\n'
    assert teds(table_to_html(t), table_to_html(t)) == 1.0


def test_teds_definition():
    true = "<table><tr><td>abcd</td><td>x</td></tr><tr><td>1</td><td>2</td></tr></table>"
    assert html_tree(true)[1] == 6  # 2 tr + 4 td
    assert teds(true, true) == 1.0
    # one text edit: rename cost = normalised Levenshtein = 1/4
    assert teds(true.replace("abcd", "abce"), true) == pytest.approx(1 - 0.25 / 6)
    # a missing cell: one deletion
    assert teds("<table><tr><td>abcd</td><td>x</td></tr><tr><td>1</td></tr></table>", true) == pytest.approx(1 - 1 / 6)
    # a wrong colspan: rename (span differs) + delete the second cell
    assert teds('<table><tr><td colspan="2">abcd</td></tr><tr><td>1</td><td>2</td></tr></table>', true) == pytest.approx(1 - 2 / 6)
    # structure-only ignores text
    assert teds(true.replace("abcd", "zzzz"), true, structure_only=True) == 1.0
    assert teds("<table></table>", true) == 0.0


def test_deployment_class_without_ray():
    from serve_app.errors import ServeAppError
    from serve_app.table_extractor import TableExtractor

    te = TableExtractor.func_or_class({"threads": 2, "max_image_pixels": 1_000_000, "enabled": True})
    s = _render(_grid(EN), 4, 3, font_size=22)
    tables = asyncio.run(te.extract(s.image))
    assert table_grid(tables[0]) == EN and tables[0]["csv"].startswith("Region,Q1 sales,Q2 sales\n")
    with pytest.raises(ServeAppError) as e:
        asyncio.run(te.extract(np.zeros((10, 10, 3), np.float32)))
    assert (e.value.status, e.value.code) == (400, "invalid_image")
    with pytest.raises(ServeAppError) as e:
        asyncio.run(te.extract(np.zeros((2000, 1000, 3), np.uint8)))
    assert (e.value.status, e.value.code) == (413, "image_too_large")
    st = asyncio.run(te.stats())
    assert st["images"] == 1 and st["tables"] == 1 and st["errors"] == 2 and st["methods"] == {"lines": 1}
    assert st["providers"][-1] == "CPUExecutionProvider"
