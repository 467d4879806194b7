import hashlib
import json

import pytest
import torch

from diffsr.export.checkpoint import (
    SUBMODULES,
    assemble,
    init_checkpoint,
    load_submodule,
    open_checkpoint,
    random_components,
    write_checkpoint,
)
from diffsr.export.config import preset
from diffsr.export.errors import DiffsrError
from diffsr.export.samples import sample_inputs
from diffsr.export.signatures import signatures

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


def test_same_seed_same_bytes_other_seed_other_weights(tiny_checkpoint, tmp_path):
    again = init_checkpoint("tiny", seed=0, out=tmp_path / "again")
    other = init_checkpoint("tiny", seed=1, out=tmp_path / "other")
    assert _digest(again.path) == _digest(tiny_checkpoint.path)
    differ = {k for k, v in _digest(other.path).items() if v != _digest(again.path)[k]}
    assert "unet/diffusion_pytorch_model.safetensors" in differ


def test_round_trip_is_bit_identical(tmp_path):
    components = random_components(preset("tiny"), seed=3)
    ckpt = write_checkpoint(components, preset("tiny"), tmp_path / "c")
    sigs = signatures(ckpt.model)
    for name in SUBMODULES:
        feed = sample_inputs(sigs[name], DIMS)
        with torch.no_grad():
            before = assemble(name, components)(*feed.values())
            after = load_submodule(ckpt, name)(*feed.values())
        for x, y in zip(before if isinstance(before, tuple) else (before,), after if isinstance(after, tuple) else (after,)):
            assert torch.equal(x, y), name


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
