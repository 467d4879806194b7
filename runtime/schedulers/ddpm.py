"""DDPM (Ho et al. 2020), the ancestral sampler: eq. (7)'s posterior mean plus fresh noise at every step, variance
"fixed_small" (the posterior's own, beta~_t). What XPSR samples with (diffusers' `DDPMScheduler` on SD's schedule).

Its noise is drawn per request on the host, from the request's seeded generator, one (C, h, w) draw per step in
sampling order, as diffusers draws it (`initial_state`): the device reads step i's draw from that bank, so a step stays
device work only and a captured CUDA graph replays it. Held to diffusers' `DDPMScheduler` step for step, with the
same generator, by the tests.
"""

from __future__ import annotations

import torch

from diffsr.export.core.errors import DiffsrError
from diffsr.runtime.schedulers.base import Coefficients, Scheduler, choose, spaced_timesteps


class DDPMScheduler(Scheduler):
    name = "ddpm"
    columns = ("sqrt_a", "sqrt_1_minus_a", "x0_coef", "sample_coef", "sigma", "index")

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        prediction_type: str = "epsilon",
        variance_type: str = "fixed_small",
        steps_offset: int = 1,
        timestep_spacing: str = "leading",
        clip_sample: bool = False,
    ):
        super().__init__()
        self._trained_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, prediction_type, steps_offset,
                               timestep_spacing, clip_sample)
        choose("variance_type", variance_type, ("fixed_small",))
        self._coef: list[tuple[float, ...]] = []

    def set_timesteps(self, num_inference_steps: int) -> None:
        n, T = num_inference_steps, self.num_train_timesteps
        self.check_steps(n, T)
        ts = spaced_timesteps(n, T, self.timestep_spacing, self.steps_offset)
        self.timesteps = [float(t) for t in ts]
        self._coef = []
        for i, t in enumerate(ts):
            # the step lands on the next timestep, past t = 0 on alpha_bar = 1 (diffusers' `previous_timestep`)
            a = self.alphas_cumprod[t]
            a_prev = self.alphas_cumprod[ts[i + 1]] if i + 1 < n else torch.tensor(1.0)
            alpha, beta = a / a_prev, 1 - a / a_prev  # of this jump
            # 1. eq. (7): the posterior mean's weights on x_0 and x_t; 2. its variance beta~ = (1-a_prev)/(1-a) beta
            x0_coef = a_prev**0.5 * beta / (1 - a)
            sample_coef = alpha**0.5 * (1 - a_prev) / (1 - a)
            variance = torch.clamp((1 - a_prev) / (1 - a) * beta, min=1e-20)
            self._coef.append((float(a**0.5), float((1 - a) ** 0.5), float(x0_coef), float(sample_coef),
                               float(variance**0.5) if t > 0 else 0.0, float(i)))

    def coefficients(self, i: int) -> tuple[float, ...]:
        return self._coef[i]

    def initial_state(self, sample: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Every step's noise, (steps, *sample.shape) on the sample's device: drawn on the host from `generator`
        (a fresh unseeded one where none is given), one draw per step in sampling order, as diffusers draws it."""
        draws = [torch.randn(sample.shape, generator=generator) for _ in self.timesteps]
        return torch.stack(draws).to(sample.device)

    def update(self, model_output: torch.Tensor, sample: torch.Tensor, coef: Coefficients,
               state: torch.Tensor | None) -> torch.Tensor:
        sqrt_a, sqrt_b, x0_coef, sample_coef, sigma, index = coef
        if state is None:
            raise DiffsrError("the ddpm scheduler draws its noise per request: give update the bank of initial_state")
        # 1. predicted x_0 (eq. 15)
        if self.prediction_type == "epsilon":
            x0 = (sample - sqrt_b * model_output) / sqrt_a
        else:  # v = sqrt(a) eps - sqrt(1-a) x0
            x0 = sqrt_a * sample - sqrt_b * model_output
        # 2. the posterior mean (eq. 7), plus its deviation times this step's draw
        step_index = torch.as_tensor(index, device=state.device).long().view(1)
        noise = state.index_select(0, step_index).view(sample.shape)
        return x0_coef * x0 + sample_coef * sample + sigma * noise

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timestep: float) -> torch.Tensor:
        """q(x_t | x_0) = sqrt(a_t) x_0 + sqrt(1 - a_t) noise."""
        a = self.alphas_cumprod[int(timestep)]
        return float(a**0.5) * original + float((1 - a) ** 0.5) * noise
