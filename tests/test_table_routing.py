"""Table question routing, row/column parsing, exact answers and the VLM context (no models)."""

from __future__ import annotations

import pytest

from serve_app._table_routing import (TableQuery, answer_table_question, asks_about_table, parse_table_query,
                                      table_context)
from serve_app._tables import Cell, Table


@pytest.mark.parametrize("text", [
    "上一张图里的表格第三行数据是多少?",
    "what is in row 3 of the table in the last image?",
    "Extract the table as CSV",
    "Summarize the table in this screenshot",
    "What's the total in the table?",
    "What are the column headers of the spreadsheet?",
    "According to the table, which region grew fastest?",
    "这张表第三行是什么",
    "上表中第二列的合计是多少？",
    "帮我把图片里的表格转成Markdown",
    "表中北京的收入是多少",
    "第2行第3列是什么",
    "row 2, column 3?",
    "what's in cell B3",
    "Give me the second-to-last row of the second table",
])
def test_routes(text):
    assert asks_about_table(text)


@pytest.mark.parametrize("text", [
    "put the book on the table",
    "How many chairs are around the table?",
    "What color is the table in the image?",
    "The kitchen table is wobbly",
    "Let's table this discussion until Monday",
    "Describe this picture",
    "What is in row 3?",           # a row alone, no table named
    "第三行诗是什么意思",            # 行 as a line of a poem
    "手表上显示几点",                # 表 in 手表 (a watch)
    "这个表情是什么意思",            # 表情 (an emoji)
    "代表什么意思",
    "",
])
def test_does_not_route(text):
    assert not asks_about_table(text)


@pytest.mark.parametrize("text,query", [
    ("what is in row 3 of the table", TableQuery(1, 3, None)),
    ("the third row", TableQuery(1, 3, None)),
    ("row three please", TableQuery(1, 3, None)),
    ("2nd column of table 2", TableQuery(2, None, 2)),
    ("the last row", TableQuery(1, -1, None)),
    ("second-to-last column", TableQuery(1, None, -2)),
    ("column B, row 4", TableQuery(1, 4, 2)),
    ("cell C2", TableQuery(1, 2, 3)),
    ("header row", TableQuery(1, 1, None)),
    ("第三行", TableQuery(1, 3, None)),
    ("第3列", TableQuery(1, None, 3)),
    ("第１２行", TableQuery(1, 12, None)),
    ("第十二行第二十三列", TableQuery(1, 12, 23)),
    ("倒数第二行", TableQuery(1, -2, None)),
    ("最后一列", TableQuery(1, None, -1)),
    ("表头", TableQuery(1, 1, None)),
    ("第二个表格的第一行", TableQuery(2, 1, None)),
    ("银行进行中", TableQuery(1, None, None)),  # 行 inside words is not a row
])
def test_parse(text, query):
    assert parse_table_query(text) == query


@pytest.fixture
def tables() -> list[dict]:
    cells = [Cell("地区", 0, 0), Cell("收入", 0, 1), Cell("成本", 0, 2),
             Cell("北京", 1, 0), Cell("1,204.50", 1, 1), Cell("80", 1, 2),
             Cell("上海", 2, 0, rowspan=2), Cell("98%", 2, 1), Cell("", 2, 2),
             Cell("7", 3, 1), Cell("8 | 9", 3, 2)]
    en = [Cell("Region", 0, 0), Cell("Q1", 0, 1), Cell("Q2", 0, 2),
          Cell("North", 1, 0), Cell("120", 1, 1), Cell("130", 1, 2),
          Cell("South", 2, 0), Cell("98.5", 2, 1), Cell("n/a", 2, 2)]
    return [Table(cells, 4, 3, [0, 0, 1, 1], "lines").to_dict(), Table(en, 3, 3, [0, 2, 1, 3], "slanet").to_dict()]


def test_exact_answers(tables):
    zh, en = tables[:1], tables[1:]
    assert answer_table_question("上一张图里的表格第三行数据是多少?", zh) == "表格第3行：地区：上海；收入：98%；成本：（空）"
    assert answer_table_question("表格第2行第2列是什么", zh) == "表格第2行第2列（收入）：1,204.50"
    # the rowspan label counts for both rows it covers
    assert answer_table_question("表格第4行", zh) == "表格第4行：地区：上海；收入：7；成本：8 | 9"
    assert answer_table_question("表格最后一列", zh) == "表格第3列（成本）：北京：80；上海：（空）；上海：8 | 9"
    assert answer_table_question("表中北京的收入是多少", zh) == "表格第2行第2列（收入）：1,204.50"
    assert answer_table_question("what is in row 3 of the table in the last image?", en) == \
        "The table, row 3: Region: South; Q1: 98.5; Q2: n/a"
    assert answer_table_question("What is Q2 in row 2 of the table?", en) == "The table, row 2, column 3 (Q2): 130"
    assert answer_table_question("what's in cell B1", en) == "The table, row 1, column 2: Q1"
    assert answer_table_question("the second column of the table", en) == "The table, column 2 (Q1): North: 120; South: 98.5"
    assert answer_table_question("row 1 of the table", en) == "The table, row 1: Region; Q1; Q2"
    assert answer_table_question("What is the Q1 value for North in the table?", en) == "The table, row 2, column 2 (Q1): 120"


def test_answers_pick_table_and_check_ranges(tables):
    assert answer_table_question("row 2 of the second table", tables) == "Table 2, row 2: Region: North; Q1: 120; Q2: 130"
    assert answer_table_question("第一个表格第2行第3列", tables) == "表格1第2行第3列（成本）：80"
    assert answer_table_question("row 9 of the table", tables[1:]) == "The table has only 3 rows."
    assert answer_table_question("第5列", tables[:1]) == "该表格只有 3 列。"
    assert answer_table_question("row 1 of the third table", tables) == "Only 2 tables found in the image."


def test_no_answer_when_not_specific(tables):
    assert answer_table_question("What is the table about?", tables) is None
    assert answer_table_question("Summarize the table", tables) is None
    assert answer_table_question("row 2 of the table", []) is None
    assert answer_table_question("Which is bigger, North or South?", tables[1:]) is None  # two row labels, no column


def test_table_context(tables):
    ctx = table_context(tables)
    assert ctx.splitlines()[:7] == [
        "Table 1 (4 rows x 3 columns, read from the image by OCR; row 1 is the top row):",
        "| # | c1 | c2 | c3 |",
        "|---|---|---|---|",
        "| 1 | 地区 | 收入 | 成本 |",
        "| 2 | 北京 | 1,204.50 | 80 |",
        "| 3 | 上海 | 98% |  |",
        "| 4 | ↑ | 7 | 8 \\| 9 |",  # merged slot marked, pipe escaped
    ]
    assert "Table 2 (3 rows x 3 columns" in ctx and "| 3 | South | 98.5 | n/a |" in ctx
    assert table_context([]) == ""
    short = table_context(tables, max_chars=200)
    assert len(short) < 260 and "truncated" in short
