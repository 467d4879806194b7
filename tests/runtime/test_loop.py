"""The loop: its steps read a device table and are the family's prediction plus the scheduler's update,
written out here by hand; CUDA graphs refused off CUDA; SDXL's conditioning."""

import pytest
import torch

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.families import preset
from diffsr.runtime.cuda_graph import StepGraphs
from diffsr.runtime.loading import load_runners
from diffsr.runtime.loop import denoise
from diffsr.runtime.pipeline import Pipeline
from diffsr.runtime.schedulers import make_scheduler
from diffsr.runtime.step import Step


@pytest.mark.parametrize("name, start", [("ddim", "noise"), ("dpmpp-2m", "noise"), ("ddpm", "noise"), ("ddpm", "lq")])
def test_denoise_is_the_textbook_loop(tiny_checkpoint, name, start):
    """The table-driven loop against the loop written out with the scheduler's own `step` (diffusers'
    contract, held to diffusers in test_schedulers) and the guidance combine in Python floats; every draw from the
    request's seeded generator in one order: the start's noise, the added noise (XPSR's start: the LQ latent noised
    to the first step, then to 800), a stochastic scheduler's noise."""
    runners = load_runners("torch", tiny_checkpoint)
    run = lambda name, **feed: runners[name].infer(feed)  # noqa: E731
    added = 800 if start == "lq" else None
    cfg = tiny_checkpoint.defaults.replace(steps=4, seed=3, scheduler=name, start=start, added_noise_level=added)
    g = torch.Generator().manual_seed(1)
    lq = {"f1": torch.randn(1, 64, 8, 8, generator=g), "z_lq": torch.randn(1, 4, 8, 8, generator=g)}
    text = torch.randn(2, 77, 32, generator=g)
    scheduler = make_scheduler(name, tiny_checkpoint.scheduler_config)
    got = denoise(tiny_checkpoint.model, run, lq, {"text_embeddings": text}, cfg, scheduler)

    scheduler = make_scheduler(name, tiny_checkpoint.scheduler_config)
    scheduler.set_timesteps(cfg.steps)
    generator = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(lq["z_lq"].shape, generator=generator)
    if start == "lq":
        x = scheduler.add_noise(lq["z_lq"], x, scheduler.timesteps[0])
        x = scheduler.add_noise(x, torch.randn(x.shape, generator=generator), 800)
    for t in scheduler.timesteps:
        f2 = run("fusion_transformer", f1=lq["f1"], sample=x)["f2"]
        eps = run("controlnet_unet", sample=torch.cat([x, x]), timestep=torch.full((2,), float(t)),
                  text_embeddings=text, f2=f2)["noise_pred"]
        neg, pos = eps.chunk(2)
        x = scheduler.step(neg + cfg.guidance_scale * (pos - neg), t, x, generator)
    torch.testing.assert_close(got, x, rtol=1e-5, atol=1e-5)


def test_cuda_graphs_are_refused_off_cuda(tiny_checkpoint):
    with pytest.raises(DiffsrError, match="CUDA graphs need a CUDA device; this pipeline runs on cpu"):
        Pipeline(load_runners("torch", tiny_checkpoint), tiny_checkpoint, "cpu", cuda_graph=True)
    x = torch.zeros(1, 4, 8, 8)
    step = Step(tiny_checkpoint.model, lambda *a, **k: {}, make_scheduler("ddim", tiny_checkpoint.scheduler_config))
    with pytest.raises(DiffsrError, match="CUDA graphs need the latents on a CUDA device, not cpu"):
        StepGraphs().prepare(step, x, {"f1": x}, {"text_embeddings": x}, torch.zeros(1, 6))


def test_sdxl_conditioning_adds_time_ids_from_the_output_size():
    text = {"text_embeddings": torch.zeros(2, 77, 80), "text_embeds": torch.zeros(2, 48)}
    cond = preset("sdxl-tiny").conditioning(text, (600, 800))
    assert cond["time_ids"].tolist() == [[600, 800, 0, 0, 600, 800]] * 2  # original, crop corner, target
    assert cond["text_embeds"] is text["text_embeds"]
    assert set(preset("tiny").conditioning({"text_embeddings": text["text_embeddings"]}, (600, 800))) == {"text_embeddings"}
