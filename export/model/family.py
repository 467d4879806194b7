"""Model families: everything family-specific about a model is declared by one class, bound to one config.

A family (a `ModelFamily` subclass, one module under `diffsr/export/model/families/`) declares its
submodules and their signatures, its named dims, checkpoint components (folder -> network), tokenizers,
latent geometry, which submodule plays which part of the pipeline (`Stages`), the model-specific part
of a denoising step (`predict`: noise or velocity, the guidance layout), its default sampler and
scheduler config, what INT8 leaves out and what FP16 keeps whole, and how a new checkpoint is drawn.
An instance is a model: the family bound to its config (`checkpoint.model`), and to the checkpoint's
captioner where it has one (`export/model/captioner.py`: its three graphs join the family's submodules).
Shared code asks the model; it never names a submodule or branches on a family.

A family declares its own dims, components, parts and sample draws (`family_dims`, `family_components`, ...);
the model's `dims`, `components`, `parts`, ... are those plus the captioner's.

`diffsr.json` names the family; `register` adds one (the built-ins register on import of
`diffsr.export.model.families`, which every lookup does first).
"""

from __future__ import annotations

import dataclasses
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from diffsr.export.core.configs import dataclass_from_json
from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.captioner import FOLDER as CAPTIONER
from diffsr.export.model.captioner import WEIGHTS as CAPTIONER_WEIGHTS
from diffsr.export.model.captioner import Captioner
from diffsr.export.model.dims import MIN_LATENT, NamedDim
from diffsr.export.model.settings import PipelineConfig
from diffsr.export.model.signatures import Signature, parse_dim

