"""FP8 (e4m3) linear layers: weights per output channel, activations per token, quantised on the
fly (the "dynamic fp8" scheme of vLLM's ``quantization="fp8"`` and of Qwen's FP8 checkpoints).

Why: a decode step reads every weight once, so halving the weight bytes shortens it; prefill's
GEMMs run at twice the bf16 rate on Hopper's FP8 tensor cores. Embeddings and norms stay in the
model's dtype; the LM head and the vision tower have options of their own
(``lm_head_quantization``, ``vision_quantization``).

``torch._scaled_mm`` does the GEMM on the GPU (fp32 accumulation, ``out = (xq @ wq.T) * sx * sw``);
the CPU (tests) computes the same product in fp32. On CUDA the per-token quantisation is a
Triton kernel, fused into the RMSNorm and SiLU kernels where those produce the GEMM's input
(``kernels.rms_norm(..., quant=True)``, ``kernels.silu_mul(..., quant=True)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0          # largest finite e4m3fn value
_MIN_SCALE = 1e-12       # an all-zero row quantises to zeros, not NaNs


@dataclass
class Fp8Weight:
    """``q`` [N, K] e4m3 (row-major, passed transposed: the column-major B cuBLASLt wants) and
    ``scale`` [1, N] float32: ``w ~= q * scale.T``."""

    q: torch.Tensor
    scale: torch.Tensor
    name: str = ""          # which projection ("qkv", "o", ...): decode kernel plans are per name


def supported(device: torch.device) -> str | None:
    """None if FP8 GEMMs run on ``device``, else why not (a clear start-up error)."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"fp8 needs a CUDA GPU or the CPU, not {device.type}"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return (f"fp8 needs FP8 tensor cores (compute capability 8.9+: Ada, Hopper, Blackwell); "
                f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}")
    return None


@torch.no_grad()
def quantize_weight(w: torch.Tensor, name: str = "", chunk_rows: int = 8192) -> Fp8Weight:
    """Per-output-channel scales from each row's absolute maximum (a weight row is quantised as
    an activation row is). In chunks of rows: the fp32 copy of a whole LM head (151,936 x 2,560)
    would be 1.6 GB on the GPU for a moment; each row's result is the same either way."""
    w = w.detach()
    q = torch.empty(w.shape, dtype=FP8, device=w.device)
    scale = torch.empty(w.shape[0], 1, dtype=torch.float32, device=w.device)
    for i in range(0, w.shape[0], chunk_rows):
        q[i:i + chunk_rows], scale[i:i + chunk_rows] = quantize_rows_torch(w[i:i + chunk_rows])
    return Fp8Weight(q, scale.reshape(1, -1).contiguous(), name)


def quantize_rows_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token quantisation in torch ops (CPU, and the reference for the Triton kernels):
    ``(q [M, K] e4m3, scale [M, 1] float32)``."""
    xf = x.float()
    scale = xf.abs().amax(dim=1, keepdim=True).clamp_min(_MIN_SCALE) / FP8_MAX
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.is_cuda:
        from serve_app.engine._private.kernels import quantize_rows as triton_quant
        return triton_quant(x)
    return quantize_rows_torch(x)


def linear(x, w: Fp8Weight, out_dtype: torch.dtype, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ w.T (+ bias)`` where ``x`` is an activation [M, K] or an already quantised ``(q, scale)``.

    A bf16 bias rides in the GEMM's epilogue: a separate add over the output cost the vision
    tower ~20 us per linear on an H200 (measured), more than FP8 saved."""
    xq, xs = x if isinstance(x, tuple) else quantize_rows(x)
    if not xq.is_cuda:
        # CPU (tests): the same product in fp32; torch's CPU _scaled_mm takes per-tensor scales
        # only before 2.13.
        y = (xq.float() * xs) @ (w.q.float() * w.scale.reshape(-1, 1)).t()
        return (y if bias is None else y + bias.float()).to(out_dtype)
    # cuBLASLt's row-wise scaled GEMM writes bf16 only (an fp32 engine on the GPU casts after).
    fused = bias is not None and bias.dtype == torch.bfloat16
    y = torch._scaled_mm(xq, w.q.t(), scale_a=xs, scale_b=w.scale, bias=bias if fused else None,
                         out_dtype=torch.bfloat16)
    y = y if y.dtype == out_dtype else y.to(out_dtype)
    return y if bias is None or fused else y.add_(bias)
