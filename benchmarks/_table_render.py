"""Synthetic table images with exact ground truth, for the TEDS benchmark and the table tests.

Everything is drawn with PIL from fonts on disk (no network): Latin text uses DejaVu when present,
else Pillow's bundled scalable font; Chinese needs a CJK font, e.g. Debian ``fonts-wqy-microhei``
(``apt-get install -y fonts-wqy-microhei``). Photo backgrounds come from the images scikit-image
ships inside its wheel. The ground truth is a grid of cells with spans and pixel boxes, so the same
sample serves TEDS (its HTML) and position checks in tests.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from serve_app._table_geometry import _is_cjk  # the pipeline's rule: no space between CJK characters

CJK_FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf",
)
LATIN_FONT_CANDIDATES = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
)
# Photos bundled in scikit-image's wheel (loaded from its data dir; nothing is fetched).
_PHOTOS = ("coffee.png", "astronaut.png", "chelsea.png", "rocket.jpg", "retina.jpg", "gravel.png",
           "brick.png", "grass.png", "motorcycle_left.png", "hubble_deep_field.jpg")

EN_WORDS = ("Alpha", "Beta", "Gamma", "Delta", "Region", "North", "South", "East", "West", "Total",
            "Revenue", "Cost", "Profit", "Margin", "Units", "Price", "Q1", "Q2", "Q3", "Q4", "Name",
            "Status", "Active", "Closed", "Pending", "Paris", "Berlin", "Tokyo", "Lima", "Oslo",
            "Model", "Score", "Rank", "Date", "Owner", "Green", "Blue", "Red", "Small", "Large")
ZH_WORDS = ("北京", "上海", "广州", "深圳", "杭州", "成都", "收入", "成本", "利润", "数量", "单价",
            "合计", "名称", "状态", "完成", "进行中", "已关闭", "第一季度", "第二季度", "销售额",
            "部门", "技术部", "市场部", "财务部", "人数", "日期", "备注", "增长率", "项目", "负责人",
            "张三", "李四", "王五", "产品", "型号", "库存", "地区", "年份", "评分", "类别")


def find_font(cjk: bool) -> str | None:
    """Path of a usable font file; ``None`` for Latin means Pillow's bundled font."""
    for p in CJK_FONT_CANDIDATES if cjk else LATIN_FONT_CANDIDATES:
        if Path(p).is_file():
            return p
    if cjk:
        raise RuntimeError("no CJK font found; install one, e.g. `apt-get install -y fonts-wqy-microhei`")
    return None


def load_font(cjk: bool, size: int) -> ImageFont.FreeTypeFont:
    path = find_font(cjk)
    return ImageFont.truetype(path, size) if path else ImageFont.load_default(size)


@dataclass
class GtCell:
    text: str
    row: int
    col: int
    rowspan: int = 1
    colspan: int = 1
    bbox: list[float] = field(default_factory=list)  # [x0, y0, x1, y1] of the cell in image pixels
    text_bbox: list[float] = field(default_factory=list)  # ink box of the text, image pixels


@dataclass
class Sample:
    image: np.ndarray  # RGB uint8
    cells: list[GtCell]
    n_rows: int
    n_cols: int
    category: str = ""
    angle: float = 0.0  # degrees counter-clockwise applied by rotate()

    def html(self) -> str:
        return cells_to_html(self.cells, self.n_rows)


def gt_text(text: str) -> str:
    """A cell's ground-truth string: its drawn lines joined by a space (nothing between CJK)."""
    out = ""
    for line in text.split("\n"):
        if out and line and not (_is_cjk(out[-1]) and _is_cjk(line[0])):
            out += " "
        out += line
    return out


def cells_to_html(cells, n_rows: int) -> str:
    rows: list[list] = [[] for _ in range(n_rows)]
    for c in sorted(cells, key=lambda c: (c.row, c.col)):
        rows[c.row].append(c)
    out = ["<table>"]
    for r in rows:
        out.append("<tr>")
        for c in r:
            attrs = (f' rowspan="{c.rowspan}"' if c.rowspan > 1 else "") + (
                f' colspan="{c.colspan}"' if c.colspan > 1 else "")
            out.append(f"<td{attrs}>{escape(gt_text(c.text))}</td>")
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def _word(rng: random.Random, zh: bool) -> str:
    return rng.choice(ZH_WORDS if zh else EN_WORDS)


