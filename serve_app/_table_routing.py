"""Does a chat message ask about a table, which row/column/cell, and what is the exact answer?

No Ray, no models: plain regular expressions, so the rule is cheap and explainable.

Routing rule (``asks_about_table``): a message asks about a table when
  * it names a table in the *data* sense - English ``table``/``spreadsheet``/``tabular``/``csv``
    (ignoring furniture phrases "on/at/under/around the table"), Chinese ``表格`` (never
    furniture: that is 桌子), or 表 in a table phrase (这张表, 上表, 表中, 报表, 数据表...) - and
  * it points at table content: a row/column/cell/header reference ("row 3", "third column",
    "cell B2", "第3行", "第三列", "表头"), a data word ("value", "data", "number", "total",
    "extract", "数据", "数值", "多少", "内容"...), a table preposition ("in/from/according to the
    table"), or an image reference ("in the image", "screenshot", "图片", "图里");
  * or, without naming a table, it asks for a row *and* a column together ("row 2, column 3",
    "第2行第3列"), or a spreadsheet cell ("cell B3"). In Chinese 表格 alone is enough.

Rows and columns are numbered from 1 at the top/left of the table as it appears in the image
(the header row is row 1), and :func:`table_context` shows the model the same numbers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# ----------------------------------------------------------------------------- vocabulary

_EN_ORD = {w: i + 1 for i, w in enumerate(
    "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth thirteenth "
    "fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth twentieth".split())}
_EN_CARD = {w: i + 1 for i, w in enumerate(
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty".split())}
_ZH_DIGIT = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
_ZH_NUM = r"[0-9０-９]+|[零〇一二两三四五六七八九十百]+"
_EN_NUM = r"\d+|" + "|".join(sorted(_EN_CARD, key=len, reverse=True))
_EN_ORDS = r"\d+(?:st|nd|rd|th)|" + "|".join(sorted(_EN_ORD, key=len, reverse=True)) + r"|last|second[- ](?:to[- ])?last|penultimate"

_EN_TABLE = re.compile(r"\b(?:tables?|spreadsheets?|tabular|csv)\b", re.I)
_EN_FURNITURE = re.compile(r"\b(?:on|at|under|underneath|around|beside|off|onto|across)\s+(?:the|a|this|that|our|my|your|his|her|their)?\s*"
                           r"(?:\w+\s+)?tables?\b", re.I)
_EN_STRONG = re.compile(
    r"\b(?:rows?|columns?|cols?|cells?|headers?|heading|values?|data|entr(?:y|ies)|numbers?|figures?|totals?|sum|"
    r"average|amount|extract|transcribe|convert|parse|markdown|json|html|csv)\b", re.I)
_EN_WEAK = re.compile(r"\b(?:read|list|summari[sz]e|contents?|says?|shows?|contains?|lists?|what\s+is\s+in|what's\s+in)\b", re.I)
_EN_FURNITURE_WORDS = re.compile(r"\b(?:colou?r|wood(?:en)?|legs?|chairs?|sit(?:ting)?|sat|furniture|kitchen|dining|coffee|"
                                 r"desk|bed|sofa|couch|lamp|tablecloth|wobbly|marble|glass)\b", re.I)
_EN_PREP = re.compile(r"\b(?:in|from|within|inside|according\s+to|per)\s+(?:the|this|that|a|your|my)?\s*"
                      r"(?:above\s+|below\s+|following\s+|last\s+|previous\s+|first\s+|second\s+)?(?:tables?|spreadsheets?)\b", re.I)
_EN_IMAGE = re.compile(r"\b(?:images?|pictures?|photos?|screenshots?|scans?|pics?|img|attachments?|uploads?)\b", re.I)

_ZH_TABLE = re.compile(r"表格|报表|图表|[数统明汇总览价课时]表|(?:这|那|该|此|本|上|下|前|后|每|各|哪)(?:一|张|个|份|幅)*表(?![示达情演面明扬彰现态哥姐弟妹白决率])|"
                       r"(?<![手代发电水钟仪外列图])表[中里内上的](?![示达情演面明扬彰现态])")
_ZH_DATA = re.compile(r"第\s*(?:" + _ZH_NUM + r")\s*[行列栏格]|最后\s*[一1]?\s*[行列]|倒数|表头|首[行列]|单元格|数据|数值|内容|"
                      r"多少|几|哪|是什么|提取|读取|列出|转换|汇总|合计|总计|平均|最大|最小")
_ZH_IMAGE = re.compile(r"图|照片|截图|截屏|扫描|附件|图片")


# ----------------------------------------------------------------------------- parsing

@dataclass
class TableQuery:
    """What a message asks for. Indices are 1-based; negative counts from the end (-1 = last)."""

    table: int = 1
    row: int | None = None
    col: int | None = None


def _zh_int(s: str) -> int | None:
    """"3", "３", "三", "十二", "二十三", "一百零五" -> int."""
    s = s.translate(str.maketrans("０１２３４５６７８９", "0123456789"))
    if s.isdigit():
        return int(s)
    if not s or any(ch not in _ZH_DIGIT and ch not in "十百" for ch in s):
        return None
    if "十" not in s and "百" not in s:
        return int("".join(str(_ZH_DIGIT[ch]) for ch in s))
    total, cur = 0, 0
    for ch in s:
        if ch in "十百":
            total += (cur or 1) * (10 if ch == "十" else 100)
            cur = 0
        else:
            cur = _ZH_DIGIT[ch]
    return total + cur


def _en_int(s: str) -> int | None:
    s = s.lower().strip()
    if s.isdigit():
        return int(s)
    m = re.fullmatch(r"(\d+)(?:st|nd|rd|th)", s)
    if m:
        return int(m.group(1))
    if s == "last":
        return -1
    if s in ("penultimate", "second last", "second-last", "second to last", "second-to-last"):
        return -2
    return _EN_ORD.get(s) or _EN_CARD.get(s)


def _col_letter(s: str) -> int:
    return ord(s.upper()) - ord("A") + 1


_EN_ROW = [re.compile(r"\brow\s*(?:#|no\.?|number)?\s*(" + _EN_NUM + r")\b", re.I),
           re.compile(r"\b(" + _EN_ORDS + r")\s+row\b", re.I)]
_EN_COL = [re.compile(r"\b(?:column|col)\s*(?:#|no\.?|number)?\s*(" + _EN_NUM + r")\b", re.I),
           re.compile(r"\b(?:column|col)\s+([A-Z])\b"),
           re.compile(r"\b(" + _EN_ORDS + r")\s+(?:column|col)\b", re.I)]
_EN_CELL = re.compile(r"\bcell\s+([A-Z])\s*(\d+)\b")
_EN_TABLE_IDX = [re.compile(r"\btable\s*(?:#|no\.?)?\s*(\d+)\b", re.I),
                 re.compile(r"\b(" + _EN_ORDS + r")\s+table\b", re.I)]
_ZH_ROW = [re.compile(r"倒数\s*第\s*(" + _ZH_NUM + r")\s*行"), re.compile(r"第\s*(" + _ZH_NUM + r")\s*行")]
_ZH_COL = [re.compile(r"倒数\s*第\s*(" + _ZH_NUM + r")\s*[列栏]"), re.compile(r"第\s*(" + _ZH_NUM + r")\s*[列栏]")]
_ZH_TABLE_IDX = [re.compile(r"倒数\s*第\s*(" + _ZH_NUM + r")\s*[个张份]?表"), re.compile(r"第\s*(" + _ZH_NUM + r")\s*[个张份]?表")]


def _first(patterns, text, conv, from_end_first: bool) -> int | None:
    for k, p in enumerate(patterns):
        m = p.search(text)
        if m:
            v = conv(m.group(1))
            if v is None or v == 0:
                continue
            return -v if (from_end_first and k == 0) else v
    return None


def parse_table_query(text: str) -> TableQuery:
    """Row/column/table numbers named in ``text`` (English or Chinese)."""
    q = TableQuery()
    m = _EN_CELL.search(text)
    if m:
        q.col, q.row = _col_letter(m.group(1)), int(m.group(2))
    q.row = q.row or _first(_EN_ROW, text, _en_int, False) or _first(_ZH_ROW, text, _zh_int, True)
    q.col = q.col or _first(_EN_COL, text, lambda s: _col_letter(s) if re.fullmatch(r"[A-Z]", s) else _en_int(s), False) \
        or _first(_ZH_COL, text, _zh_int, True)
    if q.row is None:
        if re.search(r"最后\s*[一1]?\s*行|末行|\bbottom\s+row\b", text, re.I):
            q.row = -1
        elif re.search(r"表头|首行|\b(?:header|heading|top)\s+row\b", text, re.I):
            q.row = 1
    if q.col is None:
        if re.search(r"最后\s*[一1]?\s*[列栏]|末列|\b(?:rightmost|right-most)\s+col(?:umn)?\b", text, re.I):
            q.col = -1
        elif re.search(r"首列|\b(?:leftmost|left-most)\s+col(?:umn)?\b", text, re.I):
            q.col = 1
    q.table = _first(_EN_TABLE_IDX, text, _en_int, False) or _first(_ZH_TABLE_IDX, text, _zh_int, True) or 1
    return q


def asks_about_table(text: str) -> bool:
    """The routing rule in the module docstring."""
    if not text:
        return False
    q = parse_table_query(text)
    if (q.row is not None and q.col is not None) or _EN_CELL.search(text):
        return True
    if "表格" in text:
        return True
    if _ZH_TABLE.search(text) and (_ZH_DATA.search(text) or _ZH_IMAGE.search(text)):
        return True
    if _EN_TABLE.search(_EN_FURNITURE.sub(" ", text)):  # a table noun outside furniture phrases
        if _EN_STRONG.search(text) or q.row is not None or q.col is not None:
            return True
        weak = _EN_PREP.search(text) or _EN_WEAK.search(text) or _EN_IMAGE.search(text)
        return bool(weak) and not _EN_FURNITURE_WORDS.search(text)
    return False


# ----------------------------------------------------------------------------- rendering & answers

def _dense(table: dict, fill_merged: bool) -> list[list[str]]:
    n_rows, n_cols = int(table["n_rows"]), int(table["n_cols"])
    grid = [[""] * n_cols for _ in range(n_rows)]
    for c in table["cells"]:
        for i in range(c["row"], min(n_rows, c["row"] + c.get("rowspan", 1))):
            for j in range(c["col"], min(n_cols, c["col"] + c.get("colspan", 1))):
                if (i, j) == (c["row"], c["col"]) or fill_merged:
                    grid[i][j] = c["text"]
                else:
                    grid[i][j] = "↑" if j == c["col"] else "←"
    return grid


def _md(s: str) -> str:
    return " ".join(s.split()).replace("|", "\\|")


def table_context(tables: list[dict], max_chars: int = 6000) -> str:
    """Extracted tables as compact Markdown for the VLM prompt: one block per table with a
    ``#`` column of row numbers and ``c1..cN`` column numbers (the same numbering users and
    :func:`answer_table_question` use). In a merged cell the text sits at its top-left slot;
    the other slots show ``←`` (merged with the cell to the left) or ``↑`` (merged with above)."""
    if not tables:
        return ""
    parts = []
    for t_i, t in enumerate(tables, 1):
        grid = _dense(t, fill_merged=False)
        head = f"Table {t_i} ({t['n_rows']} rows x {t['n_cols']} columns, read from the image by OCR; row 1 is the top row):"
        lines = [head, "| # | " + " | ".join(f"c{j + 1}" for j in range(t["n_cols"])) + " |",
                 "|---" * (t["n_cols"] + 1) + "|"]
        lines += [f"| {i + 1} | " + " | ".join(_md(v) for v in row) + " |" for i, row in enumerate(grid)]
        parts.append("\n".join(lines))
    text = "\n\n".join(parts)
    if len(text) > max_chars:
        cut = text[:max_chars].rsplit("\n", 1)[0]
        text = cut + f"\n... (truncated; {text.count(chr(10)) - cut.count(chr(10))} more lines)"
    return text


def _resolve(idx: int | None, n: int) -> int | None:
    """1-based / negative-from-end index -> 0-based, or None if out of range."""
    if idx is None:
        return None
    k = idx - 1 if idx > 0 else n + idx
    return k if 0 <= k < n else None


def _labels(text: str, values: list[str], skip: int | None = None) -> list[int]:
    """Indices of ``values`` that appear in ``text`` as a whole word (CJK: as a substring)."""
    out = []
    for i, v in enumerate(values):
        v = v.strip()
        if i == skip or len(v) < 2:
            continue
        if re.search(r"[\u3000-\u9fff]", v):
            hit = v in text
        else:
            hit = re.search(r"(?<!\w)" + re.escape(v) + r"(?!\w)", text, re.I) is not None
        if hit:
            out.append(i)
    return out


def answer_table_question(text: str, tables: list[dict]) -> str | None:
    """An exact, deterministic answer when ``text`` names a specific row, column or cell of one of
    ``tables`` (by number, or by a row label from the first column plus a column header);
    ``None`` when the question is not that specific or there is no table. Cell values are quoted
    verbatim from the extraction; a merged cell's value counts for every slot it covers."""
    if not tables or not text:
        return None
    q = parse_table_query(text)
    zh = len(re.findall(r"[\u4e00-\u9fff]", text)) >= len(re.findall(r"[A-Za-z]", text)) / 3
    t_idx = _resolve(q.table, len(tables))
    if t_idx is None:
        return (f"图片中只识别到 {len(tables)} 个表格。" if zh else
                f"Only {len(tables)} table{'s' if len(tables) > 1 else ''} found in the image.")
    t = tables[t_idx]
    grid = _dense(t, fill_merged=True)
    n_rows, n_cols = len(grid), len(grid[0]) if grid else 0
    header = grid[0] if grid else []
    r, c = _resolve(q.row, n_rows), _resolve(q.col, n_cols)
    if q.row is not None and r is None:
        return f"该表格只有 {n_rows} 行。" if zh else f"The table has only {n_rows} rows."
    if q.col is not None and c is None:
        return f"该表格只有 {n_cols} 列。" if zh else f"The table has only {n_cols} columns."
    # Labels complete a numbered question ("Q2 in row 3") or, both together, name a cell
    # ("北京的收入是多少"): first-column text names a row, header text names a column.
    row_hits = _labels(text, [row[0] for row in grid], skip=0) if r is None else []
    col_hits = _labels(text, header, skip=0) if c is None else []
    if r is None and c is None:
        if len(row_hits) != 1 or len(col_hits) != 1:
            return None
        r, c = row_hits[0], col_hits[0]
    elif r is None:
        r = row_hits[0] if len(row_hits) == 1 else None
    elif c is None:
        c = col_hits[0] if len(col_hits) == 1 else None
    name = (f"表格{t_idx + 1}" if len(tables) > 1 else "表格") if zh else (f"Table {t_idx + 1}" if len(tables) > 1 else "The table")
    sep, join = ("：", "；") if zh else (": ", "; ")

    empty = "（空）" if zh else "(empty)"

    def col_name(j: int) -> str:
        return header[j] or (f"第{j + 1}列" if zh else f"column {j + 1}")

    def row_name(i: int) -> str:
        return grid[i][0] or (f"第{i + 1}行" if zh else f"row {i + 1}")

    if r is not None and c is not None:
        v = grid[r][c] or empty
        hdr = header[c] if r > 0 and header[c] else ""
        if zh:
            return f"{name}第{r + 1}行第{c + 1}列" + (f"（{hdr}）" if hdr else "") + f"：{v}"
        return f"{name}, row {r + 1}, column {c + 1}" + (f" ({hdr})" if hdr else "") + f": {v}"
    if r is not None:
        vals = [f"{col_name(j)}{sep}{v or empty}" for j, v in enumerate(grid[r])] if r > 0 else [v or empty for v in grid[r]]
        return (f"{name}第{r + 1}行：" if zh else f"{name}, row {r + 1}: ") + join.join(vals)
    vals = [f"{row_name(i)}{sep}{grid[i][c] or empty}" for i in range(1, n_rows)] if c > 0 else [grid[i][c] or empty for i in range(1, n_rows)]
    hdr = f"（{header[c]}）" if zh and header[c] else (f" ({header[c]})" if header[c] else "")
    return (f"{name}第{c + 1}列{hdr}：" if zh else f"{name}, column {c + 1}{hdr}: ") + join.join(vals)
