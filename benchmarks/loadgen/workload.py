"""The article's request mix: four question classes over pre-encoded JPEGs, in multi-turn sessions.

Images are generated and JPEG-encoded once, before any request is sent, so the client never becomes
the bottleneck. Each new conversation still gets *unique* image bytes (a JPEG comment segment holding
a nonce is spliced in after the SOI marker), so the server's content-hash caches (Preprocess tensors,
VLM vision embeddings) only hit when a conversation re-sends its own history, as a real client does.
"""

from __future__ import annotations

import base64
import io
import itertools
import logging
import math
import random
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger("loadgen")

# Sizes between 640x480 and 1920x1080, the range the article's clients sent.
RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (640, 480), (800, 600), (960, 540), (1024, 768), (1280, 720), (1280, 960), (1366, 768),
    (1600, 900), (1440, 1080), (1920, 1080))

_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry",
           "retina", "camera")


@dataclass(frozen=True)
class RequestClass:
    name: str
    weight: float           # share of requests
    max_tokens: int         # forced output length (ignore_eos + min_tokens = max_tokens)
    n_images: int
    prompts: tuple[str, ...]
    follow_ups: tuple[str, ...]


DEFAULT_CLASSES: tuple[RequestClass, ...] = (
    RequestClass("short_description", 0.30, 48, 1,
                 ("Describe this image in one short sentence.",
                  "What is shown here? Answer in under 100 characters.",
                  "Give a one-line caption for this picture."),
                 ("And the main colour?", "Is it indoors or outdoors? One word.")),
    RequestClass("detail_recognition", 0.40, 128, 1,
                 ("Read every number visible in the image and give the pixel coordinates (x, y) of each.",
                  "List the labels in this picture with their bounding boxes as x1,y1,x2,y2.",
                  "How many distinct objects are there? Give the centre coordinates of each."),
                 ("Which of those values is the largest, and where is it?",
                  "Now give the same coordinates normalised to 0-1000.")),
    RequestClass("cross_region_reasoning", 0.20, 192, 1,
                 ("Compare the upper-left quarter of the image with the lower-right quarter: what "
                  "changes, and what might explain it? Reason step by step.",
                  "Relate the object in the centre to what is at the edges of the picture, and infer "
                  "what is happening.",
                  "If the left half continued to the right, what would be different? Explain."),
                 ("Why do you think so? Cite the regions you used.",
                  "What would change your conclusion?")),
    RequestClass("two_image_comparison", 0.10, 128, 2,
                 ("What are the differences between these two images?",
                  "Compare the two pictures: which one has more detail, and where?",
                  "Do these two images show the same scene? Justify briefly."),
                 ("Which differences matter most?", "Describe what the second image adds.")),
)


def classes_with_tokens(tokens: dict[str, int] | None,
                        classes: tuple[RequestClass, ...] = DEFAULT_CLASSES) -> tuple[RequestClass, ...]:
    """The default classes with some output lengths replaced (``{"detail_recognition": 64}``)."""
    if not tokens:
        return classes
    unknown = set(tokens) - {c.name for c in classes}
    if unknown:
        raise ValueError(f"unknown request classes {sorted(unknown)}; known: {[c.name for c in classes]}")
    return tuple(RequestClass(c.name, c.weight, int(tokens.get(c.name, c.max_tokens)), c.n_images,
                              c.prompts, c.follow_ups) for c in classes)


def mean_output_tokens(classes: tuple[RequestClass, ...]) -> float:
    total = sum(c.weight for c in classes)
    return sum(c.weight * c.max_tokens for c in classes) / total


# ---------------------------------------------------------------------------------------- images
def _photo(name: str) -> np.ndarray:
    from skimage import data

    arr = getattr(data, name)()
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    return np.ascontiguousarray(arr[..., :3]).astype(np.uint8)


