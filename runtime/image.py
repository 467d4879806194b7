"""Image in and out: decoding any PIL mode to RGB, the bicubic LQ upsample, uint8 and colour fixes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.family import ModelFamily

MAX_INPUT_PIXELS = 4096 * 4096  # a decompression-bomb guard, far above what a request should send


def to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8 RGB: alpha composited on white, 16/32-bit scaled down."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit greyscale (PNG opens as one of these)
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr / 257.0, 0, 255).round().astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        peak = 255.0 if arr.max(initial=0) > 1.0 else 1.0
        img = Image.fromarray(np.clip(arr * (255.0 / peak), 0, 255).round().astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return np.asarray(img.convert("RGB"), dtype=np.uint8)


def decode_image(data: bytes, source: str = "image") -> np.ndarray:
    """Encoded bytes (PNG, JPEG, ...) -> RGB uint8; a clear error for anything undecodable."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_INPUT_PIXELS:
                raise DiffsrError(f"{source} is {img.width}x{img.height}, above the {MAX_INPUT_PIXELS} pixel limit")
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # as viewers show it (a camera's orientation tag applied)
            return to_rgb(img)
    except UnidentifiedImageError:
        raise DiffsrError(f"cannot decode {source}: its {len(data)} bytes are no image format Pillow reads (send a PNG "
                          "or JPEG)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DiffsrError(f"cannot decode {source}: {e}") from None


def load_image(path: str | Path) -> np.ndarray:
    path = Path(path)
    if path.is_dir():
        raise DiffsrError(f"{path} is a folder, not a photo: give a photo file")
    if not path.is_file():
        raise DiffsrError(f"input image not found: {path}")
    return decode_image(path.read_bytes(), str(path))


def save_image(rgb: np.ndarray, path: str | Path) -> None:
    path = Path(path)
    try:
        Image.fromarray(rgb).save(path)
    except (OSError, ValueError, KeyError) as e:
        raise DiffsrError(f"cannot write {path}: {e}") from None


def encode_png(rgb: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG bytes (what the endpoint takes and returns)."""
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def output_size(height: int, width: int, scale: int) -> tuple[int, int]:
    """The upscaled size: exactly `scale` times the input, whatever its sides (the pipeline pads to the
    model's multiple inside and crops back)."""
    if height < 1 or width < 1:
        raise DiffsrError(f"input image {width}x{height} is empty")
    return height * scale, width * scale


def upsample(rgb: np.ndarray, scale: int) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, sH, sW) float32 in [-1, 1], bicubic."""
    return resized(rgb, output_size(rgb.shape[0], rgb.shape[1], scale))


def resized(rgb: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(H, W, 3) uint8 -> (1, 3, h, w) float32 in [-1, 1] at size = (h, w), bicubic (none where it is the size)."""
    x = torch.tensor(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1.0  # copies: inputs may be read-only
    if tuple(size) != rgb.shape[:2]:
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False)
    return x.clamp(-1.0, 1.0)


def padded_side(side: int, multiple: int, minimum: int = 0) -> int:
    """A side padded up to a multiple and to at least `minimum` (itself a multiple)."""
    return max(-(-side // multiple) * multiple, minimum)


def pad_to_multiple(x: torch.Tensor, multiple: int, minimum: int = 0) -> torch.Tensor:
    """Replicate-pad the bottom and right edges up to a multiple (the model's pixel multiple) and to at least
    `minimum` pixels a side (the model's `min_pixels`: no latent below the engines' least side)."""
    h, w = x.shape[-2:]
    ph, pw = padded_side(h, multiple, minimum) - h, padded_side(w, multiple, minimum) - w
    return F.pad(x, (0, pw, 0, ph), mode="replicate") if ph or pw else x


def latent_grid(model: ModelFamily, height: int, width: int) -> tuple[int, int]:
    """The latent's (h, w) for an output size: padded as `prepare_lq` pads, in latent cells."""
    m, least = model.pixel_multiple, model.min_pixels
    return padded_side(height, m, least) // model.latent_factor, padded_side(width, m, least) // model.latent_factor


def adain(x: torch.Tensor, ref: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Give x the per-channel mean and standard deviation of ref (colour correction)."""
    mx, sx = x.mean((-2, -1), keepdim=True), x.std((-2, -1), keepdim=True)
    mr, sr = ref.mean((-2, -1), keepdim=True), ref.std((-2, -1), keepdim=True)
    return ((x - mx) / (sx + eps) * sr + mr).clamp(-1.0, 1.0)


def wavelet_split(x: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) frequencies of (B, C, H, W) images, high + low == x: an a-trous wavelet pyramid, each
    level a 3x3 binomial blur dilated 2^i (replicate-padded), its detail added to `high`."""
    kernel = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=x.dtype, device=x.device) / 16
    kernel = kernel.expand(x.shape[1], 1, 3, 3)
    high, low = torch.zeros_like(x), x
    for i in range(levels):
        r = 2**i
        blurred = F.conv2d(F.pad(low, (r, r, r, r), mode="replicate"), kernel, dilation=r, groups=x.shape[1])
        high, low = high + (low - blurred), blurred
    return high, low


def wavelet_fix(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """StableSR's and SeeSR's colour fix: the output's high frequencies on the reference's low ones (the
    bicubic-upsampled LQ image's colours and shading, the model's detail)."""
    return (wavelet_split(x)[0] + wavelet_split(ref)[1]).clamp(-1.0, 1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(1, 3, H, W) in [-1, 1] -> (H, W, 3) uint8."""
    y = ((x[0].float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return y.permute(1, 2, 0).contiguous().numpy()
