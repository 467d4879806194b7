"""Weights as the libraries publish them: shards with an index, a tied embedding stored under one name
(SD3.5's `text_encoder_3/` is T5-XXL in two shards, saved by transformers). The sharded copies here are
written by transformers' own `save_pretrained` and by safetensors with diffusers' index layout."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffsr.export.core.errors import DiffsrError
from diffsr.export.graphs.onnx_export import onnx_from_checkpoint
from diffsr.export.model.checkpoint import load_submodule, open_checkpoint, stored_weights
from diffsr.export.model.samples import sample_inputs
from diffsr.runtime.backends.onnxruntime_runner import OnnxRuntimeRunner

DIMS = dict(batch=1, cfg_batch=2, text_batch=2, latent_height=8, latent_width=8)
INDEX = "diffusion_pytorch_model.safetensors.index.json"


@pytest.fixture(scope="module")
def published(dit4sr_checkpoint, tmp_path_factory):
    """dit4sr-tiny with T5 re-saved by transformers in shards (its tied embedding under one name) and the
    transformer split into two shards with diffusers' index."""
    from transformers import T5EncoderModel

    path = shutil.copytree(dit4sr_checkpoint.path, tmp_path_factory.mktemp("published") / "ck")
    t5 = path / "text_encoder_3"
    model = T5EncoderModel.from_pretrained(str(t5))
    (t5 / "model.safetensors").unlink()
    model.save_pretrained(str(t5), max_shard_size="300KB")
    folder = path / "transformer"
    with safe_open(str(folder / "diffusion_pytorch_model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    keys, weight_map = sorted(tensors), {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        shard = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(folder / shard), {"format": "pt"})
        weight_map.update({k: shard for k in part})
    (folder / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return open_checkpoint(path)


def test_the_published_layout_is_what_was_written(published):
    t5 = stored_weights(published, "text_encoder_3")
    assert not t5.file.is_file() and t5.index.is_file() and len(set(t5.files.values())) >= 2
    assert len({"shared.weight", "encoder.embed_tokens.weight"} & t5.stored()) == 1  # transformers saves one of the tied
    assert len(set(stored_weights(published, "transformer").files.values())) == 2


@pytest.mark.parametrize("name", ["t5_encoder", "transformer"])
def test_sharded_and_tied_weights_load_as_the_single_file(published, dit4sr_checkpoint, name):
    ours, theirs = load_submodule(dit4sr_checkpoint, name), load_submodule(published, name)
    mine, other = ours.state_dict(), theirs.state_dict()
    assert mine.keys() == other.keys() and all(torch.equal(mine[k], other[k]) for k in mine)


def test_sharded_and_tied_weights_export_as_the_single_file(published, dit4sr_checkpoint, tmp_path):
    """The export binds each initializer to its shard (and the tied embedding to its stored name); T5 has
    both (the transformer's shards take the same path, at a minute and a half of tracing)."""
    name = "t5_encoder"
    ours = load_submodule(dit4sr_checkpoint, name)
    feeds = sample_inputs(published.model, name, DIMS, seed=0)
    graph = OnnxRuntimeRunner(published.model.signature(name), onnx_from_checkpoint(published, name, tmp_path / f"{name}.onnx"))
    want = ours(**feeds)
    got = graph.load().infer(feeds)
    for key, value in (want if isinstance(want, dict) else {published.model.signature(name).outputs[0].name: want}).items():
        np.testing.assert_allclose(got[key].numpy(), value.numpy(), rtol=1e-4, atol=1e-5)


def test_a_broken_index_is_an_error_naming_it(published, tmp_path):
    path = shutil.copytree(published.path, tmp_path / "ck")
    index = path / "transformer" / INDEX
    data = json.loads(index.read_text())
    key = next(iter(data["weight_map"]))
    data["weight_map"][key] = "diffusion_pytorch_model-00002-of-00002.safetensors" if data["weight_map"][key].startswith(
        "diffusion_pytorch_model-00001") else "diffusion_pytorch_model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    with pytest.raises(DiffsrError, match=rf"{INDEX} maps \['{key}'\] to diffusion_pytorch_model-0000\d-of-00002.safetensors, which lacks"):
        load_submodule(open_checkpoint(path), "transformer")
    index.unlink()
    with pytest.raises(DiffsrError, match=r"checkpoint file missing: .*transformer/diffusion_pytorch_model.safetensors \(nor a sharded"):
        load_submodule(open_checkpoint(path), "transformer")


def test_a_new_t5_has_its_embedding_tied(dit4sr_checkpoint):
    """A new checkpoint stores both names of T5's embedding with one value, as a real T5 has it."""
    with safe_open(str(stored_weights(dit4sr_checkpoint, "text_encoder_3").file), "pt") as f:
        assert torch.equal(f.get_tensor("shared.weight"), f.get_tensor("encoder.embed_tokens.weight"))
