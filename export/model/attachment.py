"""An attachment: an optional model a checkpoint carries in a folder of its own, attached to any family (the BLIP-2
captioner: `attachments/captioner.py`; the LLaVA prompter: `attachments/prompter.py`). The family class asks each attachment through this interface; it names none.
A new kind is its declaration here (a module under `attachments/`, named in `attachments.KINDS`) and its runner in the
runtime (named in `runtime/prompts.PROMPTERS`): one line in each table, no branch anywhere."""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.dims import NamedDim
from diffsr.export.model.inputs import PromptSlot
from diffsr.export.model.parts import Component, Draw
from diffsr.export.model.signatures import Signature


class Attachment(ABC):
    """(A frozen dataclass whose first field is `path`, its folder.) An optional model a checkpoint carries in a folder of its own, beside its family's networks, and attached to
    any family: an image-to-text model (the BLIP-2 captioner, `attachments/captioner.py`; the LLaVA prompter,
    `attachments/prompter.py`). Its graphs are submodules of the model like the family's own (exported, checked,
    engine-built, budgeted, served); what it makes for a request (the texts it `writes`) is made once per request,
    before the family's stages, by its runtime runner (`runtime/prompts.py`)."""

    folder: ClassVar[str]  # its checkpoint folder, and its key in the model's JSON
    # whether it writes the request's texts (the family's prompt slots, under the prompt policy); a checkpoint holds
    # one such prompter at most
    writes: ClassVar[bool] = False
    # whether it follows a slot's instruction (LLaVA writes every slot), or only continues a prompt (a captioner
    # writes the prompt alone)
    instructed: ClassVar[bool] = False
    part: ClassVar[str] = ""  # the pipeline part it is timed and benchmarked as (a captioner: "caption")
    stand_in: ClassVar[str] = ""  # what stands in for its outputs where a deployment leaves it out

    @classmethod
    @abstractmethod
    def open(cls, folder: Path) -> Attachment:
        """What a checkpoint's folder says (its widths), read without building any network."""

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Attachment:
        """From its `to_json` (what a manifest or a Triton model rebuilds the signatures from): a dataclass's fields
        but its `path`, which is its folder's name until a caller gives the real one."""
        try:
            return cls(Path(cls.folder), **data)  # type: ignore[call-arg]
        except TypeError as e:
            raise DiffsrError(f"{cls.folder} entry {data} is malformed: {e}") from None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "path"}  # type: ignore[call-overload]

    @abstractmethod
    def dims(self) -> tuple[NamedDim, ...]: ...

    @abstractmethod
    def declare(self) -> tuple[Signature, ...]: ...

    @abstractmethod
    def components(self) -> dict[str, Component]: ...

    @abstractmethod
    def parts(self, submodule: str) -> tuple[tuple[str, ...], Callable[..., nn.Module]]: ...

    def partial(self, submodule: str) -> bool:
        """Whether a graph uses only part of its folder's weights (each of a captioner's graphs does)."""
        return False

    def writes_slot(self, slot: PromptSlot) -> bool:
        """Whether it writes a prompt slot: an instructed one every slot, a captioner the prompt alone."""
        return self.writes and (self.instructed or slot.text == "prompt")

    def sample_draws(self) -> Mapping[str, Draw]:
        return {}

    def file_errors(self, folder: Path) -> list[str]:
        """What is missing or unreadable in its folder besides its components (checked when a checkpoint opens)."""
        return []

    def serving_files(self, folder: Path) -> list[Path]:
        """What the endpoint's preprocessing needs of its folder besides the graphs (configs, a tokenizer)."""
        return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in (".json", ".txt", ".model"))

    @property
    def graphs(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.declare())
