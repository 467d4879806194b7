"""Sampler step math, written once on tensors so every backend runs it where the latents live.

The contract is diffusers': `set_timesteps(n)`, `timesteps`, `step(model_output, t, sample)`.
Coefficients are Python floats computed on the host when the timesteps are set, so a step is a
few element-wise ops on the device with no host round trip. Tests hold it to diffusers'
`DDIMScheduler`; only the constructor's keys are read from a diffusers `scheduler_config.json`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from diffsr.export.core.errors import DiffsrError


def alphas_cumprod(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), in float32 as the model was trained with."""
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    else:
        raise DiffsrError(f"beta_schedule={beta_schedule!r} is not supported; choose 'scaled_linear' or 'linear'")
    return torch.cumprod(1.0 - betas, dim=0)


class DDIMScheduler:
    """DDIM (Song et al. 2021) with eta = 0: the deterministic sampler, eq. (12) without noise."""

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
        if prediction_type not in ("epsilon", "v_prediction"):
            raise DiffsrError(f"prediction_type={prediction_type!r} is not supported; use 'epsilon' or 'v_prediction'")
        if timestep_spacing not in ("leading", "trailing"):
            raise DiffsrError(f"timestep_spacing={timestep_spacing!r} is not supported; use 'leading' or 'trailing'")
        if clip_sample:
            raise DiffsrError("clip_sample=True is not supported (SD checkpoints use False)")
        self.num_train_timesteps, self.steps_offset = num_train_timesteps, steps_offset
        self.prediction_type, self.timestep_spacing = prediction_type, timestep_spacing
        self.alphas_cumprod = alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.timesteps: list[int] = []
        self._coef: dict[int, tuple[float, float, float, float]] = {}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DDIMScheduler:
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                "set_alpha_to_one", "steps_offset", "timestep_spacing", "clip_sample")
        return cls(**{k: config[k] for k in keys if k in config})

    def set_timesteps(self, num_inference_steps: int) -> None:
        n, T = num_inference_steps, self.num_train_timesteps
        if not 1 <= n <= T:
            raise DiffsrError(f"num_inference_steps={n} is out of range: use 1 to {T}")
        stride = T // n
        if self.timestep_spacing == "leading":
            ts = [i * stride + self.steps_offset for i in range(n)]
        else:  # trailing: end exactly at the last training step
            ts = [round(T - i * T / n) - 1 for i in range(n)][::-1]
        if ts[-1] >= T:  # leading spacing shifted by steps_offset: 1000 steps of 1000 reach t = 1000
            raise DiffsrError(f"steps={n} is out of range for this scheduler: its {self.timestep_spacing} spacing with "
                              f"steps_offset={self.steps_offset} would start at timestep {ts[-1]}, past the last "
                              f"trained one ({T - 1}); use fewer steps")
        self.timesteps = ts[::-1]
        # per timestep: sqrt(a_t), sqrt(1 - a_t) and the same for the step it jumps to (t - T/n), or
        # the final alpha_bar past t = 0; rounded to float32 like the training code's tensors
        self._coef = {}
        for t in ts:
            a_prev = self.alphas_cumprod[t - stride] if t - stride >= 0 else self.final_alpha_cumprod
            self._coef[t] = (*_sqrt_pair(self.alphas_cumprod[t]), *_sqrt_pair(a_prev))

    def step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor) -> torch.Tensor:
        return self.update(model_output, sample, self._coef[timestep])

    def coefficients(self, timestep: int) -> tuple[float, float, float, float]:
        """sqrt(a_t), sqrt(1 - a_t), sqrt(a_prev), sqrt(1 - a_prev) of a timestep set by `set_timesteps`."""
        return self._coef[timestep]

    def update(self, model_output: torch.Tensor, sample: torch.Tensor, coef: Sequence[float | torch.Tensor]) -> torch.Tensor:
        """x_t -> x_{t-1} given a step's coefficients, as Python floats or as device scalars (what a step
        captured in a CUDA graph reads, so one capture serves every timestep)."""
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

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timestep: int) -> torch.Tensor:
        """q(x_t | x_0) = sqrt(a_t) x_0 + sqrt(1 - a_t) noise."""
        sqrt_a, sqrt_b = _sqrt_pair(self.alphas_cumprod[timestep])
        return sqrt_a * original + sqrt_b * noise


def _sqrt_pair(alpha_bar: torch.Tensor) -> tuple[float, float]:
    """(sqrt(a), sqrt(1 - a)) computed in float32."""
    return float(alpha_bar**0.5), float((1 - alpha_bar) ** 0.5)


SCHEDULER_CLASSES = {"ddim": DDIMScheduler}


def make_scheduler(name: str, config: dict[str, Any]) -> DDIMScheduler:
    if name not in SCHEDULER_CLASSES:
        raise DiffsrError(f"scheduler {name!r} is not supported; choose one of {sorted(SCHEDULER_CLASSES)}")
    return SCHEDULER_CLASSES[name].from_config(config)
