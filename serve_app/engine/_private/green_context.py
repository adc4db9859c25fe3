"""A CUDA stream whose kernels may use only some of the GPU's SMs (a CUDA green context), for
the prompt work beside the decode steps (``engine.prompt_sms``).

Why: with ``prefill_stream`` the vision tower and each prefill (compute-bound GEMMs with waves of
long blocks) fill every SM, and a decode step's small memory-bound kernels wait for SMs between
those blocks: on an H200 decode steps took ~5.2 ms beside prompt work against ~3.2 ms alone
(RESULTS.md). Stream priority did not change that. A green context holds the prompt work to N of
the SMs, so the decode kernels (on the primary context, all SMs) always find some free.
Measured (RESULTS.md "prompt work on fewer SMs"): the decode steps got 10-15 % shorter and the
prompt work as much longer, TTFT worse; the GPU time per request did not change. Off by default.

The driver API is called through ctypes (CUDA 12.4+ drivers), not ``torch.cuda.green_contexts``,
whose interface changed between torch 2.10 and 2.12. The stream is wrapped as a
``torch.cuda.ExternalStream``; the green context lives as long as the process.
"""

from __future__ import annotations

import ctypes
import threading

import torch

_CU_DEV_RESOURCE_TYPE_SM = 1
_CU_GREEN_CTX_DEFAULT_STREAM = 0x1
_CU_STREAM_NON_BLOCKING = 0x1


class _DevResource(ctypes.Structure):
    """``CUdevResource``: a type, 92 bytes of padding, then a 48-byte union whose SM member starts
    with ``smCount`` (CUDA 13.1 appends a pointer); spare bytes cover later additions."""
    _fields_ = [("type", ctypes.c_int), ("_pad", ctypes.c_ubyte * 92), ("sm_count", ctypes.c_uint),
                ("_union_rest", ctypes.c_ubyte * 44), ("_spare", ctypes.c_ubyte * 128)]


_lock = threading.Lock()
_alive: list = []          # (green context handle, stream handle): never destroyed


def _driver():
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError as e:  # pragma: no cover - a CUDA machine has it
        raise RuntimeError(f"engine.prompt_sms needs the CUDA driver library: {e}") from e


def _call(lib, name: str, *args) -> None:
    fn = getattr(lib, name, None)
    if fn is None:
        raise RuntimeError(f"engine.prompt_sms needs CUDA green contexts (driver 12.4+): {name} is missing")
    rc = fn(*args)
    if rc != 0:
        msg = ctypes.c_char_p()
        lib.cuGetErrorString(rc, ctypes.byref(msg))
        raise RuntimeError(f"{name} failed: CUDA error {rc} ({(msg.value or b'?').decode()})")


def sm_limited_stream(device: torch.device, num_sms: int, priority: int = 0) -> tuple[torch.cuda.ExternalStream, int]:
    """A stream on ``device`` whose kernels run on ``num_sms`` SMs (rounded up by the driver to
    its partition granularity: 8 on Hopper), and the SM count it got."""
    total = torch.cuda.get_device_properties(device).multi_processor_count
    if not 1 <= num_sms <= total:
        raise ValueError(f"engine.prompt_sms={num_sms}: this GPU has {total} SMs")
    torch.cuda.init()
    lib = _driver()
    with _lock:
        dev = ctypes.c_int()
        _call(lib, "cuDeviceGet", ctypes.byref(dev), ctypes.c_int(device.index or 0))
        whole = _DevResource()
        _call(lib, "cuDeviceGetDevResource", dev, ctypes.byref(whole), ctypes.c_int(_CU_DEV_RESOURCE_TYPE_SM))
        part, groups = _DevResource(), ctypes.c_uint(1)
        _call(lib, "cuDevSmResourceSplitByCount", ctypes.byref(part), ctypes.byref(groups), ctypes.byref(whole),
              None, ctypes.c_uint(0), ctypes.c_uint(num_sms))
        if groups.value != 1 or not part.sm_count:
            raise RuntimeError(f"could not split {num_sms} SMs off this GPU ({groups.value} groups)")
        desc, ctx, stream = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_void_p()
        _call(lib, "cuDevResourceGenerateDesc", ctypes.byref(desc), ctypes.byref(part), ctypes.c_uint(1))
        _call(lib, "cuGreenCtxCreate", ctypes.byref(ctx), desc, dev, ctypes.c_uint(_CU_GREEN_CTX_DEFAULT_STREAM))
        _call(lib, "cuGreenCtxStreamCreate", ctypes.byref(stream), ctx, ctypes.c_uint(_CU_STREAM_NON_BLOCKING),
              ctypes.c_int(priority))
        _alive.append((ctx, stream))
    return torch.cuda.ExternalStream(stream.value, device=device), int(part.sm_count)
