"""One declarative signature per submodule: the single source of every name, dtype and shape.

A shape entry is an int (fixed), a dynamic dim's name, or "8*name" (a multiple of one). ONNX
dynamic axes, TensorRT profiles, Triton configs, runtime buffers, runner input checks and the
parity tests' sample inputs all derive from `signatures(model_config)` and `TARGETS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import NamedTuple

from diffsr.export.model.config import LATENT_CHANNELS, LATENT_FACTOR, TEXT_LENGTH, TIME_IDS, ModelConfig
from diffsr.export.core.errors import DiffsrError

Dim = int | str
SUBMODULES = ("text_encoder", "lq_encoder", "fusion_transformer", "controlnet_unet", "vae_decoder")
DTYPES = ("float32", "float16", "int32", "int64")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    shape: tuple[Dim, ...]

    def resolve(self, dims: Mapping[str, int]) -> tuple[int, ...]:
        return tuple(_eval(d, dims) for d in self.shape)


@dataclass(frozen=True)
class Signature:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def dim_names(self) -> tuple[str, ...]:
        names = [parse_dim(d)[1] for t in self.inputs + self.outputs for d in t.shape if isinstance(d, str)]
        return tuple(dict.fromkeys(names))

    def input_shapes(self, dims: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: t.resolve(dims) for t in self.inputs}

    def output_shapes(self, dims: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
        return {t.name: t.resolve(dims) for t in self.outputs}

    def shape_ranges(self, ranges: Mapping[str, DimRange]) -> dict[str, ShapeRange]:
        """Each input's (min, opt, max) shape over the dims' ranges: a TensorRT optimisation profile."""
        ends = [{name: getattr(r, end) for name, r in ranges.items()} for end in ("min", "opt", "max")]
        return {t.name: ShapeRange(*(t.resolve(dims) for dims in ends)) for t in self.inputs}

    def bind(self, shapes: Mapping[str, tuple[int, ...]], dtypes: Mapping[str, str]) -> dict[str, int]:
        """Check a feed's names, dtypes and shapes; return the value of every dynamic dim."""
        expected = [t.name for t in self.inputs]
        if sorted(shapes) != sorted(expected):
            raise DiffsrError(f"{self.name}: inputs {sorted(shapes)} given, expected {expected}")
        dims: dict[str, int] = {}
        for spec in self.inputs:
            shape, dtype = tuple(shapes[spec.name]), dtypes[spec.name]
            if dtype != spec.dtype:
                raise DiffsrError(f"{self.name}.{spec.name}: dtype {dtype}, expected {spec.dtype}")
            if len(shape) != len(spec.shape):
                raise DiffsrError(f"{self.name}.{spec.name}: shape {shape} has rank {len(shape)}, expected {spec.shape}")
            for size, dim in zip(shape, spec.shape):
                if isinstance(dim, int):
                    if size != dim:
                        raise DiffsrError(f"{self.name}.{spec.name}: shape {shape}, expected {spec.shape}")
                    continue
                factor, name = parse_dim(dim)
                if size % factor or size < factor:
                    raise DiffsrError(f"{self.name}.{spec.name}: size {size} of {dim} is not a positive multiple of {factor}")
                if dims.setdefault(name, size // factor) != size // factor:
                    raise DiffsrError(
                        f"{self.name}.{spec.name}: shape {shape} disagrees with {name}={dims[name]} set by another input"
                    )
        return dims


def parse_dim(dim: str) -> tuple[int, str]:
    """"8*latent_height" -> (8, "latent_height"); "batch" -> (1, "batch")."""
    factor, _, name = dim.rpartition("*")
    return (int(factor) if factor else 1), name


def _eval(dim: Dim, dims: Mapping[str, int]) -> int:
    if isinstance(dim, int):
        return dim
    factor, name = parse_dim(dim)
    return factor * dims[name]


def signatures(cfg: ModelConfig) -> dict[str, Signature]:
    """The five submodules' interfaces at a model's widths, in pipeline order. SDXL adds the second
    tokenizer's ids and the pooled `text_embeds` to the text encoder, and `text_embeds` and `time_ids`
    (the size micro-conditioning) to ControlNet + UNet."""
    img = (f"{LATENT_FACTOR}*latent_height", f"{LATENT_FACTOR}*latent_width")
    lat = ("latent_height", "latent_width")
    f32 = "float32"
    ids = [TensorSpec("input_ids", "int32", ("text_batch", TEXT_LENGTH))]
    text_out = [TensorSpec("text_embeddings", f32, ("text_batch", TEXT_LENGTH, cfg.context_dim))]
    added: list[TensorSpec] = []
    if cfg.sdxl:
        ids.append(TensorSpec("input_ids_2", "int32", ("text_batch", TEXT_LENGTH)))
        text_out.append(TensorSpec("text_embeds", f32, ("text_batch", cfg.pooled_dim)))
        added = [TensorSpec("text_embeds", f32, ("cfg_batch", cfg.pooled_dim)),
                 TensorSpec("time_ids", f32, ("cfg_batch", TIME_IDS))]
    sigs = [
        Signature("text_encoder", inputs=tuple(ids), outputs=tuple(text_out)),
        Signature(
            "lq_encoder",
            inputs=(TensorSpec("lq_image", f32, ("batch", 3, *img)),),
            outputs=(
                TensorSpec("f1", f32, ("batch", cfg.f1_channels, *lat)),
                TensorSpec("z_lq", f32, ("batch", LATENT_CHANNELS, *lat)),
            ),
        ),
        Signature(
            "fusion_transformer",
            inputs=(TensorSpec("f1", f32, ("batch", cfg.f1_channels, *lat)), TensorSpec("sample", f32, ("batch", LATENT_CHANNELS, *lat))),
            outputs=(TensorSpec("f2", f32, ("batch", cfg.f2_channels, *lat)),),
        ),
        Signature(
            "controlnet_unet",
            inputs=(
                TensorSpec("sample", f32, ("cfg_batch", LATENT_CHANNELS, *lat)),
                TensorSpec("timestep", f32, ("cfg_batch",)),
                TensorSpec("text_embeddings", f32, ("cfg_batch", TEXT_LENGTH, cfg.context_dim)),
                *added,
                TensorSpec("f2", f32, ("batch", cfg.f2_channels, *lat)),
            ),
            outputs=(TensorSpec("noise_pred", f32, ("cfg_batch", LATENT_CHANNELS, *lat)),),
        ),
        Signature(
            "vae_decoder",
            inputs=(TensorSpec("latent", f32, ("batch", LATENT_CHANNELS, *lat)),),
            outputs=(TensorSpec("image", f32, ("batch", 3, *img)),),
        ),
    ]
    return {s.name: s for s in sigs}


# --- deployment targets: the min/opt/max of every dynamic dim -------------------------------------


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
class Target:
    """Shape ranges of one deployment. Latent sides are in latent cells (x8 for pixels): from
    `min_latent` to `max_scale` times the model's native side (`ModelConfig.native_latent`: SD 512 px,
    SDXL 1024 px), the native side being the opt (the benchmark's output size)."""

    name: str
    batch: DimRange
    min_latent: int
    max_scale: float
    static: bool = False  # every dim fixed at its opt: one shape, the fastest engine

    def dim_ranges(self, cfg: ModelConfig) -> dict[str, DimRange]:
        """Every dynamic dim's range; sides rounded to the UNet's multiple."""
        m = cfg.latent_multiple
        ends = (self.min_latent, cfg.native_latent, int(cfg.native_latent * self.max_scale))
        side = DimRange(*(max(m, (v // m) * m) for v in ends))
        b = self.batch
        ranges = {
            "batch": b,
            "cfg_batch": DimRange(b.min, 2 * b.opt, 2 * b.max),  # the negative branch doubles it
            "text_batch": DimRange(1, 2, 2 * b.max),  # the prompts: positive, and negative with CFG
            "latent_height": side,
            "latent_width": side,
        }
        if self.static:
            return {name: DimRange(r.opt, r.opt, r.opt) for name, r in ranges.items()}
        return ranges

    def resized(self, max_batch: int | None = None, static: bool = False) -> Target:
        """This target with another largest batch, and/or fixed at its opt shape."""
        batch = self.batch
        if max_batch is not None:
            if max_batch < batch.opt:
                raise DiffsrError(f"--max-batch {max_batch} is below the {self.name} target's opt batch {batch.opt}")
            batch = DimRange(batch.min, batch.opt, max_batch)
        return replace(self, batch=batch, static=self.static or static)


TARGETS: dict[str, Target] = {
    # a datacenter GPU: up to 4 images a request, 64 pixels a side to twice the native side
    # (SD: 512 opt, 1024 max; SDXL: 1024 opt, 2048 max)
    "server": Target("server", batch=DimRange(1, 1, 4), min_latent=8, max_scale=2.0),
    # a Jetson Orin class device: one image, up to 1.5 times the native side (SD 768, SDXL 1536 pixels)
    "edge": Target("edge", batch=DimRange(1, 1, 1), min_latent=8, max_scale=1.5),
}


def target(name: str) -> Target:
    if name not in TARGETS:
        raise DiffsrError(f"unknown target {name!r}; choose one of {sorted(TARGETS)}")
    return TARGETS[name]
