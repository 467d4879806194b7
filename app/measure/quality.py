"""Quality against ground truth, the way SR papers measure it: PSNR and SSIM on the Y channel.

Conventions (BasicSR's `calculate_psnr` / `calculate_ssim` with `test_y_channel=True`, which follow the
MATLAB code the papers used):
- Y is ITU-R BT.601 luma of 8-bit RGB, studio range: Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255,
  kept as floats in [16, 235] (not rounded);
- a border of `scale` pixels is cropped from every side before measuring;
- PSNR with a peak of 255; SSIM (Wang et al. 2004) with an 11 x 11 Gaussian window of sigma 1.5, K1 0.01,
  K2 0.03, population statistics, data range 255: scikit-image's `structural_similarity` with
  `gaussian_weights=True, sigma=1.5, use_sample_covariance=False`, which is that computation.

The bicubic row upsamples with Pillow's bicubic (a = -0.5, MATLAB's kernel); an LR image made here (when no
LR folder is given) is Pillow's bicubic downscale, antialiased as MATLAB's `imresize` is.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffsr.app.measure.parity import psnr_db
from diffsr.calib.data import sample_request
from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.files import PHOTO_SUFFIXES
from diffsr.export.core.precision import Precision
from diffsr.export.core.progress import OnProgress, Progress, ignore
from diffsr.runtime.image import load_image

SSIM_WINDOW = 11  # pixels: the Gaussian window's side (sigma 1.5)
BICUBIC = "bicubic"  # the first row
REFERENCE = "torch fp32"  # the row the others' dB difference is against, where it ran
CROP = 160  # pixels a side of each crop in the picture


def y_channel(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) float64 BT.601 luma in [16, 235]."""
    x = rgb.astype(np.float64) / 255.0
    return 16.0 + x @ np.array([65.481, 128.553, 24.966])


def _crop(y: np.ndarray, border: int) -> np.ndarray:
    return y[border:-border, border:-border] if border else y


def psnr_y(out: np.ndarray, ref: np.ndarray, border: int) -> float:
    """PSNR (dB) of two RGB images' Y channels, `border` pixels cropped from each side."""
    return psnr_db(_crop(y_channel(ref), border), _crop(y_channel(out), border))


def ssim_y(out: np.ndarray, ref: np.ndarray, border: int) -> float:
    """SSIM of two RGB images' Y channels, `border` pixels cropped from each side."""
    from skimage.metrics import structural_similarity

    a, b = _crop(y_channel(out), border), _crop(y_channel(ref), border)
    return float(structural_similarity(a, b, data_range=255.0, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False))


# --- the images --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    name: str
    hr: Path
    lr: Path | None  # None: made from the HR image by bicubic downscaling


def _images(folder: Path, tag: str) -> list[Path]:
    """A folder's images of one side: those tagged `_HR` (`_LR`) where any is (Set14 keeps both in one
    folder), else all those not tagged for the other side."""
    if not folder.is_dir():
        raise DiffsrError(f"{tag} folder {folder} does not exist")
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in PHOTO_SUFFIXES)
    tagged = [p for p in found if p.stem.upper().endswith(f"_{tag}")]
    other = "LR" if tag == "HR" else "HR"
    chosen = tagged or [p for p in found if not p.stem.upper().endswith(f"_{other}")]
    if not chosen:
        raise DiffsrError(f"{tag} folder {folder} has no images ({', '.join(PHOTO_SUFFIXES)})")
    return chosen


def _key(path: Path, tag: str) -> str:
    """A file's pairing name: its stem without an `_HR` / `_LR` tag (Set14's `img_001_SRF_4_HR.png`)."""
    stem = path.stem
    return stem[: -len(tag) - 1] if stem.upper().endswith(f"_{tag}") else stem


def pair_images(hr_dir: Path, lr_dir: Path | None) -> list[Pair]:
    """HR images with their LR images, paired by name (the same stem, or the stem with `_HR` for `_LR`);
    an image on either side without its partner is an error naming it."""
    hrs = {_key(p, "HR"): p for p in _images(hr_dir, "HR")}
    if lr_dir is None:
        return [Pair(name, path, None) for name, path in hrs.items()]
    lrs = {_key(p, "LR"): p for p in _images(lr_dir, "LR")}
    lonely = [f"{hrs[k].name} (no LR image)" for k in hrs if k not in lrs] + [f"{lrs[k].name} (no HR image)" for k in lrs if k not in hrs]
    if lonely:
        raise DiffsrError(f"unpaired images in {hr_dir} and {lr_dir}: {', '.join(lonely[:4])}{' ...' if len(lonely) > 4 else ''}")
    return [Pair(name, hrs[name], lrs[name]) for name in hrs]


