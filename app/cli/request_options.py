"""The command line's request options, made from the request inputs' declarations (`RequestInput`): every model's base
inputs and every registered family's own. A command decorated with `request_options` takes them as options (the
photo as its argument) and gets their values, by input name, as `values`; which of them the checkpoint's (or the
server's) model takes is checked where the request is parsed, not here.

Typer reads a command's signature when the command line is parsed, so a family registered by then (one of one's own,
imported first) has its options, in a help panel of its own.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from diffsr.export.model.inputs import RequestInput
from diffsr.export.model.settings import BASE_INPUTS

PYTHON_TYPES: dict[str, Any] = {"photo": Path, "photos": list[Path], "text": str, "int": int, "float": float,
                                "choice": str}


def declared_inputs() -> dict[str, tuple[RequestInput, str]]:
    """Every request input by name, with the help panel it shows in: the base inputs, then each family's own (a name
    two families declare is shown once, under the first)."""
    from diffsr.export.model.families import families
    from diffsr.runtime.schedulers import SCHEDULERS

    schedulers = ", ".join(sorted(SCHEDULERS))
    found: dict[str, tuple[RequestInput, str]] = {}
    for spec in BASE_INPUTS:
        if spec.name == "scheduler":
            spec = RequestInput(spec.name, spec.kind, f"the sampler, one of {schedulers} that fits the model "
                                "(default: the checkpoint's)")
        found[spec.name] = (spec, "Request")
    for name, family in families().items():
        for spec in family(next(iter(family.presets.values()))).family_inputs():
            found.setdefault(spec.name, (spec, f"Request: the {name} family"))
    return found


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
