import json

import pytest

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.families import family, model_from_json, preset, presets
from diffsr.export.model.families.sd import SD
from diffsr.export.model.families.sdxl import SDXL
from tests.conftest import DATA


def test_unknown_preset_and_family_name_the_choices():
    with pytest.raises(DiffsrError, match=r"unknown preset 'huge'.*\['demo', 'dit4sr', 'dit4sr-tiny', 'refsr', 'refsr-tiny', 'sd15', 'sdxl', 'sdxl-tiny', 'sisrm', "
                       r"'sisrm-tiny', 'small', 'tiny', 'xpsr', "
                       r"'xpsr-tiny'\]"):
        preset("huge")
    with pytest.raises(DiffsrError, match=r"unknown model family 'dit'.*\['dit4sr', 'refsr', 'sd', 'sdxl', 'sisrm', 'xpsr'\]"):
        family("dit")


@pytest.mark.parametrize("name", sorted(presets()))
def test_model_config_json_round_trip(name):
    model = preset(name)
    assert model_from_json(model.name, json.loads(json.dumps(model.to_json()))) == model


def test_sd15_is_sd_at_sd15s_geometry():
    """Its published sizes: tests/export/model/test_checkpoint.py. Three halvings in the UNet, 8 px a latent cell."""
    model = preset("sd15")
    assert isinstance(model, SD) and model.name == "sd"
    assert model.latent_multiple == 8 and model.pixel_multiple == 64 and model.native_latent * model.latent_factor == 512


def test_a_three_block_vae_is_a_factor_4_model():
    """The demo preset's VAE has three blocks, two downsampling (LDM's x4 SR autoencoder): 4 px per latent cell,
    in the signatures, the pixel multiple and the smallest padded side; four or three blocks, nothing else."""
    model = preset("demo")
    assert model.latent_factor == 4 and preset("tiny").latent_factor == 8
    assert model.pixel_multiple == 4 * model.latent_multiple and model.min_pixels == 32
    dims = dict(batch=1, cfg_batch=1, text_batch=1, latent_height=10, latent_width=14)
    assert model.signature("lq_encoder").input_shapes(dims)["lq_image"] == (1, 3, 40, 56)
    assert model.signature("vae_decoder").output_shapes(dims)["image"] == (1, 3, 40, 56)
    with pytest.raises(DiffsrError, match="3 blocks .factor 4. or 4 .factor 8."):
        model_from_json("sd", model.to_json() | {"vae_channels": [32, 32, 64, 64, 64]})


def test_unknown_or_missing_config_keys_are_named():
    data = preset("tiny").to_json()
    with pytest.raises(DiffsrError, match="bogus"):
        model_from_json("sd", data | {"bogus": 1})
    del data["f1_channels"]
    with pytest.raises(DiffsrError, match=r"lacks keys \['f1_channels'\]"):
        model_from_json("sd", data)


def test_sdxl_is_sdxl_base():
    """What follows from SDXL base's config (its published sizes: tests/export/model/test_checkpoint.py): the UNet
    attends to 768 + 1280 text widths and embeds the pooled text with six 256-wide size ids (2816)."""
    model = preset("sdxl")
    assert isinstance(model, SDXL) and model.context_dim == 2048 and model.pooled_dim == 1280
    assert model.unet_config()["projection_class_embeddings_input_dim"] == 1280 + 6 * 256
    assert model.latent_multiple == 4 and model.native_latent * model.latent_factor == 1024


def test_sdxl_tiny_has_the_structure_of_sdxl():
    tiny, full = preset("sdxl-tiny"), preset("sdxl")
    assert type(tiny) is SDXL and tiny.config.unet_cross_attention == full.config.unet_cross_attention
    assert len(tiny.config.unet_transformer_depth) == len(full.config.unet_transformer_depth)
    assert set(tiny.signature("controlnet_unet").input_shapes(dict(cfg_batch=2, batch=1, latent_height=8,
                                                                    latent_width=8))) >= {"text_embeds", "time_ids"}
    assert "time_ids" not in preset("sd15").signature("controlnet_unet").input_shapes(
        dict(cfg_batch=2, batch=1, latent_height=8, latent_width=8))


def test_an_sdxl_config_needs_its_second_encoder():
    data = preset("sdxl-tiny").to_json() | {"text2_hidden": 0}
    with pytest.raises(DiffsrError, match="second text encoder"):
        model_from_json("sdxl", data)


def test_legacy_model_entries_get_their_family_by_the_one_rule(tmp_path):
    """A diffsr.json written before families had names: SDXL where it has a second text encoder, SD with its
    zero SDXL keys dropped; an SD entry with non-zero SDXL keys is refused."""
    legacy = json.loads((DATA / "legacy-tiny-diffsr.json").read_text())
    assert model_from_json(None, legacy["model"]) == preset("tiny")
    legacy_xl = json.loads((DATA / "legacy-sdxl-tiny-diffsr.json").read_text())
    assert model_from_json(None, legacy_xl["model"]) == preset("sdxl-tiny")
    with pytest.raises(DiffsrError, match="SDXL's, not SD's"):
        model_from_json(None, legacy["model"] | {"text2_hidden": 0, "addition_time_embed_dim": 8})
