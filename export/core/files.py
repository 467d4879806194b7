"""Small file steps every layer shares: a JSON object or a clear error, a folder that must be new,
a file that must be writable. Each failure is one DiffsrError line naming the path."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from diffsr.export.core.errors import DiffsrError


def read_json(path: Path, what: str, hint: str = "") -> dict[str, Any]:
    """A JSON object from a file; a missing file, invalid JSON or a non-object is an error naming
    `what` (e.g. "checkpoint file") and, for a missing file, what to do (`hint`)."""
    if not path.is_file():
        raise DiffsrError(f"{what} missing: {path}" + (f": {hint}" if hint else ""))
    try:
        data = json.loads(path.read_text(encoding="utf-8"))  # JSON is UTF-8, whatever the locale (a Triton stub's is ASCII)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DiffsrError(f"{what} is not valid JSON: {path}: {e}") from None
    except OSError as e:
        raise DiffsrError(f"cannot read {what} {path}: {e.strerror}") from None
    if not isinstance(data, dict):
        raise DiffsrError(f"{what} {path} holds {type(data).__name__}, not a JSON object")
    return data


def require_new_folder(out: Path) -> None:
    """An output folder must not exist yet, or be empty: nothing of the user's is overwritten."""
    if out.exists() and not out.is_dir():
        raise DiffsrError(f"output folder {out} is a file: choose a new --out")
    if out.exists() and any(out.iterdir()):
        raise DiffsrError(f"output folder {out} is not empty: choose a new --out or remove it")


def require_writable(path: Path) -> None:
    """A file about to be written (perhaps after minutes of work): its folder must exist and be writable,
    and the path must not be a folder. Checked before the work, not after."""
    folder = path.parent
    if path.is_dir():
        raise DiffsrError(f"output {path} is a folder: give a file name")
    if not folder.is_dir():
        raise DiffsrError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise DiffsrError(f"cannot write {path}: folder {folder} is not writable")


# the photo formats diffsr reads from a folder (a gallery, eval's pairs) and writes an upscaled photo as, whole
PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")


def require_image_name(path: Path) -> None:
    """An output photo's name must say a format it is written in whole (checked before the work, not after it)."""
    if path.suffix.lower() not in PHOTO_SUFFIXES:
        raise DiffsrError(f"cannot write {path}: {path.suffix or 'no extension'} names no photo format diffsr writes "
                          f"({', '.join(PHOTO_SUFFIXES)}); .png keeps every pixel")


def linked_copy(src: Path, out: Path) -> Path:
    """A new folder `out` holding `src`'s files: the graphs as hard links where the file system allows (no
    second copy of SDXL's gigabytes; every writer here replaces a graph file, never rewrites it in place),
    the rest (the manifest) as copies, which do get rewritten. Returns `out`."""
    import shutil

    require_new_folder(out)
    out.mkdir(parents=True, exist_ok=True)
    for file in sorted(p for p in Path(src).iterdir() if p.is_file()):
        if file.name.endswith((".onnx", ".onnx.data")):
            try:
                os.link(file, out / file.name)
                continue
            except OSError:
                pass
        shutil.copy2(file, out / file.name)
    return out
