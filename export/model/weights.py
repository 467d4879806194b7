"""A component's stored weights, as the libraries publish them: one safetensors file, or shards named by
an index (`model.safetensors.index.json`, `diffusion_pytorch_model.safetensors.index.json`: T5-XXL and
other large networks come so), with tied tensors stored under one of their names.

Only headers are read to learn keys and shapes; tensors are read one at a time, when asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.files import read_json


@dataclass(frozen=True)
class StoredWeights:
    """`folder/name`, or the shards its `name.index.json` maps keys to. `tied`: pairs of keys naming one
    tensor (a tied embedding); either may be the one stored. `rename`: a stored key -> the network's name of it,
    where its library renames keys on loading (`components.library_names`); keys here are the network's."""

    folder: Path
    name: str
    tied: tuple[tuple[str, str], ...] = field(default=())
    rename: Callable[[str], str] | None = None

    @property
    def file(self) -> Path:
        return self.folder / self.name

    @property
    def index(self) -> Path:
        return self.folder / f"{self.name}.index.json"

    def __str__(self) -> str:
        return str(self.file if self.file.is_file() or not self.index.is_file() else self.index)

    @cached_property
    def _stored(self) -> dict[str, tuple[Path, tuple[int, ...]]]:
        """key (the network's name) -> (the file holding it, its shape)."""
        return {self._names.get(key, key): held for key, held in self._as_stored.items()}

    @cached_property
    def _names(self) -> dict[str, str]:
        """stored key -> the network's, where they differ."""
        rename = self.rename
        return {} if rename is None else {k: new for k in self._as_stored if (new := rename(k)) != k}

    @cached_property
    def _stored_names(self) -> dict[str, str]:
        return {network: stored for stored, network in self._names.items()}

    @cached_property
    def _as_stored(self) -> dict[str, tuple[Path, tuple[int, ...]]]:
        """key as stored -> (the file holding it, its shape), each file's header read once."""
        if self.file.is_file():
            return {key: (self.file, shape) for key, shape in _header(self.file).items()}
        if not self.index.is_file():
            raise DiffsrError(f"checkpoint file missing: {self.file} (nor a sharded {self.index.name})")
        weight_map = read_json(self.index, "weights index", "fix or replace the checkpoint").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise DiffsrError(f"{self.index} has no weight_map")
        by_shard: dict[str, list[str]] = {}
        for key, shard in weight_map.items():
            by_shard.setdefault(shard, []).append(key)
        stored: dict[str, tuple[Path, tuple[int, ...]]] = {}
        for shard, listed in sorted(by_shard.items()):
            header = _header(self.folder / shard)
            lacking = sorted(k for k in listed if k not in header)
            if lacking:
                raise DiffsrError(f"{self.index} maps {lacking[:3]} to {shard}, which lacks them")
            stored.update((k, (self.folder / shard, header[k])) for k in listed)
        return stored

    @property
    def files(self) -> dict[str, Path]:
        """key -> the file holding it."""
        return {key: file for key, (file, _) in self._stored.items()}

    @cached_property
    def _partners(self) -> dict[str, str]:
        return {a: b for pair in self.tied for a, b in (pair, pair[::-1])}

    @cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """key -> shape of every stored tensor, and of each tied key whose partner is stored."""
        shapes = {key: shape for key, (_, shape) in self._stored.items()}
        for key, partner in self._partners.items():
            if key not in shapes and partner in shapes:
                shapes[key] = shapes[partner]
        return shapes

    def stored(self) -> set[str]:
        """The keys as stored (tied partners not added)."""
        return set(self._stored)

    def locate(self, key: str) -> tuple[Path, str]:
        """(file, stored key) of a key (the network's name, or the stored one); a tied key resolves to its stored
        partner."""
        name = key if key in self._stored else self._partners.get(key, key)
        if name in self._stored:
            return self._stored[name][0], self._stored_names.get(name, name)
        if key in self._as_stored:
            return self._as_stored[key][0], key
        raise DiffsrError(f"weights in {self} have no tensor {key!r}")

    def read(self, keys: list[str], window: int = 1 << 29) -> Iterator[tuple[str, torch.Tensor]]:
        """(key, tensor) in `keys` order, each file reopened after every `window` bytes read: a mapping keeps
        the pages it touched resident, and SDXL's files are 5 GB."""
        located, done = [self.locate(key) for key in keys], 0
        while done < len(keys):
            file, read = located[done][0], 0
            with safe_open(str(file), "pt") as f:
                while done < len(keys) and read < window and located[done][0] == file:
                    tensor = f.get_tensor(located[done][1])
                    read += tensor.numel() * tensor.element_size()
                    yield keys[done], tensor
                    done += 1


def _header(file: Path) -> Mapping[str, tuple[int, ...]]:
    """key -> shape of a safetensors file's tensors, from its header."""
    if not file.is_file():
        raise DiffsrError(f"checkpoint file missing: {file}")
    try:
        with safe_open(str(file), "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise DiffsrError(f"cannot read weights {file}: {e}") from None
