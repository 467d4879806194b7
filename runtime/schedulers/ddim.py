"""DDIM (Song et al. 2021) with eta = 0, the deterministic sampler: eq. (12) without noise.

Held to diffusers' `DDIMScheduler` (same config) step for step by the tests.
"""

from __future__ import annotations

import torch

from diffsr.runtime.schedulers.base import Coefficients, Scheduler, spaced_timesteps


class DDIMScheduler(Scheduler):
    name = "ddim"
    columns = ("sqrt_a", "sqrt_1_minus_a", "sqrt_a_prev", "sqrt_1_minus_a_prev")

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        prediction_type: str = "epsilon",
        set_alpha_to_one: bool = False,
        steps_offset: int = 1,
        timestep_spacing: str = "leading",
        clip_sample: bool = False,
    ):
        super().__init__()
        self._trained_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, prediction_type, steps_offset,
                               timestep_spacing, clip_sample)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self._coef: list[tuple[float, float, float, float]] = []

    def set_timesteps(self, num_inference_steps: int) -> None:
        n, T = num_inference_steps, self.num_train_timesteps
        self.check_steps(n, T)
        stride = T // n
        steps = spaced_timesteps(n, T, self.timestep_spacing, self.steps_offset)
        self.timesteps = [float(t) for t in steps]
        # per step: sqrt(a_t), sqrt(1 - a_t) and the same for the step it jumps to (t - T/n), or the final
        # alpha_bar past t = 0; rounded to float32 like the training code's tensors
        self._coef = []
        for t in steps:
            a_prev = self.alphas_cumprod[t - stride] if t - stride >= 0 else self.final_alpha_cumprod
            self._coef.append((*_sqrt_pair(self.alphas_cumprod[t]), *_sqrt_pair(a_prev)))

    def coefficients(self, i: int) -> tuple[float, ...]:
        return self._coef[i]

    def update(self, model_output: torch.Tensor, sample: torch.Tensor, coef: Coefficients,
               state: torch.Tensor | None = None) -> torch.Tensor:
        sqrt_a, sqrt_b, sqrt_a_prev, sqrt_b_prev = coef
        # 1. predicted x_0 and epsilon (eq. 12, "predicted x_0")
        if self.prediction_type == "epsilon":
            x0 = (sample - sqrt_b * model_output) / sqrt_a
            eps = model_output
        else:  # v = sqrt(a) eps - sqrt(1-a) x0  (Salimans & Ho 2022)
            x0 = sqrt_a * sample - sqrt_b * model_output
            eps = sqrt_a * model_output + sqrt_b * sample
        # 2. x_{t-1} = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps  (eq. 12 with sigma = 0)
        return sqrt_a_prev * x0 + sqrt_b_prev * eps

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timestep: float) -> torch.Tensor:
        """q(x_t | x_0) = sqrt(a_t) x_0 + sqrt(1 - a_t) noise."""
        sqrt_a, sqrt_b = _sqrt_pair(self.alphas_cumprod[int(timestep)])
        return sqrt_a * original + sqrt_b * noise


def _sqrt_pair(alpha_bar: torch.Tensor) -> tuple[float, float]:
    """(sqrt(a), sqrt(1 - a)) computed in float32."""
    return float(alpha_bar**0.5), float((1 - alpha_bar) ** 0.5)
