"""Stacking several calls into one ONNX Runtime run gives each call what it would get alone."""

import numpy as np
import onnxruntime as ort
import pytest

from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.precision import Precision
from diffsr.export.graphs.manifest import verified_files
from diffsr.export.model.families import preset
from diffsr.export.model.samples import sample_inputs
from diffsr.triton_models.step_batching import StepBatching


@pytest.mark.parametrize("name", preset("tiny").stages.step)
@pytest.mark.parametrize("cfg", [True, False])
@pytest.mark.parametrize("model", ["tiny", "sdxl"])
def test_stacked_calls_answer_each_call_as_alone(request, model, name, cfg):
    """Three calls of two tiles each, with and without guidance (SDXL: text_embeds and time_ids are
    guided rows too), stacked into one run and split again: each call's outputs are its own."""
    ckpt = request.getfixturevalue(f"{model}_checkpoint")
    onnx = request.getfixturevalue(f"{model}_onnx")
    sig = ckpt.model.signature(name)
    path = verified_files(onnx, ckpt, Precision.FP32, [name])[name]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    dims = dict(batch=2, cfg_batch=4 if cfg else 2, latent_height=8, latent_width=16)
    feeds = [{k: v.numpy() for k, v in sample_inputs(ckpt.model, name, dims, seed=s).items()} for s in range(3)]
    alone = [dict(zip([o.name for o in sig.outputs], session.run(None, f))) for f in feeds]
    stacking = StepBatching(sig, ckpt.model.dims())
    n = stacking.groups(feeds[0])
    assert n == (2 if cfg and name == "controlnet_unet" else 1)
    stacked = stacking.stack(feeds)
    assert all(v.shape[0] == 3 * feeds[0][k].shape[0] for k, v in stacked.items())
    together = stacking.unstack(dict(zip([o.name for o in sig.outputs], session.run(None, stacked))), 3, n)
    for a, b in zip(alone, together):
        for k in a:
            assert a[k].shape == b[k].shape
            np.testing.assert_allclose(b[k], a[k], rtol=1e-5, atol=1e-5)


def test_a_submodule_whose_first_dim_counts_prompts_cannot_be_step_batched():
    model = preset("tiny")
    with pytest.raises(DiffsrError, match="text_encoder.input_ids: its first dim 'text_batch' does not count images"):
        StepBatching(model.signature("text_encoder"), model.dims())
