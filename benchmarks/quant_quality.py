"""Answer quality of engine options that change the model's numbers, against a reference engine.

    python benchmarks/quant_quality.py OUT --model Qwen/Qwen3-VL-4B-Instruct --device cuda \\
        --reference-json '{"quantization": "fp8"}' --requests 64    # variants: head, vision, both

Why: one H200 at the 24 GB cap held 24 QPS only with ``lm_head_quantization: fp8`` and
``vision_quantization: fp8`` (RESULTS.md, "24 QPS held for 5 minutes with both FP8 options"). Both
move the logits, so they stay off until answers are checked on trained weights. Random weights
cannot tell (their logits are near-ties everywhere), and no weights can be downloaded where this
project is built: this is the check to run where they can, before turning the options on.

What it runs: the article's request classes with their prompts and images from the load
generator's pool (generated scenes and scikit-image photos, JPEG quality 40-75), resized by
Preprocess's own pipeline; greedy, each class's ``max_tokens`` (capped by ``--max-tokens``), no
``ignore_eos``: a trained model's answers end where it ends them. Engines run one at a time in
this process: the reference (``--engine-json`` + ``--reference-json``), the reference again (the
noise floor: another run batches the rows differently, and the rounding with it), then each
variant (the reference's settings + the variant's). Against the reference's answers, each reports:

- identical answers (share) and the first differing token (median over requests);
- teacher-forced agreement: at every ``--stride``-th token of the reference's answer, the engine's
  greedy token after the prompt plus the reference's answer up to there. A free answer differs
  everywhere after one early flip; this counts each position on its own.

A variant whose teacher-forced agreement sits at the noise floor changes answers no more than
batching does. The first ``--show`` answers of each engine go into the Markdown, side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen.workload import Workload  # noqa: E402
from serve_app._chat import split_images  # noqa: E402
from serve_app._image_pipeline import ImagePipeline, PreprocessOptions  # noqa: E402
from serve_app._prompt import PromptBuilder  # noqa: E402
from serve_app.protocol import ChatCompletionRequest  # noqa: E402
from serve_app.engine import EngineRequest, SamplingParams, create_engine  # noqa: E402
from serve_app.engine.config import EngineConfig  # noqa: E402


def build_prompts(tokenizer, n: int, seed: int, pool_seed: int, pool_size: int, max_pixels: int,
                  max_tokens: int) -> list[dict]:
    """``n`` first turns as the loadgen draws them (class mix, prompts, pooled images), made into
    prompt ids the way the app does: its chat split, Preprocess's pipeline, the prompt builder."""
    workload = Workload("quality", pool_size=pool_size, seed=seed, pool_seed=pool_seed, unique_images=False)
    pipeline = ImagePipeline(PreprocessOptions(max_pixels=max_pixels, resize_threads=1))
    builder = PromptBuilder(tokenizer)
    lengths = {c.name: c.max_tokens for c in workload.classes}
    out = []
    for _ in range(n):
        cls, messages = workload.first_turn()
        req = ChatCompletionRequest(model="quality", messages=messages)
        chat, sources = split_images(req, pipeline.limits.max_images_per_request)
        images = pipeline.process(sources)
        out.append({"cls": cls.name, "text": chat[0]["content"][0]["text"],
                    "prompt_ids": builder.build(chat, images), "images": images,
                    "max_tokens": min(lengths[cls.name], max_tokens)})
    return out


def forced_positions(length: int, stride: int) -> list[int]:
    """Where the teacher-forced check asks for the next token: 0, stride, 2 x stride, ... < length."""
    return list(range(0, length, max(1, stride)))


def first_difference(ref: list[int], got: list[int]) -> int:
    """Index of the first differing token; the shorter length if one is a prefix of the other,
    and ``len(ref)`` when equal."""
    for i, (a, b) in enumerate(zip(ref, got)):
        if a != b:
            return i
    return len(ref) if len(ref) == len(got) else min(len(ref), len(got))


def compare(ref: list[list[int]], answers: list[list[int]], forced: list[list[tuple[int, int]]]) -> dict:
    """One engine against the reference: answers identical, first difference, forced agreement.
    ``forced[i]`` holds (reference token, engine token) at request i's checked positions."""
    firsts = [first_difference(r, a) for r, a in zip(ref, answers)]
    pairs = [p for f in forced for p in f]
    return {"requests": len(ref), "identical": sum(r == a for r, a in zip(ref, answers)) / len(ref),
            "first_difference_median": statistics.median(firsts),
            "first_difference_mean": statistics.mean(firsts),
            "forced_positions": len(pairs),
            "forced_agreement": sum(a == b for a, b in pairs) / len(pairs) if pairs else None,
            "mean_answer_tokens": statistics.mean(len(a) for a in answers)}


async def generate(engine, prompts: list[dict], tag: str, extra: list[list[int]] | None = None,
                   max_tokens: int | None = None) -> list[list[int]]:
    """Greedy token ids per prompt (all submitted at once); ``extra[i]`` is appended to prompt i."""
    async def one(i: int, p: dict) -> list[int]:
        ids = p["prompt_ids"] + (extra[i] if extra else [])
        req = EngineRequest(f"{tag}-{i}", ids, p["images"],
                            SamplingParams(max_tokens=max_tokens or p["max_tokens"], temperature=0.0))
        toks: list[int] = []
        async for d in engine.generate(req):
            toks.extend(d.token_ids)
        return toks
    return list(await asyncio.gather(*[one(i, p) for i, p in enumerate(prompts)]))


