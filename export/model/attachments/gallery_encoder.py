"""The gallery encoder: a CLIP image encoder that embeds photos for a reference gallery (`runtime/gallery.py`), so the
photos most like a request's can be found among many and sent as its references.

A checkpoint may hold one in `gallery_encoder/`, in transformers' layout for `CLIPVisionModelWithProjection`
(config.json, model.safetensors, preprocessor_config.json), so a published CLIP's vision folder (e.g.
`openai/clip-vit-base-patch32` saved as `CLIPVisionModelWithProjection`) is one as it stands. One graph:

    gallery_embed    pixel_values (B, 3, S, S) -> image_embeds (B, P)   (CLIP's projected CLS: what
                     `CLIPVisionModelWithProjection` returns as `image_embeds`)

It writes no text: it runs only when a gallery is built or searched. `init_gallery_encoder` writes a seeded one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.files import read_json
from diffsr.export.model.attachment import Attachment
from diffsr.export.model.attachments.clip_vision import CLIP_MEAN, CLIP_STD, clip_hidden, clip_processing
from diffsr.export.model.dims import NamedDim
from diffsr.export.model.parts import Component
from diffsr.export.model.signatures import Signature, TensorSpec

FOLDER = "gallery_encoder"
WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class GalleryEncoderConfig:
    preset: str
    vision: tuple[int, int, int, int]  # CLIP ViT: hidden, layers, heads, MLP
    projection_dim: int
    image_size: int
    patch_size: int


PRESETS: dict[str, GalleryEncoderConfig] = {
    # openai/clip-vit-base-patch32's image tower: ViT-B/32 at 224 px, 512-wide embeddings (88 M parameters)
    "clip-vit-base-patch32": GalleryEncoderConfig("clip-vit-base-patch32", (768, 12, 12, 3072), 512, 224, 32),
    # the same structure at tiny widths, for the tests
    "clip-tiny": GalleryEncoderConfig("clip-tiny", (32, 2, 4, 64), 16, 28, 14),
}


def gallery_encoder_preset(name: str) -> GalleryEncoderConfig:
    if name not in PRESETS:
        raise DiffsrError(f"unknown gallery encoder preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def clip_vision_config(c: GalleryEncoderConfig) -> Any:
    from transformers import CLIPVisionConfig

    (h, layers, heads, mlp) = c.vision
    return CLIPVisionConfig(hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=mlp,
                            image_size=c.image_size, patch_size=c.patch_size, projection_dim=c.projection_dim,
                            hidden_act="quick_gelu")


class GalleryEmbed(nn.Module):
    """pixel_values -> image_embeds: every layer, the post-norm of CLS, the projection (under the folder's names)."""

    def __init__(self, clip: Any):
        super().__init__()
        self.vision_model, self.visual_projection = clip.vision_model, clip.visual_projection

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        tower = self.vision_model
        x = clip_hidden(tower, pixel_values, len(tower.encoder.layers))
        return self.visual_projection(tower.post_layernorm(x[:, 0]))


def build_clip_vision(folder: Path) -> nn.Module:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    from transformers.initialization import no_init_weights

    try:
        config = CLIPVisionConfig.from_dict(read_json(folder / "config.json", "gallery encoder file"),
                                            attn_implementation="eager")
        with no_init_weights():
            module: nn.Module = CLIPVisionModelWithProjection(config)
    except (ValueError, TypeError, KeyError) as e:
        raise DiffsrError(f"{folder / 'config.json'} is not a valid CLIPVisionConfig: {e}") from None
    return module


@dataclass(frozen=True)
class GalleryEncoder(Attachment):
    """A checkpoint's gallery encoder, read from its config: the widths its graph's signature needs."""

    folder = FOLDER
    part = "gallery"
    stand_in = "references sent with the request (no gallery search)"

    path: Path = field(compare=False)
    image_size: int
    projection_dim: int

    @classmethod
    def open(cls, folder: Path) -> GalleryEncoder:
        if not (folder / "config.json").is_file():
            raise DiffsrError(f"no gallery encoder in {folder}: add one with `diffsr init --gallery-encoder clip-tiny` or "
                              "copy a CLIP vision folder there")
        config = read_json(folder / "config.json", "gallery encoder file")
        if config.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise DiffsrError(f"{folder / 'config.json'} is a {config.get('model_type')!r} config, not a CLIP vision one: "
                              "save the image tower as CLIPVisionModelWithProjection (a whole CLIP's "
                              "`CLIPVisionModelWithProjection.from_pretrained(...).save_pretrained(...)`)")
        return cls(folder, config.get("image_size", 224), config.get("projection_dim", 512))

    def components(self) -> dict[str, Component]:
        return {FOLDER: Component(build_clip_vision, WEIGHTS)}

    def parts(self, submodule: str) -> tuple[tuple[str, ...], Any]:
        return (FOLDER,), GalleryEmbed

    def dims(self) -> tuple[NamedDim, ...]:
        return ()

    def declare(self) -> tuple[Signature, ...]:
        return (Signature("gallery_embed",
                          inputs=(TensorSpec("pixel_values", "float32", ("batch", 3, self.image_size, self.image_size)),),
                          outputs=(TensorSpec("image_embeds", "float32", ("batch", self.projection_dim)),)),)

    def file_errors(self, folder: Path) -> list[str]:
        if not (folder / "preprocessor_config.json").is_file():
            return [f"gallery encoder file missing: {folder / 'preprocessor_config.json'}: copy the CLIP image "
                    "processor's config"]
        try:
            clip_processing(folder, self.image_size)
        except DiffsrError as e:
            return [str(e)]
        return []


def init_gallery_encoder(preset_name: str, seed: int, checkpoint: Path) -> GalleryEncoder:
    """Write a seeded gallery encoder of a preset into `checkpoint/gallery_encoder` (which must not exist yet)."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection

    from diffsr.export.model.draw import STORED_DTYPE, draw_parameter

    c = gallery_encoder_preset(preset_name)
    out = Path(checkpoint) / FOLDER
    if out.exists():
        raise DiffsrError(f"{out} already exists: a checkpoint holds one gallery encoder")
    config = clip_vision_config(c)
    with init_empty_weights(include_buffers=False):
        model = CLIPVisionModelWithProjection(config)
    modules = dict(model.named_modules())
    tensors = {}
    for key, tensor in model.state_dict().items():
        owner, _, kind = key.rpartition(".")
        tensors[key] = draw_parameter(modules[owner], kind, tuple(tensor.shape), seed, f"{FOLDER}/{key}").to(STORED_DTYPE)
    out.mkdir(parents=True)
    config.save_pretrained(str(out))
    CLIPImageProcessorPil(size={"shortest_edge": c.image_size}, crop_size={"height": c.image_size, "width": c.image_size},
                          image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD)).save_pretrained(str(out))
    save_file(tensors, str(out / WEIGHTS), {"format": "pt"})
    (out / "diffsr_gallery_encoder.json").write_text(json.dumps({"preset": asdict(c), "seed": seed}, indent=2) + "\n")
    return GalleryEncoder.open(out)