def _value(rng: random.Random, zh: bool) -> str:
    kind = rng.random()
    if kind < 0.4:
        return str(rng.randint(0, 99999))
    if kind < 0.6:
        return f"{rng.uniform(0, 1000):.2f}"
    if kind < 0.7:
        return f"{rng.randint(1, 99)}%"
    if kind < 0.85:
        return _word(rng, zh)
    return _word(rng, zh) + ("" if zh else " ") + _word(rng, zh)


def random_layout(rng: random.Random, zh: bool, merged: bool, rows=(3, 7), cols=(3, 5),
                  empty_p: float = 0.0, wrap_p: float = 0.0) -> tuple[list[GtCell], int, int]:
    """A header row plus body rows; with ``merged``, add a colspan in the header and/or a rowspan.
    Body cells are left empty with probability ``empty_p`` and drawn on two lines with ``wrap_p``."""
    n_rows, n_cols = rng.randint(*rows), rng.randint(*cols)
    owner = [[None] * n_cols for _ in range(n_rows)]
    cells: list[GtCell] = []

    def place(r, c, rs, cs, text):
        cell = GtCell(text, r, c, rs, cs)
        for i in range(r, r + rs):
            for j in range(c, c + cs):
                owner[i][j] = cell
        cells.append(cell)

    if merged:
        if rng.random() < 0.7:  # a header cell spanning two columns
            c0 = rng.randint(1, n_cols - 2)
            place(0, c0, 1, 2, _word(rng, zh))
        if rng.random() < 0.7 or not cells:  # a first-column cell spanning two body rows
            r0 = rng.randint(1, n_rows - 2)
            place(r0, 0, 2, 1, _word(rng, zh))
    for r in range(n_rows):
        for c in range(n_cols):
            if owner[r][c] is None:
                text = _word(rng, zh) if (r == 0 or c == 0) else _value(rng, zh)
                if empty_p and r > 0 and c > 0 and rng.random() < empty_p:
                    text = ""
                elif wrap_p and r > 0 and rng.random() < wrap_p:
                    text = _word(rng, zh) + "\n" + _value(rng, zh)
                place(r, c, 1, 1, text)
    return cells, n_rows, n_cols


