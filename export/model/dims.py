"""The named dynamic dims, declared once: what each means and how its sizes follow from a deployment.

A signature's shapes name these dims ("batch", "8*latent_height"). Everything that needs sizes reads
them from here: the TensorRT profiles and Triton's served shape (`Target.dim_ranges`), the ONNX export's
example sizes and bounds (`trace`, `bound`), parity's odd shape (`odd`) and the benchmark's shape
(`Target.at`). A family lists its dims (`ModelFamily.dims`); a new kind of dim (a sequence length, a
cache length) is a new `NamedDim` there, not an edit of each consumer.

Kinds:
    images    images (or tiles) per call: the target's batch
    guided    latent rows of a guided call: the negative and the positive branch, twice the images
    prompts   prompts encoded at once: the positive and, with guidance, the negative
    side      a latent side in latent cells, a multiple of `multiple`: from the target's smallest side
              to `max_scale` times the model's native side, the native side being the opt
    fixed     a size set by the checkpoint (min = opt = max)
    beams     rows of a captioner's language model: one image's beams, 1 to `native` (images are captioned one
              at a time)
    length    a sequence length or a count (tokens, cache slots, reference photos): `least` to `bound`, `native` the
              opt, whatever the target
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import NamedTuple

from diffsr.export.core.errors import DiffsrError

KINDS = ("images", "guided", "prompts", "side", "fixed", "beams", "length")
BATCH_KINDS = ("images", "guided")  # dims that count images (tiles): what step batching stacks


class ShapeRange(NamedTuple):
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def contains(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.min) and all(lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max))


@dataclass(frozen=True)
class DimRange:
    min: int
    opt: int
    max: int

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise DiffsrError(f"dim range {self} must satisfy 1 <= min <= opt <= max")


@dataclass(frozen=True)
class NamedDim:
    """One dynamic dim. `trace` and `odd` are sizes in units of `multiple` (distinct from the other dims'
    and > 1, so tracing specialises nothing); `bound` is the largest size, in units, an exported graph admits."""

    name: str
    meaning: str
    kind: str
    trace: int
    odd: int
    bound: int
    multiple: int = 1  # sides: the latent cells the network halves them by
    native: int = 0  # sides: the side the model was trained at (the opt); fixed: the size; beams: the most beams
    # an image; length: the opt
    least: int = 1  # length: the shortest

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise DiffsrError(f"dim {self.name}: kind {self.kind!r} is not one of {list(KINDS)}")

    def range(self, target: Target) -> DimRange:
        b, m = target.batch, self.multiple
        if self.kind == "images":
            r = b
        elif self.kind == "guided":
            r = DimRange(b.min, 2 * b.opt, 2 * b.max)
        elif self.kind == "prompts":
            r = DimRange(1, 2, 2 * b.max)
        elif self.kind == "beams":
            r = DimRange(1, 1, self.native)
        elif self.kind == "length":
            r = DimRange(self.least, self.native, self.bound)
        elif self.kind == "side":
            ends = (target.min_latent, self.native, int(self.native * target.max_scale))
            r = DimRange(*(max(m, (v // m) * m) for v in ends))
        else:
            r = DimRange(self.native, self.native, self.native)
        return DimRange(r.opt, r.opt, r.opt) if target.static else r


# the dims every family of this runtime has (sides come from the family's geometry: `latent_sides`)
BATCH = NamedDim("batch", "images (or tiles) per call", "images", trace=2, odd=2, bound=31)
CFG_BATCH = NamedDim("cfg_batch", "latent rows: the negative then the positive branch, two per image with guidance",
                     "guided", trace=4, odd=4, bound=62)  # below 64: diffusers' upsamplers branch at 64 rows
TEXT_BATCH = NamedDim("text_batch", "prompts encoded at once: the negative and the positive with guidance",
                      "prompts", trace=3, odd=3, bound=62)


def latent_sides(multiple: int, native: int, bound: int = 512) -> tuple[NamedDim, NamedDim]:
    """latent_height and latent_width, multiples of `multiple` cells, native side `native`; traced at 2 x 3
    multiples and checked by parity at 3 x 5 (non-square, odd)."""
    return (NamedDim("latent_height", "latent rows (the latent factor's pixels each)", "side", 2, 3, bound, multiple, native),
            NamedDim("latent_width", "latent columns", "side", 3, 5, bound, multiple, native))


@dataclass(frozen=True)
class Target:
    """Shape ranges of one deployment: the images per call, and latent sides from `min_latent` cells to
    `max_scale` times the model's native side (the native side being the opt: the benchmark's size)."""

    name: str
    batch: DimRange
    min_latent: int
    max_scale: float
    static: bool = False  # every dim fixed at its opt: one shape, the fastest engine

    def dim_ranges(self, dims: Iterable[NamedDim]) -> dict[str, DimRange]:
        return {d.name: d.range(self) for d in dims}

    def at(self, dims: Iterable[NamedDim], side: tuple[int, int] | None = None) -> dict[str, int]:
        """Every dim at its opt; the two sides at `side` (a request's latent or tile) where given."""
        sizes = {d.name: d.range(self).opt for d in dims}
        if side is not None:
            sides = [d.name for d in dims if d.kind == "side"]
            sizes |= dict(zip(sides, side))
        return sizes

    def resized(self, max_batch: int | None = None, static: bool = False) -> Target:
        """This target with another largest batch, and/or fixed at its opt shape."""
        batch = self.batch
        if max_batch is not None:
            if max_batch < batch.opt:
                raise DiffsrError(f"--max-batch {max_batch} is below the {self.name} target's opt batch {batch.opt}")
            batch = DimRange(batch.min, batch.opt, max_batch)
        return replace(self, batch=batch, static=self.static or static)


MIN_LATENT = 8  # the smallest latent side of every target's profiles; the pipeline pads smaller images up to it

TARGETS: dict[str, Target] = {
    # a datacenter GPU: up to 4 images a request, 64 pixels a side to twice the native side
    # (SD: 512 opt, 1024 max; SDXL: 1024 opt, 2048 max)
    "server": Target("server", batch=DimRange(1, 1, 4), min_latent=MIN_LATENT, max_scale=2.0),
    # a Jetson Orin class device: one image, up to 1.5 times the native side (SD 768, SDXL 1536 pixels)
    "edge": Target("edge", batch=DimRange(1, 1, 1), min_latent=MIN_LATENT, max_scale=1.5),
}


def target(name: str) -> Target:
    if name not in TARGETS:
        raise DiffsrError(f"unknown target {name!r}; choose one of {sorted(TARGETS)}")
    return TARGETS[name]


def odd_sizes(dims: Iterable[NamedDim]) -> dict[str, int]:
    """Parity's odd shape: two images, a non-square latent of odd multiples, each side at least `MIN_LATENT`
    (the sides' odd multiples raised by the same even number where a small multiple needs it)."""
    sides = [d for d in dims if d.kind == "side"]
    raise_by = 0
    while any((d.odd + raise_by) * d.multiple < MIN_LATENT for d in sides):
        raise_by += 2
    return {d.name: d.native if d.kind == "fixed" else (d.odd + (raise_by if d.kind == "side" else 0)) * d.multiple
            for d in dims}


def trace_sizes(dims: Iterable[NamedDim]) -> dict[str, int]:
    """The ONNX export's example sizes: distinct and > 1, so that no dim is specialised to a constant."""
    return {d.name: d.trace * d.multiple if d.kind != "fixed" else d.native for d in dims}


def by_name(dims: Iterable[NamedDim]) -> Mapping[str, NamedDim]:
    return {d.name: d for d in dims}
