"""What every command shares: the one error boundary, progress bars, parsing of sizes and lists.

Every command is registered through `command`: a `DiffsrError` (anything the user can cause and fix) or
an `OSError` on a path becomes one line on stderr and exit code 2. Output paths are checked before the
work that ends in writing them. Commands import what they run inside their bodies, so `diffsr --help`
starts without loading torch. Long work reports `Progress` events, drawn as bars by `Bars`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress

from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.files import require_writable
from diffsr.export.core.precision import Precision
from diffsr.export.core.progress import Progress

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Deploy a diffusion super-resolution model.")
console = Console(stderr=True)  # messages, progress and errors; results that scripts read go to stdout
out = Console()
F = TypeVar("F", bound=Callable[..., Any])


def fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True, markup=True)  # one line
    raise typer.Exit(code=2)


def command(name: str | None = None, group: typer.Typer | None = None) -> Callable[[F], F]:
    """Register a command behind the one error boundary (on `group`, a command group such as `diffsr gallery`)."""

    def register(fn: F) -> F:
        @functools.wraps(fn)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except DiffsrError as e:
                fail(str(e))
            except OSError as e:  # a path the user gave: missing, unwritable, full disk
                where = f": {e.filename}" if e.filename else ""
                fail(f"{e.strerror or e}{where}")

        (group or app).command(name)(guarded)
        return fn

    return register


class Bars:
    """Draws `Progress` events: one bar per task, advanced by the events' counts."""

    def __init__(self, progress: RichProgress):
        self.progress, self.tasks = progress, {}

    def __call__(self, event: Progress) -> None:
        if event.task not in self.tasks:
            self.tasks[event.task] = self.progress.add_task(event.task, total=event.total)
        task: TaskID = self.tasks[event.task]
        self.progress.update(task, completed=event.done, total=event.total, description=f"{event.task}: {event.item}")


@contextmanager
def bars() -> Iterator[Bars]:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with RichProgress(*columns, console=console, transient=True) as progress:
        yield Bars(progress)


def parse_size(text: str) -> tuple[int, int]:
    """"WIDTHxHEIGHT" -> (width, height), both positive."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise DiffsrError(f"size {text!r} is not WIDTHxHEIGHT, e.g. 128x96") from None
    if w < 1 or h < 1:
        raise DiffsrError(f"size {text!r} must be at least 1x1 pixels")
    return w, h


def parse_precision(value: str | None) -> Precision | None:
    if value is None:
        return None
    if value not in {p.value for p in Precision}:
        raise DiffsrError(f"precision {value!r} is not supported; choose one of {[p.value for p in Precision]}")
    return Precision(value)


def parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise DiffsrError(f"{what} {text!r} is not a comma-separated list of integers, e.g. 1,2,4") from None


def writable(*paths: Path | None) -> None:
    for path in paths:
        if path is not None:
            require_writable(path)


def output_path(out: Path, overwrite: bool, inputs: list[Path]) -> None:
    """An output file that may be written (its folder writable, not a folder), and not one of the command's own input
    photos unless `overwrite` says so."""
    for given in inputs:
        if not overwrite and given.exists() and out.exists() and out.resolve() == given.resolve():
            raise DiffsrError(f"--out {out} is the input photo {given}: write the result to another file, or pass "
                              "--overwrite to replace the photo")
    require_writable(out)
