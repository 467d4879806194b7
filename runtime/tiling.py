"""Overlapping tiles over the latent grid, and their blending: what keeps time linear in pixels and
memory bounded at any image size.

A `Tiling` lays tiles of `size` x `size` latent cells over a (h, w) latent with at least `overlap`
cells shared between neighbours (a side that fits one tile is one tile of that side: an image that
fits one tile is not tiled at all). The sampler predicts the noise of each tile, the LQ encoder
encodes each tile's pixels (8 per cell), the decoder decodes each tile's latent, and `blend` puts
the tiles' outputs back together with weights that ramp linearly across each overlap:

- in a tile's interior (no neighbour) its weight is 1: the output there is that tile's own;
- across an overlap the two weights fall and rise linearly over the whole shared band and sum to 1,
  so the output fades from one tile into the next instead of jumping;
- at the image border there is no ramp (no neighbour to fade into).

`blend="none"` pastes tiles instead (each cell from the tile whose centre is nearest): the seams a
pasting pipeline shows, kept as the seam test's counter-example.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.family import ModelFamily
from diffsr.export.model.settings import TILE_BLENDS as BLENDS
from diffsr.export.model.settings import PipelineConfig


@dataclass(frozen=True)
class Tile:
    """A window of the latent grid, in latent cells."""

    y: int
    x: int
    h: int
    w: int

    def window(self, scale: int = 1) -> tuple[slice, slice]:
        """Its (rows, columns) on a grid of `scale` values per latent cell (8: pixels)."""
        return slice(self.y * scale, (self.y + self.h) * scale), slice(self.x * scale, (self.x + self.w) * scale)

    def crop(self, t: torch.Tensor, scale: int = 1) -> torch.Tensor:
        rows, cols = self.window(scale)
        return t[..., rows, cols]

    def pixels(self, factor: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) in pixels, `factor` pixels per latent cell."""
        return self.y * factor, self.x * factor, self.h * factor, self.w * factor


def axis_starts(length: int, size: int, overlap: int) -> list[int]:
    """Tile starts along one side: as few tiles as keep `overlap` shared, spread evenly end to end."""
    if length <= size:
        return [0]
    n = math.ceil((length - overlap) / (size - overlap))
    return [round(i * (length - size) / (n - 1)) for i in range(n)]


GAUSSIAN_SIGMA = 0.1  # of the tile's side: DiT4SR's (and MultiDiffusion's) tile weights, variance 0.01


def axis_weights(starts: list[int], size: int, scale: int, blend: str) -> list[torch.Tensor]:
    """Each tile's weights along one side (at `scale` values per cell). Ramps span the band a tile
    shares with each neighbour, so two overlapping weights sum to 1 everywhere in the band. Gaussian:
    the official DiT4SR pipeline's weights, a Gaussian over the whole tile centred on it, sigma a tenth
    of its side (the blend divides by the weights' sum)."""
    weights = []
    n = size * scale
    pos = torch.arange(n, dtype=torch.float32) + 0.5
    if blend == "gaussian":
        return [torch.exp(-0.5 * ((pos / n - 0.5) / GAUSSIAN_SIGMA) ** 2) for _ in starts]
    for i, start in enumerate(starts):
        w = torch.ones(n)
        prev_end = starts[i - 1] + size if i > 0 else None
        next_start = starts[i + 1] if i + 1 < len(starts) else None
        if blend == "none":  # cells nearer this tile's centre than a neighbour's are its own
            lo = (start + prev_end) * scale // 2 - start * scale if prev_end is not None else 0
            hi = (next_start + start + size) * scale // 2 - start * scale if next_start is not None else n
            w = ((pos >= lo) & (pos < hi)).float()
        else:
            if prev_end is not None:
                band = (prev_end - start) * scale
                w = torch.minimum(w, pos / band)
            if next_start is not None:
                band = (start + size - next_start) * scale
                w = torch.minimum(w, (n - pos) / band)
        weights.append(w)
    return weights


