"""The trained demo model (`app/demo_model`, made by scripts/train_demo.py): small enough to ship, trained (its
images are the photo upscaled, not noise) and kept by every backend. Scored on real Set14 crops
(tests/data/set14-crops) as `diffsr eval` scores them."""

from pathlib import Path

import pytest

from diffsr.app.cli.demo import DEMO_MODEL
from diffsr.app.measure.quality import BICUBIC, evaluate, pair_images, rows_for
from diffsr.export.core.precision import Precision

CROPS = Path(__file__).parents[1] / "data" / "set14-crops"
MAX_BYTES = 20 * 2**20


def test_the_demo_model_is_a_small_factor_4_checkpoint(demo_model):
    size = sum(p.stat().st_size for p in DEMO_MODEL.rglob("*") if p.is_file())
    assert size <= MAX_BYTES, f"{size / 2**20:.1f} MiB"
    assert demo_model.model.preset == "demo" and demo_model.model.latent_factor == 4


def test_its_autoencoder_was_trained_and_its_latent_normalised(demo_model):
    """scripts/train_demo.py folds the trained latent's per-channel mean and std into the quant convs: on real
    photos (the Set14 crops) every channel of the LQ latent has a std near 1 (measured 0.87 to 1.57) and a mean
    near 0. A seeded random-weight autoencoder of the same preset gives stds of 0.13 to 0.20."""
    import torch

    from diffsr.export.model.checkpoint import load_submodule
    from diffsr.runtime.image import load_image
    from diffsr.runtime.stages import prepare_lq

    encoder = load_submodule(demo_model, "lq_encoder")
    with torch.no_grad():
        latents = [encoder(prepare_lq(demo_model.model, load_image(p), 1))[1].flatten(2)
                   for p in sorted(CROPS.glob("*_HR.png"))]
    z = torch.cat(latents, 2)
    std, mean = z.std((0, 2)), z.mean((0, 2))
    assert bool(((std > 0.6) & (std < 2.0)).all()) and bool((mean.abs() < 1.0).all()), (std, mean)


@pytest.fixture(scope="module")
def scores(demo_model, demo_onnx):
    pairs = pair_images(CROPS, CROPS)
    rows = rows_for(demo_model, demo_model.defaults, ["torch", "onnxruntime"], [Precision.FP32], demo_onnx, None)
    return {s.label: s for s in evaluate(pairs, rows, 4)}


def test_the_trained_model_upscales_set14_crops(scores):
    """Random weights score about 14 dB here; the trained model 23.1 dB / 0.54, bicubic 26.3 / 0.69 (its small
    autoencoder reconstructs Set14 no better than bicubic upscales it: docs/demo_model.md)."""
    assert scores["torch fp32"].psnr_y > max(21.0, scores[BICUBIC].psnr_y - 4.5)
    assert scores["torch fp32"].ssim_y > 0.45


def test_onnx_runtime_keeps_the_trained_models_quality(scores):
    assert abs(scores["onnxruntime fp32"].psnr_y - scores["torch fp32"].psnr_y) < 0.01
