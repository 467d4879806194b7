"""Model families: everything family-specific about a model is declared by one class, bound to one config.

A family (a `ModelFamily` subclass, one module under `diffsr/export/model/families/`) declares its
submodules and their signatures, its named dims, checkpoint components (folder -> network), tokenizers,
latent geometry, what a request carries (`family_inputs`, beside every model's `BASE_INPUTS`), which submodules
run once per request and which at every step (`Stages`; prompting stages, whose outputs the family reads as words of
the prompt: `words`), the model-specific part of a denoising step (`predict`:
noise or velocity, the guidance layout), its default sampler and scheduler config, what INT8 leaves out and what FP16
keeps whole, and how a new checkpoint is drawn. An instance is a model: the family bound to its config
(`checkpoint.model`) and to the checkpoint's attachments (`Attachment`: optional models in folders of their own, such
as a captioner, whose graphs join the submodules). Shared code asks the model; it never names a submodule or branches
on a family, and this class knows no attachment by name.

A family declares its own dims, components, parts and sample draws (`family_dims`, `family_components`, ...); the
model's `dims`, `components`, `parts`, ... are those plus each attachment's.

`diffsr.json` names the family; `register` adds one. The lookups by name (`families`, `preset`, `model_from_json`)
are the families package's (`diffsr.export.model.families`), which registers the built-ins on import.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from diffsr.export.core.configs import dataclass_from_json
from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.attachment import Attachment
from diffsr.export.model.dims import BATCH_KINDS, MIN_LATENT, NamedDim
from diffsr.export.model.inputs import PHOTO_KINDS, PromptSlot, RequestInput
from diffsr.export.model.parts import Component, Draw, RunFn, Stages, Tensors
from diffsr.export.model.settings import BASE_INPUTS, PipelineConfig
from diffsr.export.model.signatures import Signature, TensorSpec, parse_dim


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

    def __init__(self, config: Any, attachments: tuple[Attachment, ...] = ()):
        if not isinstance(config, self.config_class):
            raise DiffsrError(f"the {self.name} family takes a {self.config_class.__name__}, not {type(config).__name__}")
        self.config: Any = config  # a frozen dataclass: the family's `config_class`
        self.attachments = tuple(attachments)  # the checkpoint's attached models, in the order they run

    def with_attachments(self, attachments: tuple[Attachment, ...]) -> ModelFamily:
        """This model with (only) these attachments."""
        return type(self)(self.config, attachments)

    def attachment(self, folder: str) -> Attachment | None:
        return next((a for a in self.attachments if a.folder == folder), None)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ModelFamily) and type(other) is type(self) and bool(other.config == self.config)
                and other.attachments == self.attachments)

    def __hash__(self) -> int:
        return hash((type(self), self.config, self.attachments))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, (self.config, *self.attachments)))})"

    # --- what a request carries, and what runs once for it ----------------------------------------

    def family_inputs(self) -> tuple[RequestInput, ...]:
        """The family's own request inputs, beside every model's `BASE_INPUTS` (a second prompt, reference photos)."""
        return ()

    def request_inputs(self) -> tuple[RequestInput, ...]:
        base = [dataclasses.replace(i, tensor=self.stages.photo) if i.name == "image" else i for i in BASE_INPUTS]
        return (*base, *self.family_inputs())

    def prompt_slots(self) -> tuple[PromptSlot, ...]:
        """The request's texts a prompter may write of the photo, in the order it writes them: the prompt (with the
        request's `caption_prompt` as its instruction), and a family's own (XPSR's low-level prompt)."""
        return (PromptSlot("prompt"),)

    def prompter(self) -> Attachment | None:
        """The attachment that writes the prompt slots (one at most), if the checkpoint has one."""
        return next((a for a in self.attachments if a.writes), None)

    def input_values(self, settings: PipelineConfig) -> dict[str, Any]:
        """The family's non-photo inputs of a request: the settings' values, else the declarations' defaults."""
        return {i.name: settings.inputs.get(i.name, i.default) for i in self.family_inputs() if i.kind not in PHOTO_KINDS}

    def settings_errors(self, settings: PipelineConfig) -> list[str]:
        """What a request's (or a checkpoint's default) settings ask that this model cannot give, one line each: a
        caption without a captioner, guidance or a prompt for a model without text (no tokenizer: LDM x4's; it would
        be ignored), a family input that is not declared or out of its range."""
        errors = []
        if not self.tokenizer_folders():
            if settings.cfg:
                errors.append(f"guidance_scale={settings.guidance_scale}: the {self.name} family has no text "
                              "conditioning to guide by; use 1.0")
            for name in ("prompt", "negative_prompt"):
                if getattr(settings, name):
                    errors.append(f"{name}={getattr(settings, name)!r}: the {self.name} family has no text "
                                  "conditioning; leave it out")
        if settings.caption == "always" and self.prompter() is None:
            errors.append('caption="always" needs an attachment that writes the prompt (a prompter/ or captioner/ '
                          'folder: `diffsr init --prompter llava-tiny` or `--captioner blip2-tiny`, or a LLaVA-1.5 or '
                          'BLIP-2 folder copied there), or use caption="auto"')
        declared = {i.name: i for i in self.family_inputs() if i.kind not in PHOTO_KINDS}
        for name, value in settings.inputs.items():
            if name not in declared:
                errors.append(f"this {self.name} model has no setting input {name!r} (it has {sorted(declared)})")
                continue
            try:
                declared[name].check(value)
            except DiffsrError as e:
                errors.append(str(e))
        return errors

    def token_ids(self, tokenize: Callable[[list[str]], dict[str, Any]], texts: Mapping[str, str],
                  guided: bool) -> dict[str, np.ndarray[Any, Any]]:
        """A request's texts (the prompt, the negative prompt, the family's own texts) -> token ids by input name:
        the prompt after the negative prompt with guidance (the order of the loop's batch)."""
        return tokenize([texts["negative_prompt"], texts["prompt"]] if guided else [texts["prompt"]])

    def token_part(self) -> str:
        """The pipeline part tokenising is timed as: the first once-per-request stage that takes token ids."""
        names = set(self.tokenizer_folders())
        return next((s.part for s in self.stages.once if names & {t.name for t in self.signature(s.submodule).inputs}),
                    "text")

    def prepared(self) -> list[TensorSpec]:
        """What a request's preparation hands the once-per-request stages (the photos' pixels, token ids, what the
        prompting stages made): every input of a stage that is not prompting that no earlier such stage makes, in the
        order the stages take them."""
        made: set[str] = set()
        out: dict[str, TensorSpec] = {}
        for stage in self.stages.once:
            if stage.prompting:
                continue
            sig = self.signature(stage.submodule)
            out |= {t.name: t for t in sig.inputs if t.name not in made and t.name not in out}
            made |= {t.name for t in sig.outputs}
        return list(out.values())

    def photo_views(self) -> tuple[str, ...]:
        """Tensors a family's own image processor makes of the request's photo (SISRM: its segmenter's `pixel_values`,
        as the segmenter folder's `SegformerImageProcessor` makes them): what `view` returns."""
        return ()

    def view(self, rgb: np.ndarray[Any, Any], root: Path) -> dict[str, torch.Tensor]:
        """The request's photo ((H, W, 3) uint8, edge-padded to cover the prepared photo's frame, so that what is made
        of it lines up with the prepared photo) as the family's processors prepare it (`photo_views`), from the files
        under `root` (a checkpoint, or a Triton model's copy of its `reading_folders`)."""
        return {}

    def file_errors(self, path: Path) -> list[str]:
        """What is wrong with the family's own files under the checkpoint `path` that a request reads (SISRM: its
        segmenter's image processor and class names), one message each; checked when a checkpoint opens."""
        return []

    def words(self, made: Tensors, inputs: Mapping[str, Any], root: Path) -> dict[str, str]:
        """What the prompting stages' outputs say, by prompt slot (SISRM: the names of the classes its label generator
        ranks highest, for the prompt); `inputs`: the request's family inputs (`input_values`)."""
        return {}

    def reading_folders(self) -> dict[str, tuple[str, ...]]:
        """The checkpoint folders a request's preparation reads, each with the file patterns it reads: every
        tokenizer's files, and a family's own (SISRM: its segmenter's configs, for the image processor and the label
        names). The endpoint's preprocessing holds a copy of these."""
        return {folder: ("*",) for folder in self.tokenizer_folders().values()}

    def check_stages(self) -> None:
        """The declaration's own consistency: every once-per-request stage's inputs are prepared from the request or
        made by an earlier stage (a prompting stage's: from the photos alone, or earlier prompting stages); `start` is a
        tiled stage's output; every step and decode submodule exists; the prompt slots are the prompt and declared text
        inputs."""
        texts = {"prompt", *(i.name for i in self.family_inputs() if i.kind == "text")}
        slots = [slot.text for slot in self.prompt_slots()]
        if "prompt" not in slots or not set(slots) <= texts or len(set(slots)) != len(slots):
            raise DiffsrError(f"{self.name}: prompt slots {slots} must include 'prompt', once each, and name only "
                              f"declared text inputs ({sorted(texts)})")
        photos = {*self.photo_views(), *(i.tensor for i in self.request_inputs() if i.kind in PHOTO_KINDS)}
        ready, early = {*self.tokenizer_folders(), *photos}, set(photos)
        tiled: set[str] = set()
        for stage in self.stages.once:
            sig = self.signature(stage.submodule)
            missing = [t.name for t in sig.inputs if t.name not in ready]
            if missing:
                raise DiffsrError(f"{self.name}: stage {stage.submodule} needs {missing}, which no request input or "
                                  "earlier stage makes")
            if stage.prompting:
                late = [t.name for t in sig.inputs if t.name not in early]
                if stage.tiled or late:
                    raise DiffsrError(f"{self.name}: prompting stage {stage.submodule} must be untiled and read only "
                                      f"photos and earlier prompting stages' outputs (it reads {late})")
                early |= {t.name for t in sig.outputs}
            sideless = [t.name for t in sig.outputs if self.side_scale(t) is None]
            if stage.tiled and (sideless or all(self.side_scale(t) is None for t in sig.inputs)):
                raise DiffsrError(f"{self.name}: tiled stage {stage.submodule} must take and make tensors with the "
                                  f"latent's sides (outputs without: {sideless})")
            ready |= {t.name for t in sig.outputs}
            tiled |= {t.name for t in sig.outputs} if stage.tiled else set()
        if self.stages.start not in tiled:
            raise DiffsrError(f"{self.name}: start {self.stages.start!r} is no tiled stage's output ({sorted(tiled)})")
        for name in (*self.stages.step, self.stages.decode):
            self.signature(name)

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
    def native_latent(self) -> int:
        """The latent side the model was trained at: the default tile and the engines' opt (the config's)."""
        return int(self.config.native_latent)

    @abstractmethod
    def family_dims(self) -> tuple[NamedDim, ...]:
        """The dynamic dims its signatures name."""

    def dims(self) -> tuple[NamedDim, ...]:
        """Every dynamic dim of the model's signatures: the family's, then each attachment's."""
        return self.family_dims() + tuple(d for a in self.attachments for d in a.dims())

    @abstractmethod
    def declare(self) -> tuple[Signature, ...]:
        """Every submodule's signature, in pipeline order."""

    @cached_property
    def _signatures(self) -> dict[str, Signature]:
        return {s.name: s for s in (*(s for a in self.attachments for s in a.declare()), *self.declare())}

    def owner(self, submodule: str) -> Attachment | None:
        """The attachment a submodule is a graph of (None: the family's own)."""
        return next((a for a in self.attachments if submodule in a.graphs), None)

    def stand_in(self, submodule: str) -> str:
        """What stands in for a submodule's outputs where a deployment leaves it out ("": nothing can)."""
        owner = self.owner(submodule)
        return owner.stand_in if owner is not None else self.droppable.get(submodule, "")

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

    def side_scale(self, spec: TensorSpec) -> int | None:
        """Values per latent cell of a tensor's last two axes (1 at latent resolution, the latent factor for an
        image), or None where they are not the latent's sides (a vector, a token axis)."""
        last = spec.shape[-1] if spec.shape else None
        sides = {d.name for d in self.dims() if d.kind == "side"}
        if not isinstance(last, str) or parse_dim(last)[1] not in sides:
            return None
        return parse_dim(last)[0]

    def batched_inputs(self, sig: Signature) -> tuple[str, ...]:
        """A signature's inputs whose first dim counts images (or tiles): what a batch of tiles repeats per tile."""
        kinds = {d.name: d.kind for d in self.dims()}
        return tuple(t.name for t in sig.inputs
                     if t.shape and isinstance(t.shape[0], str) and kinds.get(parse_dim(t.shape[0])[1]) in BATCH_KINDS)

    def photo_lists(self) -> tuple[RequestInput, ...]:
        """The family's lists of photos (refsr's references): what a gallery fills, and, where a request may leave
        one empty, what the stages reading it must do without (`runtime.stages.not_run`)."""
        return tuple(i for i in self.family_inputs() if i.kind == "photos")

    def tiled_scales(self) -> dict[str, int]:
        """What every step reads a tile's crop of, and its scale: the tiled once-per-request stages' outputs, and the
        prepared photos a step submodule takes (LDM x4's UNet reads the LR photo beside the latent)."""
        stepped = {t.name for name in self.stages.step for t in self.signature(name).inputs}
        photos = [t for t in self.prepared() if t.name in stepped]
        made = [t for s in self.stages.once if s.tiled for t in self.signature(s.submodule).outputs]
        return {t.name: scale for t in (*photos, *made) if (scale := self.side_scale(t)) is not None}

    @property
    def photo_scale(self) -> int:
        """Values per latent cell of the request's prepared photo (`Stages.photo`): the latent factor where the first
        stage takes it at the output's pixels, 1 where it takes it at the latent's sides (LDM x4's LR photo)."""
        spec = next(t for t in self.prepared() if t.name == self.stages.photo)
        scale = self.side_scale(spec)
        if scale is None:
            raise DiffsrError(f"{self.name}: the photo {spec.name!r} must have the latent's sides (at some scale)")
        return scale

    # --- the checkpoint ----------------------------------------------------------------------

    @abstractmethod
    def family_components(self) -> dict[str, Component]:
        """Checkpoint folder -> its network and weights file."""

    def components(self) -> dict[str, Component]:
        """The family's components and each attachment's."""
        found = self.family_components()
        for a in self.attachments:
            found |= a.components()
        return found

    @abstractmethod
    def family_parts(self, submodule: str) -> tuple[tuple[str, ...], Callable[..., nn.Module]]:
        """The component folders a submodule is made of, and how they combine into it."""

    def parts(self, submodule: str) -> tuple[tuple[str, ...], Callable[..., nn.Module]]:
        owner = self.owner(submodule)
        return owner.parts(submodule) if owner is not None else self.family_parts(submodule)

    def family_partial(self, submodule: str) -> bool:
        """Whether the submodule uses only part of a component's weights (a VAE's decoder half)."""
        return False

    def partial(self, submodule: str) -> bool:
        owner = self.owner(submodule)
        return owner.partial(submodule) if owner is not None else self.family_partial(submodule)

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
        """The family's draws, or an attachment's for its graphs."""
        owner = self.owner(submodule)
        return owner.sample_draws() if owner is not None else self.family_draws()

    def force_upcast(self, path: Path) -> tuple[str, ...]:
        """Submodules that stay wholly FP32 unless calibration proves FP16 safe (a VAE marked as
        overflowing, diffusers' `force_upcast`)."""
        return ()

    # --- the pipeline's model-specific math (device tensors only: a CUDA graph can capture it) ------

    def conditioning(self, once: Tensors, size: tuple[int, int],
                     inputs: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """What every step takes besides the latent and the tiled stages' outputs, from the untiled once-per-request
        stages' outputs (the text states), the output size in pixels and the family's own request inputs
        (`input_values`: its numbers and choices reach the model here)."""
        return dict(once)

    def tile_conditioning(self, cond: Tensors, corners: torch.Tensor) -> dict[str, torch.Tensor]:
        """The conditioning of a batch of n tiles (`corners` (n, 4): top, left, height, width in pixels): each
        row repeated n times, in the order `predict` lays its batch out."""
        n = corners.shape[0]
        return {name: t.repeat_interleave(n, dim=0) for name, t in cond.items()}

    @abstractmethod
    def predict(self, run: RunFn, x: torch.Tensor, tiled: Tensors, cond: Tensors, row: torch.Tensor) -> torch.Tensor:
        """The guided model output for latent x (noise or velocity, as the scheduler config says); `tiled` holds the
        tiled stages' outputs (x's tile of them), `cond` the conditioning; `row` is the step's device row: the
        model's timestep, the guidance scale, then the scheduler's coefficients."""

    # --- JSON ---------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The model config, and each attachment's widths under its folder's name (what a manifest or a Triton model
        rebuilds the signatures from; a checkpoint's own folders are read instead)."""
        data: dict[str, Any] = dataclasses.asdict(self.config)
        for a in self.attachments:
            data[a.folder] = a.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any], attachments: tuple[Attachment, ...] = ()) -> ModelFamily:
        """From the model config alone (`families.model_from_json` reads the attachments' entries)."""
        return cls(dataclass_from_json(cls.config_class, data, f"{cls.name} model config"), attachments)


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
