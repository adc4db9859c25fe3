"""Image patches from the host to the GPU in the vision tower's input layout.

Preprocess ships compact uint8 patches (8x fewer bytes than float32 ``pixel_values``); they go up
through a reused pinned buffer with non-blocking copies and are normalised on the device with
the processor's lookup table (bit-identical to the host path). Float rows go up as they are.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn.functional as F


class PixelUpload:
    def __init__(self, device: torch.device, dtype: torch.dtype, temporal_patch: int):
        self.device = device
        self.dtype = dtype                  # the vision tower's
        self.temporal_patch = temporal_patch
        self.is_cuda = device.type == "cuda"
        self._lut: torch.Tensor | None = None     # compact (uint8) pixels: the normalisation LUT
        self._lut_offset: torch.Tensor | None = None
        # Pinned staging for pixel values (grown on demand) and the event of its last upload.
        self._pix_host: torch.Tensor | None = None
        self._pix_event = torch.cuda.Event() if self.is_cuda else None

    def _upload_pixels(self, pixel_values: list) -> torch.Tensor:
        """Pixel rows of several images -> one device tensor. On CUDA through a pinned staging
        buffer and a non-blocking copy (inputs may be read-only numpy arrays: never written)."""
        n = sum(p.shape[0] for p in pixel_values)
        width = pixel_values[0].shape[1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")      # torch.from_numpy on read-only arrays
            srcs = [torch.from_numpy(p) if isinstance(p, np.ndarray) else p for p in pixel_values]
        if not self.is_cuda:
            return torch.cat(srcs) if len(srcs) > 1 else srcs[0]
        dtype = srcs[0].dtype
        if (self._pix_host is None or self._pix_host.numel() < n * width
                or self._pix_host.dtype != dtype):
            self._pix_host = torch.empty(max(n * width, 1 << 22), dtype=dtype, pin_memory=True)
        else:
            self._pix_event.synchronize()        # the previous upload has left the buffer
        host = self._pix_host[:n * width].view(n, width)
        dev = torch.empty(n, width, dtype=dtype, device=self.device)
        o = 0
        for s in srcs:   # image i's upload overlaps the host copy of image i+1
            e = o + s.shape[0]
            host[o:e].copy_(s)                   # multi-threaded host copy into pinned memory
            dev[o:e].copy_(host[o:e], non_blocking=True)
            o = e
        self._pix_event.record()
        return dev

    def to_device(self, pixel_values: list) -> torch.Tensor:
        """Patch rows of several images on the device in the tower's input layout. Float rows go
        up as they are; compact uint8 patches go up 4x smaller and are normalised here with
        the processor's LUT and repeated in time (bit-identical to the host path)."""
        u8 = [p.dtype == np.uint8 or p.dtype == torch.uint8 for p in pixel_values]
        if not any(u8):
            return self._upload_pixels(pixel_values)
        if not all(u8):       # mixed: each kind on its own, back in order
            parts = [self.to_device([p]) for p in pixel_values]
            return torch.cat(parts)
        c, p = pixel_values[0].shape[1], pixel_values[0].shape[2]
        raw = self._upload_pixels([x.reshape(x.shape[0], -1) for x in pixel_values])   # [N, c*p*p]
        n = raw.shape[0]
        if self._lut is None:
            from serve_app._image import _LUTS, _SAME_LUT
            # In the tower's dtype: rounding the LUT then gathering == gathering then rounding.
            lut = torch.from_numpy(_LUTS[:1] if _SAME_LUT else _LUTS[:c]).to(self.device, self.dtype)
            self._lut = lut.reshape(-1, 1)                                              # [c*256, 1]
            self._lut_offset = None if _SAME_LUT else (
                torch.arange(c, device=self.device, dtype=torch.int32) * 256).repeat_interleave(p * p)
        idx = raw.to(torch.int32)
        if self._lut_offset is not None:
            idx += self._lut_offset
        vals = F.embedding(idx, self._lut).view(n, c, 1, p * p)      # a gather with int32 indices
        t = self.temporal_patch
        return vals.expand(n, c, t, p * p).reshape(n, c * t * p * p)
