import pytest

from diffsr.export.model.config import PRESETS, ModelConfig, preset
from diffsr.export.core.errors import DiffsrError


def test_unknown_preset_names_the_choices():
    with pytest.raises(DiffsrError, match=r"unknown preset 'huge'.*\['sd15', 'sdxl', 'sdxl-tiny', 'small', 'tiny'\]"):
        preset("huge")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_model_config_json_round_trip(name):
    cfg = PRESETS[name]
    assert ModelConfig.from_json(cfg.to_json()) == cfg


def test_sd15_has_sd15_widths():
    cfg = PRESETS["sd15"]
    assert cfg.unet_channels == (320, 640, 1280, 1280)
    assert cfg.vae_channels == (128, 256, 512, 512)
    assert cfg.text_hidden == 768 and cfg.f1_channels == 512
    assert cfg.latent_multiple == 8


def test_unknown_config_key_is_refused():
    data = PRESETS["tiny"].to_json() | {"bogus": 1}
    with pytest.raises(DiffsrError, match="bogus"):
        ModelConfig.from_json(data)


def test_missing_config_key_is_named():
    data = PRESETS["tiny"].to_json()
    del data["f1_channels"]
    with pytest.raises(DiffsrError, match=r"lacks keys \['f1_channels'\]"):
        ModelConfig.from_json(data)


def test_sdxl_is_sdxl_base():
    cfg = PRESETS["sdxl"]
    assert cfg.sdxl and cfg.unet_channels == (320, 640, 1280) and cfg.unet_transformer_depth == (1, 2, 10)
    assert cfg.unet_cross_attention == (False, True, True) and cfg.unet_heads == (5, 10, 20)
    assert cfg.context_dim == 2048 and cfg.pooled_dim == 1280 and cfg.scaling_factor == 0.13025
    assert cfg.pooled_dim + 6 * cfg.addition_time_embed_dim == 2816  # projection_class_embeddings_input_dim
    assert cfg.latent_multiple == 4 and cfg.vae_force_upcast and cfg.f1_channels == 512


def test_sdxl_tiny_has_the_structure_of_sdxl():
    tiny, full = PRESETS["sdxl-tiny"], PRESETS["sdxl"]
    assert tiny.sdxl and tiny.unet_cross_attention == full.unet_cross_attention
    assert len(tiny.unet_transformer_depth) == len(full.unet_transformer_depth) and tiny.vae_force_upcast
    assert not PRESETS["sd15"].sdxl and PRESETS["sd15"].context_dim == 768