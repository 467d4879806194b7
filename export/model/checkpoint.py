"""Checkpoint folders: read any one that follows the layout (`random_init` writes seeded ones).

    diffsr.json                  the family, the model config (its widths) and the pipeline's defaults
    scheduler/                   scheduler_config.json                     (diffusers)
    <component>/                 config.json + weights, one folder per network, as the family declares
                                 (diffusers and transformers layouts where the library has one)
    tokenizer*/                  the tokenizers, as the family declares
    captioner/ ...               optional attachments (`attachments/`: a BLIP-2 captioner in transformers'
                                 layout), whose graphs join the model's submodules

Weights are loaded strictly: a missing, extra or mis-shaped tensor is an error naming the file.
Nothing cares how the weights were trained, nor in which float type they are stored (SDXL
checkpoints are published in FP16): the reference runs in FP32. Networks are built with their
parameters on the meta device and the stored tensors assigned one at a time, so loading holds one
FP32 copy of the weights, never two; a network can also be built without weights at all (`build`),
for tracing with fake tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn

from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.files import read_json
from diffsr.export.model.attachments import open_attachments
from diffsr.export.model.components import library_names
from diffsr.export.model.families import model_from_json, module_of
from diffsr.export.model.family import ModelFamily
from diffsr.export.model.settings import PipelineConfig
from diffsr.export.model.tokenizer import tokenizer_class
from diffsr.export.model.weights import StoredWeights

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint folder says, read without building any network."""

    path: Path
    model: ModelFamily  # the family, bound to the model config
    defaults: PipelineConfig
    scheduler_config: dict[str, Any]

    def tokenizer(self) -> Callable[[list[str]], dict[str, Any]]:
        return self.model.tokenizer(self.path)


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path, "checkpoint file", "create one with `diffsr init` or fix --checkpoint")


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_dir():
        raise DiffsrError(f"checkpoint folder not found: {path}: create one with `diffsr init --out {path}`")
    meta = _read_json(path / "diffsr.json")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DiffsrError(
            f"{path / 'diffsr.json'} has format_version {meta.get('format_version')!r}; this diffsr reads {FORMAT_VERSION}"
        )
    try:
        model = model_from_json(meta.get("family"), meta["model"], meta.get("family_module"))
        defaults = PipelineConfig.from_json(_before_captions(meta.get("pipeline", {}), model))
    except (KeyError, TypeError, AttributeError) as e:
        raise DiffsrError(f"{path / 'diffsr.json'} is malformed: {e!r}") from None
    except DiffsrError as e:  # a setting of the wrong type or out of range: named with the file
        raise DiffsrError(f"{path / 'diffsr.json'}: {e}") from None
    # the attachments are the folder's, whatever diffsr.json says
    model = model.with_attachments(open_attachments(path))
    model.check_stages()  # a family whose declaration does not hold together says so now, naming the stage
    errors = model.settings_errors(defaults)
    if errors:
        raise DiffsrError(f"{path / 'diffsr.json'}'s pipeline settings: {'; '.join(errors)}")
    scheduler = _read_json(path / "scheduler" / "scheduler_config.json")
    check_files(path, model)
    return Checkpoint(path, model, defaults, scheduler)


def check_files(path: Path, model: ModelFamily) -> None:
    """Every file the model's components, tokenizers and attachments need, there and readable (configs and tokenizers
    parsed, weights' headers read), before any weights load: a broken or missing one is an error naming it now, not a
    crash minutes later."""
    errors: list[str] = []
    for folder, component in model.components().items():
        try:
            _read_json(path / folder / "config.json")
            StoredWeights(path / folder, component.weights, component.tied).shapes
        except DiffsrError as e:
            errors.append(str(e))
    for folder in dict.fromkeys(model.tokenizer_folders().values()):
        try:
            tokenizer_class(path / folder)
        except DiffsrError as e:
            errors.append(str(e))
    for attachment in model.attachments:
        errors += attachment.file_errors(path / attachment.folder)
    errors += model.file_errors(path)
    if errors:
        raise DiffsrError(f"checkpoint {path} is incomplete: {'; '.join(errors)}")


def _before_captions(pipeline: dict[str, Any], model: ModelFamily) -> dict[str, Any]:
    """A `diffsr.json` written before prompts could be captions holds its family's default prompt as `prompt`: that
    is now the caption suffix (the prompt where there is no caption), so a captioner added to it is used. The
    prompt text without a captioner is the same."""
    if "caption_suffix" in pipeline or pipeline.get("prompt") != model.defaults.caption_suffix:
        return pipeline
    return {**pipeline, "prompt": None, "caption_suffix": pipeline["prompt"]}


