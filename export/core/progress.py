"""Progress of long work as structured events: the library reports them, the CLI draws bars.

    Progress(task="export", item="controlnet_unet fp32", done=4, total=10)

`done` counts finished units of `task` out of `total`; an event with `done` unchanged announces the
item now being worked on. Consumers read the fields, never the wording of `item`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Progress:
    task: str  # what the work is: "export", "fp16 check", "build", ...
    item: str  # what is being done or was just finished, for display
    done: int  # units of the task finished so far
    total: int  # units in all


OnProgress = Callable[[Progress], None]


def ignore(_: Progress) -> None:
    """The default consumer."""
