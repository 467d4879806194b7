"""The schedulers, by name: the one registry `--scheduler`, the checkpoint's default and a request's
`scheduler` choose from. Each keeps diffusers' contract and the device table contract (`base.py`)."""

from __future__ import annotations

from typing import Any

from diffsr.export.core.errors import DiffsrError
from diffsr.runtime.schedulers.base import Scheduler
from diffsr.runtime.schedulers.ddim import DDIMScheduler
from diffsr.runtime.schedulers.ddpm import DDPMScheduler
from diffsr.runtime.schedulers.dpm_solver import DPMSolverMultistepScheduler
from diffsr.runtime.schedulers.flow_match import FlowMatchEulerScheduler

SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.name: cls for cls in (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerScheduler)}
FLOW_CONFIGS = ("FlowMatchEulerDiscreteScheduler",)  # diffusers' config classes of flow-matching models


def process_of(config: dict[str, Any]) -> str:
    """What a checkpoint's model was trained on, from its `scheduler_config.json`'s class."""
    return "flow" if config.get("_class_name") in FLOW_CONFIGS else "diffusion"


def schedulers_for(config: dict[str, Any]) -> list[str]:
    """The names that sample a checkpoint's model (its process's schedulers)."""
    return sorted(n for n, cls in SCHEDULERS.items() if cls.process == process_of(config))


def make_scheduler(name: str, config: dict[str, Any]) -> Scheduler:
    """The scheduler `name` with a checkpoint's `scheduler_config.json` (the keys it knows)."""
    if name not in SCHEDULERS:
        raise DiffsrError(f"scheduler {name!r} is not supported; choose one of {schedulers_for(config)}")
    if SCHEDULERS[name].process != process_of(config):
        raise DiffsrError(f"scheduler {name!r} samples a {SCHEDULERS[name].process} process; this model was trained "
                          f"for {process_of(config)} ({config.get('_class_name')}): choose one of {schedulers_for(config)}")
    return SCHEDULERS[name].from_config(config)
