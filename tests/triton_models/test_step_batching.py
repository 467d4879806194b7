"""Stacking several calls into one ONNX Runtime run gives each call what it would get alone."""

import numpy as np
import onnxruntime as ort
import pytest

from diffsr.export.model.config import Precision
from diffsr.export.graphs.manifest import verified_files
from diffsr.export.model.samples import sample_inputs
from diffsr.export.model.signatures import signatures
from diffsr.triton_models.step_batching import BATCHED, groups, stack, unstack


@pytest.mark.parametrize("name", BATCHED)
@pytest.mark.parametrize("cfg", [True, False])
@pytest.mark.parametrize("preset", ["tiny", "sdxl"])
def test_stacked_calls_answer_each_call_as_alone(request, preset, name, cfg):
    """Three calls of two tiles each, with and without guidance (SDXL: text_embeds and time_ids are
    cfg_batch too), stacked into one run and split again: each call's outputs are its own."""
    ckpt = request.getfixturevalue(f"{preset}_checkpoint")
    onnx = request.getfixturevalue(f"{preset}_onnx")
    sig = signatures(ckpt.model)[name]
    path = verified_files(onnx, ckpt, [name], Precision.FP32)[name]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    dims = dict(batch=2, cfg_batch=4 if cfg else 2, latent_height=8, latent_width=16)
    feeds = [{k: v.numpy() for k, v in sample_inputs(sig, dims, seed=s).items()} for s in range(3)]
    alone = [dict(zip([o.name for o in sig.outputs], session.run(None, f))) for f in feeds]
    n = groups(sig, feeds[0])
    assert n == (2 if cfg and name == "controlnet_unet" else 1)
    stacked = stack(sig, feeds)
    assert all(v.shape[0] == 3 * feeds[0][k].shape[0] for k, v in stacked.items())
    together = unstack(sig, dict(zip([o.name for o in sig.outputs], session.run(None, stacked))), 3, n)
    for a, b in zip(alone, together):
        for k in a:
            assert a[k].shape == b[k].shape
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-5)
