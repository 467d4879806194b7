"""The reference pipeline end to end on a real photo, with the tiny checkpoint."""

import numpy as np
import pytest

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.settings import Request
from diffsr.runtime.loading import load_runners
from diffsr.runtime.pipeline import Pipeline


@pytest.fixture(scope="module")
def pipe(tiny_checkpoint):
    return Pipeline(load_runners("torch", tiny_checkpoint), tiny_checkpoint)


def _cfg(pipe, **kw):
    return pipe.checkpoint.defaults.replace(**({"steps": 3} | kw))


def test_same_seed_same_image_other_seed_other_image(pipe, photo_lq):
    a = pipe(Request(photo_lq, _cfg(pipe, seed=7))).image
    b = pipe(Request(photo_lq, _cfg(pipe, seed=7))).image
    c = pipe(Request(photo_lq, _cfg(pipe, seed=8))).image
    assert a.shape == (256, 256, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_the_default_20_steps_each_report_progress(pipe):
    rgb = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    steps = []
    result = pipe(Request(rgb, pipe.checkpoint.defaults), on_step=lambda i, n: steps.append((i, n)))
    assert result.image.shape == (192, 256, 3)
    assert steps == [(i, 20) for i in range(1, 21)]
    for stage in ("preprocess", "text", "lq", "denoise", "decode", "postprocess", "total"):
        assert result.timings[stage] > 0


def test_non_square_and_unaligned_sizes_are_padded_and_cropped(pipe):
    # 18x22 -> 72x88 output, latent 9x11: padded to the UNet's multiple, cropped back
    rgb = np.random.default_rng(1).integers(0, 256, (18, 22, 3), dtype=np.uint8)
    assert pipe(Request(rgb, _cfg(pipe))).image.shape == (72, 88, 3)


@pytest.mark.parametrize("size", [(183, 183), (57, 86), (31, 17), (1, 1)], ids=["183x183", "57x86", "prime-sides", "one-pixel"])
def test_any_photo_size_comes_back_at_exactly_four_times(pipe, size, tmp_path):
    """Odd and prime sides (a real photo, RGBA through the file loader): padded to the model's pixel multiple
    inside, cropped back to exactly 4x; tiled too (732 px out is four of tiny's 512 px tiles already)."""
    from PIL import Image

    from diffsr.calib.data import photo
    from diffsr.runtime.image import load_image

    rgba = Image.fromarray(photo("coffee", size)).convert("RGBA")
    rgba.putalpha(200)
    rgba.save(tmp_path / "in.png")
    rgb = load_image(tmp_path / "in.png")
    w, h = size
    assert pipe(Request(rgb, _cfg(pipe, steps=1 if w > 100 else 2))).image.shape == (4 * h, 4 * w, 3)
    if w < 100:
        assert pipe(Request(rgb, _cfg(pipe, steps=2, tile=8, tile_overlap=2))).image.shape == (4 * h, 4 * w, 3)


def test_dpm_solver_runs_at_fewer_steps(pipe, photo_lq):
    ddim = pipe(Request(photo_lq, _cfg(pipe, steps=10))).image
    dpm = pipe(Request(photo_lq, _cfg(pipe, steps=10, scheduler="dpmpp-2m"))).image
    assert dpm.shape == ddim.shape and not np.array_equal(dpm, ddim)


def test_options_change_the_image(pipe, photo_lq):
    base = pipe(Request(photo_lq, _cfg(pipe))).image
    for change in (dict(guidance_scale=1.0), dict(start="lq"), dict(color_fix="none"), dict(color_fix="wavelet"),
                   dict(prompt="a cat")):
        assert not np.array_equal(pipe(Request(photo_lq, _cfg(pipe, **change))).image, base), change


@pytest.mark.parametrize("fix", ["adain", "wavelet"])
def test_colour_fix_follows_the_input(pipe, photo_lq, fix):
    out = pipe(Request(photo_lq, _cfg(pipe, color_fix=fix))).image.reshape(-1, 3).mean(0)
    assert np.abs(out - photo_lq.reshape(-1, 3).mean(0)).max() < 4


@pytest.mark.parametrize("bad, message", [
    (dict(steps=0), r"steps=0 is out of range: use 1 to 1000"),
    (dict(steps=10_000), r"steps=10000 is out of range: use 1 to 1000"),
    (dict(guidance_scale=float("nan")), r"guidance_scale=nan is out of range: use 1 to 50"),
    (dict(start="middle"), r"start='middle' is not supported; choose one of \['noise', 'lq'\]"),
    (dict(steps="20"), r"steps must be an integer, not '20'"),
])
def test_bad_settings_are_refused(pipe, bad, message):
    with pytest.raises(DiffsrError, match=message):
        pipe.checkpoint.defaults.replace(**bad)


def test_an_unknown_scheduler_is_refused_before_any_model_runs(tiny_checkpoint, photo_lq):
    class Untouchable:
        def infer(self, feed):
            raise AssertionError("a model ran")

    pipe = Pipeline(dict.fromkeys(tiny_checkpoint.model.submodules, Untouchable()), tiny_checkpoint)
    with pytest.raises(DiffsrError, match=r"scheduler 'euler_x' is not supported; choose one of \['ddim', 'ddpm', 'dpmpp-2m'\]"):
        pipe(Request(photo_lq, tiny_checkpoint.defaults.replace(scheduler="euler_x")))
