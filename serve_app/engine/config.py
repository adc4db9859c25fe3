"""Engine settings (pydantic, so ``deployments.yaml`` values are validated at start-up)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


# Options only the continuous engine has, with the value that means "off" (the one another engine needs).
CONTINUOUS_ONLY = {"quantization": None, "vision_quantization": None, "kv_cache_dtype": "auto",
                   "lm_head_quantization": None, "pdl": False, "separate_process": False, "decode_balance": 0,
                   "vision_stream": False, "prefill_stream": False, "stream_priority": "prompt",
                   "max_decode_rows": None, "decode_order": "arrival", "prompt_sms": None}
# Of those, the ones the engine's start-up refuses on the CPU (the others run there too).
GPU_ONLY = ("pdl", "decode_balance", "vision_stream", "prefill_stream")


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field("builtin:tiny-qwen3-vl",
                       description="builtin:NAME, a Hugging Face id, or a local folder")
    served_model_name: str | None = Field(None, description="name shown in /v1/models (default: model)")
    engine: str = Field(
        "continuous", pattern=r"^(hf-generate|continuous|[A-Za-z_][\w.]*:[A-Za-z_]\w*)$",
        description="'continuous', 'hf-generate', or 'package.module:Class' - your own engine, built "
                    "as Class(engine_config), implementing serve_app.engine.protocol.Engine")
    device: str = Field("auto", description="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:N'")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bf16 where the GPU supports it, else fp16; fp32 on CPU")
    max_gpu_memory_gb: float | None = Field(
        None, gt=0, description="cap on this replica's GPU memory (weights + activations + KV)")
    gpu_memory_fraction: float | None = Field(None, gt=0, le=1, description="cap as a fraction of the card")
    max_num_seqs: int = Field(64, ge=1, description="most requests admitted into the engine at once (all "
                                                     "decoding unless max_decode_rows is lower)")
    max_decode_rows: int | None = Field(
        None, ge=1, description="continuous engine: most rows in one decode step (None: max_num_seqs). "
                                "Below max_num_seqs, the requests admitted past it get their prompt "
                                "processed and their first token out, then wait for a decode row (first "
                                "joined, first in): a burst's TTFT no longer waits for rows to free, "
                                "while the decode batch, and so the step time, stays bounded. Their "
                                "wait shows in the time to the second token and in /v1/stats' "
                                "decode_deferred")
    decode_order: Literal["arrival", "laxity"] = Field(
        "arrival", description="continuous engine, with max_decode_rows below max_num_seqs: which waiting "
                               "request gets a decode row that frees. 'arrival': the first joined. "
                               "'laxity': the one whose e2e would end latest if it waited, i.e. the "
                               "smallest arrival time - tokens left x the recent decode step time, with "
                               "max_tokens - tokens so far as the tokens left (exact with ignore_eos, an "
                               "upper bound otherwise). Rows already decoding keep theirs either way. "
                               "Long requests set the e2e tail; this lets them skip the wait, which the "
                               "short ones, who have room, take")
    max_model_len: int = Field(8192, ge=64, description="prompt + output tokens per request")
    max_prefill_tokens: int = Field(8192, ge=64, description="tokens per prefill chunk")
    quantization: Literal["fp8"] | None = Field(
        None, description="continuous engine: 'fp8' runs the decoder layers' linears as FP8 GEMMs "
                          "(per-channel weight and per-token activation scales, quantised at load; "
                          "GPUs with FP8 tensor cores, or the CPU); None keeps the model's dtype")
    vision_quantization: Literal["fp8"] | None = Field(
        None, description="continuous engine: 'fp8' runs the vision tower's linears (qkv, proj, MLP) as "
                          "FP8 GEMMs, quantised as quantization='fp8' quantises the decoder's; the patch "
                          "embedding and the mergers stay in the model's dtype. None: the model's dtype")
    lm_head_quantization: Literal["fp8"] | None = Field(
        None, description="continuous engine: 'fp8' keeps an e4m3 copy of the LM head (per-vocab-row "
                          "scales) for the logits. With FP8 decoder layers the bf16 head is ~18 % of "
                          "the bytes a decode step reads (778 MB of 4.4 GB for Qwen3-VL-4B). On a GPU "
                          "the kernel per row count is timed at start-up against the bf16 head, which "
                          "stays where it is tied to the embeddings (it is used where it is faster). "
                          "Logits move by the FP8 rounding: check answer quality on trained weights. "
                          "Measured on one H200: decode steps 2-4 % shorter at the engine, nothing "
                          "measurable in the app at 22 QPS")
    kv_cache_dtype: Literal["auto", "fp8"] = Field(
        "auto", description="continuous engine: 'fp8' stores K/V as e4m3 without scales (clamped to "
                            "+-448): half the bytes per token, so twice the KV tokens in a budget and half "
                            "the cache bytes a decode step reads; attention math stays 16-bit. 'auto': the "
                            "model's dtype. Values beyond the e4m3 range are clipped. Slower in the app "
                            "on an H200 (RESULTS.md): for when KV memory is the limit")
    cuda_graphs: bool = Field(True, description="capture decode steps as CUDA graphs (GPU only)")
    pdl: bool = Field(False, description="continuous engine, Hopper+ GPUs: launch the engine's Triton kernels "
                                         "with programmatic dependent launch, so each may be scheduled while "
                                         "the one before it drains (a decode step is ~400 small kernels)")
    decode_balance: int = Field(
        0, ge=0, le=64, description="continuous engine, GPU: cut every decode row's attention into chunks "
                                    "of one length, set each step from all rows' lengths, aiming at this "
                                    "many programs per SM (0: each row in equal parts of its own, the "
                                    "default). With rows of mixed lengths the parts of the longest row set "
                                    "an attention call's time. Experimental: on an H200 decode steps were "
                                    "slower at 12-16 rows, faster at 24-32 (RESULTS.md)")
    vision_stream: bool = Field(
        False, description="continuous engine, GPU (experimental): run the vision tower on a CUDA stream "
                           "of its own, beside the decode steps, instead of in front of them; a "
                           "request's prefill waits for its images, the other requests go on. The "
                           "tower is compute-bound and a decode step memory-bound, so they may share "
                           "the GPU; its per-kind GPU seconds then overlap. On an H200 it helped "
                           "less than prefill_stream (RESULTS.md)")
    prefill_stream: bool = Field(
        False, description="continuous engine, GPU: also run each prefill step and its first-token "
                           "sampling on that second stream (implies the vision tower there), so "
                           "prompt work, compute-bound, overlaps the decode steps. New rows join the "
                           "decode batch once their prefill is done. On in deployments.gpu.yaml: on "
                           "an H200 the engine served 22.35 req/s at 23 offered against 19.97 "
                           "(RESULTS.md)")
    stream_priority: Literal["prompt", "decode"] = Field(
        "prompt", description="continuous engine, GPU, with vision_stream or prefill_stream: which of "
                              "the two CUDA streams gets SMs first when blocks of both wait. 'prompt' "
                              "(the side stream, as prompt work ran first on one stream: TTFT), or "
                              "'decode' (the decode steps run on a high-priority stream of their own: a "
                              "decode kernel then waits for one block of a prefill GEMM to end, not for "
                              "its waves, so steps, and the rows they hold, finish sooner). "
                              "Measured on an H200: no gain (decode steps 4.79 vs 4.78 ms at 21 req/s; "
                              "RESULTS.md)")
    prompt_sms: int | None = Field(
        None, ge=1, description="continuous engine, GPU, with prefill_stream (experimental): run the "
                                "prompt work (vision tower, prefill) on a CUDA green context of this many "
                                "SMs (rounded up by the driver: multiples of 8 on Hopper), so the decode "
                                "steps' small kernels, which may use every SM, always find some free "
                                "beside the prompt GEMMs. None: the prompt work may use every SM. "
                                "Measured on an H200 at 22 req/s: decode steps 4.54 / 4.28 ms with the "
                                "prompt work on 112 / 96 SMs against 5.04, but TTFT P95 336 / 390 against "
                                "244 ms; the GPU time per request stays the same (RESULTS.md)")
    prefill_graph_tokens: int = Field(
        0, ge=0, description="continuous engine: run a request's whole prompt of fewer than this many "
                             "tokens as one CUDA graph, padded to a bucket of prefill_graph_step (0: off). An eager "
                             "prefill pass costs ~22-27 ms of host launches whatever its size, a graph "
                             "replay ~0.3 ms; the graphs' memory is taken from the KV budget. "
                             "deployments.gpu.yaml sets 4096")
    prefill_graph_step: int = Field(
        256, ge=64, multiple_of=64,
        description="continuous engine: the prefill graphs' bucket size in tokens (a prompt is padded "
                    "to the next multiple). On the article's workload (loadgen resolutions, "
                    "~1.2k-token prompts) 256 pads 14 % of the prompt tokens, 128 pads 6.5 % "
                    "(benchmarks/engine_arrivals.py --padding), at twice "
                    "the graphs (one memory pool: the largest bucket's activations). "
                    "deployments.gpu.yaml sets 128: on an H200, 22 QPS at SLO in 30-s steps "
                    "where 256 missed 20 (RESULTS.md)")
    vision_graph_grids: int = Field(
        0, ge=0, description="continuous engine: keep up to this many CUDA graphs of the vision tower, "
                             "one per image grid seen twice, captured while idle (0: off). An eager "
                             "vision call costs 10-20 ms of host launches, a replay ~1 ms. deployments.gpu.yaml sets 16")
    separate_process: bool = Field(
        False, description="continuous engine: run the scheduler and the model in a child process of "
                           "the replica, so the replica's event loop (every stream through Ray) does "
                           "not share the engine thread's GIL. Requests and outputs cross a socket. "
                           "With max_num_seqs 24 behind a VLM cap of 48 (deployments.gpu.yaml), an "
                           "H200 held 17.5-19 QPS at SLO where in-process cap 24 missed 17.5 "
                           "(RESULTS.md); it also isolates a crashing engine")
    gc_freeze: bool = Field(True, description="continuous engine: after start-up, freeze the objects alive "
                                              "then (gc.freeze), so Python's full collections walk only what "
                                              "serving made. One full collection over the start-up objects "
                                              "stalls the engine thread for 0.1-0.3 s")
    vision_cache_mb: int = Field(256, ge=0, description="LRU of vision embeddings by image id")
    cache_dir: str | None = Field(None, description="where built-in models are written")
    kv_cache_tokens: int | None = Field(
        None, ge=64, description="continuous engine: KV cache size in tokens (default: what the memory "
                                 "budget leaves after weights and activations; 65536 on CPU)")

    @model_validator(mode="after")
    def _check(self) -> "EngineConfig":
        if self.engine != "continuous":       # the options only the continuous engine has, and their off
            for name, off in CONTINUOUS_ONLY.items():
                if getattr(self, name) != off:
                    raise ValueError(f"{name}={getattr(self, name)!r} needs engine='continuous'")
        if self.stream_priority != "prompt" and not (self.vision_stream or self.prefill_stream):
            raise ValueError(f"stream_priority={self.stream_priority!r} needs vision_stream or prefill_stream "
                             "(with one stream there is nothing to rank)")
        if self.prompt_sms is not None and not self.prefill_stream:
            raise ValueError("prompt_sms needs prefill_stream (it limits the SMs of that stream's prompt work)")
        if self.device == "cpu":              # the start-up would refuse them inside the replica, later
            gpu_only = [f"{n}={getattr(self, n)!r}" for n in GPU_ONLY if getattr(self, n) != CONTINUOUS_ONLY[n]]
            if gpu_only:
                raise ValueError(f"{', '.join(gpu_only)} need a CUDA GPU, and engine.device is 'cpu' "
                                 "(deployments.gpu.yaml turns GPU options on: on a CPU use deployments.yaml)")
        if self.max_decode_rows is not None and self.max_decode_rows > self.max_num_seqs:
            raise ValueError(f"max_decode_rows ({self.max_decode_rows}) must not exceed max_num_seqs "
                             f"({self.max_num_seqs})")
        if self.decode_order != "arrival" and (self.max_decode_rows or self.max_num_seqs) >= self.max_num_seqs:
            raise ValueError(f"decode_order={self.decode_order!r} needs max_decode_rows below max_num_seqs "
                             f"({self.max_num_seqs}): with a decode row for every admitted request none waits")
        return self
