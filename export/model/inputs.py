"""A request input: one thing a request may carry, declared once. The command line's options (`upscale`, `client`),
the endpoint's tensors, the Triton models' configs, calibration's and parity's sample requests all follow from these
declarations: every model takes the base inputs (`settings.BASE_INPUTS`: the photo, the prompts, the sampler's
settings), a family adds its own (`ModelFamily.family_inputs`: a second prompt, reference photos).

Kinds:

    photo     one photo (an encoded PNG or JPEG at the endpoint, a file on the command line)
    photos    a list of `low` to `high` photos
    text      UTF-8 text
    int       an integer in [low, high]
    float     a finite number in [low, high]
    choice    one of `choices` (none listed: a name the runtime checks against the model, as the scheduler's)

A photo input is `tiled` (laid over the request's photo: resized to the output size and cut into the same tiles) or
global (resized to `side` pixels square; every tile sees all of it). Its prepared pixels ([-1, 1], (N, 3, H, W)) go
under the name `tensor` in the once-per-request stages' feeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.signatures import TensorSpec

KINDS = ("photo", "photos", "text", "int", "float", "choice")
PHOTO_KINDS = ("photo", "photos")
ENDPOINT_DTYPES = {"int": ("int32", "int64"), "float": ("float32",)}  # a number's tensor at the endpoint


@dataclass(frozen=True)
class RequestInput:
    name: str
    kind: str
    help: str
    low: float | None = None  # numbers: the least value; photos: the fewest
    high: float | None = None  # numbers: the most; photos: the most
    choices: tuple[str, ...] = ()
    default: Any = None  # a family input's value where neither the request nor the checkpoint gives one
    required: bool = False
    tiled: bool = False  # photos: laid over the request's photo and tiled with it (else global)
    side: int = 0  # global photos: the square side in pixels they are resized to
    tensor: str = ""  # photos: the name of their prepared pixels in the stages' feeds
    dtype: str = ""  # numbers: the endpoint's tensor type (int: int32 or int64; float: float32)
    flag: str = ""  # the command line's option name (default: the name with dashes); a list's option repeats

    def __post_init__(self) -> None:
        where = f"request input {self.name!r}"
        if self.kind not in KINDS:
            raise DiffsrError(f"{where}: kind {self.kind!r} is not one of {list(KINDS)}")
        if self.kind in PHOTO_KINDS and (not self.tensor or self.tiled == bool(self.side)):
            raise DiffsrError(f"{where}: a photo input names its tensor and is either tiled or resized to a side")
        if self.kind in ENDPOINT_DTYPES and self.dtype not in ENDPOINT_DTYPES[self.kind]:
            raise DiffsrError(f"{where}: dtype {self.dtype!r} is not one of {list(ENDPOINT_DTYPES[self.kind])}")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise DiffsrError(f"{where}: low {self.low} is above high {self.high}")

    @property
    def option(self) -> str:
        return "--" + (self.flag or self.name).replace("_", "-")

    @property
    def spec(self) -> TensorSpec:
        """Its tensor at the endpoint: one element (a list of photos: any number)."""
        dtype = self.dtype or "bytes"
        return TensorSpec(self.name, dtype, (-1,) if self.kind == "photos" else (1,))

    def check(self, value: Any) -> Any:
        """The value, checked against the declaration (photos: their count; they are decoded by the runtime). A
        mistake is one line naming the input, the value and what is allowed."""
        name, kind = self.name, self.kind
        if kind == "photos":
            count = len(value)
            if not (self.low or 0) <= count <= (self.high if self.high is not None else math.inf):
                raise DiffsrError(f"{name}: {count} photos given; send {_range(self.low or 0, self.high)}")
            return value
        if kind == "photo":
            return value
        if kind in ("text", "choice"):
            if not isinstance(value, str):
                raise DiffsrError(f"{name} must be text, not {type(value).__name__} {value!r}")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise DiffsrError(f"{name} is not valid UTF-8 text") from None
            if kind == "choice" and self.choices and value not in self.choices:
                raise DiffsrError(f"{name}={value!r} is not supported; choose one of {list(self.choices)}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind == "int" and isinstance(value, float)
                                                                                and not value.is_integer()):
            raise DiffsrError(f"{name} must be {'an integer' if kind == 'int' else 'a number'}, not {value!r}")
        value = int(value) if kind == "int" else float(value)
        low = -math.inf if self.low is None else self.low
        high = math.inf if self.high is None else self.high
        if not (math.isfinite(value) and low <= value <= high):
            raise DiffsrError(f"{name}={value} is out of range: use {_range(self.low, self.high)}")
        return value


def _show(v: float) -> str:
    return f"{int(v)}" if float(v).is_integer() and abs(v) < 1e18 else f"{v}"


def _range(low: float | None, high: float | None) -> str:
    show = _show
    if high is None:
        return f"at least {show(low or 0)}"
    return f"{show(low or 0)} to {show(high)}" if low is not None else f"at most {show(high)}"


@dataclass(frozen=True)
class PromptSlot:
    """A text of the request a prompter may write of the photo (`ModelFamily.prompt_slots`): the request's own text
    (`text`: "prompt", or a family's text input) when it gives one, else (under the `caption` policy) what the
    checkpoint's prompter writes when asked `instruction` (None: the request's `caption_prompt`, or the prompter's
    default), else the default. An instruction holding `<image>` is the prompter's whole input as it stands; one
    without is put in the prompter's chat template. `cleaned`: the written text's sentences naming a degradation are
    dropped and `caption_suffix` follows (a content prompt); otherwise it is kept as written, on one line (a prompt
    that describes the degradations)."""

    text: str
    instruction: str | None = None
    cleaned: bool = True
