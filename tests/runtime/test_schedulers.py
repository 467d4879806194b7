"""The schedulers against diffusers' (same config), step for step: DDIM, DDPM (its noise from the same seeded
generator, drawn in the same order) and DPM-Solver++ (2M) on SD's diffusion process, flow-matching Euler on SD3.5's,
through diffusers' contract and through the device table the loop reads."""

import pytest
import torch
from diffusers import DDIMScheduler as DDIMReference
from diffusers import DDPMScheduler as DDPMReference
from diffusers import DPMSolverMultistepScheduler as DPMReference
from diffusers import FlowMatchEulerDiscreteScheduler as FlowReference

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.families.sd import SD_SCHEDULER_CONFIG
from diffsr.export.model.families.xpsr import XPSR_SCHEDULER_CONFIG
from diffsr.runtime.schedulers import SCHEDULERS, make_scheduler
from diffsr.runtime.schedulers.ddim import DDIMScheduler
from diffsr.runtime.step import LEADING_COLUMNS, step_table

REFERENCES = {"ddim": DDIMReference, "ddpm": DDPMReference, "dpmpp-2m": DPMReference, "flow-euler": FlowReference}
SPACINGS = {"ddim": ("leading", "trailing"), "ddpm": ("leading", "trailing"), "dpmpp-2m": ("leading", "trailing", "linspace")}
CASES = [(name, spacing) for name in SPACINGS for spacing in SPACINGS[name]]
SD35_SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
CONFIGS = {"ddim": SD_SCHEDULER_CONFIG, "ddpm": SD_SCHEDULER_CONFIG, "dpmpp-2m": SD_SCHEDULER_CONFIG,
           "flow-euler": SD35_SCHEDULER_CONFIG}


def _reference_step(ref, name, model_output, t, x, generator=None):
    kwargs = {"eta": 0.0} if name == "ddim" else {"generator": generator} if name == "ddpm" else {}
    timestep = t if SCHEDULERS[name].process == "flow" else int(t)  # diffusers' diffusion schedulers index by it
    return ref.step(model_output, timestep, x, **kwargs).prev_sample


def _generators(seed=7):
    """Two generators of one seed: ours draws a stochastic scheduler's noise from one, diffusers' from the other."""
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)


def _rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name,spacing", CASES)
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("steps", [1, 2, 10, 20, 50])
def test_matches_diffusers_step_for_step(name, spacing, prediction, steps):
    """Each step from the same input (errors cannot compound), the multistep solver's history its own:
    within 1e-6 of diffusers' largest value at every step."""
    config = SD_SCHEDULER_CONFIG | {"timestep_spacing": spacing, "prediction_type": prediction}
    ours, ref = make_scheduler(name, config), REFERENCES[name].from_config(config)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert ours.timesteps == ref.timesteps.tolist()
    g = torch.Generator().manual_seed(0)
    mine, theirs = _generators()
    x = torch.randn(1, 4, 16, 16, generator=g)
    for t in ours.timesteps:
        model_output = torch.randn(1, 4, 16, 16, generator=g)  # stands in for the UNet
        want = _reference_step(ref, name, model_output, t, x, theirs)
        assert _rel(ours.step(model_output, t, x, mine), want) <= 1e-6, t
        x = want


@pytest.mark.parametrize("name", SCHEDULERS)
def test_the_device_table_gives_diffusers_steps(name):
    """What the loop runs: each step's coefficients read from its row of the device table (0-d tensors, as a
    CUDA graph reads them) and the solver's history in a state buffer, against diffusers' `step`. A table
    whose columns were out of order, or a history not kept, fails this."""
    config = CONFIGS[name]
    ours, ref = make_scheduler(name, config), REFERENCES[name].from_config(config)
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    table = step_table(ours, 5.5)
    assert table.shape == (20, len(LEADING_COLUMNS) + len(ours.columns)) and table.dtype == torch.float32
    assert table[:, 0].tolist() == [float(t) for t in ours.timesteps] and table[:, 1].eq(5.5).all()
    g = torch.Generator().manual_seed(1)
    mine, theirs = _generators()
    x = torch.randn(1, 4, 8, 8, generator=g)
    state = ours.initial_state(x, mine)
    for i, t in enumerate(ours.timesteps):
        model_output = torch.randn(1, 4, 8, 8, generator=g)
        got = ours.update(model_output, x, table[i, len(LEADING_COLUMNS):].unbind(), state)
        want = _reference_step(ref, name, model_output, t, x, theirs)
        assert _rel(got, want) <= 1e-6, (i, t)
        x = want


@pytest.mark.parametrize("name", SCHEDULERS)
def test_add_noise_matches_diffusers_at_the_first_step(name):
    ours, ref = make_scheduler(name, CONFIGS[name]), REFERENCES[name].from_config(CONFIGS[name])
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = ours.timesteps[0]
    if name == "flow-euler":  # a point of the path (at the first sigma, 1 for SD3.5: the noise itself)
        want = ref.scale_noise(x0, torch.tensor([t]), noise)
    else:
        want = ref.add_noise(x0, noise, torch.tensor([int(t)]))
    assert (ours.add_noise(x0, noise, t) - want).abs().max() <= 1e-6