async def run_engine(settings: dict, prompts: list[dict], ref: list[list[int]] | None, stride: int,
                     tag: str) -> dict:
    """Start an engine, take its free answers and (against ``ref``) its teacher-forced tokens."""
    cfg = EngineConfig(**settings)
    engine = create_engine(cfg)
    t0 = time.perf_counter()
    await engine.start()
    try:
        answers = await generate(engine, prompts, tag)
        forced: list[list[tuple[int, int]]] = []
        if ref is not None:
            jobs = [(i, k) for i, r in enumerate(ref) for k in forced_positions(len(r), stride)]
            flat = [prompts[i] for i, _ in jobs]
            got = await generate(engine, flat, f"{tag}-forced", [ref[i][:k] for i, k in jobs], max_tokens=1)
            forced = [[] for _ in ref]
            for (i, k), g in zip(jobs, got):
                forced[i].append((ref[i][k], g[0] if g else -1))
        texts = [engine.tokenizer.decode(a, skip_special_tokens=True) for a in answers]
        health = engine.health()
    finally:
        await engine.shutdown()
    return {"answers": answers, "texts": texts, "forced": forced, "seconds": time.perf_counter() - t0,
            "quantization": {k: health.get(k) for k in ("quantization", "vision_quantization",
                                                        "lm_head_quantization", "kv_cache_dtype")
                             if k in health}}


async def run(a) -> dict:
    base = {"model": a.model, "engine": "continuous", "device": a.device, "dtype": a.dtype,
            **json.loads(a.engine_json)}
    reference = {**base, **json.loads(a.reference_json)}
    variants = json.loads(a.variants)
    for name, v in variants.items():        # a bad option fails here, before any engine starts
        EngineConfig(**{**reference, **v})
    EngineConfig(**reference)
    from serve_app.models import load_tokenizer, resolve_model
    tokenizer = load_tokenizer(resolve_model(a.model))
    prompts = build_prompts(tokenizer, a.requests, a.seed, a.pool_seed, a.pool_size, a.max_pixels,
                            a.max_tokens)
    ref = await run_engine(reference, prompts, None, a.stride, "ref")
    runs = {}
    engines = ([("reference again", {})] if not a.no_repeat else []) + list(variants.items())
    for name, v in engines:
        r = await run_engine({**reference, **v}, prompts, ref["answers"], a.stride, name)
        runs[name] = {"options": v, "seconds": r["seconds"], "quantization": r["quantization"],
                      **compare(ref["answers"], r["answers"], r["forced"]),
                      "answers": r["answers"], "texts": r["texts"]}
    return {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python " + shlex.join(sys.argv), "reference": {"settings": reference, "answers": ref["answers"],
                                                        "texts": ref["texts"], "seconds": ref["seconds"]},
            "prompts": [{"cls": p["cls"], "text": p["text"], "prompt_tokens": len(p["prompt_ids"]),
                         "grids": [im.grid_thw for im in p["images"]]} for p in prompts],
            "runs": runs}


def markdown(res: dict, show: int) -> str:
    lines = [f"# Answer quality against the reference, {res['date']}", "", f"`{res['command']}`", "",
             f"Reference: `{json.dumps(res['reference']['settings'])}`", "",
             "| engine | options | identical answers | first differing token (median / mean) | "
             "teacher-forced agreement (positions) | mean answer tokens |", "|---|---|---|---|---|---|"]
    for name, r in res["runs"].items():
        fa = "-" if r["forced_agreement"] is None else f"{r['forced_agreement']:.3f}"
        lines.append(f"| {name} | `{json.dumps(r['options'])}` | {r['identical']:.2f} | "
                     f"{r['first_difference_median']:g} / {r['first_difference_mean']:.1f} | "
                     f"{fa} ({r['forced_positions']}) | {r['mean_answer_tokens']:.1f} |")
    for i, p in enumerate(res["prompts"][:show]):
        lines += ["", f"## Request {i}: {p['cls']}, {p['prompt_tokens']} prompt tokens", "", f"> {p['text']}",
                  "", f"- reference: {res['reference']['texts'][i]!r}"]
        lines += [f"- {name}: {r['texts'][i]!r}" for name, r in res["runs"].items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder for quality.json and quality.md")
    p.add_argument("--model", default="builtin:tiny-qwen3-vl")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--engine-json", default="{}", help="engine settings of every run")
    p.add_argument("--reference-json", default="{}", help="the reference's own settings")
    p.add_argument("--variants", default='{"head": {"lm_head_quantization": "fp8"}, '
                                         '"vision": {"vision_quantization": "fp8"}, "both": '
                                         '{"lm_head_quantization": "fp8", "vision_quantization": "fp8"}}',
                   help='JSON {name: engine settings added to the reference\'s}')
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=192, help="cap on each class's answer length")
    p.add_argument("--stride", type=int, default=8, help="teacher-forced check at every N-th token")
    p.add_argument("--seed", type=int, default=0, help="classes, prompts and image picks")
    p.add_argument("--pool-seed", type=int, default=2, help="the image pool (2: the workload's expected size)")
    p.add_argument("--pool-size", type=int, default=32)
    p.add_argument("--max-pixels", type=int, default=2359296, help="as deployments.gpu.yaml's images.max_pixels")
    p.add_argument("--show", type=int, default=8, help="answers written side by side")
    p.add_argument("--no-repeat", action="store_true", help="skip the reference's second run (the noise floor)")
    a = p.parse_args(argv)
    res = asyncio.run(run(a))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(res, indent=1))
    (out / "quality.md").write_text(markdown(res, a.show))
    print(markdown(res, 0), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
