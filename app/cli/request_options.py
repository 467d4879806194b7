"""The command line's request options, made from the request inputs' declarations (`RequestInput`): every model's base
inputs and every registered family's own. A command decorated with `request_options` takes them as options (the
photo as its argument) and gets their values, by input name, as `values`; which of them the checkpoint's (or the
server's) model takes is checked where the request is parsed, not here.

Typer reads a command's signature when the command line is parsed, so a family registered by then (one of one's own,
imported first) has its options, in a help panel of its own.
"""

from __future__ import annotations

import inspect
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from diffsr.export.model.inputs import RequestInput
from diffsr.export.model.settings import BASE_INPUTS

PYTHON_TYPES: dict[str, Any] = {"photo": Path, "photos": list[Path], "text": str, "int": int, "float": float,
                                "choice": str}


REQUEST_COMMANDS = ("upscale", "client")  # the commands that take request options
SCHEDULER_HELP = "the sampler, one of {} that fits the model (default: the checkpoint's)"


def declared_inputs() -> dict[str, tuple[RequestInput, str]]:
    """Every request input by name, with the help panel it shows in: the base inputs, then each registered family's
    own (a name two families declare is shown once, under the first). Families of one's own are imported first: the
    module `--checkpoint`'s diffsr.json names, those of `DIFFSR_FAMILIES` and of the `diffsr.families` entry points.
    Typer reads every command's signature whenever it runs, so another command (or `diffsr --help`) imports no
    family, nor torch."""
    found: dict[str, tuple[RequestInput, str]] = {}
    loaded = "diffsr.export.model.families" in sys.modules  # in-process callers (tests) have it already
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if not loaded and command not in REQUEST_COMMANDS:
        return {spec.name: (spec, "Request") for spec in BASE_INPUTS}
    from diffsr.export.model.families import families, load_plugins
    from diffsr.runtime.schedulers import SCHEDULERS

    load_plugins(_checkpoint_module(sys.argv[2:]))
    for spec in BASE_INPUTS:
        if spec.name == "scheduler":
            spec = RequestInput(spec.name, spec.kind, SCHEDULER_HELP.format(", ".join(sorted(SCHEDULERS))))
        found[spec.name] = (spec, "Request")
    for name, family in families().items():
        for config in list(family.presets.values())[:1]:  # the family's inputs, from any of its models
            for spec in family(config).family_inputs():
                found.setdefault(spec.name, (spec, f"Request: the {name} family"))
    return found


def _checkpoint_module(argv: list[str]) -> list[str]:
    """The family module the diffsr.json of the command line's `--checkpoint` names (none where it names none or
    cannot be read: the command says why once it runs)."""
    for i, arg in enumerate(argv):
        path = arg.split("=", 1)[1] if arg.startswith("--checkpoint=") else argv[i + 1] if arg == "--checkpoint" and \
            i + 1 < len(argv) else None
        if path is not None:
            try:
                module = json.loads((Path(path) / "diffsr.json").read_text(encoding="utf-8")).get("family_module")
            except (OSError, ValueError, AttributeError):
                return []
            return [module] if isinstance(module, str) else []
    return []


def _parameter(spec: RequestInput, panel: str) -> inspect.Parameter:
    kind = PYTHON_TYPES[spec.kind]
    help_text = spec.help + (f" ({', '.join(spec.choices)})" if spec.choices else "")
    if spec.name == "image":
        info: Any = typer.Argument(help=help_text, show_default=False)
        return inspect.Parameter(spec.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Annotated[kind, info])
    info = typer.Option(spec.option, help=help_text + (" (repeat for each)" if spec.kind == "photos" else ""),
                        rich_help_panel=panel, show_default=False)
    return inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[Optional[kind], info])


class request_options:  # noqa: N801 (a decorator)
    """Decorates a command taking `values: dict[str, Any]`: its signature gains the request inputs' options (typer
    reads it at parse time), and its call gathers their values into `values` (None: not given)."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.__name__, self.__qualname__, self.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
        self.__module__ = fn.__module__
        self.__annotations__: dict[str, Any] = {}

    @property
    def __signature__(self) -> inspect.Signature:
        own = inspect.signature(self.fn, eval_str=True)
        inputs = [_parameter(spec, panel) for spec, panel in declared_inputs().values()]
        first = [p for p in inputs if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        rest = [p for p in own.parameters.values() if p.name != "values"]
        options = [p for p in inputs if p.kind is inspect.Parameter.KEYWORD_ONLY]
        positional = [p for p in rest if p.default is inspect.Parameter.empty]
        defaulted = [p for p in rest if p.default is not inspect.Parameter.empty]
        return own.replace(parameters=[*first, *positional, *defaulted, *options])

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        names = declared_inputs()
        values = {name: kwargs.pop(name) for name in list(kwargs) if name in names}
        values = {k: (v if not isinstance(v, list) or v else None) for k, v in values.items()}  # an empty list: not given
        return self.fn(*args, values=values, **kwargs)
