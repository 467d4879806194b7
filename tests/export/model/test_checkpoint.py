import functools
import hashlib
import json

import pytest
import torch
from safetensors import safe_open

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.checkpoint import load_submodule, open_checkpoint, weights_file
from diffsr.export.model.families import preset, presets
from diffsr.export.model.random_init import init_checkpoint
from diffsr.export.model.samples import sample_inputs

DIMS = dict(batch=1, cfg_batch=2, text_batch=2, latent_height=8, latent_width=8)


def _digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_layout(tiny_checkpoint):
    names = set(_digest(tiny_checkpoint.path))
    for expected in ("diffsr.json", "tokenizer/tokenizer.json", "scheduler/scheduler_config.json",
                     "text_encoder/model.safetensors", "lq_encoder/model.safetensors",
                     "fusion_transformer/model.safetensors", "unet/diffusion_pytorch_model.safetensors",
                     "controlnet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert expected in names
    assert not any(n.startswith(("text_encoder_2/", "tokenizer_2/")) for n in names)  # SD: one text encoder


def test_sdxl_layout_has_the_second_encoder(sdxl_checkpoint):
    names = set(_digest(sdxl_checkpoint.path))
    assert {"text_encoder_2/model.safetensors", "tokenizer_2/tokenizer.json"} <= names
    config = json.loads((sdxl_checkpoint.path / "unet" / "config.json").read_text())
    assert config["addition_embed_type"] == "text_time" and config["transformer_layers_per_block"] == [1, 2, 2]
    assert json.loads((sdxl_checkpoint.path / "vae" / "config.json").read_text())["force_upcast"] is True


def test_same_seed_same_bytes_other_seed_other_weights(tiny_checkpoint, tmp_path):
    again = init_checkpoint("tiny", seed=0, out=tmp_path / "again")
    other = init_checkpoint("tiny", seed=1, out=tmp_path / "other")
    weights = {k: v for k, v in _digest(tiny_checkpoint.path).items() if k != "diffsr.json"}  # the fixture's is legacy
    assert {k: v for k, v in _digest(again.path).items() if k != "diffsr.json"} == weights
    differ = {k for k, v in _digest(other.path).items() if v != _digest(again.path)[k]}
    assert "unet/diffusion_pytorch_model.safetensors" in differ


def test_weights_are_stored_fp16_and_load_as_fp32_exactly(tiny_checkpoint):
    file = weights_file(tiny_checkpoint, "unet")
    with safe_open(str(file), "pt") as f:
        key = "conv_in.weight"
        stored = f.get_tensor(key)
    assert stored.dtype == torch.float16
    module = load_submodule(tiny_checkpoint, "controlnet_unet")
    loaded = module.unet.conv_in.weight
    assert loaded.dtype == torch.float32 and torch.equal(loaded, stored.float())


def test_copies_are_copies_and_the_control_path_is_not_zero(tiny_checkpoint):
    """ControlNet starts as the UNet's encoder, the LQ encoder as the VAE's; zero convs are drawn."""
    cn = load_submodule(tiny_checkpoint, "controlnet_unet")
    assert torch.equal(cn.controlnet.conv_in.weight, cn.unet.conv_in.weight)
    assert torch.equal(cn.controlnet.down_blocks[0].resnets[0].conv1.weight, cn.unet.down_blocks[0].resnets[0].conv1.weight)
    assert cn.controlnet.controlnet_mid_block.weight.abs().max() > 0
    lq = load_submodule(tiny_checkpoint, "lq_encoder")
    with safe_open(str(weights_file(tiny_checkpoint, "vae")), "pt") as f:
        assert torch.equal(lq.encoder.conv_in.weight, f.get_tensor("encoder.conv_in.weight").float())


@functools.cache
def networks(name: str):
    """A preset's networks, parameters on the meta device: built once for the tests that read them."""
    return preset(name).networks()


@pytest.mark.parametrize("name", sorted(presets()))
def test_every_preset_builds_its_networks_without_memory(name):
    model = preset(name)
    found = networks(name)
    assert set(found) == set(model.components())
    sd = {"text_encoder", "lq_encoder", "fusion_transformer", "controlnet", "unet", "vae"}
    expected = {"sd": sd, "sdxl": sd | {"text_encoder_2"},
                "dit4sr": {"text_encoder", "text_encoder_2", "text_encoder_3", "transformer", "vae"},
                "xpsr": {"text_encoder", "vae", "controlnet", "unet"}, "refsr": {"unet", "vqvae", "reference"},
                "sisrm": {"text_encoder", "segmenter", "vae", "controlnet", "unet", "semantic"}}
    assert set(found) == expected[model.name]
    assert all(p.is_meta for net, _ in found.values() for p in net.parameters())


def test_a_new_checkpoint_names_its_family(sdxl_checkpoint):
    meta = json.loads((sdxl_checkpoint.path / "diffsr.json").read_text())
    assert meta["family"] == "sdxl" and "text2_hidden" in meta["model"] and meta["format_version"] == 1
    assert sdxl_checkpoint.model == preset("sdxl-tiny")


def test_a_checkpoint_written_before_families_still_opens(tiny_checkpoint):
    """The tiny fixture's diffsr.json is the checked-in one main wrote: no family, SDXL's keys at zero."""
    meta = json.loads((tiny_checkpoint.path / "diffsr.json").read_text())
    assert "family" not in meta and meta["model"]["text2_hidden"] == 0
    assert tiny_checkpoint.model == preset("tiny") and tiny_checkpoint.model.name == "sd"


def test_sd15_has_the_published_sizes():
    """Not the preset's table restated: the networks it builds have SD 1.5's published parameter counts (UNet
    859,520,964; CLIP ViT-L/14 text 123,060,480; VAE 83,653,863), so its widths, heads and block types are SD 1.5's."""
    count = {name: sum(p.numel() for p in net.parameters()) for name, (net, _) in networks("sd15").items()}
    assert (count["unet"], count["text_encoder"], count["vae"]) == (859_520_964, 123_060_480, 83_653_863)


def test_sdxl_has_the_published_sizes():
    """SDXL base's published counts, exactly: UNet 2,567,463,684; OpenCLIP bigG with projection 694,659,840; CLIP-L
    123,060,480; its VAE 83,653,863 (the ControlNet, a copy of the UNet's encoder with our conditioning, about 1.25 B)."""
    count = {name: sum(p.numel() for p in net.parameters()) for name, (net, _) in networks("sdxl").items()}
    assert (count["unet"], count["text_encoder_2"], count["text_encoder"], count["vae"]) == (
        2_567_463_684, 694_659_840, 123_060_480, 83_653_863)
    assert round(count["controlnet"] / 1e9, 2) == 1.25


@pytest.mark.parametrize("fixture", ["tiny_checkpoint", "sdxl_checkpoint"])
def test_every_submodule_loads_and_runs_at_its_signature(fixture, request):
    ckpt = request.getfixturevalue(fixture)
    for name, sig in ckpt.model.signatures().items():
        out = load_submodule(ckpt, name)(*sample_inputs(ckpt.model, name, DIMS).values())
        outs = out if isinstance(out, tuple) else (out,)
        assert [tuple(o.shape) for o in outs] == [t.resolve(DIMS) for t in sig.outputs], name


def test_refuses_a_non_empty_output_folder(tiny_checkpoint):
    with pytest.raises(DiffsrError, match="not empty"):
        init_checkpoint("tiny", 0, tiny_checkpoint.path)


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_folder_and_files_are_named(tiny_checkpoint, tmp_path):
    with pytest.raises(DiffsrError, match="checkpoint folder not found"):
        open_checkpoint(tmp_path / "nope")
    broken = _copy(tiny_checkpoint.path, tmp_path / "b")
    (broken / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(DiffsrError, match=r"missing: .*unet/diffusion_pytorch_model.safetensors"):
        load_submodule(open_checkpoint(broken), "controlnet_unet")
    (broken / "diffsr.json").unlink()
    with pytest.raises(DiffsrError, match=r"missing: .*diffsr.json"):
        open_checkpoint(broken)


def test_corrupt_weights_are_named(tiny_checkpoint, tmp_path):
    broken = _copy(tiny_checkpoint.path, tmp_path / "b")
    (broken / "lq_encoder" / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(DiffsrError, match=r"cannot read weights .*lq_encoder/model.safetensors"):
        load_submodule(open_checkpoint(broken), "lq_encoder")


def test_weights_that_do_not_match_the_config_are_named(tiny_checkpoint, tmp_path):
    broken = _copy(tiny_checkpoint.path, tmp_path / "b")
    cfg_file = broken / "fusion_transformer" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["width"] *= 2
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(DiffsrError, match=r"fusion_transformer/model.safetensors do not match .*wrong shape"):
        load_submodule(open_checkpoint(broken), "fusion_transformer")
    cfg["blocks"] = 3
    cfg["width"] //= 2
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(DiffsrError, match=r"missing \['blocks.2"):
        load_submodule(open_checkpoint(broken), "fusion_transformer")


def test_wrong_class_in_config_is_named(tiny_checkpoint, tmp_path):
    broken = _copy(tiny_checkpoint.path, tmp_path / "b")
    (broken / "vae" / "config.json").write_text((broken / "unet" / "config.json").read_text())
    with pytest.raises(DiffsrError, match="describes a UNet2DConditionModel, expected AutoencoderKL"):
        load_submodule(open_checkpoint(broken), "vae_decoder")
