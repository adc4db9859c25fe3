"""benchmarks/quant_quality.py: the answer-quality check of the options that change the model's
numbers. Its comparison and teacher-forcing plumbing against a fake engine whose next token is a
known function of the prompt, then end to end on the tiny model on the CPU."""

from __future__ import annotations

import asyncio
import json

import pytest

from benchmarks import quant_quality as qq
from serve_app.engine.protocol import TokenDelta


def test_first_difference_and_forced_positions():
    assert qq.first_difference([1, 2, 3], [1, 2, 3]) == 3
    assert qq.first_difference([1, 2, 3], [1, 9, 3]) == 1
    assert qq.first_difference([1, 2, 3], [1, 2]) == 2          # stopped early: differs at its end
    assert qq.first_difference([1, 2], [1, 2, 3]) == 2
    assert qq.forced_positions(10, 4) == [0, 4, 8] and qq.forced_positions(0, 4) == []
    assert qq.forced_positions(3, 0) == [0, 1, 2]


def test_compare_counts_answers_and_forced_positions():
    ref = [[1, 2, 3, 4], [5, 6]]
    got = [[1, 2, 3, 4], [5, 7]]
    forced = [[(1, 1), (3, 3)], [(5, 5), (6, 9)]]
    r = qq.compare(ref, got, forced)
    assert r["identical"] == 0.5 and r["first_difference_median"] == 2.5
    assert r["forced_positions"] == 4 and r["forced_agreement"] == 0.75
    assert r["mean_answer_tokens"] == 3.0


class _Tok:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


class _FakeEngine:
    """Greedy 'model': the next token is (sum of all ids so far + shift) % 50, so a teacher-forced
    token is known exactly from the prefix it was given."""

    def __init__(self, shift: int):
        self.shift, self.tokenizer, self.prompts = shift, _Tok(), []

    async def start(self):
        pass

    async def shutdown(self):
        pass

    def health(self):
        return {"ready": True, "quantization": "fake"}

    async def generate(self, req):
        self.prompts.append(list(req.prompt_token_ids))
        ids = list(req.prompt_token_ids)
        for i in range(req.sampling.max_tokens):
            t = (sum(ids) + self.shift) % 50
            ids.append(t)
            yield TokenDelta(req.request_id, str(t), [t], len(req.prompt_token_ids), i + 1,
                             "length" if i + 1 == req.sampling.max_tokens else None)


def test_teacher_forcing_asks_at_each_stride_after_the_reference_prefix(monkeypatch):
    """The same fake model agrees everywhere; another one (shifted) is asked after the reference's
    own prefix at every stride, so each forced token is the shifted model's token for that prefix."""
    made = []

    def fake_create(cfg):
        made.append(_FakeEngine(cfg.max_num_seqs))   # the shift rides in a real EngineConfig field
        return made[-1]

    monkeypatch.setattr(qq, "create_engine", fake_create)
    prompts = [{"prompt_ids": [3, 4], "images": [], "max_tokens": 7},
               {"prompt_ids": [10], "images": [], "max_tokens": 3}]
    settings = {"model": "builtin:tiny-qwen3-vl", "device": "cpu", "max_num_seqs": 4}
    ref = asyncio.run(qq.run_engine(settings, prompts, None, 3, "ref"))
    assert [len(a) for a in ref["answers"]] == [7, 3] and ref["forced"] == []
    assert ref["texts"][1] == " ".join(map(str, ref["answers"][1]))
    same = asyncio.run(qq.run_engine(settings, prompts, ref["answers"], 3, "same"))
    assert same["answers"] == ref["answers"]
    assert [len(f) for f in same["forced"]] == [3, 1] and all(a == b for f in same["forced"] for a, b in f)
    other = asyncio.run(qq.run_engine({**settings, "max_num_seqs": 5}, prompts, ref["answers"], 3, "other"))
    for i, positions in enumerate(other["forced"]):
        for (want, got), k in zip(positions, qq.forced_positions(len(ref["answers"][i]), 3)):
            prefix = prompts[i]["prompt_ids"] + ref["answers"][i][:k]
            assert want == ref["answers"][i][k] and got == (sum(prefix) + 5) % 50
    # the forced requests were one token each, after exactly those prefixes
    assert made[-1].prompts[2:] == [[3, 4], [3, 4] + ref["answers"][0][:3], [3, 4] + ref["answers"][0][:6], [10]]
    r = qq.compare(ref["answers"], other["answers"], other["forced"])
    assert r["identical"] == 0 and r["forced_agreement"] < 1


@pytest.mark.slow
def test_tiny_model_end_to_end_on_the_cpu(tmp_path):
    """The workload's real prompts and images through Preprocess's pipeline into the CPU engine:
    the reference run twice agrees with itself everywhere (fp32, the same batches), the FP8 head is
    compared position by position, and the JSON and Markdown carry every run and the answers."""
    assert qq.main([str(tmp_path), "--device", "cpu", "--dtype", "float32", "--requests", "3",
                    "--max-tokens", "6", "--stride", "2", "--engine-json", '{"max_num_seqs": 4}',
                    "--variants", '{"head": {"quantization": "fp8", "lm_head_quantization": "fp8"}}',
                    "--show", "2"]) == 0
    res = json.loads((tmp_path / "quality.json").read_text())
    assert list(res["runs"]) == ["reference again", "head"]
    again, head = res["runs"]["reference again"], res["runs"]["head"]
    assert again["identical"] == 1.0 and again["forced_agreement"] == 1.0
    assert again["forced_positions"] == head["forced_positions"] == 3 * 3   # 6 tokens, every 2nd
    assert 0.0 <= head["forced_agreement"] <= 1.0
    assert head["quantization"]["lm_head_quantization"] == "fp8"
    assert all(p["prompt_tokens"] > 100 and p["grids"] for p in res["prompts"])   # real images
    assert all(len(a) == 6 for a in res["reference"]["answers"])
    md = (tmp_path / "quality.md").read_text()
    assert "| reference again | `{}` | 1.00 |" in md and "## Request 1:" in md and "## Request 2:" not in md
    with pytest.raises(ValueError, match="fp8"):     # a bad option fails before any engine starts
        qq.main([str(tmp_path / "bad"), "--device", "cpu", "--variants", '{"x": {"quantization": "int4"}}'])
