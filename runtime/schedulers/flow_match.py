"""Flow matching, Euler (SD3's sampler): the model predicts the velocity v = noise - x0 of the straight path
x_sigma = (1 - sigma) x0 + sigma noise, and a step moves along it, x_next = x + (sigma_next - sigma) v.

Sigmas are spaced evenly in training time from sigma_max to sigma_min, then shifted,
sigma' = shift sigma / (1 + (shift - 1) sigma) (SD3.5: shift 3.0, more of the steps at high noise), and
the model's timestep is 1000 sigma'. Held to diffusers' `FlowMatchEulerDiscreteScheduler` (same config,
static shift) step for step by the tests.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from diffsr.export.core.errors import DiffsrError
from diffsr.runtime.schedulers.base import Coefficients, Scheduler


class FlowMatchEulerScheduler(Scheduler):
    name = "flow-euler"
    process = "flow"
    columns = ("sigma", "sigma_next")

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, use_dynamic_shifting: bool = False,
                 invert_sigmas: bool = False, shift_terminal: float | None = None, use_karras_sigmas: bool = False,
                 use_exponential_sigmas: bool = False, use_beta_sigmas: bool = False, stochastic_sampling: bool = False):
        super().__init__()
        unsupported = dict(use_dynamic_shifting=use_dynamic_shifting, invert_sigmas=invert_sigmas,
                           shift_terminal=shift_terminal, use_karras_sigmas=use_karras_sigmas,
                           use_exponential_sigmas=use_exponential_sigmas, use_beta_sigmas=use_beta_sigmas,
                           stochastic_sampling=stochastic_sampling)
        set_ = {k: v for k, v in unsupported.items() if v}
        if set_:
            raise DiffsrError(f"flow matching with {set_} is not supported (SD3 checkpoints use a static shift)")
        if not shift > 0:
            raise DiffsrError(f"shift={shift} must be positive")
        self.num_train_timesteps, self.shift = num_train_timesteps, float(shift)
        # the training sigmas, as the training code made them (float32): 1/T .. 1, shifted
        trained = self._shifted(np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32) / num_train_timesteps)
        self.sigma_min, self.sigma_max = float(trained[0]), float(trained[-1])
        self.sigmas: list[float] = []

    def _shifted(self, sigmas: npt.NDArray[np.floating[Any]]) -> npt.NDArray[np.float32]:
        return (self.shift * sigmas / (1 + (self.shift - 1) * sigmas)).astype(np.float32)

    def set_timesteps(self, num_inference_steps: int) -> None:
        n, T = num_inference_steps, self.num_train_timesteps
        self.check_steps(n, T)
        # evenly in training time between the shifted ends, then shifted (again, as diffusers does), float32
        sigmas = self._shifted(np.linspace(self.sigma_max * T, self.sigma_min * T, n) / T)
        self.sigmas = [float(s) for s in sigmas] + [0.0]
        self.timesteps = [float(np.float32(s) * np.float32(T)) for s in sigmas]

    def coefficients(self, i: int) -> tuple[float, ...]:
        return self.sigmas[i], self.sigmas[i + 1]

    def update(self, model_output: torch.Tensor, sample: torch.Tensor, coef: Coefficients,
               state: torch.Tensor | None = None) -> torch.Tensor:
        sigma, sigma_next = coef
        return sample + (sigma_next - sigma) * model_output

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timestep: float) -> torch.Tensor:
        """A point of the path at `timestep`: (1 - sigma) x0 + sigma noise, sigma the step's (or, at another
        timestep, timestep / num_train_timesteps)."""
        sigma = (self.sigmas[self.timesteps.index(timestep)] if timestep in self.timesteps
                 else float(timestep) / self.num_train_timesteps)
        return sigma * noise + (1.0 - sigma) * original