def checkpoint_meta(model: ModelFamily, defaults: PipelineConfig) -> dict[str, Any]:
    """The `diffsr.json` of a checkpoint; a family defined outside diffsr names its module (imported to register it
    wherever the checkpoint opens: a command, an export process, a Triton model)."""
    module = module_of(model)
    return {"format_version": FORMAT_VERSION, "family": model.name,
            **({} if module is None or module.startswith("diffsr.") else {"family_module": module}),
            "model": model.to_json(), "pipeline": defaults.to_json()}


def weight_source(model: ModelFamily, name: str, parameter: str) -> tuple[str, str]:
    """(component folder, key in its weights file) of a submodule's parameter. Wrappers hold their
    components under the folders' names (`controlnet.conv_in.weight` -> controlnet, conv_in.weight);
    a single-component submodule's names are its file's keys."""
    folders = model.parts(name)[0]
    head, _, rest = parameter.partition(".")
    if head in folders:
        return head, rest
    if len(folders) == 1:
        return folders[0], parameter
    raise DiffsrError(f"{name}: parameter {parameter!r} belongs to none of {list(folders)}")


def build(ckpt: Checkpoint, name: str) -> nn.Module:
    """A submodule from its components' configs, in eval mode, without loading any weights: call it
    under `torch.device("meta")`, a FakeTensorMode or `empty_parameters()`."""
    folders, combine = ckpt.model.parts(name)
    components = ckpt.model.components()
    return combine(*(components[f].build(ckpt.path / f) for f in folders)).eval().requires_grad_(False)


@contextmanager
def empty_parameters() -> Iterator[None]:
    """Networks built inside have their parameters on the meta device (no memory), buffers real."""
    with init_empty_weights(include_buffers=False):
        yield


def weights_file(ckpt: Checkpoint, folder: str) -> Path:
    """The single weights file of a component as `init` writes it (a published one may be sharded)."""
    return stored_weights(ckpt, folder).file


def stored_weights(ckpt: Checkpoint, folder: str) -> StoredWeights:
    component = ckpt.model.components()[folder]
    return StoredWeights(ckpt.path / folder, component.weights, component.tied,
                         library_names(component, ckpt.path / folder))


def check_weights(weights: StoredWeights, expected: dict[str, tuple[int, ...]], others_allowed: bool = False) -> None:
    """Stored weights against what a network needs: every key with its shape, and (unless the network
    uses the component in part, as the decoder does the VAE) no other key."""
    stored = weights.shapes
    missing = sorted(set(expected) - set(stored))
    unexpected = [] if others_allowed else sorted(weights.stored() - set(expected))
    shapes = [k for k in expected if k in stored and stored[k] != expected[k]]
    if missing or unexpected or shapes:
        detail = "; ".join(
            f"{what} {keys[:3]}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
            if keys
        )
        raise DiffsrError(f"weights in {weights} do not match its config.json: {detail}")


def load_submodule(ckpt: Checkpoint, name: str, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The PyTorch reference of one submodule, FP32 (or `dtype`: a 7B language model's in BF16 fits where its FP32
    does not) on the CPU; reads only its components' files, one tensor at a time, into a network built without
    weights."""
    with empty_parameters():
        module = build(ckpt, name)
    wanted: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}  # folder -> key -> (parameter, shape)
    for parameter, tensor in module.state_dict().items():
        folder, key = weight_source(ckpt.model, name, parameter)
        wanted.setdefault(folder, {})[key] = (parameter, tuple(tensor.shape))
    state: dict[str, torch.Tensor] = {}
    for folder, keys in wanted.items():
        weights = stored_weights(ckpt, folder)
        check_weights(weights, {k: shape for k, (_, shape) in keys.items()}, others_allowed=ckpt.model.partial(name))
        stored = {key: weights.locate(key)[1] for key in keys}  # tied keys share one stored tensor: read once
        read = {k: t.to(dtype) if t.is_floating_point() else t for k, t in weights.read(list(dict.fromkeys(stored.values())))}
        for key, (parameter, _) in keys.items():
            state[parameter] = read[stored[key]]
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval().requires_grad_(False)


def parameter_bytes(ckpt: Checkpoint, name: str) -> int:
    """The bytes a submodule's parameters take in FP32, from its configs (nothing is loaded)."""
    with torch.device("meta"):
        return sum(4 * t.numel() for t in build(ckpt, name).state_dict().values())


def load_reference(path: str | Path) -> tuple[Checkpoint, dict[str, nn.Module]]:
    ckpt = open_checkpoint(path)
    return ckpt, {name: load_submodule(ckpt, name) for name in ckpt.model.submodules}
