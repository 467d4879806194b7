"""The attachments: optional models a checkpoint may carry in folders of their own, attached to any family
(`attachment.Attachment`). Each kind is one module; `KINDS` names them by folder.

    prompter/    LLaVA-1.5: a family's prompts of the photo, each from an instruction (`prompter.py`)
    captioner/   BLIP-2 (OPT): the photo's caption, the paper's own prompt (`captioner.py`)
    gallery_encoder/  CLIP's image encoder: photos embedded for a reference gallery (`gallery_encoder.py`)

A checkpoint holds one attachment that writes prompts at most.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.attachment import Attachment
from diffsr.export.model.attachments.captioner import Captioner
from diffsr.export.model.attachments.gallery_encoder import GalleryEncoder
from diffsr.export.model.attachments.prompter import Prompter

KINDS: dict[str, type[Attachment]] = {Prompter.folder: Prompter, Captioner.folder: Captioner,
                                      GalleryEncoder.folder: GalleryEncoder}


def open_attachments(checkpoint: Path) -> tuple[Attachment, ...]:
    """The attachments a checkpoint folder holds, in `KINDS`' order (the order they run in)."""
    found = tuple(kind.open(checkpoint / folder) for folder, kind in KINDS.items() if (checkpoint / folder).exists())
    writers = [a.folder for a in found if a.writes]
    if len(writers) > 1:
        raise DiffsrError(f"{checkpoint} holds {' and '.join(f'{w}/' for w in writers)}: a checkpoint has one attachment "
                          "that writes its prompts; remove the others")
    return found


def attachments_from_json(data: dict[str, Any]) -> tuple[tuple[Attachment, ...], dict[str, Any]]:
    """(the attachments, the family's own entry) of a model's JSON (`ModelFamily.to_json`)."""
    found = tuple(kind.from_json(data[folder]) for folder, kind in KINDS.items() if folder in data)
    return found, {k: v for k, v in data.items() if k not in KINDS}
