"""engine.pdl: programmatic dependent launch of the engine's Triton kernels (Hopper+).

PDL changes when a kernel may be scheduled, never what it computes: each taking-part kernel waits
(griddepcontrol.wait) before it touches memory. So the GPU test asks for the same bits with it on
and off, eager and in the captured decode graphs, with FP8 projections (the Triton decode GEMMs)
and without. The CPU tests check the settings; tests/test_triton_lowering.py compiles every
taking-part kernel for sm_90 with its wait."""

from __future__ import annotations

import pytest
import torch

from serve_app.engine._private.runner import ModelRunner
from serve_app.engine.config import EngineConfig

from test_engine import DEVICE, model_dir  # noqa: F401  (fixture)
from test_kv_fp8 import _runner_with_random_kv


def test_config_and_device_checks(model_dir):  # noqa: F811
    assert EngineConfig(pdl=True).pdl
    with pytest.raises(ValueError, match="needs engine='continuous'"):
        EngineConfig(engine="hf-generate", pdl=True)
    from serve_app.models import load_model
    model = load_model(model_dir, dtype=torch.float32, device="cpu").eval()
    with pytest.raises(ValueError, match="compute capability 9.0"):
        ModelRunner(model, torch.device("cpu"), 2, 256, pdl=True)


@pytest.mark.skipif(DEVICE != "cuda", reason="needs ENGINE_TEST_DEVICE=cuda (Hopper)")
@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_decode_step_bits_equal_with_and_without_pdl(model_dir, monkeypatch, quantization):  # noqa: F811
    from serve_app.engine._private import kernels
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("PDL needs sm_90+")
    r, args = _runner_with_random_kv(model_dir, quantization=quantization)
    if r.fp8:
        r.tune_fp8_decode()                  # the Triton decode GEMMs, as the engine plans them
    k0, v0 = r.kv.k.clone(), r.kv.v.clone()

    def step(graphs: bool) -> torch.Tensor:
        r.kv.k.copy_(k0)
        r.kv.v.copy_(v0)
        r._graphs = {}
        if graphs:
            r.capture_graphs()
        out = r.decode(*args).clone()
        torch.cuda.synchronize()
        return out, r.kv.k.clone()

    monkeypatch.setattr(kernels, "PDL", False)
    want = {gr: step(gr) for gr in (False, True)}
    monkeypatch.setattr(kernels, "PDL", True)
    got = {gr: step(gr) for gr in (False, True)}
    for gr in (False, True):
        assert torch.equal(got[gr][0], want[gr][0]), f"logits, graphs={gr}"
        assert torch.equal(got[gr][1], want[gr][1]), f"K cache, graphs={gr}"