def test_ddim_adds_noise_at_any_trained_timestep():
    ours, ref = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG), DDIMReference.from_config(SD_SCHEDULER_CONFIG)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for t in (1, 500, 951, 999):
        assert (ours.add_noise(x0, noise, t) - ref.add_noise(x0, noise, torch.tensor([t]))).abs().max() <= 1e-6


@pytest.mark.parametrize("name", ["ddpm", "dpmpp-2m"])
def test_the_diffusion_schedulers_noise_to_a_timestep_off_their_steps(name):
    """XPSR's added noise level (800) is no step's timestep at 2 steps: every diffusion scheduler noises to it as the
    training schedule does (diffusers' DDPM's `add_noise`), not only DDIM (dpmpp-2m looked it up among its steps)."""
    ours, ref = make_scheduler(name, XPSR_SCHEDULER_CONFIG), DDPMReference.from_config(XPSR_SCHEDULER_CONFIG)
    ours.set_timesteps(2)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert 800 not in ours.timesteps
    assert (ours.add_noise(x0, noise, 800) - ref.add_noise(x0, noise, torch.tensor([800]))).abs().max() <= 1e-6


def test_flow_matching_noises_to_a_timestep_off_its_steps():
    ours = make_scheduler("flow-euler", SD35_SCHEDULER_CONFIG)
    ours.set_timesteps(20)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    assert 800.0 not in ours.timesteps
    assert torch.allclose(ours.add_noise(x0, noise, 800), 0.8 * noise + 0.2 * x0)


def test_step_stays_on_the_inputs_dtype():
    s = DDIMScheduler()
    s.set_timesteps(20)
    x = torch.randn(1, 4, 8, 8, dtype=torch.float16)
    assert s.step(x, s.timesteps[0], x).dtype == torch.float16


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("steps", [0, 1001])
def test_bad_step_counts_are_refused(name, steps):
    with pytest.raises(DiffsrError, match="out of range"):
        make_scheduler(name, CONFIGS[name]).set_timesteps(steps)


def test_a_step_count_past_the_last_trained_timestep_is_refused():
    """Leading spacing with steps_offset 1 (SD's config): 1000 DDIM steps would start at t = 1000, which has
    no alpha (diffusers indexes past its table there); 999 steps are the most, and start at 999."""
    with pytest.raises(DiffsrError, match="steps=1000 is out of range for this scheduler.*timestep 1000"):
        DDIMScheduler.from_config(SD_SCHEDULER_CONFIG).set_timesteps(1000)
    most = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
    most.set_timesteps(999)
    assert most.timesteps[0] == 999
    with pytest.raises(DiffsrError, match="repeats timesteps"):  # leading spacing over 1000 steps: a ratio of 0
        make_scheduler("dpmpp-2m", SD_SCHEDULER_CONFIG).set_timesteps(1000)


def test_unknown_schedulers_and_unsupported_configs_are_refused():
    with pytest.raises(DiffsrError, match=r"scheduler 'euler_x' is not supported; choose one of \['ddim', 'ddpm', 'dpmpp-2m'\]"):
        make_scheduler("euler_x", SD_SCHEDULER_CONFIG)
    with pytest.raises(DiffsrError, match=r"use_dynamic_shifting"):
        make_scheduler("flow-euler", SD35_SCHEDULER_CONFIG | {"use_dynamic_shifting": True})
    with pytest.raises(DiffsrError, match="prediction_type='sample'"):
        DDIMScheduler.from_config(SD_SCHEDULER_CONFIG | {"prediction_type": "sample"})
    with pytest.raises(DiffsrError, match="solver_order=3 is not supported by dpmpp-2m"):
        make_scheduler("dpmpp-2m", SD_SCHEDULER_CONFIG | {"solver_order": 3})


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 2, 10, 20, 40])
def test_flow_matching_matches_diffusers_step_for_step(shift, steps):
    """SD3.5's sampler (shift 3.0) and the unshifted one: the same timesteps (the model's input, float) and
    each step within 1e-6 of diffusers' largest value, from the same input."""
    config = SD35_SCHEDULER_CONFIG | {"shift": shift}
    ours, ref = make_scheduler("flow-euler", config), FlowReference.from_config(config)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    assert ours.timesteps == ref.timesteps.tolist() and ours.sigmas == ref.sigmas.tolist()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 16, 16, generator=g)
    for t in ours.timesteps:
        velocity = torch.randn(1, 16, 16, 16, generator=g)  # stands in for the transformer
        want = _reference_step(ref, "flow-euler", velocity, t, x)
        assert _rel(ours.step(velocity, t, x), want) <= 1e-6, t
        x = want


def test_a_scheduler_of_the_other_process_is_refused():
    """A noise-predicting sampler on a flow-matching model (or the other way round) would run and give noise:
    refused with the names that fit."""
    with pytest.raises(DiffsrError, match=r"'ddim' samples a diffusion process.*flow.*choose one of \['flow-euler'\]"):
        make_scheduler("ddim", SD35_SCHEDULER_CONFIG)
    with pytest.raises(DiffsrError, match=r"'flow-euler' samples a flow process.*choose one of \['ddim', 'ddpm', 'dpmpp-2m'\]"):
        make_scheduler("flow-euler", SD_SCHEDULER_CONFIG)
