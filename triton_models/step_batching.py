"""Cross-request step batching: one submodule call for the BLS calls of several requests' loops.

Triton's dynamic batcher queues the calls that the loop instances make to the submodules of the family's
step stage (SD: `fusion_transformer`, `controlnet_unet`) and hands a model several at once (only calls
whose tensors have equal shapes are grouped). Each call's tensors carry a leading request axis of 1 (the
config's batch dimension); the submodule's own batch is inside. Concatenating is not enough: a guided
call holds its tiles' negative rows, then their positive rows (a `guided` dim, the latent doubled for
guidance), while an `images` dim has one row per tile (SD's f2) and the graph repeats it to match. So
`stack` concatenates `images` inputs call after call and `guided` inputs half by half (all negatives,
then all positives), which keeps the graph's own pairing; `unstack` undoes the same on the outputs.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.dims import BATCH_KINDS, NamedDim
from diffsr.export.model.signatures import Signature

Array = npt.NDArray[Any]


class StepBatching:
    """Stacking and unstacking the calls of one step submodule (`sig`, whose dims are `dims`)."""

    def __init__(self, sig: Signature, dims: Iterable[NamedDim]):
        kinds = {d.name: d.kind for d in dims}
        self.sig = sig
        self.kind: dict[str, str] = {}
        for spec in (*sig.inputs, *sig.outputs):
            first = spec.shape[0]
            if not isinstance(first, str) or kinds.get(first) not in BATCH_KINDS:
                raise DiffsrError(f"{sig.name}.{spec.name}: its first dim {first!r} does not count images; it cannot "
                                  "be step-batched")
            self.kind[spec.name] = kinds[first]

    def groups(self, feed: Mapping[str, Array]) -> int:
        """How many row groups a call's guided tensors hold: 2 with guidance (negatives, positives), else 1."""
        rows = {self.kind[s.name]: feed[s.name].shape[0] for s in self.sig.inputs}
        if "guided" not in rows or "images" not in rows:
            return 1
        if rows["guided"] % rows["images"]:
            raise DiffsrError(f"{self.sig.name}: {rows['guided']} guided rows are not a multiple of {rows['images']} images")
        return int(rows["guided"] // rows["images"])

    def stack(self, feeds: Sequence[Mapping[str, Array]]) -> dict[str, Array]:
        """One feed of several calls' feeds (all with equal shapes, so equal groups)."""
        n = self.groups(feeds[0])
        out = {}
        for spec in self.sig.inputs:
            parts = [f[spec.name] for f in feeds]
            if self.kind[spec.name] == "guided":
                halves = [np.split(p, n) for p in parts]  # per call: [negatives, positives]
                out[spec.name] = np.concatenate([h[g] for g in range(n) for h in halves])
            else:
                out[spec.name] = np.concatenate(parts)
        return out

    def unstack(self, outputs: Mapping[str, Array], calls: int, n: int) -> list[dict[str, Array]]:
        """Each call's own outputs from the stacked call's outputs."""
        per_call: list[dict[str, Array]] = [{} for _ in range(calls)]
        for spec in self.sig.outputs:
            value = outputs[spec.name]
            if self.kind[spec.name] == "guided":
                by_group = [np.split(g, calls) for g in np.split(value, n)]  # [group][call]
                for i in range(calls):
                    per_call[i][spec.name] = np.concatenate([by_group[g][i] for g in range(n)])
            else:
                for i, part in enumerate(np.split(value, calls)):
                    per_call[i][spec.name] = part
        return per_call
