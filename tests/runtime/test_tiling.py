"""Tiles over the latent: the layout, the blending weights, the tiled step, and seams on a real photo."""

import numpy as np
import pytest
import torch

from diffsr.calib.data import photo
from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.families import preset
from diffsr.export.model.settings import PipelineConfig, Request
from diffsr.runtime.loading import load_runners
from diffsr.runtime.pipeline import Pipeline
from diffsr.runtime.schedulers import make_scheduler
from diffsr.runtime.stages import decode, over_tiles, prepare_lq
from diffsr.runtime.step import Step, TiledStep, step_table
from diffsr.runtime.tiling import Blender, Tiling, axis_starts, axis_weights, tiling_for


@pytest.mark.parametrize("length,size,overlap", [(300, 64, 16), (200, 64, 16), (65, 64, 16), (64, 64, 16),
                                                  (20, 8, 2), (17, 8, 0), (9, 8, 4)])
def test_tiles_cover_the_side_and_share_at_least_the_overlap(length, size, overlap):
    starts = axis_starts(length, size, overlap)
    side = min(length, size)
    assert starts[0] == 0 and starts[-1] + side == length
    assert all(b - a > 0 for a, b in zip(starts, starts[1:]))
    assert all(a + side - b >= overlap for a, b in zip(starts, starts[1:]))  # neighbours share >= overlap
    if length > size:  # as few tiles as that allows
        assert len(starts) - 1 < (length - overlap) / (size - overlap) <= len(starts)


def test_an_image_that_fits_one_tile_is_one_tile_of_its_own_shape():
    tiles = Tiling(64, 16).layout(40, 64)
    assert len(tiles) == 1 and (tiles[0].h, tiles[0].w) == (40, 64)


@pytest.mark.parametrize("blend", ["ramp", "gaussian", "none"])
@pytest.mark.parametrize("grid,scale", [((20, 16), 1), ((13, 29), 1), ((20, 16), 8)])
def test_blending_a_pointwise_function_gives_the_untiled_result(blend, grid, scale):
    """Where every output cell depends on its own input cell only, tiles must not change anything: the
    weights of every cell sum to one, and each tile lands where it was cut from."""
    torch.manual_seed(0)
    x = torch.randn(1, 3, *grid)
    fn = lambda t: torch.repeat_interleave(torch.repeat_interleave(torch.tanh(t) * 2 + t, scale, -2), scale, -1)  # noqa: E731
    tiling = Tiling(8, 3, batch=3, blend=blend)
    blender = Blender(tiling, grid, {scale})
    assert len(blender.tiles) > 1
    groups = []
    got = blender(lambda group: groups.append(len(group)) or {"y": fn(torch.cat([t.crop(x) for t in group]))},
                  {"y": scale})["y"]
    torch.testing.assert_close(got, fn(x), rtol=1e-6, atol=1e-6)
    assert max(groups) == 3 and sum(groups) == len(blender.tiles)  # batches of up to `batch` tiles


def test_ramp_weights_are_one_inside_and_fade_linearly_across_the_overlap():
    blender = Blender(Tiling(8, 2), (8, 14), {1})
    left, right = (blender.weight(t, 1)[0, 0, 0] for t in blender.tiles)  # starts 0 and 6: 2 cells shared
    assert torch.all(left[:6] == 1) and torch.all(right[2:] == 1)
    torch.testing.assert_close(left[6:] + right[:2], torch.ones(2))
    assert left[6] > left[7] > 0 and 0 < right[0] < right[1]


def test_gaussian_weights_are_the_official_dit4sr_ones():
    """DiT4SR's pipeline weights a tile of side L at cell x by exp(-(x - (L-1)/2)^2 / L^2 / (2 * 0.01)) (up to
    a constant, which the blend's normalisation removes), written out here; at 8 values a cell the same
    curve, sampled at the pixel centres."""
    from math import exp

    (w,) = axis_weights([0], 64, 1, "gaussian")
    official = torch.tensor([exp(-(x - 31.5) ** 2 / 64**2 / 0.02) for x in range(64)])
    torch.testing.assert_close(w, official, rtol=1e-5, atol=1e-7)
    (fine,) = axis_weights([0], 8, 8, "gaussian")
    torch.testing.assert_close(fine, torch.tensor([exp(-(x - 31.5) ** 2 / 64**2 / 0.02) for x in range(64)]), rtol=1e-5, atol=1e-7)


def test_bad_tilings_are_refused():
    with pytest.raises(DiffsrError, match="overlap"):
        Tiling(16, 9)
    with pytest.raises(DiffsrError, match="multiple of 2"):
        tiling_for(preset("tiny"), PipelineConfig(tile=15))
    with pytest.raises(DiffsrError, match="tile_batch"):
        PipelineConfig(tile_batch=0)
    assert tiling_for(preset("sdxl"), PipelineConfig()) == Tiling(128, 32, 4)  # SDXL: its native 1024 px


def test_tile_conditioning_repeats_text_rows_and_gives_each_tile_its_corner():
    text = torch.arange(2.0)[:, None, None].expand(2, 77, 4)  # negative row 0, positive row 1
    ids = torch.tensor([[600.0, 800, 0, 0, 600, 800]] * 2)
    corners = torch.tensor([[0.0, 0, 512, 512], [0, 288, 512, 512], [88, 0, 512, 512]])
    cond = preset("sdxl-tiny").tile_conditioning({"text_embeddings": text, "time_ids": ids}, corners)
    assert cond["text_embeddings"][:, 0, 0].tolist() == [0, 0, 0, 1, 1, 1]  # the doubled batch: negatives first
    assert cond["time_ids"].tolist()[4] == [600, 800, 0, 288, 512, 512]  # image size kept, the tile's own crop


