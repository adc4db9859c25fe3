"""Tables through the real service: POST /v1/tables and table questions in chat (EN + ZH)."""

from __future__ import annotations

import base64
import csv
import io

import httpx
import pytest
from PIL import Image, ImageDraw, ImageFont

from conftest import data_url, jpeg_bytes

pytestmark = pytest.mark.slow

EN = [["Item", "Qty", "Price"], ["Apple", "12", "3.50"], ["Banana", "7", "1.25"], ["Cherry", "40", "9.80"]]
ZH = [["城市", "人口", "面积"], ["北京", "2189", "16410"], ["上海", "2487", "6340"], ["广州", "1881", "7434"]]
FONTS = {False: "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
         True: "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc"}


def table_png(rows: list[list[str]], zh: bool = False) -> bytes:
    """A ruled table drawn with PIL, big and clean, on white."""
    font = ImageFont.truetype(FONTS[zh], 30)
    cw, ch, pad = 220, 64, 40
    w, h = pad * 2 + cw * len(rows[0]), pad * 2 + ch * len(rows)
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    for i in range(len(rows) + 1):
        d.line([(pad, pad + i * ch), (w - pad, pad + i * ch)], fill="black", width=2)
    for j in range(len(rows[0]) + 1):
        d.line([(pad + j * cw, pad), (pad + j * cw, h - pad)], fill="black", width=2)
    for i, row in enumerate(rows):
        for j, text in enumerate(row):
            d.text((pad + j * cw + 20, pad + i * ch + 14), text, fill="black", font=font)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def en_png():
    return table_png(EN)


@pytest.fixture(scope="module")
def zh_png():
    if not __import__("os").path.exists(FONTS[True]):
        pytest.skip("CJK font missing (apt-get install fonts-wqy-microhei)")
    return table_png(ZH, zh=True)


def grid_of(table: dict) -> list[list[str]]:
    g = [[""] * table["n_cols"] for _ in range(table["n_rows"])]
    for c in table["cells"]:
        g[c["row"]][c["col"]] = c["text"]
    return g


def test_tables_json_multipart(serve_url, en_png):
    r = httpx.post(f"{serve_url}/v1/tables", files={"file": ("t.png", en_png, "image/png")}, timeout=120)
    assert r.status_code == 200, r.text
    tables = r.json()["data"]
    assert len(tables) == 1
    assert grid_of(tables[0]) == EN
    cell = next(c for c in tables[0]["cells"] if c["text"] == "Banana")
    assert (cell["row"], cell["col"], cell["rowspan"], cell["colspan"]) == (2, 0, 1, 1)
    x0, y0, x1, y1 = cell["bbox"]  # drawn at x 40..260, y 168..232 (±tolerance)
    assert 20 <= x0 < x1 <= 280 and 150 <= y0 < y1 <= 250
    assert 0 < cell["confidence"] <= 1


def test_tables_csv_html_and_image_ref(serve_url, en_png):
    up = httpx.post(f"{serve_url}/v1/images", content=en_png, headers={"content-type": "image/png"},
                    timeout=60).json()
    body = {"image": f"image://{up['image_id']}"}
    r = httpx.post(f"{serve_url}/v1/tables?format=csv", json=body, timeout=120)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert list(csv.reader(io.StringIO(r.text))) == EN
    r = httpx.post(f"{serve_url}/v1/tables?format=html", json=body, timeout=120)
    assert r.status_code == 200 and "<table" in r.text and "Cherry" in r.text
    r = httpx.post(f"{serve_url}/v1/tables?format=xml", json=body, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "format"


def test_no_table_gives_empty_list_and_bad_image_gives_preprocess_4xx(serve_url):
    r = httpx.post(f"{serve_url}/v1/tables", json={"image": data_url(jpeg_bytes(640, 480))}, timeout=120)
    assert r.status_code == 200 and r.json()["data"] == []
    bad = "data:image/png;base64," + base64.b64encode(b"not an image at all" * 10).decode()
    r = httpx.post(f"{serve_url}/v1/tables", json={"image": bad}, timeout=30)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_image_format"
    r = httpx.post(f"{serve_url}/v1/tables", content=b"x", headers={"content-type": "text/plain"})
    assert r.status_code == 415


def _ask(client, model_name, messages):
    raw = client.chat.completions.with_raw_response.create(model=model_name, messages=messages,
                                                           max_tokens=16, temperature=0)
    return raw.headers.get("x-serve-app-route"), raw.parse()


def test_chat_table_question_english_exact(client, model_name, en_png):
    img = {"type": "image_url", "image_url": {"url": data_url(en_png, "image/png")}}
    messages = [{"role": "user", "content": [img, {"type": "text", "text": "Here is my invoice."}]},
                {"role": "assistant", "content": "OK."},
                {"role": "user", "content": "What is in row 3 of the table in the last image?"}]
    route, r = _ask(client, model_name, messages)
    assert route == "table-exact"
    text = r.choices[0].message.content
    for v in EN[2]:  # row 3 (header is row 1): Banana, 7, 1.25
        assert v in text
    assert "Apple" not in text and "Cherry" not in text


def test_chat_table_question_chinese_exact(client, model_name, zh_png):
    img = {"type": "image_url", "image_url": {"url": data_url(zh_png, "image/png")}}
    messages = [{"role": "user", "content": [img, {"type": "text", "text": "这是一张统计表。"}]},
                {"role": "assistant", "content": "好的。"},
                {"role": "user", "content": "上一张图里的表格第三行数据是多少?"}]
    route, r = _ask(client, model_name, messages)
    assert route == "table-exact"
    text = r.choices[0].message.content
    for v in ZH[2]:  # 上海 2487 6340
        assert v in text
    assert "北京" not in text


def test_chat_non_table_question_goes_to_the_vlm(client, model_name, en_png):
    img = {"type": "image_url", "image_url": {"url": data_url(en_png, "image/png")}}
    route, r = _ask(client, model_name, [{"role": "user", "content": [
        img, {"type": "text", "text": "Put the book on the table, please. What colour is it?"}]}])
    assert route is None and r.usage.prompt_tokens > 0 and r.usage.completion_tokens >= 1


def test_chat_unspecific_table_question_gives_the_vlm_the_table(client, model_name, en_png):
    """No row/column named: the extracted table goes into the prompt as context, so the same image
    and a same-length question costs many more prompt tokens than one that is not about a table."""
    img = {"type": "image_url", "image_url": {"url": data_url(en_png, "image/png")}}
    route, r = _ask(client, model_name, [{"role": "user", "content": [
        img, {"type": "text", "text": "What data is in the table of this image?"}]}])
    control_route, control = _ask(client, model_name, [{"role": "user", "content": [
        img, {"type": "text", "text": "What data is in the photo of this image?"}]}])
    assert route == "table-context" and control_route is None
    assert r.usage.completion_tokens >= 1
    # the context holds every cell of the 4x3 table plus an instruction: dozens of tokens
    assert r.usage.prompt_tokens - control.usage.prompt_tokens >= 40
