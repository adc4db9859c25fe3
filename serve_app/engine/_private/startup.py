"""Engine start-up: load the model, then size the KV cache and capture graphs in the order
their memory needs (FP8 plan timing before KV sizing, graphs after); what it did goes to
``/readyz`` as the engine's info."""

from __future__ import annotations

import logging
import time

import torch

from serve_app.engine._private.memory import plan_kv_tokens, vision_patch_budget
from serve_app.engine._private.runner import ModelRunner
from serve_app.engine.config import EngineConfig

logger = logging.getLogger(__name__)


def load_model_for(config: EngineConfig):
    """(model, tokenizer, device, eos ids, memory budget in bytes or None)."""
    from serve_app.engine.device import apply_memory_cap, pick_device, pick_dtype
    from serve_app.models import load_model, load_tokenizer, resolve_model

    path = resolve_model(config.model, config.cache_dir)
    device = pick_device(config)
    if device.type == "cuda" and device.index is None:  # the memory cap needs an index
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = pick_dtype(config, device)
    budget = apply_memory_cap(config, device)
    tokenizer = load_tokenizer(path)
    # On CUDA load to host first: the runner fuses projections there, then moves the model.
    model = load_model(path, dtype=dtype, device="cpu" if device.type == "cuda" else device)
    model.eval()
    gen = model.generation_config
    eos = gen.eos_token_id if gen.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    return model, tokenizer, device, eos_ids, budget


def build_runner(config: EngineConfig, model, device: torch.device, budget: int | None) -> tuple[ModelRunner, dict]:
    """The model runner with its KV cache and graphs, and the start-up info."""
    t0 = time.perf_counter()
    runner = ModelRunner(model, device, config.max_num_seqs, config.max_model_len,
                         quantization=config.quantization, kv_cache_dtype=config.kv_cache_dtype,
                         vision_quantization=config.vision_quantization, pdl=config.pdl,
                         decode_balance=config.decode_balance,
                         lm_head_quantization=config.lm_head_quantization)
    if config.prompt_sms and device.type == "cuda":    # before the graphs captured on it
        from serve_app.engine._private.image_encoding import side_priority
        runner.use_prompt_stream(config.prompt_sms, side_priority(config.stream_priority == "decode"))
    if (runner.fp8 or runner.head8 is not None) and device.type == "cuda" and config.cuda_graphs:
        runner.tune_fp8_decode()     # before KV is sized: its scratch is freed first
    kv_tokens, info = plan_kv_tokens(config, runner, budget)
    runner.eager_prefill.update(passes=0, tokens=0)   # the memory profile's pass is not served work
    runner.allocate_kv(kv_tokens)
    if device.type == "cuda" and config.cuda_graphs:
        t1 = time.perf_counter()
        runner.capture_graphs()
        info["graph_capture_s"] = round(time.perf_counter() - t1, 2)
    graphs_ok = device.type != "cuda" or config.cuda_graphs
    if config.vision_graph_grids and graphs_ok:
        from serve_app.engine._private.vision_graphs import MAX_GRAPH_PATCHES
        runner.setup_vision_graphs(config.vision_graph_grids, min(
            MAX_GRAPH_PATCHES, vision_patch_budget(config.max_prefill_tokens, runner.merge)))
    if config.prefill_graph_tokens and graphs_ok:
        t1 = time.perf_counter()
        try:
            runner.setup_prefill_graphs(min(config.prefill_graph_tokens, config.max_prefill_tokens),
                                        config.prefill_graph_step)
        except Exception as e:  # noqa: BLE001 - an optional speed-up: prefill stays eager
            info["prefill_graph_error"] = repr(e)[:300]
            logger.warning("prefill graphs not captured; prefill stays eager: %r", e)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.empty_cache()
        info["prefill_graph_buckets"] = runner.graph_stats()["prefill_graph_buckets"]
        info["prefill_graph_capture_s"] = round(time.perf_counter() - t1, 2)
    if runner.fp8_timings:
        info["fp8_decode_plan"] = {k: v["pick"] for k, v in runner.fp8_timings.items()}
    if device.type == "cuda":
        from serve_app.engine._private.sampling_kernel import warm_up
        info["sampler_warmup_s"] = round(warm_up(config.max_num_seqs, runner.vocab, device), 2)
    info.update(kv_tokens=kv_tokens, dtype=str(runner.dtype).replace("torch.", ""),
                kv_dtype=str(runner.kv_dtype).replace("torch.", ""),
                quantization=config.quantization, vision_quantization=config.vision_quantization,
                lm_head_quantization=config.lm_head_quantization, pdl=config.pdl,
                decode_balance=config.decode_balance, vision_stream=config.vision_stream,
                stream_priority=config.stream_priority,
                prefill_stream=config.prefill_stream, prompt_sms=runner.prompt_sms,
                max_num_seqs=config.max_num_seqs,
                max_decode_rows=config.max_decode_rows or config.max_num_seqs,
                decode_order=config.decode_order,
                device=str(device), page_size=runner.page_size,
                startup_s=round(time.perf_counter() - t0, 2))
    return runner, info
