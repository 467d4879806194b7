import pytest

from diffsr.export.config import PRESETS, ModelConfig, preset
from diffsr.export.errors import DiffsrError


def test_unknown_preset_names_the_choices():
    with pytest.raises(DiffsrError, match=r"unknown preset 'huge'.*\['sd15', 'small', 'tiny'\]"):
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
