"""FLOPs of the exported graphs, as `bench` prints them per stage, against PyTorch's own counter."""

import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from diffsr.app.measure.bench import stage_flops
from diffsr.app.measure.flops import graph_flops
from diffsr.export.core.precision import Precision
from diffsr.export.graphs.manifest import verified_files
from diffsr.export.model.checkpoint import load_submodule
from diffsr.export.model.dims import TARGETS
from diffsr.export.model.samples import sample_inputs
from diffsr.runtime.image import latent_grid
from diffsr.runtime.tiling import tiling_for


@pytest.mark.parametrize("model", ["tiny", "sdxl", "dit4sr"])
def test_graph_flops_equal_torchs_count_of_the_reference(model, request):
    """Every submodule at a non-square latent with guidance: the ONNX count (Conv, MatMul, Gemm) equals
    `FlopCounterMode` on the PyTorch reference, attention through SDPA's math kernel (the fused CPU kernel
    is not counted by torch). The one exception is a text encoder's dead work: SDXL's first CLIP gives its
    penultimate hidden states, so its last layer, which PyTorch runs, is not in the graph."""
    ckpt, onnx_dir = (request.getfixturevalue(f"{model}_{kind}") for kind in ("checkpoint", "onnx"))
    paths = verified_files(onnx_dir, ckpt, Precision.FP32)
    dims = TARGETS["server"].at(ckpt.model.dims(), side=(16, 24))
    for name in ckpt.model.submodules:
        net = load_submodule(ckpt, name)
        with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            net(**sample_inputs(ckpt.model, name, dims, seed=0))
        flops, counted = graph_flops(paths[name], ckpt.model.signature(name), dims), counter.get_total_flops()
        if name in ckpt.model.stages.part("text"):
            assert 0.75 * counted <= flops <= counted, name
        else:
            assert flops == counted > 0, name


def test_dit4sr_stage_flops_count_every_tile(dit4sr_checkpoint, dit4sr_onnx):
    """A 64 x 40 photo is a 32 x 20 latent: with 8-cell tiles overlapping by 2, 5 x 3 tiles, each stage but
    the text's counted once a tile; the text stage is both CLIP encoders and T5, once."""
    ckpt = dit4sr_checkpoint
    ckpt_tiled = dataclasses.replace(ckpt, defaults=ckpt.defaults.replace(tile=8, tile_overlap=2))
    flops = stage_flops(ckpt_tiled, dit4sr_onnx, (40, 64))
    tiles = tiling_for(ckpt.model, ckpt_tiled.defaults).layout(*latent_grid(ckpt.model, 256, 160))
    assert len(tiles) == 15
    paths = verified_files(dit4sr_onnx, ckpt, Precision.FP32)
    dims = TARGETS["server"].at(ckpt.model.dims(), side=(8, 8))

    def one(name):
        return graph_flops(paths[name], ckpt.model.signature(name), dims)

    assert flops == {"text": one("text_encoder") + one("t5_encoder"), "lq": 15 * one("lr_encoder"),
                     "denoise_step": 15 * one("transformer"), "decode": 15 * one("vae_decoder")}
