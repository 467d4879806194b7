"""Every submodule's output shapes at two sizes and two batch sizes, driven by the signatures."""

import json

import pytest
import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file

from diffsr.export.model.checkpoint import weights_file
from diffsr.export.model.samples import sample_inputs
from diffsr.runtime.backends.torch_runner import TorchRunner

DIMS = [
    dict(batch=1, cfg_batch=2, text_batch=2, latent_height=8, latent_width=8),
    dict(batch=2, cfg_batch=4, text_batch=1, latent_height=16, latent_width=24),
]


@pytest.mark.parametrize("dims", DIMS, ids=["b1-64px", "b2-128x192px"])
@pytest.mark.parametrize("name", ["text_encoder", "lq_encoder", "fusion_transformer", "controlnet_unet", "vae_decoder"])
def test_output_shapes(tiny_checkpoint, tiny_reference, name, dims):
    sig = tiny_checkpoint.model.signature(name)
    out = TorchRunner(sig, tiny_reference[name]).infer(sample_inputs(tiny_checkpoint.model, name, dims))
    for spec in sig.outputs:
        assert tuple(out[spec.name].shape) == spec.resolve(dims)
        assert torch.isfinite(out[spec.name]).all()


def test_z_lq_is_the_scaled_mean_of_the_vae_encoder(tiny_checkpoint, tiny_reference):
    """The LQ encoder starts as the VAE's encoder; its z_lq is the latent distribution's mean times the
    scaling factor (never a sample), and its tapped forward is the encoder's own."""
    config = json.loads((tiny_checkpoint.path / "vae" / "config.json").read_text())
    vae = AutoencoderKL.from_config(config).eval()
    vae.load_state_dict({k: v.float() for k, v in load_file(str(weights_file(tiny_checkpoint, "vae"))).items()})
    lq_encoder = tiny_reference["lq_encoder"]
    lq = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        want = vae.encode(lq).latent_dist.mean * vae.config.scaling_factor
        got = lq_encoder(lq)[1]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (vae.encode(lq).latent_dist.std > 1e-3).all()  # a sample would differ from the mean


def test_the_decoder_unshifts_the_latent_as_the_vaes_config_says(tiny_checkpoint, tiny_reference):
    """A VAE config with a `shift_factor` (SD3's 0.0609): decoding x is decoding x + shift * scaling unshifted."""
    from diffsr.export.model.families.sd_networks import VAEDecoder

    config = json.loads((tiny_checkpoint.path / "vae" / "config.json").read_text())
    vae = AutoencoderKL.from_config(config | {"shift_factor": 0.0609}).eval()
    vae.load_state_dict({k: v.float() for k, v in load_file(str(weights_file(tiny_checkpoint, "vae"))).items()})
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = VAEDecoder(vae)(latent)
        want = tiny_reference["vae_decoder"](latent + 0.0609 * config["scaling_factor"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_decoder_output_is_in_range(tiny_reference):
    with torch.no_grad():
        img = tiny_reference["vae_decoder"](torch.randn(1, 4, 8, 8) * 10)
    assert img.min() >= -1 and img.max() <= 1


def test_control_path_is_live(tiny_checkpoint, tiny_reference):
    """f2 must change the noise prediction: the zero convs were given weights."""
    feed = sample_inputs(tiny_checkpoint.model, "controlnet_unet", DIMS[0])
    with torch.no_grad():
        a = tiny_reference["controlnet_unet"](*feed.values())
        feed["f2"] = feed["f2"] + 1.0
        b = tiny_reference["controlnet_unet"](*feed.values())
    assert (a - b).abs().max() > 1e-4


def test_f2_is_shared_across_the_cfg_batch(tiny_checkpoint, tiny_reference):
    """With CFG, one f2 serves both branches: same as feeding it twice."""
    feed = sample_inputs(tiny_checkpoint.model, "controlnet_unet", DIMS[0])
    with torch.no_grad():
        shared = tiny_reference["controlnet_unet"](*feed.values())
        doubled = tiny_reference["controlnet_unet"](*list(feed.values())[:3], feed["f2"].repeat(2, 1, 1, 1))
    torch.testing.assert_close(shared, doubled)


def test_a_factor_4_lq_encoder_reads_its_vaes_encoder_at_latent_resolution():
    """Three VAE blocks (factor 4): the taps end at 1/2, 1/4 and 1/4 of the image and are pooled 2, 1, 1 to the
    latent (four blocks: 4, 2, 1); z_lq is still the VAE encoder's scaled mean."""
    from diffsr.export.model.families.sd import vae_of
    from diffsr.export.model.families.sd_networks import LQEncoder, LQEncoderConfig

    torch.manual_seed(0)
    vae = vae_of((16, 32, 32), 1, 8, 4, scaling_factor=0.5).eval()
    lq_encoder = LQEncoder(LQEncoderConfig((16, 32, 32), 1, 8, 24, 2, 0.5)).eval()
    lq_encoder.load_state_dict({k: v for k, v in vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}
                               | {k: v for k, v in lq_encoder.state_dict().items() if not k.startswith(("encoder.", "quant_conv."))})
    assert lq_encoder.pools() == [2, 1, 1]
    assert LQEncoder(LQEncoderConfig((16, 16, 32, 32), 1, 8, 24, 2, 0.5)).pools() == [4, 2, 1]
    lq = torch.rand(2, 3, 40, 56) * 2 - 1
    with torch.no_grad():
        f1, z_lq = lq_encoder(lq)
        want = vae.encode(lq).latent_dist.mean * 0.5
        decoded = vae.decode(want / 0.5).sample
    assert f1.shape == (2, 24, 10, 14) and decoded.shape == lq.shape
    torch.testing.assert_close(z_lq, want, rtol=1e-5, atol=1e-5)
