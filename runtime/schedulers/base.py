"""What every scheduler is: diffusers' contract on the host, a table of coefficients for the device.

    set_timesteps(n)                      the n steps; `timesteps` are the model's timestep input per step
    step(model_output, t, sample)         diffusers' contract: x_t -> x_{t-1} (a multistep solver keeps
                                          its history itself)
    columns, coefficients(i)              step i as a row of Python floats, computed on the host once
    update(model_output, sample, coef, state)
                                          the same step as element-wise ops, its coefficients read from
                                          the row (floats, or device scalars: what a captured CUDA graph
                                          reads, so one capture serves every step); `state` is a device
                                          buffer made per request (`initial_state`): the history a multistep
                                          solver updates in place, or a stochastic one's noise (DDPM's)
    add_noise(x0, noise, t)               q(x_t | x_0), to start from the LQ latent

`process` is what the model was trained to reverse: a diffusion (noise) process, whose model predicts the
noise or v (DDIM, DPM-Solver++), or a flow-matching path, whose model predicts the velocity (SD3's);
`make_scheduler` refuses a scheduler of the other kind than the checkpoint's.

The loop (`runtime/loop.py`) sends a request's table to the device once; nothing returns to the host
inside it. Only the constructor's keys are read from a diffusers `scheduler_config.json`; others (another
scheduler's) are ignored, as diffusers' `from_config` does.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from diffsr.export.core.errors import DiffsrError

Coefficients = Sequence[float | torch.Tensor]


def alphas_cumprod(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), in float32 as the model was trained with."""
    if beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    else:
        raise DiffsrError(f"beta_schedule={beta_schedule!r} is not supported; choose 'scaled_linear' or 'linear'")
    return torch.cumprod(1.0 - betas, dim=0)


def spaced_timesteps(n: int, num_train_timesteps: int, spacing: str, steps_offset: int) -> list[int]:
    """The n timesteps of diffusers' "leading" (from 0 by T/n, shifted by `steps_offset`) or "trailing" (ending at
    the last training step) spacing, in sampling order (descending)."""
    T = num_train_timesteps
    if spacing == "leading":
        ts = [i * (T // n) + steps_offset for i in range(n)]
    else:  # trailing: end exactly at the last training step
        ts = [round(T - i * T / n) - 1 for i in range(n)][::-1]
    if ts[-1] >= T:  # leading spacing shifted by steps_offset: 1000 steps of 1000 reach t = 1000
        raise DiffsrError(f"steps={n} is out of range for this scheduler: its {spacing} spacing with "
                          f"steps_offset={steps_offset} would start at timestep {ts[-1]}, past the last "
                          f"trained one ({T - 1}); use fewer steps")
    return ts[::-1]


def choose(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise DiffsrError(f"{name}={value!r} is not supported; use one of {list(choices)}")


class Scheduler(ABC):
    name: ClassVar[str]
    process: ClassVar[str] = "diffusion"
    columns: ClassVar[tuple[str, ...]]

    def __init__(self) -> None:
        self.timesteps: list[float] = []  # the model's timestep input per step
        self._state: torch.Tensor | None = None  # the history `step` keeps

    def _trained_schedule(self, num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str,
                          prediction_type: str, steps_offset: int, timestep_spacing: str, clip_sample: bool) -> None:
        """The discrete schedules' (DDIM's, DDPM's) shared settings, checked and kept, and alpha_bar."""
        choose("prediction_type", prediction_type, ("epsilon", "v_prediction"))
        choose("timestep_spacing", timestep_spacing, ("leading", "trailing"))
        if clip_sample:
            raise DiffsrError("clip_sample=True is not supported (SD checkpoints use False)")
        self.num_train_timesteps, self.steps_offset = num_train_timesteps, steps_offset
        self.prediction_type, self.timestep_spacing = prediction_type, timestep_spacing
        self.alphas_cumprod = alphas_cumprod(num_train_timesteps, beta_start, beta_end, beta_schedule)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Scheduler:
        keys = [k for k in inspect.signature(cls.__init__).parameters if k != "self"]
        return cls(**{k: config[k] for k in keys if k in config})

    @abstractmethod
    def set_timesteps(self, num_inference_steps: int) -> None: ...

    @abstractmethod
    def coefficients(self, i: int) -> tuple[float, ...]:
        """Step i's row (sampling order), the values of `columns`."""

    @abstractmethod
    def update(self, model_output: torch.Tensor, sample: torch.Tensor, coef: Coefficients,
               state: torch.Tensor | None) -> torch.Tensor:
        """x_t -> x_{t-1} given the step's coefficients; writes the solver's history into `state`."""

    def initial_state(self, sample: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """A request's device buffer: the history of a multistep solver, the noise of a stochastic one (drawn from
        `generator`, the request's seeded one); None: a deterministic one-step scheduler needs none."""
        return None

    @abstractmethod
    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timestep: float) -> torch.Tensor: ...

    def step(self, model_output: torch.Tensor, timestep: float, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """diffusers' contract: the step of `timestep`, the history kept here (reset at the first step, when a
        stochastic scheduler draws every step's noise from `generator`)."""
        i = self.timesteps.index(timestep)
        if i == 0 or self._state is None:
            self._state = self.initial_state(sample, generator)
        return self.update(model_output, sample, self.coefficients(i), self._state)

    def check_steps(self, n: int, most: int) -> None:
        if not 1 <= n <= most:
            raise DiffsrError(f"num_inference_steps={n} is out of range: use 1 to {most}")