def render_table(cells: list[GtCell], n_rows: int, n_cols: int, *, zh: bool, ruled: bool,
                 rng: random.Random, font_size: int | None = None, margin: int = 24,
                 header_rule: bool = True) -> Sample:
    """Draw the grid on white; fills each cell's ``bbox`` and ``text_bbox``."""
    size = font_size or rng.randint(18, 26)
    font = load_font(zh, size)
    pad_x, pad_y = rng.randint(10, 18) + (0 if ruled else 14), rng.randint(7, 12)
    width_of = lambda t: max((font.getbbox(x)[2] - font.getbbox(x)[0] if x else 0) for x in t.split("\n"))
    line_h = font.getbbox("Hg国")[3] - font.getbbox("Hg国")[1]
    gap = max(2, size // 4)  # between the lines of a wrapped cell
    height_of = lambda t: t.count("\n") * (line_h + gap) + line_h
    col_w = [0] * n_cols
    for c in cells:
        if c.colspan == 1:
            col_w[c.col] = max(col_w[c.col], width_of(c.text) + 2 * pad_x)
    for c in cells:  # widen spanned columns if a merged text does not fit
        if c.colspan > 1:
            need = width_of(c.text) + 2 * pad_x - sum(col_w[c.col:c.col + c.colspan])
            if need > 0:
                for j in range(c.col, c.col + c.colspan):
                    col_w[j] += need // c.colspan + 1
    row_h = [line_h + 2 * pad_y] * n_rows
    for c in cells:
        if c.rowspan == 1:
            row_h[c.row] = max(row_h[c.row], height_of(c.text) + 2 * pad_y)
    xs = np.cumsum([margin] + col_w).tolist()
    ys = np.cumsum([margin] + row_h).tolist()
    img = Image.new("RGB", (int(xs[-1] + margin), int(ys[-1] + margin)), "white")
    draw = ImageDraw.Draw(img)
    ink = tuple(rng.randint(0, 60) for _ in range(3))
    centered = rng.random() < 0.5
    lw = rng.choice((1, 2)) if ruled else 2
    for c in cells:
        x0, x1 = xs[c.col], xs[c.col + c.colspan]
        y0, y1 = ys[c.row], ys[c.row + c.rowspan]
        c.bbox = [float(x0), float(y0), float(x1), float(y1)]
        th = height_of(c.text)
        ty = (y0 + y1 - th) / 2
        c.text_bbox = [x1, y1, x0, y0]
        for k, line in enumerate(c.text.split("\n")):
            if not line:
                continue
            tb = font.getbbox(line)
            lw_ = tb[2] - tb[0]
            tx = (x0 + x1 - lw_) / 2 if (centered or c.colspan > 1) else x0 + pad_x
            ly = ty + k * (line_h + gap) + (line_h - (tb[3] - tb[1])) / 2
            draw.text((tx - tb[0], ly - tb[1]), line, font=font, fill=ink)
            c.text_bbox = [min(c.text_bbox[0], tx), min(c.text_bbox[1], ly),
                           max(c.text_bbox[2], tx + lw_), max(c.text_bbox[3], ly + tb[3] - tb[1])]
        if not c.text:
            c.text_bbox = [(x0 + x1) / 2, (y0 + y1) / 2, (x0 + x1) / 2, (y0 + y1) / 2]
        if ruled:
            draw.rectangle([x0, y0, x1, y1], outline=ink, width=lw)
    if not ruled and header_rule:  # booktabs-style rules: top, below header, bottom
        for y in (ys[0], ys[1], ys[-1]):
            draw.line([(xs[0], y), (xs[-1], y)], fill=ink, width=lw)
    return Sample(np.asarray(img), cells, n_rows, n_cols)


def _photo(name: str) -> Image.Image:
    import skimage.data

    return Image.open(Path(skimage.data.__file__).parent / name).convert("RGB")


def place_on_photo(sample: Sample, rng: random.Random, mode: str = "paper") -> Sample:
    """Put the table on a photo: ``paper`` pastes it as a sheet with a shadow; ``texture``
    blends the photo (lightened) under the table so text sits on a textured background."""
    table = Image.fromarray(sample.image)
    tw, th = table.size
    photo = _photo(rng.choice(_PHOTOS))
    scale = max((tw + 120) / photo.width, (th + 120) / photo.height) * rng.uniform(1.0, 1.3)
    photo = photo.resize((int(photo.width * scale), int(photo.height * scale)), Image.BILINEAR)
    ox = rng.randint(30, photo.width - tw - 30)
    oy = rng.randint(30, photo.height - th - 30)
    if mode == "texture":
        region = photo.crop((ox, oy, ox + tw, oy + th))
        light = Image.blend(region, Image.new("RGB", region.size, "white"), rng.uniform(0.6, 0.75))
        arr = np.minimum(np.asarray(light), np.asarray(table))  # table ink over a light texture
        photo.paste(Image.fromarray(arr), (ox, oy))
    else:
        shadow = Image.new("L", photo.size, 0)
        ImageDraw.Draw(shadow).rectangle([ox + 6, oy + 6, ox + tw + 6, oy + th + 6], fill=120)
        shadow = shadow.filter(ImageFilter.GaussianBlur(6))
        photo = Image.composite(Image.new("RGB", photo.size, "black"), photo, shadow)
        photo.paste(table, (ox, oy))
    for c in sample.cells:
        c.bbox = [c.bbox[0] + ox, c.bbox[1] + oy, c.bbox[2] + ox, c.bbox[3] + oy]
        c.text_bbox = [c.text_bbox[0] + ox, c.text_bbox[1] + oy, c.text_bbox[2] + ox, c.text_bbox[3] + oy]
    return Sample(np.asarray(photo), sample.cells, sample.n_rows, sample.n_cols, sample.category, sample.angle)


def rotate(sample: Sample, degrees: float) -> Sample:
    """Rotate counter-clockwise by ``degrees`` (expanding the canvas); boxes become the
    axis-aligned hull of the rotated boxes."""
    img = Image.fromarray(sample.image)
    w, h = img.size
    border = tuple(int(v) for v in np.median(np.concatenate(
        [sample.image[0], sample.image[-1], sample.image[:, 0], sample.image[:, -1]]), axis=0))
    out = img.rotate(degrees, resample=Image.BICUBIC, expand=True, fillcolor=border)
    a = math.radians(degrees)
    cx, cy, ncx, ncy = w / 2, h / 2, out.width / 2, out.height / 2

    def tf(x, y):  # PIL rotates counter-clockwise on screen (y down)
        dx, dy = x - cx, y - cy
        return ncx + dx * math.cos(a) + dy * math.sin(a), ncy - dx * math.sin(a) + dy * math.cos(a)

    def hull(b):
        pts = [tf(b[0], b[1]), tf(b[2], b[1]), tf(b[0], b[3]), tf(b[2], b[3])]
        return [min(p[0] for p in pts), min(p[1] for p in pts), max(p[0] for p in pts), max(p[1] for p in pts)]

    for c in sample.cells:
        c.bbox, c.text_bbox = hull(c.bbox), hull(c.text_bbox)
    return Sample(np.asarray(out), sample.cells, sample.n_rows, sample.n_cols, sample.category, sample.angle + degrees)


def degrade(sample: Sample, rng: random.Random, quality: int | None = None, sigma: float | None = None) -> Sample:
    """Gaussian sensor noise, a slight blur, then JPEG compression."""
    arr = sample.image.astype(np.float32)
    nrng = np.random.default_rng(rng.randint(0, 2**31))
    arr += nrng.normal(0, sigma if sigma is not None else rng.uniform(4, 10), arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        img = img.filter(ImageFilter.GaussianBlur(0.6))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality or rng.randint(30, 60))
    out = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return Sample(out, sample.cells, sample.n_rows, sample.n_cols, sample.category, sample.angle)


CATEGORIES = ("ruled_en", "ruled_zh", "borderless_en", "borderless_zh", "merged_ruled",
              "merged_borderless", "rotated", "jpeg_noise", "photo_bg", "dense")


def make_sample(category: str, seed: int) -> Sample:
    """One image of a benchmark category; the same (category, seed) always gives the same image."""
    rng = random.Random(f"{category}:{seed}")
    zh = category.endswith("_zh") or (category not in ("ruled_en", "borderless_en") and rng.random() < 0.5)
    ruled = category.startswith("ruled") or category == "merged_ruled" or (
        not category.startswith(("borderless", "merged")) and rng.random() < 0.5)
    merged = category.startswith("merged") or (category in ("rotated", "jpeg_noise", "photo_bg") and rng.random() < 0.3)
    if category == "dense":  # bigger tables, small print, empty and two-line cells
        cells, n_rows, n_cols = random_layout(rng, zh, rng.random() < 0.3, rows=(8, 12), cols=(4, 6),
                                              empty_p=0.1, wrap_p=0.15)
        s = render_table(cells, n_rows, n_cols, zh=zh, ruled=ruled, rng=rng, font_size=rng.randint(14, 17),
                         header_rule=ruled or rng.random() < 0.7)
    else:
        cells, n_rows, n_cols = random_layout(rng, zh, merged)
        s = render_table(cells, n_rows, n_cols, zh=zh, ruled=ruled, rng=rng,
                         header_rule=ruled or rng.random() < 0.7)
    if category == "rotated":
        s = rotate(s, rng.choice((-1, 1)) * rng.uniform(1.0, 3.0))
    elif category == "jpeg_noise":
        s = degrade(s, rng)
    elif category == "photo_bg":
        s = place_on_photo(s, rng, mode=rng.choice(("paper", "texture")))
        if rng.random() < 0.5:
            s = rotate(s, rng.uniform(-3.0, 3.0))
        s = degrade(s, rng, quality=rng.randint(60, 85), sigma=rng.uniform(2, 5))
    s.category = category
    return s


def no_table_images() -> list[np.ndarray]:
    """Images that contain no table: a photo, a text paragraph, a single-line caption, and from
    scikit-image a scanned book page, printed text and a chessboard (a grid with no text)."""
    photo = np.asarray(_photo("chelsea.png"))
    img = Image.new("RGB", (640, 260), "white")
    d = ImageDraw.Draw(img)
    f = load_font(False, 20)
    lines = ["The quick brown fox jumps over the lazy dog while the", "committee discussed the budget for next year and",
             "agreed to publish the minutes on Friday afternoon."]
    for i, line in enumerate(lines):
        d.text((24, 30 + i * 34), line, font=f, fill=(20, 20, 20))
    caption = Image.new("RGB", (480, 120), (245, 240, 230))
    ImageDraw.Draw(caption).text((30, 40), "Hello world 2024", font=load_font(False, 28), fill=(0, 0, 0))
    scans = [np.asarray(_photo(n)) for n in ("page.png", "text.png", "chessboard_RGB.png")]
    return [photo, np.asarray(img), np.asarray(caption), *scans]
