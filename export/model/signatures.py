"""One declarative signature per submodule: the single source of every name, dtype and shape.

A shape entry is an int (fixed), a dynamic dim's name, or "8*name" (a multiple of one); the dims are
declared in `dims.py`. A family declares its submodules' signatures (`ModelFamily.signatures`); ONNX
dynamic axes, TensorRT profiles, Triton configs, runtime buffers, runner input checks and the parity
tests' sample inputs all derive from them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.dims import DimRange, ShapeRange

Dim = int | str
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