RunFn = Callable[..., Mapping[str, torch.Tensor]]  # run(submodule, **inputs) -> outputs
Tensors = Mapping[str, torch.Tensor]
Draw = Callable[[tuple[int, ...], torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class Stages:
    """Which submodules play each part of the pipeline (`runtime/pipeline.py`)."""

    text: tuple[str, ...]  # prompts' token ids -> the text conditioning, once per request
    lq: str  # the upsampled LQ image -> latent-resolution features, once, over tiles
    step: tuple[str, ...]  # called at every denoising step (kept loaded together; batched across requests)
    decode: str  # latent -> image, once, over tiles
    start: str  # the `lq` output that is the LQ image's latent: its shape is the latent's; a sampler may start from it


@dataclass(frozen=True)
class Component:
    """A checkpoint folder: its network, built from the folder's config.json, and its weights file (or
    that name's shards and index); `tied`: key pairs naming one tensor, either of which may be stored."""

    build: Callable[[Path], nn.Module]
    weights: str
    tied: tuple[tuple[str, str], ...] = ()


class ModelFamily(ABC):
    """A family bound to one model config. Subclasses set the class attributes and implement the rest."""

    name: ClassVar[str]
    config_class: ClassVar[type]
    presets: ClassVar[Mapping[str, Any]]  # preset name -> config
    stages: ClassVar[Stages]
    scheduler_config: ClassVar[Mapping[str, Any]]  # a new checkpoint's scheduler/scheduler_config.json
    defaults: ClassVar[PipelineConfig] = PipelineConfig()  # a new checkpoint's pipeline settings (diffsr.json)
    int8_default: ClassVar[tuple[str, ...]] = ()  # what `diffsr quantize` quantizes by default
    int8_kept: ClassVar[Mapping[str, str]] = {}  # weight-name parts kept out of INT8 -> why
    # submodules a deployment may leave out -> what stands in for their outputs (the budget counts both ways)
    droppable: ClassVar[Mapping[str, str]] = {}

    def __init__(self, config: Any, captioner: Captioner | None = None):
        if not isinstance(config, self.config_class):
            raise DiffsrError(f"the {self.name} family takes a {self.config_class.__name__}, not {type(config).__name__}")
        self.config: Any = config  # a frozen dataclass: the family's `config_class`
        self.captioner = captioner  # the checkpoint's captioner/, if it has one

    def with_captioner(self, captioner: Captioner | None) -> ModelFamily:
        """This model with (or without) a captioner's graphs."""
        return type(self)(self.config, captioner)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ModelFamily) and type(other) is type(self) and bool(other.config == self.config)
                and other.captioner == self.captioner)

    def __hash__(self) -> int:
        return hash((type(self), self.config, self.captioner))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r}{'' if self.captioner is None else f', {self.captioner!r}'})"

    # --- the model's shape -------------------------------------------------------------------

    @property
    def preset(self) -> str:
        return str(self.config.preset)

    @property
    @abstractmethod
    def latent_channels(self) -> int:
        """Channels of the latent the sampler denoises (the VAE's)."""

    @property
    def latent_factor(self) -> int:
        """Pixels per latent cell: 8 for SD's, SDXL's and SD3's VAEs; a family whose autoencoder differs says so."""
        return 8

    @property
    @abstractmethod
    def latent_multiple(self) -> int:
        """Latent sides must divide by this many cells (the networks halve them)."""

    @property
    def pixel_multiple(self) -> int:
        """Image sides the pipeline pads to: the latent factor times the latent multiple."""
        return self.latent_factor * self.latent_multiple

    @property
    def min_pixels(self) -> int:
        """The smallest image side the pipeline pads to: `MIN_LATENT` cells (every engine profile's least),
        rounded up to the pixel multiple."""
        return -(-MIN_LATENT * self.latent_factor // self.pixel_multiple) * self.pixel_multiple

    @property
    @abstractmethod
    def native_latent(self) -> int:
        """The latent side the model was trained at: the default tile and the engines' opt."""

    @abstractmethod
    def family_dims(self) -> tuple[NamedDim, ...]:
        """The dynamic dims its signatures name."""

    def dims(self) -> tuple[NamedDim, ...]:
        """Every dynamic dim of the model's signatures: the family's, then the captioner's."""
        return self.family_dims() + (self.captioner.dims() if self.captioner else ())

    @abstractmethod
    def declare(self) -> tuple[Signature, ...]:
        """Every submodule's signature, in pipeline order."""

    @cached_property
    def _signatures(self) -> dict[str, Signature]:
        return {s.name: s for s in (*(self.captioner.declare() if self.captioner else ()), *self.declare())}

    def captions(self, submodule: str) -> bool:
        """Whether the submodule is one of the captioner's graphs."""
        return self.captioner is not None and submodule in self.captioner.graphs

    def stand_in(self, submodule: str) -> str:
        """What stands in for a submodule's outputs where a deployment leaves it out ("": nothing can)."""
        if self.captions(submodule):
            return "a typed prompt, or the caption suffix alone (caption=never)"
        return self.droppable.get(submodule, "")

    def signatures(self) -> dict[str, Signature]:
        return dict(self._signatures)

    @property
    def submodules(self) -> tuple[str, ...]:
        return tuple(self._signatures)

    def signature(self, name: str) -> Signature:
        if name not in self._signatures:
            raise DiffsrError(f"unknown submodule {name!r} of the {self.name} family; choose one of {list(self.submodules)}")
        return self._signatures[name]

    def check_submodules(self, names: tuple[str, ...], what: str) -> None:
        unknown = [n for n in names if n not in self._signatures]
        if not names or unknown:
            raise DiffsrError(f"{what} {list(names)} must be one or more of {list(self.submodules)}")

    def scale(self, submodule: str, output: str) -> int:
        """Values per latent cell of an output's last two axes: 1 at latent resolution, the latent factor
        for an image."""
        spec = next(t for t in self.signature(submodule).outputs if t.name == output)
        last = spec.shape[-1]
        return parse_dim(last)[0] if isinstance(last, str) else 1

    # --- the checkpoint ----------------------------------------------------------------------

    @abstractmethod
    def family_components(self) -> dict[str, Component]:
        """Checkpoint folder -> its network and weights file."""

    def components(self) -> dict[str, Component]:
        """The family's components and the captioner (its language model's head may be stored as its embedding)."""
        if self.captioner is None:
            return self.family_components()
        from diffsr.export.model.captioner_networks import EMBED_TOKENS, LM_HEAD, build_blip2

        return self.family_components() | {CAPTIONER: Component(build_blip2, CAPTIONER_WEIGHTS, ((LM_HEAD, EMBED_TOKENS),))}

    @abstractmethod
    def family_parts(self, submodule: str) -> tuple[tuple[str, ...], Callable[..., nn.Module]]:
        """The component folders a submodule is made of, and how they combine into it."""

    def parts(self, submodule: str) -> tuple[tuple[str, ...], Callable[..., nn.Module]]:
        if self.captions(submodule):
            from diffsr.export.model.captioner_networks import GRAPHS

            return (CAPTIONER,), GRAPHS[submodule]
        return self.family_parts(submodule)

    def family_partial(self, submodule: str) -> bool:
        """Whether the submodule uses only part of a component's weights (a VAE's decoder half)."""
        return False

    def partial(self, submodule: str) -> bool:
        return self.captions(submodule) or self.family_partial(submodule)  # each caption graph is part of BLIP-2

    @abstractmethod
    def tokenizer_folders(self) -> dict[str, str]:
        """Token input -> the checkpoint folder of its tokenizer (what the endpoint's preprocessing copies)."""

    @abstractmethod
    def tokenizer(self, path: Path) -> Callable[[list[str]], dict[str, Any]]:
        """prompts -> {token input name: (N, L) int32 ids}, from the checkpoint's tokenizer folders."""

    @abstractmethod
    def networks(self) -> dict[str, tuple[nn.Module, dict[str, Any]]]:
        """For a new checkpoint: each component folder's network (parameters on the meta device) and config."""

    def copy_source(self, folder: str, key: str, shapes: Mapping[str, Mapping[str, tuple[int, ...]]]) -> str:
        """The seed name a new checkpoint draws a tensor under: a copy (a ControlNet of its UNet) draws
        its original's."""
        return f"{folder}/{key}"

    @abstractmethod
    def write_extras(self, out: Path) -> None:
        """A new checkpoint's files besides the networks: tokenizers."""

    def family_draws(self) -> Mapping[str, Draw]:
        """Random inputs of the right kind, per input name (token ids in the vocabulary, timesteps in range);
        others are N(0, 1)."""
        return {}

    def sample_draws(self, submodule: str) -> Mapping[str, Draw]:
        """The family's draws, or the captioner's for its graphs."""
        return self.captioner.sample_draws() if self.captioner and self.captions(submodule) else self.family_draws()

    def force_upcast(self, path: Path) -> tuple[str, ...]:
        """Submodules that stay wholly FP32 unless calibration proves FP16 safe (a VAE marked as
        overflowing, diffusers' `force_upcast`)."""
        return ()

    # --- the pipeline's model-specific math (device tensors only: a CUDA graph can capture it) ------

    def encode_text(self, run: RunFn, ids: Tensors) -> dict[str, torch.Tensor]:
        """Token ids -> the text conditioning: each text submodule on the ids it takes."""
        out: dict[str, torch.Tensor] = {}
        for name in self.stages.text:
            sig = self.signature(name)
            out |= run(name, **{t.name: ids[t.name] for t in sig.inputs})
        return out

    def conditioning(self, text: Tensors, size: tuple[int, int]) -> dict[str, torch.Tensor]:
        """What every step takes besides the latent and the LQ features, from the text conditioning and
        the output size in pixels."""
        return dict(text)

    def tile_conditioning(self, cond: Tensors, corners: torch.Tensor) -> dict[str, torch.Tensor]:
        """The conditioning of a batch of n tiles (`corners` (n, 4): top, left, height, width in pixels): each
        row repeated n times, in the order `predict` lays its batch out."""
        n = corners.shape[0]
        return {name: t.repeat_interleave(n, dim=0) for name, t in cond.items()}

    @abstractmethod
    def predict(self, run: RunFn, x: torch.Tensor, lq: Tensors, cond: Tensors, row: torch.Tensor) -> torch.Tensor:
        """The guided model output for latent x (noise or velocity, as the scheduler config says); `row` is
        the step's device row: the model's timestep, the guidance scale, then the scheduler's coefficients."""

    # --- JSON ---------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The model config, and the captioner's widths where it has one (what a manifest or a Triton model
        rebuilds the signatures from; a checkpoint's own captioner/ folder is read instead)."""
        data: dict[str, Any] = dataclasses.asdict(self.config)
        if self.captioner is not None:
            data[CAPTIONER] = self.captioner.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelFamily:
        data = dict(data)
        captioner = data.pop(CAPTIONER, None)
        return cls(dataclass_from_json(cls.config_class, data, f"{cls.name} model config"),
                   None if captioner is None else Captioner.from_json(captioner))


def guided(x: torch.Tensor, text_rows: int, row: torch.Tensor,
           call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Classifier-free guidance around one model call: with two text rows per latent row (negative, then
    positive) the latent is doubled, `call(batch, timestep)` runs once on it, and the output is
    negative + scale * (positive - negative); `row` holds the timestep, then the scale."""
    two = text_rows == 2 * x.shape[0]
    batch = torch.cat([x, x]) if two else x
    out = call(batch, row[:1].expand(batch.shape[0]))
    if two:
        negative, positive = out.chunk(2)
        out = negative + row[1] * (positive - negative)
    return out


FAMILIES: dict[str, type[ModelFamily]] = {}


def register(family: type[ModelFamily]) -> type[ModelFamily]:
    """Add a family (a class decorator). Its presets' names must be new."""
    taken = {p for f in FAMILIES.values() if f is not family for p in f.presets}
    clash = sorted(taken & set(family.presets))
    if clash:
        raise DiffsrError(f"family {family.name!r}: presets {clash} are another family's")
    FAMILIES[family.name] = family
    return family


def _builtins() -> None:
    importlib.import_module("diffsr.export.model.families")


def families() -> dict[str, type[ModelFamily]]:
    _builtins()
    return dict(FAMILIES)


def family(name: str) -> type[ModelFamily]:
    known = families()
    if name not in known:
        raise DiffsrError(f"unknown model family {name!r}; choose one of {sorted(known)}")
    return known[name]


def presets() -> dict[str, ModelFamily]:
    """Every family's presets, by name."""
    return {p: f(cfg) for f in families().values() for p, cfg in f.presets.items()}


def preset(name: str) -> ModelFamily:
    found = presets()
    if name not in found:
        raise DiffsrError(f"unknown preset {name!r}; choose one of {sorted(found)}")
    return found[name]


def model_from_json(family_name: str | None, data: dict[str, Any]) -> ModelFamily:
    """A model from a `diffsr.json` (or manifest) family and model entry. One written before families had a
    name holds none: the rule that infers it is the families package's own (`legacy_family`)."""
    _builtins()
    if family_name is None:
        from diffsr.export.model.families import legacy_family

        family_name, data = legacy_family(data)
    return family(family_name).from_json(data)
