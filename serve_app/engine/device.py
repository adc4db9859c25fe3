"""Device, dtype and memory-cap choices shared by the engines.

``num_gpus: 0.x`` in Ray is a logical fraction only, so each replica caps its own share of the
card here (``torch.cuda.set_per_process_memory_fraction``). NVML tells compute capability and free
memory without creating a CUDA context first.
"""

from __future__ import annotations

import logging

import torch

from serve_app.engine.config import EngineConfig

logger = logging.getLogger(__name__)


def pick_device(config: EngineConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(config.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"engine.device={config.device!r} but CUDA is not available on this replica")
    return dev


def _nvml_info(index: int) -> dict | None:
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(index)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(h)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        return {"capability": (major, minor), "total": mem.total, "free": mem.free,
                "name": pynvml.nvmlDeviceGetName(h)}
    except Exception as e:  # no driver, MIG quirks...: fall back to torch
        logger.debug("NVML unavailable: %s", e)
        return None


def gpu_info(device: torch.device) -> dict:
    """Capability and memory of ``device`` (NVML first, torch as fallback)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    info = _nvml_info(index)
    if info is None:
        free, total = torch.cuda.mem_get_info(index)
        info = {"capability": torch.cuda.get_device_capability(index), "total": total, "free": free,
                "name": torch.cuda.get_device_name(index)}
    return info


def pick_dtype(config: EngineConfig, device: torch.device) -> torch.dtype:
    if config.dtype != "auto":
        return getattr(torch, config.dtype)
    if device.type != "cuda":
        return torch.float32
    major, _ = gpu_info(device)["capability"]
    return torch.bfloat16 if major >= 8 else torch.float16


def memory_budget_bytes(config: EngineConfig, device: torch.device) -> int | None:
    """This replica's GPU memory budget (None on CPU or when uncapped)."""
    if device.type != "cuda":
        return None
    total = gpu_info(device)["total"]
    caps = []
    if config.max_gpu_memory_gb:
        caps.append(int(config.max_gpu_memory_gb * 1024**3))
    if config.gpu_memory_fraction:
        caps.append(int(config.gpu_memory_fraction * total))
    return min(caps) if caps else None


def apply_memory_cap(config: EngineConfig, device: torch.device) -> int | None:
    """Make the torch allocator refuse to grow past the budget; returns the budget in bytes."""
    budget = memory_budget_bytes(config, device)
    if budget is not None:
        total = gpu_info(device)["total"]
        index = device.index if device.index is not None else torch.cuda.current_device()
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total), index)
        logger.info("GPU memory capped at %.1f GiB of %.1f GiB", budget / 1024**3, total / 1024**3)
    return budget
