"""The DDIM step math against diffusers' DDIMScheduler on the same model outputs."""

import pytest
import torch
from diffusers import DDIMScheduler as Reference

from diffsr.export.model.checkpoint import SD_SCHEDULER_CONFIG
from diffsr.export.core.errors import DiffsrError
from diffsr.runtime.schedulers.ddim import DDIMScheduler


@pytest.mark.parametrize("steps", [1, 20, 50])
@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_matches_diffusers_over_a_whole_trajectory(steps, spacing, prediction):
    config = SD_SCHEDULER_CONFIG | {"timestep_spacing": spacing, "prediction_type": prediction}
    ours, ref = DDIMScheduler.from_config(config), Reference.from_config(config)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert ours.timesteps == ref.timesteps.tolist()

    g = torch.Generator().manual_seed(0)
    x_ours = x_ref = torch.randn(1, 4, 16, 16, generator=g)
    for t in ours.timesteps:
        model_output = torch.randn(1, 4, 16, 16, generator=g)  # stands in for the UNet
        x_ours = ours.step(model_output, t, x_ours)
        x_ref = ref.step(model_output, t, x_ref, eta=0.0).prev_sample
        assert (x_ours - x_ref).abs().max() <= 1e-6, t
        x_ours = x_ref  # compare each step from the same input, so errors cannot compound


def test_add_noise_matches_diffusers():
    ours, ref = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG), Reference.from_config(SD_SCHEDULER_CONFIG)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for t in (1, 500, 951, 999):
        expected = ref.add_noise(x0, noise, torch.tensor([t]))
        assert (ours.add_noise(x0, noise, t) - expected).abs().max() <= 1e-6


def test_step_stays_on_the_inputs_device_and_dtype():
    s = DDIMScheduler()
    s.set_timesteps(20)
    x = torch.randn(1, 4, 8, 8, dtype=torch.float16)
    assert s.step(x, s.timesteps[0], x).dtype == torch.float16


@pytest.mark.parametrize("steps", [0, 1001])
def test_bad_step_counts_are_refused(steps):
    with pytest.raises(DiffsrError, match="out of range"):
        DDIMScheduler().set_timesteps(steps)


def test_a_step_count_past_the_last_trained_timestep_is_refused():
    """Leading spacing with steps_offset 1 (SD's config): 1000 steps would start at t = 1000, which has no
    alpha (diffusers indexes past its table there); 999 steps are the most, and start at 999."""
    with pytest.raises(DiffsrError, match="steps=1000 is out of range for this scheduler.*timestep 1000"):
        DDIMScheduler.from_config(SD_SCHEDULER_CONFIG).set_timesteps(1000)
    most = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
    most.set_timesteps(999)
    assert most.timesteps[0] == 999


def test_unsupported_config_is_refused():
    with pytest.raises(DiffsrError, match="prediction_type='sample'"):
        DDIMScheduler.from_config(SD_SCHEDULER_CONFIG | {"prediction_type": "sample"})
