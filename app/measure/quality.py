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

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.progress import OnProgress, Progress, ignore
from diffsr.runtime.image import load_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
PSNR_CAP = 100.0  # identical images (JSON has no infinity)


def y_channel(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (H, W) float64 BT.601 luma in [16, 235]."""
    x = rgb.astype(np.float64) / 255.0
    return 16.0 + x @ np.array([65.481, 128.553, 24.966])


def _crop(y: np.ndarray, border: int) -> np.ndarray:
    return y[border:-border, border:-border] if border else y


def psnr_y(out: np.ndarray, ref: np.ndarray, border: int) -> float:
    """PSNR (dB) of two RGB images' Y channels, `border` pixels cropped from each side."""
    a, b = _crop(y_channel(out), border), _crop(y_channel(ref), border)
    mse = float(np.mean((a - b) ** 2))
    return PSNR_CAP if mse == 0 else min(PSNR_CAP, 10 * math.log10(255.0**2 / mse))


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
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    tagged = [p for p in found if p.stem.upper().endswith(f"_{tag}")]
    other = "LR" if tag == "HR" else "HR"
    chosen = tagged or [p for p in found if not p.stem.upper().endswith(f"_{other}")]
    if not chosen:
        raise DiffsrError(f"{tag} folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
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
    """(LR, HR) as RGB uint8. A given LR must be exactly 1/scale of its HR; an LR made here is the bicubic
    downscale of the HR cropped to a multiple of `scale` (the papers' `modcrop`)."""
    hr = load_image(pair.hr)
    if pair.lr is None:
        h, w = (hr.shape[0] // scale) * scale, (hr.shape[1] // scale) * scale
        if h == 0 or w == 0:
            raise DiffsrError(f"{pair.hr.name} is {hr.shape[1]}x{hr.shape[0]}: smaller than the scale {scale}")
        hr = hr[:h, :w]
        return bicubic(hr, (w // scale, h // scale)), hr
    lr = load_image(pair.lr)
    if (lr.shape[0] * scale, lr.shape[1] * scale) != hr.shape[:2]:
        raise DiffsrError(f"{pair.lr.name} is {lr.shape[1]}x{lr.shape[0]} but {pair.hr.name} is {hr.shape[1]}x{hr.shape[0]}: "
                          f"the HR image must be exactly {scale}x the LR one")
    return lr, hr


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


def evaluate(pairs: Sequence[Pair], configs: dict[str, Upscaler], scale: int, on_progress: OnProgress = ignore,
             keep: Callable[[str, str, np.ndarray], None] | None = None) -> list[ConfigScore]:
    """Every configuration on every pair (bicubic first, as `configs` orders them); `keep(label, name, image)`
    sees each output (the picture keeps a few)."""
    scores = [ConfigScore(label) for label in configs]
    total, done = len(pairs) * len(configs), 0
    for pair in pairs:
        lr, hr = load_pair(pair, scale)
        for score, upscale in zip(scores, configs.values()):
            on_progress(Progress("eval", f"{score.label}: {pair.name}", done, total))
            start = time.perf_counter()
            sr = upscale(lr)
            seconds = time.perf_counter() - start
            if sr.shape != hr.shape:
                raise DiffsrError(f"{score.label} made {sr.shape[1]}x{sr.shape[0]} of {pair.name}, expected {hr.shape[1]}x{hr.shape[0]}")
            score.images.append(ImageScore(pair.name, psnr_y(sr, hr, scale), ssim_y(sr, hr, scale), seconds))
            if keep is not None:
                keep(score.label, pair.name, sr)
            done += 1
    on_progress(Progress("eval", "done", total, total))
    return scores


# --- reporting ---------------------------------------------------------------------------------


def reference_of(scores: list[ConfigScore]) -> ConfigScore | None:
    """What the other rows' dB difference is against: the first diffsr row (PyTorch FP32 when run)."""
    return next((s for s in scores if s.label != BICUBIC), None)


BICUBIC = "bicubic"
CROP = 160  # pixels a side of each crop in the picture


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