def test_a_tiled_step_over_one_tile_is_the_untiled_step(tiny_checkpoint):
    """The tiled step's own work (crops, repeated conditioning, blending) adds nothing to one tile."""
    runners = load_runners("torch", tiny_checkpoint)
    run = lambda name, **feed: runners[name].infer(feed)  # noqa: E731
    model = tiny_checkpoint.model
    scheduler = make_scheduler("ddim", tiny_checkpoint.scheduler_config)
    scheduler.set_timesteps(4)
    row = step_table(scheduler, 5.5)[1]
    g = torch.Generator().manual_seed(0)
    x, lq = torch.randn(1, 4, 16, 24, generator=g), {"f1": torch.randn(1, 64, 16, 24, generator=g)}
    cond = {"text_embeddings": torch.randn(2, 77, 32, generator=g)}
    whole = Step(model, run, scheduler)(x, lq, cond, row, None)
    tiled = TiledStep(model, run, scheduler, Tiling(24, 0), (16, 24), x.device)
    assert tiled.tiles == 1
    assert torch.equal(tiled(x, lq, cond, row, None), whole)
    two = TiledStep(model, run, scheduler, Tiling(16, 4), (16, 24), x.device)  # and with tiles, a different step
    assert two.tiles == 2 and not torch.allclose(two(x, lq, cond, row, None), whole)


@pytest.fixture(scope="module")
def torch_pipeline(tiny_checkpoint):
    return Pipeline(load_runners("torch", tiny_checkpoint), tiny_checkpoint)


def test_an_image_that_fits_one_tile_runs_the_untiled_pipeline(torch_pipeline, tiny_checkpoint):
    """Each stage called once on the whole image, as before tiles existed."""
    calls: list[tuple[str, tuple[int, ...]]] = []
    pipe = Pipeline({n: _Spy(r, n, calls) for n, r in torch_pipeline.runners.items()}, tiny_checkpoint)
    lq = photo("chelsea", (40, 32))
    cfg = tiny_checkpoint.defaults.replace(steps=2)
    got = pipe(Request(lq, cfg)).image
    assert [n for n, _ in calls].count("lq_encoder") == 1 and [n for n, _ in calls].count("vae_decoder") == 1
    assert ("controlnet_unet", (2, 4, 16, 20)) in calls
    tiled = pipe(Request(lq, cfg.replace(tile=8, tile_overlap=2))).image
    assert not np.array_equal(got, tiled)


class _Spy:
    def __init__(self, runner, name, calls):
        self.runner, self.name, self.calls = runner, name, calls

    def infer(self, feed):
        self.calls.append((self.name, tuple(next(iter(feed.values())).shape)))
        return self.runner.infer(feed)


def test_tiled_lq_encoder_and_decoder_stay_close_to_untiled(torch_pipeline, tiny_checkpoint):
    """Tiled VAE stages compute GroupNorm statistics per tile (as diffusers' tiled VAE does); on a size that
    fits both (latent 32: tiles of 24 against one of 32) the blended result stays near the untiled one.
    Measured: z_lq 27.3 dB, f1 31.8 dB, decoded 31.0 dB (random weights)."""
    run, model = torch_pipeline.run, tiny_checkpoint.model
    lq = prepare_lq(model, photo("astronaut", (64, 64)), 4)  # latent 32x32
    whole, tiled = Tiling(32, 8), Tiling(24, 6)
    f1, z = over_tiles(model, run, "lq_encoder", {"lq_image": lq}, whole).values()
    f1_t, z_t = over_tiles(model, run, "lq_encoder", {"lq_image": lq}, tiled).values()
    assert _psnr(z_t, z, z.abs().max()) > 25 and _psnr(f1_t, f1, f1.abs().max()) > 28
    image, image_t = decode(model, run, z, whole), decode(model, run, z, tiled)
    assert image_t.shape == image.shape == (1, 3, 256, 256)
    assert 28 < _psnr(image_t, image, 2.0) < 60  # close, and tiled for real


def _psnr(a, b, peak):
    return float(10 * torch.log10(peak**2 / ((a - b) ** 2).mean()))


def seam_ratio(image: np.ndarray, boundaries: list[int], axis: int) -> float:
    """Mean |difference| between neighbouring pixel lines across tile boundaries, over the same statistic
    across every other pair of lines (1.0: the boundaries look like anywhere else)."""
    diffs = np.abs(np.diff(image.astype(np.float64), axis=axis)).mean(axis=(1 - axis, 2))  # per line pair
    at = np.zeros(diffs.shape[0], bool)
    at[[b - 1 for b in boundaries]] = True  # the pair (b - 1, b)
    return float(diffs[at].mean() / diffs[~at].mean())


@pytest.mark.parametrize("blend,passes", [("ramp", True), ("gaussian", True), ("none", False)])
def test_seams_of_blended_tiles_look_like_the_interior_and_pasted_ones_do_not(torch_pipeline, tiny_checkpoint,
                                                                               blend, passes):
    lq = photo("coffee", (80, 56))  # -> 320x224, latent 40x28: tiles of 16 start at 0, 12, 24 and 0, 12
    cfg = tiny_checkpoint.defaults.replace(steps=4, tile=16, tile_overlap=4, tile_blend=blend)
    image = torch_pipeline(Request(lq, cfg)).image
    ratios = []
    for axis, length in ((1, 40), (0, 28)):  # columns, then rows, of the (H, W, 3) image
        starts = axis_starts(length, 16, 4)
        cuts = [8 * (a + 16 + b) // 2 for a, b in zip(starts, starts[1:])]  # where pasted tiles meet
        ratios.append(seam_ratio(image, cuts, axis))
    assert (max(ratios) <= 1.10) == passes, ratios