def _generated(rng: np.random.Generator, w: int, h: int):
    """A synthetic 'document-like' picture: gradient, shapes, numbers and labels at known places."""
    from PIL import Image, ImageDraw

    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = (x / w * rng.uniform(0.2, 1) + y / h * rng.uniform(0.2, 1))[..., None] / 2
    base = (c0 * (1 - t) + c1 * t + rng.normal(0, 6, (h, w, 3))).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(base)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(6, 20))):
        x0, y0 = int(rng.integers(0, w - 40)), int(rng.integers(0, h - 40))
        x1, y1 = x0 + int(rng.integers(20, w // 4)), y0 + int(rng.integers(20, h // 4))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), outline=colour,
                                                                   width=3)
        draw.text((x0 + 4, y0 + 4), f"{rng.integers(0, 10000)}", fill=(0, 0, 0))
    return img


def make_image(rng: np.random.Generator, w: int, h: int, quality: int, kind: str) -> bytes:
    """One JPEG of size ``w`` x ``h``: a bundled scikit-image photo (cropped/resized) or generated."""
    from PIL import Image

    if kind == "generated":
        img = _generated(rng, w, h)
    else:
        arr = _photo(kind)
        ph, pw = arr.shape[:2]
        # random crop with the target aspect ratio, then resize: varied content per image
        scale = rng.uniform(0.6, 1.0)
        cw = min(pw, int(ph * w / h * scale)) or pw
        ch = min(ph, int(cw * h / w)) or ph
        x0, y0 = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
        img = Image.fromarray(arr[y0:y0 + ch, x0:x0 + cw]).resize((w, h), Image.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(quality))
    return buf.getvalue()


def have_photos() -> bool:
    try:
        import skimage.data  # noqa: F401
    except ImportError:
        return False
    return True


_COM_PAYLOAD = 18   # SOI(2) + COM marker(2) + length(2) + 18 bytes = 24: base64 splits cleanly at 3 bytes


@dataclass
class PooledImage:
    """A JPEG encoded once; :meth:`data_url` re-labels it with a nonce in O(1) base64 work."""

    jpeg: bytes
    width: int
    height: int
    quality: int
    kind: str
    _tail_b64: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.jpeg[:2] != b"\xff\xd8":
            raise ValueError("not a JPEG")
        self._tail_b64 = base64.b64encode(self.jpeg[2:]).decode()

    def data_url(self, nonce: int | None = None) -> str:
        if nonce is None:
            return "data:image/jpeg;base64," + base64.b64encode(self.jpeg).decode()
        return "data:image/jpeg;base64," + base64.b64encode(unique_prefix(nonce)).decode() + self._tail_b64


def unique_prefix(nonce: int) -> bytes:
    """SOI + a COM segment carrying ``nonce``: prepended to a JPEG's bytes after its own SOI."""
    payload = f"lg{nonce:016x}".encode()[:_COM_PAYLOAD].ljust(_COM_PAYLOAD, b" ")
    return b"\xff\xd8\xff\xfe" + struct.pack(">H", _COM_PAYLOAD + 2) + payload


def with_nonce(jpeg: bytes, nonce: int) -> bytes:
    """The JPEG ``jpeg`` made unique by a comment segment (what :meth:`PooledImage.data_url` sends)."""
    return unique_prefix(nonce) + jpeg[2:]


def build_image_pool(n: int, seed: int = 0, quality: tuple[int, int] = (40, 75),
                     resolutions: tuple[tuple[int, int], ...] = RESOLUTIONS,
                     generated_share: float = 0.5) -> list[PooledImage]:
    """``n`` JPEGs: sizes from ``resolutions``, quality uniform in ``quality``, half of them generated."""
    rng = np.random.default_rng(seed)
    pool = []
    photos = itertools.cycle(_PHOTOS)
    if not have_photos():
        log.warning("scikit-image is not installed: generated images only (pip install scikit-image)")
        generated_share = 1.0
    for _ in range(n):
        w, h = resolutions[int(rng.integers(0, len(resolutions)))]
        q = int(rng.integers(quality[0], quality[1] + 1))
        kind = "generated" if rng.random() < generated_share else next(photos)
        pool.append(PooledImage(make_image(rng, w, h, q, kind), w, h, q, kind))
    return pool


# ----------------------------------------------------------------------------------- requests
@dataclass
class Turn:
    """One request to send: the body plus what the result is labelled with."""

    cls: str
    body: dict[str, Any]
    turn: int               # 0 = first turn of a conversation


class Workload:
    """Draws request classes by weight and builds OpenAI chat bodies (streaming, forced lengths)."""

    def __init__(self, model: str, classes: tuple[RequestClass, ...] = DEFAULT_CLASSES,
                 pool: list[PooledImage] | None = None, pool_size: int = 32, seed: int = 0,
                 unique_images: bool = True, force_lengths: bool = True, temperature: float = 0.7,
                 top_p: float = 0.95, pool_seed: int | None = None):
        if not classes or any(c.weight < 0 for c in classes) or sum(c.weight for c in classes) <= 0:
            raise ValueError("classes need non-negative weights with a positive sum")
        self.model, self.classes = model, classes
        self.pool_seed = seed if pool_seed is None else pool_seed   # recorded: the pool sets the prompt size
        self.pool = pool if pool is not None else build_image_pool(pool_size, self.pool_seed)
        if not self.pool:
            raise ValueError("empty image pool")
        self.unique_images, self.force_lengths = unique_images, force_lengths
        self.temperature, self.top_p = temperature, top_p
        self._rng = random.Random(seed)
        self._nonce = itertools.count(random.Random(seed ^ 0x5EED).getrandbits(40))
        self._weights = [c.weight for c in classes]

    def pick_class(self) -> RequestClass:
        return self._rng.choices(self.classes, weights=self._weights)[0]

    def _sampling(self, cls: RequestClass) -> dict[str, Any]:
        out: dict[str, Any] = {"max_tokens": cls.max_tokens, "temperature": self.temperature,
                               "stream": True, "stream_options": {"include_usage": True}}
        if self.temperature > 0 and self.top_p < 1:
            out["top_p"] = self.top_p
        if self.force_lengths:
            out.update(ignore_eos=True, min_tokens=cls.max_tokens)
        return out

    def first_turn(self, cls: RequestClass | None = None) -> tuple[RequestClass, list[dict]]:
        """A new conversation's opening user message (with its image parts)."""
        cls = cls or self.pick_class()
        parts: list[dict] = [{"type": "text", "text": self._rng.choice(cls.prompts)}]
        for _ in range(cls.n_images):
            img = self._rng.choice(self.pool)
            url = img.data_url(next(self._nonce) if self.unique_images else None)
            parts.append({"type": "image_url", "image_url": {"url": url}})
        return cls, [{"role": "user", "content": parts}]

    def body(self, cls: RequestClass, messages: list[dict]) -> dict[str, Any]:
        return {"model": self.model, "messages": messages, **self._sampling(cls)}

    def single(self) -> Turn:
        """An independent one-turn request (the open loop's unit of arrival)."""
        cls, messages = self.first_turn()
        return Turn(cls.name, self.body(cls, messages), 0)


class Conversation:
    """A closed-loop session's multi-turn chat: images in the first turn, text follow-ups after.

    After ``turns`` exchanges it starts over with a new class and new images, so prompts stay about
    the article's size (~1.1k tokens) instead of growing without bound.
    """

    def __init__(self, workload: Workload, turns: int = 3):
        if turns < 1:
            raise ValueError("turns must be >= 1")
        self.w, self.turns = workload, turns
        self.cls: RequestClass | None = None
        self.messages: list[dict] = []
        self.turn = 0

    def next_turn(self) -> Turn:
        if self.cls is None or self.turn >= self.turns:
            self.cls, self.messages = self.w.first_turn()
            self.turn = 0
        else:
            self.messages.append({"role": "user", "content": self.w._rng.choice(self.cls.follow_ups)})
        return Turn(self.cls.name, self.w.body(self.cls, list(self.messages)), self.turn)

    def record_answer(self, text: str) -> None:
        """Append the assistant's reply (a failed turn calls :meth:`reset` instead)."""
        self.messages.append({"role": "assistant", "content": text})
        self.turn += 1

    def reset(self) -> None:
        self.cls, self.messages, self.turn = None, [], 0


def poisson_arrivals(qps: float, duration_s: float, rng: random.Random,
                     max_requests: int | None = None) -> list[float]:
    """Arrival offsets (s) of a Poisson process of rate ``qps`` within ``[0, duration_s)``."""
    if qps <= 0 or duration_s <= 0:
        return []
    out, t = [], 0.0
    while True:
        t += rng.expovariate(qps)
        if t >= duration_s or (max_requests is not None and len(out) >= max_requests):
            return out
        out.append(t)


def expected_image_tokens(w: int, h: int, factor: int = 32) -> int:
    """Qwen3-VL's visual tokens for a ``w`` x ``h`` image under the default pixel bounds."""
    hb, wb = max(factor, round(h / factor) * factor), max(factor, round(w / factor) * factor)
    return hb * wb // (factor * factor)


def pool_summary(pool: list[PooledImage]) -> dict[str, Any]:
    sizes = [len(p.jpeg) for p in pool]
    return {"images": len(pool), "generated": sum(p.kind == "generated" for p in pool),
            "mean_jpeg_kb": round(sum(sizes) / len(sizes) / 1024, 1),
            "mean_image_tokens": round(sum(expected_image_tokens(p.width, p.height) for p in pool)
                                       / len(pool)),
            "quality_range": [min(p.quality for p in pool), max(p.quality for p in pool)],
            "min_size": min((p.width, p.height) for p in pool),
            "max_size": max((p.width, p.height) for p in pool),
            "geomean_pixels": round(math.exp(sum(math.log(p.width * p.height) for p in pool)
                                             / len(pool)))}
