"""The schedulers, by name: the one registry `--scheduler`, the checkpoint's default and a request's
`scheduler` choose from. Each keeps diffusers' contract and the device table contract (`base.py`)."""

from __future__ import annotations

from typing import Any

from diffsr.export.core.errors import DiffsrError
from diffsr.runtime.schedulers.base import Scheduler
from diffsr.runtime.schedulers.ddim import DDIMScheduler
from diffsr.runtime.schedulers.dpm_solver import DPMSolverMultistepScheduler

SCHEDULERS: dict[str, type[Scheduler]] = {cls.name: cls for cls in (DDIMScheduler, DPMSolverMultistepScheduler)}


def make_scheduler(name: str, config: dict[str, Any]) -> Scheduler:
    """The scheduler `name` with a checkpoint's `scheduler_config.json` (the keys it knows)."""
    if name not in SCHEDULERS:
        raise DiffsrError(f"scheduler {name!r} is not supported; choose one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(config)