def load_pair(pair: Pair, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """(LR, HR) as RGB uint8. A given LR must be 1/scale of its HR (an HR up to scale - 1 pixels larger is
    cropped to LR x scale, as BasicSR does); an LR made here is the bicubic downscale of the HR cropped to a
    multiple of `scale` (the papers' `modcrop`)."""
    hr = load_image(pair.hr)
    if pair.lr is None:
        h, w = (hr.shape[0] // scale) * scale, (hr.shape[1] // scale) * scale
        if h == 0 or w == 0:
            raise DiffsrError(f"{pair.hr.name} is {hr.shape[1]}x{hr.shape[0]}: smaller than the scale {scale}")
        hr = _big_enough(hr[:h, :w], pair.hr.name, scale)
        return bicubic(hr, (w // scale, h // scale)), hr
    lr = load_image(pair.lr)
    h, w = lr.shape[0] * scale, lr.shape[1] * scale
    if not (h <= hr.shape[0] < h + scale and w <= hr.shape[1] < w + scale):
        raise DiffsrError(f"{pair.lr.name} is {lr.shape[1]}x{lr.shape[0]} but {pair.hr.name} is {hr.shape[1]}x{hr.shape[0]}: "
                          f"the HR image must be {scale}x the LR one (up to {scale - 1} pixels more, cropped)")
    return lr, _big_enough(hr[:h, :w], pair.hr.name, scale)


def _big_enough(hr: np.ndarray, name: str, border: int) -> np.ndarray:
    """SSIM's 11-pixel window must fit inside the border crop."""
    if min(hr.shape[:2]) < 2 * border + SSIM_WINDOW:
        raise DiffsrError(f"{name} is {hr.shape[1]}x{hr.shape[0]}: too small to score (at least {2 * border + SSIM_WINDOW} "
                          f"pixels a side: a {border} px border and SSIM's {SSIM_WINDOW} px window)")
    return hr


def bicubic(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """RGB uint8 resized to (width, height) with Pillow's bicubic."""
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BICUBIC))


# --- measuring ---------------------------------------------------------------------------------


@dataclass
class ImageScore:
    name: str
    psnr_y: float
    ssim_y: float
    seconds: float


@dataclass
class ConfigScore:
    label: str  # "bicubic", "torch fp32", "onnxruntime fp16", ...
    images: list[ImageScore] = field(default_factory=list)

    @property
    def psnr_y(self) -> float:
        return float(np.mean([i.psnr_y for i in self.images]))

    @property
    def ssim_y(self) -> float:
        return float(np.mean([i.ssim_y for i in self.images]))

    @property
    def seconds(self) -> float:
        return float(sum(i.seconds for i in self.images))

    def to_json(self) -> dict:
        return {"label": self.label, "psnr_y": self.psnr_y, "ssim_y": self.ssim_y, "seconds": self.seconds,
                "images": [asdict(i) for i in self.images]}


Upscaler = Callable[[np.ndarray], np.ndarray]  # LR RGB uint8 -> SR RGB uint8 at scale x
Row = Callable[[], AbstractContextManager[Upscaler]]  # loads a configuration; leaving the context releases it


def evaluate(pairs: Sequence[Pair], rows: dict[str, Row], scale: int, on_progress: OnProgress = ignore,
             keep: Callable[[str, str, np.ndarray], None] | None = None) -> list[ConfigScore]:
    """Every configuration on every pair (bicubic first, as `rows` orders them), one configuration loaded at
    a time (a full-size model's backends do not fit in memory together); `keep(label, name, image)` sees
    each output (the picture keeps a few)."""
    images = [(pair.name, *load_pair(pair, scale)) for pair in pairs]  # test sets are small: read once
    scores, total, done = [], len(images) * len(rows), 0
    for label, row in rows.items():
        on_progress(Progress("eval", f"loading {label}", done, total))
        score = ConfigScore(label)
        with row() as upscale:
            for name, lr, hr in images:
                on_progress(Progress("eval", f"{label}: {name}", done, total))
                start = time.perf_counter()
                sr = upscale(lr)
                seconds = time.perf_counter() - start
                if sr.shape != hr.shape:
                    raise DiffsrError(f"{label} made {sr.shape[1]}x{sr.shape[0]} of {name}, expected {hr.shape[1]}x{hr.shape[0]}")
                score.images.append(ImageScore(name, psnr_y(sr, hr, scale), ssim_y(sr, hr, scale), seconds))
                if keep is not None:
                    keep(label, name, sr)
                done += 1
        scores.append(score)
    on_progress(Progress("eval", "done", total, total))
    return scores


# --- the rows ----------------------------------------------------------------------------------


def rows_for(ckpt: Any, config: Any, backends: list[str], precisions: list[Precision], onnx: Path | None,
             engines: Path | None, triton_url: str | None = None) -> dict[str, Row]:
    """label -> row: bicubic, then each backend (the ONNX ones at each precision; the endpoint, `triton`, a
    tritonserver on `onnx` serving `config`'s colour fix and tiling, or the one at `triton_url`, which serves its
    own). Checked before anything loads."""
    from diffsr.runtime.backends.names import BACKENDS, DEFAULTS, SERVED

    unknown = [b for b in backends if b not in (*BACKENDS, SERVED)]
    if not backends or unknown:
        raise DiffsrError(f"backends {unknown or backends}: choose one or more of {[*BACKENDS, SERVED]}")
    needs = {"onnxruntime": (onnx, "--onnx DIR"), SERVED: (onnx or triton_url, "--onnx DIR or --triton-url"),
             "tensorrt": (engines, "--engines DIR")}
    for backend in backends:
        folder, option = needs.get(backend, ("", ""))
        if folder is None:
            raise DiffsrError(f"the {backend} row needs {option}")
    scale = config.upscale
    rows: dict[str, Row] = {BICUBIC: lambda: nullcontext(lambda rgb: bicubic(rgb, (rgb.shape[1] * scale, rgb.shape[0] * scale)))}
    for backend in backends:
        if backend == SERVED:
            rows[f"{SERVED} fp32"] = lambda: _endpoint(dataclasses.replace(ckpt, defaults=config), onnx, triton_url)
        elif backend in ("onnxruntime", "tensorrt"):
            for p in precisions:
                rows[f"{backend} {p.value}"] = lambda b=backend, p=p: _pipeline(b, ckpt, config, onnx, engines, p)
        else:
            rows[f"{backend} {DEFAULTS[backend][1].value}"] = lambda b=backend: _pipeline(b, ckpt, config, onnx, engines, None)
    return rows


@contextmanager
def _pipeline(backend: str, ckpt: Any, config: Any, onnx: Path | None, engines: Path | None,
              precision: Precision | None) -> Iterator[Upscaler]:
    from diffsr.runtime.loading import load_pipeline

    pipe = load_pipeline(backend, ckpt, onnx_dir=onnx, precision=precision, engines_dir=engines)
    try:
        yield lambda rgb: pipe(sample_request(ckpt.model, rgb, config)).image
    finally:
        for runner in pipe.runners.values():
            runner.release()


@contextmanager
def _endpoint(ckpt: Any, onnx: Path | None, url: str | None) -> Iterator[Upscaler]:
    """Requests to a tritonserver started on a repository of `ckpt` (its defaults as the served settings), or to the
    one at `url`; each carries the model's other inputs as the in-process rows' requests do."""
    from diffsr.app.measure.bench import local_triton_server
    from diffsr.app.serving.triton_client import TritonClient, remote_values
    from diffsr.runtime.image import decode_image

    cfg = ckpt.defaults
    with ExitStack() as stack:
        if url is None:
            tiling = (cfg.tile, cfg.tile_overlap)
            url = stack.enter_context(local_triton_server(ckpt, onnx, stack, lambda _: None, tiling=tiling)).http_url
        client = stack.enter_context(TritonClient(url))
        settings = dict(steps=cfg.steps, seed=cfg.seed, scheduler=cfg.scheduler)

        def upscale(rgb: Any) -> Any:
            values = remote_values(ckpt.model, sample_request(ckpt.model, rgb, cfg))
            return decode_image(client.upscale(values.pop("image"), **values, **settings).png, "the endpoint's answer")

        yield upscale


# --- reporting ---------------------------------------------------------------------------------


def reference_of(scores: list[ConfigScore]) -> ConfigScore | None:
    """What the other rows' dB difference is against: PyTorch FP32 where it ran, else the first diffsr row."""
    return next((s for s in scores if s.label == REFERENCE), next((s for s in scores if s.label != BICUBIC), None))




def picture(rows: list[tuple[str, list[tuple[str, np.ndarray]]]], path: Path) -> None:
    """A PNG grid: one row per image, its crops side by side (the same centre square of each), labelled."""
    from PIL import ImageDraw

    label_h, gap = 14, 4
    columns = max(len(crops) for _, crops in rows)
    sheet = Image.new("RGB", (columns * (CROP + gap) + gap, len(rows) * (CROP + label_h + gap) + gap), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (name, crops) in enumerate(rows):
        for c, (label, rgb) in enumerate(crops):
            h, w = rgb.shape[:2]
            side = min(CROP, h, w)
            top, left = (h - side) // 2, (w - side) // 2
            tile = Image.fromarray(rgb[top: top + side, left: left + side]).resize((CROP, CROP), Image.Resampling.NEAREST)
            x, y = gap + c * (CROP + gap), gap + r * (CROP + label_h + gap)
            draw.text((x, y), f"{label}: {name}"[:28], fill="black")
            sheet.paste(tile, (x, y + label_h))
    sheet.save(path)
