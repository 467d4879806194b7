"""Cross-request step batching: one submodule call for the BLS calls of several requests' loops.

Triton's dynamic batcher queues the calls that the loop instances make to `fusion_transformer` and
`controlnet_unet` and hands a model several at once (only calls whose tensors have equal shapes are
grouped). Each call's tensors carry a leading request axis of 1 (the config's batch dimension); the
submodule's own batch is inside. Concatenating is not enough: a ControlNet + UNet call holds its tiles'
negative rows, then their positive rows (`cfg_batch`, the latent doubled for guidance), while f2 has one row
per tile (`batch`) and the graph repeats it to match. So `stack` concatenates `batch` inputs call after call
and `cfg_batch` inputs half by half (all negatives, then all positives), which keeps the graph's own pairing;
`unstack` undoes the same on the outputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.signatures import Signature

BATCHED = ("fusion_transformer", "controlnet_unet")  # called every step: worth a batch
BATCH_DIMS = ("batch", "cfg_batch")
Array = npt.NDArray[Any]


def _dim(sig: Signature, name: str) -> str:
    spec = next(s for s in (*sig.inputs, *sig.outputs) if s.name == name)
    first = spec.shape[0]
    if first not in BATCH_DIMS:
        raise DiffsrError(f"{sig.name}.{name}: its first dim {first!r} is not a batch dim; it cannot be step-batched")
    return str(first)


def groups(sig: Signature, feed: Mapping[str, Array]) -> int:
    """How many row groups a call's cfg_batch tensors hold: 2 with guidance (negatives, positives), else 1."""
    rows = {_dim(sig, s.name): feed[s.name].shape[0] for s in sig.inputs}
    if "cfg_batch" not in rows or "batch" not in rows:
        return 1
    if rows["cfg_batch"] % rows["batch"]:
        raise DiffsrError(f"{sig.name}: cfg_batch {rows['cfg_batch']} is not a multiple of batch {rows['batch']}")
    return rows["cfg_batch"] // rows["batch"]


def stack(sig: Signature, feeds: Sequence[Mapping[str, Array]]) -> dict[str, Array]:
    """One feed of several calls' feeds (all with equal shapes, so equal groups)."""
    n = groups(sig, feeds[0])
    out = {}
    for spec in sig.inputs:
        parts = [f[spec.name] for f in feeds]
        if _dim(sig, spec.name) == "cfg_batch":
            halves = [np.split(p, n) for p in parts]  # per call: [negatives, positives]
            out[spec.name] = np.concatenate([h[g] for g in range(n) for h in halves])
        else:
            out[spec.name] = np.concatenate(parts)
    return out


def unstack(sig: Signature, outputs: Mapping[str, Array], calls: int, n: int) -> list[dict[str, Array]]:
    """Each call's own outputs from the stacked call's outputs."""
    per_call: list[dict[str, Array]] = [{} for _ in range(calls)]
    for spec in sig.outputs:
        value = outputs[spec.name]
        if _dim(sig, spec.name) == "cfg_batch":
            by_group = [np.split(g, calls) for g in np.split(value, n)]  # [group][call]
            for i in range(calls):
                per_call[i][spec.name] = np.concatenate([by_group[g][i] for g in range(n)])
        else:
            for i, part in enumerate(np.split(value, calls)):
                per_call[i][spec.name] = part
    return per_call
