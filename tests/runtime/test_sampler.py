"""The sampler's step reads a device table; it is the scheduler's step, and refuses CUDA graphs off CUDA."""

import pytest
import torch

from diffsr.export.model.checkpoint import SD_SCHEDULER_CONFIG
from diffsr.export.core.errors import DiffsrError
from diffsr.runtime.backends import load_runners
from diffsr.runtime.pipeline import Pipeline
from diffsr.runtime.sampler import TABLE_COLUMNS, StepGraphs, conditioning, denoise, step_table
from diffsr.runtime.schedulers.ddim import DDIMScheduler


def test_step_table_rows_are_the_timesteps_guidance_and_coefficients():
    scheduler = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
    scheduler.set_timesteps(20)
    table = step_table(scheduler, 5.5)
    assert table.shape == (20, len(TABLE_COLUMNS)) and table.dtype == torch.float32
    assert table[:, 0].tolist() == [float(t) for t in scheduler.timesteps]  # 951, 901, ..., 1
    assert table[:, 1].eq(5.5).all()
    assert table[3, 2:].tolist() == list(scheduler.coefficients(scheduler.timesteps[3]))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_update_with_device_scalars_is_the_step_with_floats(prediction_type):
    scheduler = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG | {"prediction_type": prediction_type})
    scheduler.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    table = step_table(scheduler, 1.0)
    for i, t in enumerate(scheduler.timesteps):
        want = scheduler.step(eps, t, x)
        got = scheduler.update(eps, x, table[i, 2:].unbind())
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_denoise_is_the_textbook_loop(tiny_checkpoint, tiny_reference):
    """The table-driven loop against the loop written out with the scheduler's step and Python floats."""
    runners = load_runners("torch", tiny_checkpoint)
    run = lambda name, **feed: runners[name].infer(feed)  # noqa: E731
    cfg = tiny_checkpoint.defaults.replace(steps=4, seed=3)
    g = torch.Generator().manual_seed(1)
    f1, z_lq = torch.randn(1, 64, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    text = torch.randn(2, 77, 32, generator=g)
    got = denoise(run, f1, z_lq, {"text_embeddings": text}, cfg, tiny_checkpoint.scheduler_config)

    scheduler = DDIMScheduler.from_config(tiny_checkpoint.scheduler_config)
    scheduler.set_timesteps(cfg.steps)
    x = torch.randn(z_lq.shape, generator=torch.Generator().manual_seed(cfg.seed))
    for t in scheduler.timesteps:
        f2 = run("fusion_transformer", f1=f1, sample=x)["f2"]
        eps = run("controlnet_unet", sample=torch.cat([x, x]), timestep=torch.full((2,), float(t)),
                  text_embeddings=text, f2=f2)["noise_pred"]
        neg, pos = eps.chunk(2)
        x = scheduler.step(neg + cfg.guidance_scale * (pos - neg), t, x)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


def test_cuda_graphs_are_refused_off_cuda(tiny_checkpoint):
    with pytest.raises(DiffsrError, match="CUDA graphs need a CUDA device; this pipeline runs on cpu"):
        Pipeline(load_runners("torch", tiny_checkpoint), tiny_checkpoint, "cpu", cuda_graph=True)
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(DiffsrError, match="CUDA graphs need the latents on a CUDA device, not cpu"):
        StepGraphs().prepare(lambda *a: a[0], x, x, {"text_embeddings": x}, torch.zeros(1, 6))


def test_conditioning_adds_sdxl_time_ids_from_the_output_size():
    from diffsr.export.model.config import PRESETS

    text = {"text_embeddings": torch.zeros(2, 77, 80), "text_embeds": torch.zeros(2, 48)}
    cond = conditioning(PRESETS["sdxl-tiny"], text, (600, 800))
    assert cond["time_ids"].tolist() == [[600, 800, 0, 0, 600, 800]] * 2  # original, crop corner, target
    assert cond["text_embeds"] is text["text_embeds"]
    assert set(conditioning(PRESETS["tiny"], {"text_embeddings": text["text_embeddings"]}, (600, 800))) == {"text_embeddings"}