@dataclass(frozen=True)
class Tiling:
    """`size` and `overlap` in latent cells; `batch`: tiles per call of a submodule."""

    size: int
    overlap: int
    batch: int = 1
    blend: str = "ramp"

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= 2 * self.overlap <= self.size:
            raise DiffsrError(f"tile {self.size} with overlap {self.overlap}: the overlap must be 0 to half the tile")
        if self.batch < 1:
            raise DiffsrError(f"tile batch {self.batch} must be at least 1")
        if self.blend not in BLENDS:
            raise DiffsrError(f"tile blend {self.blend!r}: choose one of {list(BLENDS)}")

    def layout(self, h: int, w: int) -> list[Tile]:
        """Tiles over an (h, w) latent, row by row; all of one shape (so they batch)."""
        th, tw = min(h, self.size), min(w, self.size)
        return [Tile(y, x, th, tw) for y in axis_starts(h, self.size, self.overlap)
                for x in axis_starts(w, self.size, self.overlap)]

    def tiles(self, h: int, w: int) -> int:
        return len(self.layout(h, w))

    def groups(self, tiles: list[Tile]) -> list[list[Tile]]:
        return [tiles[i: i + self.batch] for i in range(0, len(tiles), self.batch)]


def tiling_for(model: ModelFamily, cfg: PipelineConfig) -> Tiling:
    """The request's tiling: by default tiles of the model's native side (SD 64 cells = 512 px, SDXL
    128 = 1024 px: what the network was trained at) overlapping by a quarter of it."""
    size = cfg.tile if cfg.tile is not None else model.native_latent
    m = model.latent_multiple
    if size % m or size < 8:
        raise DiffsrError(f"tile {size} must be a multiple of {m} latent cells (the model's) and at least 8")
    overlap = cfg.tile_overlap if cfg.tile_overlap is not None else size // 4
    return Tiling(size, overlap, cfg.tile_batch, cfg.tile_blend)


TileFn = Callable[[list[Tile]], Mapping[str, torch.Tensor]]  # tiles -> outputs, one batch row per tile


class Blender:
    """Blends tile outputs over an (h, w) latent grid. The tiles form a grid, so a tile's weights are
    the outer product of its row and column weights, and the sum of all weights is the outer product
    of the per-side sums: everything is kept per side, on `device`, made once. Calls then do device
    work only (a CUDA graph can capture them)."""

    def __init__(self, tiling: Tiling, grid: tuple[int, int], scales: set[int], device: torch.device | str = "cpu"):
        self.tiling, self.grid = tiling, grid
        h, w = grid
        self.tiles = tiling.layout(h, w)
        starts = (axis_starts(h, tiling.size, tiling.overlap), axis_starts(w, tiling.size, tiling.overlap))
        sides = (min(h, tiling.size), min(w, tiling.size))
        self.side_weights: dict[int, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        self.inverse_sums: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for scale in scales:
            per_side = []
            inverse = []
            for axis_starts_, side, length in zip(starts, sides, grid):
                weights = axis_weights(axis_starts_, side, scale, tiling.blend)
                total = torch.zeros(length * scale)
                for start, wt in zip(axis_starts_, weights):
                    total[start * scale: (start + side) * scale] += wt
                per_side.append([wt.to(device) for wt in weights])
                inverse.append((1.0 / total).to(device))
            self.side_weights[scale] = (per_side[0], per_side[1])
            self.inverse_sums[scale] = (inverse[0], inverse[1])
        ys, xs = starts
        self.position = {tile: (ys.index(tile.y), xs.index(tile.x)) for tile in self.tiles}

    def weight(self, tile: Tile, scale: int) -> torch.Tensor:
        """(1, 1, th*scale, tw*scale)."""
        iy, ix = self.position[tile]
        wy, wx = self.side_weights[scale]
        return (wy[iy][:, None] * wx[ix][None, :])[None, None]

    def __call__(self, fn: TileFn, scales: Mapping[str, int],
                 on_group: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
        """Run `fn` on batches of tiles and blend each output named in `scales` (values per latent cell)
        into a (1, C, h*scale, w*scale) whole. Holds the wholes and one batch of tile outputs."""
        h, w = self.grid
        acc: dict[str, torch.Tensor] = {}
        for group in self.tiling.groups(self.tiles):
            outputs = fn(group)
            for name, scale in scales.items():
                out = outputs[name]
                if name not in acc:
                    acc[name] = out.new_zeros((1, out.shape[1], h * scale, w * scale))
                for row, tile in enumerate(group):
                    rows, cols = tile.window(scale)
                    acc[name][..., rows, cols] += out[row: row + 1] * self.weight(tile, scale).to(out.dtype)
            if on_group is not None:
                on_group(len(group))
        for name, scale in scales.items():
            iy, ix = self.inverse_sums[scale]
            acc[name] *= (iy[:, None] * ix[None, :]).to(acc[name].dtype)
        return acc
