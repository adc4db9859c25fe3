"""Chat messages + preprocessed images -> prompt token ids, the way Qwen's processor does it.

The model's own chat template renders one ``<|image_pad|>`` per image; each is then expanded to
``t*h*w / merge**2`` copies (the image's tokens). We tokenise the text between image pads and
splice the pad ids in, which equals tokenising the expanded string (pads are special tokens, so BPE
never merges across them) and is much faster for large images.
"""

from __future__ import annotations

from typing import Any, Sequence

from serve_app.engine.protocol import ImageInput
from serve_app.errors import ServeAppError

IMAGE_PAD = "<|image_pad|>"


class PromptBuilder:
    def __init__(self, tokenizer: Any, merge_size: int = 2):
        self.tokenizer = tokenizer
        self.merge_size = merge_size
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        if self.image_token_id is None or self.image_token_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {IMAGE_PAD} token; not a Qwen-VL tokenizer")

    def render(self, messages: Sequence[dict]) -> str:
        """The chat template's text, with one image pad per image (generation prompt appended)."""
        try:
            return self.tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                      add_generation_prompt=True)
        except Exception as e:  # template errors are the client's message structure
            raise ServeAppError(f"messages cannot be rendered with the model's chat template: {e}",
                                400, "invalid_messages", "messages") from e

    def build(self, messages: Sequence[dict], images: Sequence[ImageInput]) -> list[int]:
        text = self.render(messages)
        pieces = text.split(IMAGE_PAD)
        if len(pieces) - 1 != len(images):
            raise ServeAppError(
                f"the prompt has {len(pieces) - 1} image placeholders but {len(images)} images",
                400, "image_count_mismatch", "messages")
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if piece:
                ids.extend(self.tokenizer.encode(piece, add_special_tokens=False))
            if i < len(images):
                ids.extend([self.image_token_id] * images[i].num_tokens(self.merge_size))
        return ids
