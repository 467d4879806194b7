"""DPM-Solver++ (2M): the second-order multistep solver of the diffusion ODE in data prediction
(Lu et al. 2022, "DPM-Solver++", Algorithm 2, midpoint form), as diffusers' `DPMSolverMultistepScheduler`
runs it with its defaults (solver_order 2, lower_order_final, final sigma zero).

With sigma_t = sqrt((1 - a_t) / a_t), alpha_t = 1 / sqrt(sigma_t^2 + 1), sigma_t *= alpha_t and
lambda_t = log(alpha_t / sigma_t), step i from s0 to t (s1 the step before s0):

    x0_i   = (x - sigma_s0 eps) / alpha_s0                     data prediction (v: alpha x - sigma v)
    h      = lambda_t - lambda_s0,  r0 = (lambda_s0 - lambda_s1) / h
    x_t    = (sigma_t / sigma_s0) x - alpha_t (e^-h - 1) x0_i
             - 1/2 alpha_t (e^-h - 1) (x0_i - x0_{i-1}) / r0    second order (first order: without it)

The first step, and the last (which lands on sigma 0), are first order. x0_{i-1} is the state buffer, on
the device: a row's coefficients are (alpha_s0, sigma_s0, sigma_t / sigma_s0, alpha_t (e^-h - 1), and the
second-order weight, 0 on first-order rows). Coefficients are computed in float32 as diffusers computes
them, so the two agree to rounding.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

from diffsr.export.core.errors import DiffsrError
from diffsr.runtime.schedulers.base import Coefficients, Scheduler, alphas_cumprod, choose


class DPMSolverMultistepScheduler(Scheduler):
    name = "dpmpp-2m"
    columns = ("alpha_s", "sigma_s", "sigma_ratio", "first_order", "second_order")

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        solver_order: int = 2,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,  # with solver_order 2 and a final sigma of zero: the last step is first order anyway
        final_sigmas_type: str = "zero",
        use_karras_sigmas: bool = False,
        thresholding: bool = False,
    ):
        super().__init__()
        choose("prediction_type", prediction_type, ("epsilon", "v_prediction"))
        choose("timestep_spacing", timestep_spacing, ("linspace", "leading", "trailing"))
        for key, value, wanted in (("solver_order", solver_order, 2), ("algorithm_type", algorithm_type, "dpmsolver++"),
                                   ("solver_type", solver_type, "midpoint"), ("final_sigmas_type", final_sigmas_type, "zero"),
                                   ("use_karras_sigmas", use_karras_sigmas, False), ("thresholding", thresholding, False)):
            if value != wanted:
                raise DiffsrError(f"{key}={value!r} is not supported by dpmpp-2m; it runs {key}={wanted!r}")
        self.num_train_timesteps, self.steps_offset = num_train_timesteps, steps_offset
        self.prediction_type, self.timestep_spacing = prediction_type, timestep_spacing
        self.alphas_cumprod = alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule)
        self.train_sigmas = np.array(((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5)  # float32, per training step
        self._coef: list[tuple[float, ...]] = []

    def _spaced(self, n: int) -> npt.NDArray[np.int64]:
        T = self.num_train_timesteps
        if self.timestep_spacing == "linspace":
            return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        if self.timestep_spacing == "leading":
            ratio = T // (n + 1)
            return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + self.steps_offset
        return np.arange(T, 0, -T / n).round().copy().astype(np.int64) - 1  # trailing

    def set_timesteps(self, num_inference_steps: int) -> None:
        n = num_inference_steps
        self.check_steps(n, self.num_train_timesteps)
        timesteps = self._spaced(n)
        if timesteps.max() >= self.num_train_timesteps or timesteps.min() < 0:
            raise DiffsrError(f"steps={n} is out of range for this scheduler: its {self.timestep_spacing} spacing "
                              f"reaches timestep {int(timesteps.max())}; use fewer steps")
        if len(set(timesteps.tolist())) < n:
            raise DiffsrError(f"steps={n} is out of range for this scheduler: its {self.timestep_spacing} spacing "
                              f"repeats timesteps; use fewer steps")
        self.timesteps = [float(t) for t in timesteps]
        spaced = np.interp(timesteps, np.arange(0, len(self.train_sigmas)), self.train_sigmas)
        sigmas = torch.from_numpy(np.concatenate([spaced, [0.0]]).astype(np.float32))  # the last step lands on 0
        alpha = 1 / ((sigmas**2 + 1) ** 0.5)
        sigma = sigmas * alpha
        lam = torch.log(alpha) - torch.log(sigma)  # lambda; +inf at sigma 0
        self._coef = []
        for i in range(n):
            h = lam[i + 1] - lam[i]
            first = alpha[i + 1] * (torch.exp(-h) - 1.0)
            if i == 0 or i == n - 1:  # no history yet; the last step lands on sigma 0
                second = torch.tensor(0.0)
            else:
                r0 = (lam[i] - lam[i - 1]) / h
                second = 0.5 * first * (1.0 / r0)
            ratio = sigma[i + 1] / sigma[i]
            self._coef.append((float(alpha[i]), float(sigma[i]), float(ratio), float(first), float(second)))
        self._sigma_alpha = [(float(alpha[i]), float(sigma[i])) for i in range(n)]

    def coefficients(self, i: int) -> tuple[float, ...]:
        return self._coef[i]

    def initial_state(self, sample: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.zeros_like(sample)  # read with weight 0 by the first step

    def update(self, model_output: torch.Tensor, sample: torch.Tensor, coef: Coefficients,
               state: torch.Tensor | None) -> torch.Tensor:
        if state is None:
            raise DiffsrError("dpmpp-2m keeps the previous step's data prediction: pass its state buffer")
        alpha_s, sigma_s, ratio, first, second = coef
        # 1. data prediction x0 at this step
        if self.prediction_type == "epsilon":
            x0 = (sample - sigma_s * model_output) / alpha_s
        else:
            x0 = alpha_s * sample - sigma_s * model_output
        # 2. x_t = (sigma_t / sigma_s0) x - alpha_t (e^-h - 1) x0 - 1/2 alpha_t (e^-h - 1) / r0 (x0 - x0_prev)
        prev = ratio * sample - first * x0 - second * (x0 - state)
        state.copy_(x0)
        return prev

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timestep: float) -> torch.Tensor:
        """alpha_t x_0 + sigma_t noise: at a step's timestep (the first, to start from the LQ latent) as its step
        computes them; at any other training timestep (XPSR's added noise level) from the training schedule."""
        if timestep in self.timesteps:
            alpha, sigma = self._sigma_alpha[self.timesteps.index(timestep)]
        else:
            a = self.alphas_cumprod[int(timestep)]
            alpha, sigma = float(a**0.5), float((1 - a) ** 0.5)
        return alpha * original + sigma * noise
