"""The PyTorch GPU path: FP16, channels-last, a CUDA graph per denoising step.

Its numerics (FP16 and channels-last) are checked on the CPU everywhere; the CUDA graph and the GPU
parity only where a CUDA GPU is present (skipped otherwise, with the reason in the log)."""

import numpy as np
import pytest
import torch

from diffsr.app.measure.parity import TOLERANCES, judge_image
from diffsr.export.core.precision import Precision
from diffsr.export.model.checkpoint import load_submodule
from diffsr.export.model.samples import sample_inputs
from diffsr.export.model.settings import Request
from diffsr.runtime.backends.torch_runner import TorchRunner
from diffsr.runtime.loading import load_runners
from diffsr.runtime.pipeline import Pipeline

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DIMS = dict(batch=1, cfg_batch=2, text_batch=2, latent_height=8, latent_width=12)


def fp16_runners(ckpt, device="cpu"):
    sigs = ckpt.model.signatures()
    return {name: TorchRunner(sig, load_submodule(ckpt, name), device, Precision.FP16, channels_last=True)
            for name, sig in sigs.items()}


def test_fp16_channels_last_runners_keep_the_signature_and_the_numbers(tiny_checkpoint):
    sigs, fast = tiny_checkpoint.model.signatures(), fp16_runners(tiny_checkpoint)
    reference = load_runners("torch", tiny_checkpoint)
    for name, sig in sigs.items():
        conv = next((m for m in fast[name].module.modules() if isinstance(m, torch.nn.Conv2d)), None)
        assert conv is None or conv.weight.is_contiguous(memory_format=torch.channels_last)
        feed = sample_inputs(tiny_checkpoint.model, name, DIMS, seed=1)
        got, want = fast[name].infer(feed), reference[name].infer(feed)
        for spec in sig.outputs:
            assert got[spec.name].dtype == torch.float32  # the signature's dtype, whatever ran inside
            rel = (got[spec.name] - want[spec.name]).norm() / want[spec.name].norm()
            assert rel < TOLERANCES[Precision.FP16].rel, (name, spec.name, float(rel))


def test_attention_runs_through_sdpa(tiny_checkpoint):
    """The GPU path's attention is PyTorch's fused SDPA kernel in every submodule that attends."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    for name in ("lq_encoder", "controlnet_unet", "vae_decoder"):
        processors = [m.processor for m in load_submodule(tiny_checkpoint, name).modules() if hasattr(m, "processor")]
        assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors), name
    assert load_submodule(tiny_checkpoint, "text_encoder").text_encoder.config._attn_implementation == "sdpa"


def test_fp16_pipeline_matches_the_reference(tiny_checkpoint, photo_lq):
    config = tiny_checkpoint.defaults.replace(steps=8)
    lq = photo_lq[:32, :32]  # PyTorch's FP16 on a CPU is slow: a small image
    ref = Pipeline(load_runners("torch", tiny_checkpoint), tiny_checkpoint)(Request(lq, config)).image
    out = Pipeline(fp16_runners(tiny_checkpoint), tiny_checkpoint)(Request(lq, config)).image
    assert judge_image((32, 32), ref, out, TOLERANCES[Precision.FP16]).passed


@needs_cuda
def test_torch_cuda_matches_the_cpu_reference_and_graph_matches_eager(tiny_checkpoint, photo_lq):
    config = tiny_checkpoint.defaults.replace(steps=20)
    ref = Pipeline(load_runners("torch", tiny_checkpoint), tiny_checkpoint)(Request(photo_lq, config)).image
    runners = load_runners("torch-cuda", tiny_checkpoint)
    eager = Pipeline(runners, tiny_checkpoint, "cuda")(Request(photo_lq, config)).image
    graphed = Pipeline(runners, tiny_checkpoint, "cuda", cuda_graph=True)
    first, second = graphed(Request(photo_lq, config)).image, graphed(Request(photo_lq, config)).image
    assert judge_image((64, 64), ref, first, TOLERANCES[Precision.FP16]).passed
    assert np.abs(first.astype(int) - eager.astype(int)).max() <= 2
    assert np.array_equal(first, second) and graphed.graphs.captures == 1  # replayed, not captured again
    graphed(photo_lq[:32, :48], config)  # another shape: captured anew
    assert graphed.graphs.captures == 2
