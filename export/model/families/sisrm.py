"""The `sisrm` family: SISRM (Wang and Yang, "Semantic-aware interactive diffusion for image super-resolution
reconstruction", 计算机系统应用 2025), a SeeSR-style SD-2 ControlNet SR model conditioned on a semantic segmentation of
the photo. Presets sisrm (SD-2-base's widths, SegFormer-B2 on ADE20K's 150 classes) and sisrm-tiny.

    segmenter        pixel_values (B, 3, 4s, 4t): the photo as the segmenter folder's image processor prepares it
                     -> seg_logits (B, L, s, t): SegFormer's logits                      once, prompting
    labeller         seg_logits, lq_image (B, 3, 8h, 8w) -> label_scores (B, L): the label generator's class scores
                     (global average pooling of the class probabilities, linear, softmax); segmentation (B, L, h, w):
                     the class probabilities over the prepared photo's frame, at its latent grid  once, prompting
    text_encoder     input_ids (T, 77) -> text_embeddings (T, 77, D)                       once
    lr_encoder       lq_image -> cond_embedding (B, C0, h, w): the ControlNet's conditioning embedding of the photo in
                     [0, 1]; z_lq (B, 4, h, w): the VAE posterior's mean, scaled          once, over tiles
    mask_encoder     segmentation -> mask_embedding E_m (B, C_m, h, w), mask M (B, 1, h, w) once, over tiles
    controlnet_unet  sample (2B, 4, h, w), timestep, text_embeddings, cond_embedding, mask_embedding, mask
                     -> noise_pred (2B, 4, h, w)                                           every step
    vae_decoder      latent (B, 4, h, w) -> image (B, 3, 8h, 8w)

The label words (the `labels` classes the label generator scores highest, `id2label`'s names verbatim) join the prompt
before it is tokenised: the typed prompt, a caption, the label words, the suffix. Where the paper is silent, SeeSR's
test settings (DDPM on SD-2's schedule, 50 steps, guidance 5.5, the photo's latent as the start, AdaIN, its added and
negative prompts): docs/sisrm.md. The networks are in `sisrm_networks.py`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.files import read_json
from diffsr.export.model.components import (
    diffusers_component,
    diffusers_config,
    our_component,
    transformers_component,
)
from diffsr.export.model.dims import BATCH, CFG_BATCH, TEXT_BATCH, NamedDim, latent_sides
from diffsr.export.model.families.sd import INT8_KEPT, _ids, clip_config, controlnet_copy_source, vae_force_upcast, vae_of
from diffsr.export.model.family import ModelFamily, guided, register
from diffsr.export.model.inputs import RequestInput
from diffsr.export.model.parts import Component, Draw, RunFn, Stage, Stages, Tensors
from diffsr.export.model.settings import PipelineConfig
from diffsr.export.model.signatures import Signature, TensorSpec
from diffsr.export.model.tokenizer import CLIP_LENGTH, Tokenizer, build_clip_tokenizer

F32 = "float32"
LATENT_CHANNELS = 4
NETWORKS = "diffsr.export.model.families.sisrm_networks"
MAX_LABELS = 20
MIN_SEGMENT = 32  # the segmenter's least input side, in logits cells (128 px)
# SeeSR's sampler: diffusers' DDPMScheduler read from SD-2-base's scheduler folder (SD's schedule)
SISRM_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "variance_type": "fixed_small", "steps_offset": 1,
    "timestep_spacing": "leading", "clip_sample": False,
}
# SeeSR's test_seesr.py: its added prompt (the suffix) and negative prompt, 50 steps, guidance 5.5, the LR latent as the
# start, AdaIN; Gaussian tile weights as its latent tiles
DEFAULTS = PipelineConfig(caption_suffix="clean, high-resolution, 8k", negative_prompt="dotted, noise, blur, lowres, smooth",
                          steps=50, guidance_scale=5.5, scheduler="ddpm", start="lq", color_fix="adain",
                          tile_blend="gaussian")
# ADE20K's 150 classes as transformers' SegFormer checkpoints name them (`id2label`; "bed " with its space)
ADE20K = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed ", "windowpane", "grass", "cabinet",
    "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair", "car", "water",
    "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field", "armchair", "seat", "fence", "desk",
    "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion", "base", "box", "column", "signboard",
    "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace", "refrigerator", "grandstand", "path",
    "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase",
    "blind", "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver", "airplane", "dirt track",
    "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van",
    "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel",
    "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name",
    "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce",
    "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor", "bulletin board",
    "shower", "radiator", "glass", "clock", "flag",
)


@dataclass(frozen=True)
class SISRMConfig:
    """Every width; the diffusers/transformers configs of a checkpoint derive from it."""

    preset: str
    vae_channels: tuple[int, ...]
    vae_layers_per_block: int
    vae_norm_groups: int
    text_hidden: int
    text_layers: int
    text_heads: int
    text_intermediate: int
    unet_channels: tuple[int, ...]
    unet_cross_attention: tuple[bool, ...]
    unet_layers_per_block: int
    unet_heads: tuple[int, ...]  # per level (SD-2's config writes them as `attention_head_dim`: 5, 10, 20, 20)
    unet_norm_groups: int
    cond_channels: tuple[int, ...]  # the ControlNet's conditioning embedding: one stage more than its halvings
    segmenter_widths: tuple[int, ...]  # SegFormer's MiT encoder (`hidden_sizes`)
    segmenter_depths: tuple[int, ...]
    segmenter_heads: tuple[int, ...]
    segmenter_decoder: int  # its all-MLP decode head's width
    segmenter_side: int  # pixels: the square its image processor resizes a photo to
    mask_hidden: int  # the mask encoder's 3x3 conv width
    mask_channels: int  # E_m's width
    mask_pool: int  # latent cells a side per E_m token
    labels: int = 5  # label words a request's prompt gets by default (top-k)
    scaling_factor: float = 0.18215
    native_latent: int = 64

    def __post_init__(self) -> None:
        if 2 ** (len(self.cond_channels) - 1) != 2 ** (len(self.vae_channels) - 1):
            raise DiffsrError(f"cond_channels {self.cond_channels}: the embedding must reach the latent from the photo "
                              f"({len(self.vae_channels) - 1} halvings)")
        if (2 ** (len(self.unet_channels) - 1)) % self.mask_pool:
            raise DiffsrError(f"mask_pool {self.mask_pool} must divide the latent multiple "
                              f"{2 ** (len(self.unet_channels) - 1)}")
        if not 0 <= self.labels <= MAX_LABELS:
            raise DiffsrError(f"labels {self.labels}: a prompt takes 0 to {MAX_LABELS} label words")
        if self.segmenter_side % 32 or self.segmenter_side < 4 * MIN_SEGMENT:
            raise DiffsrError(f"segmenter_side {self.segmenter_side} must divide by 32 (SegFormer's four stages) and be "
                              f"at least {4 * MIN_SEGMENT}")


PRESETS: dict[str, SISRMConfig] = {
    # SeeSR's base: SD-2-base (its UNet, a ControlNet copy, OpenCLIP-H's text encoder at 23 layers, SD's VAE); the
    # segmenter SegFormer-B2 on ADE20K at 512 px (nvidia/segformer-b2-finetuned-ade-512-512's shape: docs/sisrm.md)
    "sisrm": SISRMConfig(
        preset="sisrm", vae_channels=(128, 256, 512, 512), vae_layers_per_block=2, vae_norm_groups=32,
        text_hidden=1024, text_layers=23, text_heads=16, text_intermediate=4096,
        unet_channels=(320, 640, 1280, 1280), unet_cross_attention=(True, True, True, False), unet_layers_per_block=2,
        unet_heads=(5, 10, 20, 20), unet_norm_groups=32, cond_channels=(16, 32, 96, 256),
        segmenter_widths=(64, 128, 320, 512), segmenter_depths=(3, 4, 6, 3), segmenter_heads=(1, 2, 5, 8),
        segmenter_decoder=768, segmenter_side=512, mask_hidden=256, mask_channels=320, mask_pool=4),
    # tests: the same structure at tiny widths
    "sisrm-tiny": SISRMConfig(
        preset="sisrm-tiny", vae_channels=(32, 32, 64, 64), vae_layers_per_block=1, vae_norm_groups=8,
        text_hidden=32, text_layers=2, text_heads=2, text_intermediate=64,
        unet_channels=(32, 64), unet_cross_attention=(True, True), unet_layers_per_block=1,
        unet_heads=(2, 4), unet_norm_groups=8, cond_channels=(8, 8, 16, 16),
        segmenter_widths=(8, 16, 16, 32), segmenter_depths=(1, 1, 1, 1), segmenter_heads=(1, 1, 2, 2),
        segmenter_decoder=16, segmenter_side=128, mask_hidden=16, mask_channels=16, mask_pool=2, native_latent=32),
}


@functools.lru_cache(maxsize=8)
def _processor(folder: Path) -> Any:
    from transformers import SegformerImageProcessorPil  # the processor on PIL (its torchvision twin needs torchvision)

    try:
        if not (folder / "preprocessor_config.json").is_file():  # else transformers takes the path for a hub name
            raise OSError(f"no preprocessor_config.json in {folder}")
        return SegformerImageProcessorPil.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise DiffsrError(f"{folder}: its image processor does not load ({type(e).__name__}: {e}): copy the segmenter's "
                          "preprocessor_config.json there") from None


@functools.lru_cache(maxsize=8)
def _label_names(folder: Path) -> tuple[str, ...]:
    id2label = read_json(folder / "config.json", "segmenter config").get("id2label") or {}
    try:
        names = tuple(id2label[str(i)] for i in range(len(id2label)))
    except KeyError:
        raise DiffsrError(f"{folder / 'config.json'}: id2label must name every class 0 to {len(id2label) - 1}") from None
    return names


@register
class SISRM(ModelFamily):
    name = "sisrm"
    config_class = SISRMConfig
    presets = PRESETS
    stages = Stages(photo="lq_image",
                    once=(Stage("segmenter", "segment", prompting=True), Stage("labeller", "segment", prompting=True),
                          Stage("text_encoder", "text"), Stage("lr_encoder", "lq", tiled=True),
                          Stage("mask_encoder", "segment", tiled=True)),
                    step=("controlnet_unet",), decode="vae_decoder", start="z_lq")
    scheduler_config = SISRM_SCHEDULER_CONFIG
    defaults = DEFAULTS
    int8_default = ("controlnet_unet",)
    int8_kept = INT8_KEPT
    latent_channels = LATENT_CHANNELS

    @property
    def latent_multiple(self) -> int:
        return 2 ** (len(self.config.unet_channels) - 1)

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.config.vae_channels) - 1)

    @property
    def num_labels(self) -> int:
        return len(ADE20K)

    def family_inputs(self) -> tuple[RequestInput, ...]:
        return (RequestInput("labels", "int", "label words the prompt gets: the classes the segmentation-aware label "
                             "generator scores highest (0: none)", low=0, high=MAX_LABELS, default=self.config.labels,
                             dtype="int32"),)

    def family_dims(self) -> tuple[NamedDim, ...]:
        # at least 32 rows (128 px): below, SegFormer's spatial reductions leave single cells, whose shape guards
        # torch.export cannot solve
        rows = self.config.segmenter_side // 4
        return (BATCH, CFG_BATCH, TEXT_BATCH, *latent_sides(self.latent_multiple, self.native_latent),
                NamedDim("segment_height", "segmentation rows: the segmenter's input rows / 4", "length", trace=36,
                         odd=33, bound=2 * rows, native=rows, least=MIN_SEGMENT),
                NamedDim("segment_width", "segmentation columns", "length", trace=40, odd=35, bound=2 * rows,
                         native=rows, least=MIN_SEGMENT))

    def photo_views(self) -> tuple[str, ...]:
        return ("pixel_values",)

    def view(self, rgb: np.ndarray[Any, Any], root: Path) -> dict[str, torch.Tensor]:
        """The segmenter's `pixel_values`, as its folder's `SegformerImageProcessor` makes them of the photo (resized,
        rescaled, normalised). Where the processor does not resize, the photo is first resized to sides the graphs
        take (a multiple of 4, from the least side to the bound): resized, not padded, so the segmentation keeps the
        photo's frame."""
        processor = _processor(root / "segmenter")
        if not processor.do_resize:
            sides = [self._segment_side(n) for n in rgb.shape[:2]]
            if sides != list(rgb.shape[:2]):
                rgb = np.asarray(Image.fromarray(rgb).resize((sides[1], sides[0]), Image.Resampling.BICUBIC))
        pixels = processor(images=rgb, return_tensors="np", input_data_format="channels_last")["pixel_values"]
        return {"pixel_values": torch.as_tensor(np.asarray(pixels), dtype=torch.float32)}

    def _segment_side(self, pixels: int) -> int:
        """The side the segmenter's graphs take nearest `pixels`: 4 a cell, MIN_SEGMENT to twice the native cells."""
        return 4 * min(max(-(-pixels // 4), MIN_SEGMENT), self.config.segmenter_side // 2)

    def file_errors(self, path: Path) -> list[str]:
        """The segmenter's image processor loads and gives sides the graphs take; `id2label` names the label
        generator's classes."""
        folder, errors = path / "segmenter", []
        try:
            processor = _processor(folder)
            if processor.do_resize:
                side = {processor.size.get("height"), processor.size.get("width")}
                if any(not isinstance(n, int) or self._segment_side(n) != n for n in side):
                    errors.append(f"{folder / 'preprocessor_config.json'}: its size {processor.size} must be "
                                  f"multiples of 4 from {4 * MIN_SEGMENT} to {2 * self.config.segmenter_side} px "
                                  "(the segmenter's graphs)")
        except DiffsrError as e:
            errors.append(str(e))
        try:
            names = _label_names(folder)
            if len(names) != self.num_labels:
                errors.append(f"{folder / 'config.json'} names {len(names)} classes; the label generator scores "
                              f"{self.num_labels}")
        except DiffsrError as e:
            errors.append(str(e))
        return errors

    def words(self, made: Tensors, inputs: Mapping[str, Any], root: Path) -> dict[str, str]:
        """The names (`id2label`'s, verbatim) of the `labels` classes the label generator scores highest, best first,
        comma-separated, for the prompt."""
        scores, k = made["label_scores"][0], int(inputs["labels"])
        names = _label_names(root / "segmenter")
        return {"prompt": ", ".join(names[i] for i in scores.topk(min(k, len(names))).indices.tolist())} if k else {}

    def reading_folders(self) -> dict[str, tuple[str, ...]]:
        return super().reading_folders() | {"segmenter": ("config.json", "preprocessor_config.json")}

    def declare(self) -> tuple[Signature, ...]:
        c, f, n = self.config, self.latent_factor, self.num_labels
        img, lat = (f"{f}*latent_height", f"{f}*latent_width"), ("latent_height", "latent_width")
        latent, guided_latent = ("batch", LATENT_CHANNELS, *lat), ("cfg_batch", LATENT_CHANNELS, *lat)
        lq = TensorSpec("lq_image", F32, ("batch", 3, *img))
        logits = TensorSpec("seg_logits", F32, ("batch", n, "segment_height", "segment_width"))
        segmentation = TensorSpec("segmentation", F32, ("batch", n, *lat))
        cond = TensorSpec("cond_embedding", F32, ("batch", c.unet_channels[0], *lat))
        embedding = TensorSpec("mask_embedding", F32, ("batch", c.mask_channels, *lat))
        mask = TensorSpec("mask", F32, ("batch", 1, *lat))
        return (
            Signature("segmenter", (TensorSpec("pixel_values", F32, ("batch", 3, "4*segment_height", "4*segment_width")),),
                      (logits,)),
            Signature("labeller", (logits, lq), (TensorSpec("label_scores", F32, ("batch", n)), segmentation)),
            Signature("text_encoder", (TensorSpec("input_ids", "int32", ("text_batch", CLIP_LENGTH)),),
                      (TensorSpec("text_embeddings", F32, ("text_batch", CLIP_LENGTH, c.text_hidden)),)),
            Signature("lr_encoder", (lq,), (cond, TensorSpec("z_lq", F32, latent))),
            Signature("mask_encoder", (segmentation,), (embedding, mask)),
            Signature("controlnet_unet",
                      (TensorSpec("sample", F32, guided_latent), TensorSpec("timestep", F32, ("cfg_batch",)),
                       TensorSpec("text_embeddings", F32, ("cfg_batch", CLIP_LENGTH, c.text_hidden)), cond, embedding,
                       mask),
                      (TensorSpec("noise_pred", F32, guided_latent),)),
            Signature("vae_decoder", (TensorSpec("latent", F32, latent),), (TensorSpec("image", F32, ("batch", 3, *img)),)),
        )

    # --- checkpoint ------------------------------------------------------------------------

    def family_components(self) -> dict[str, Component]:
        return {"text_encoder": transformers_component("CLIPTextModel", "CLIPTextConfig"),
                "segmenter": transformers_component("SegformerForSemanticSegmentation", "SegformerConfig",
                                                    library_keys=True),  # stored as transformers publishes SegFormer
                "vae": diffusers_component("AutoencoderKL"),
                "unet": diffusers_component("UNet2DConditionModel"),
                "controlnet": diffusers_component("ControlNetModel"),
                "semantic": our_component(f"{NETWORKS}:SemanticParts", f"{NETWORKS}:SemanticConfig")}

    def family_parts(self, submodule: str) -> tuple[tuple[str, ...], Callable[..., nn.Module]]:
        from diffsr.export.model.families import sisrm_networks as nets
        from diffsr.export.model.families.sd_networks import TextEncoder, VAEDecoder
        from diffsr.export.model.families.xpsr_networks import LREncoder

        self.signature(submodule)
        table: dict[str, tuple[tuple[str, ...], Callable[..., nn.Module]]] = {
            "segmenter": (("segmenter",), nets.Segmenter),
            "labeller": (("semantic",), nets.LabelStage),
            "text_encoder": (("text_encoder",), TextEncoder),
            "lr_encoder": (("controlnet", "vae"), LREncoder),
            "mask_encoder": (("semantic",), nets.MaskStage),
            "controlnet_unet": (("controlnet", "unet", "semantic"), nets.SISRMStep),
            "vae_decoder": (("vae",), VAEDecoder),
        }
        return table[submodule]

    def family_partial(self, submodule: str) -> bool:
        return submodule not in ("text_encoder", "segmenter")

    def tokenizer_folders(self) -> dict[str, str]:
        return {"input_ids": "tokenizer"}

    def tokenizer(self, path: Path) -> Tokenizer:
        return Tokenizer({"input_ids": path / "tokenizer"})

    def unet_config(self) -> dict[str, Any]:
        """SD-2-base's UNet config at the preset's widths."""
        c = self.config
        return dict(
            sample_size=c.native_latent, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
            down_block_types=["CrossAttnDownBlock2D" if x else "DownBlock2D" for x in c.unet_cross_attention],
            up_block_types=["CrossAttnUpBlock2D" if x else "UpBlock2D" for x in reversed(c.unet_cross_attention)],
            block_out_channels=list(c.unet_channels), layers_per_block=c.unet_layers_per_block,
            attention_head_dim=list(c.unet_heads), cross_attention_dim=c.text_hidden, use_linear_projection=True,
            norm_num_groups=c.unet_norm_groups)

    def segmenter_config(self) -> dict[str, Any]:
        """transformers' `SegformerConfig` arguments: the preset's MiT encoder and decode head, ADE20K's classes."""
        c = self.config
        return dict(num_channels=3, num_encoder_blocks=len(c.segmenter_widths), depths=list(c.segmenter_depths),
                    hidden_sizes=list(c.segmenter_widths), num_attention_heads=list(c.segmenter_heads),
                    sr_ratios=[8, 4, 2, 1], patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2], mlp_ratios=[4, 4, 4, 4],
                    decoder_hidden_size=c.segmenter_decoder, id2label=dict(enumerate(ADE20K)),
                    label2id={name: i for i, name in enumerate(ADE20K)}, architectures=["SegformerForSemanticSegmentation"])

    def networks(self) -> dict[str, tuple[nn.Module, dict[str, Any]]]:
        import dataclasses

        from accelerate import init_empty_weights
        from diffusers import ControlNetModel, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, SegformerConfig, SegformerForSemanticSegmentation

        from diffsr.export.model.families.sisrm_networks import SemanticConfig, SemanticParts, block_shapes

        c = self.config
        with init_empty_weights(include_buffers=False):
            vae = vae_of(c.vae_channels, c.vae_layers_per_block, c.vae_norm_groups, LATENT_CHANNELS,
                         scaling_factor=c.scaling_factor)
            text = CLIPTextModel(CLIPTextConfig(**clip_config(c.text_hidden, c.text_layers, c.text_heads,
                                                              c.text_intermediate, "gelu", 1)))
            segmenter = SegformerForSemanticSegmentation(SegformerConfig(**self.segmenter_config()))
            unet = UNet2DConditionModel(**self.unet_config())
            controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=c.cond_channels,
                                                   load_weights_from_unet=False)
            semantic = SemanticParts(SemanticConfig(
                num_labels=self.num_labels, mask_hidden=c.mask_hidden, mask_channels=c.mask_channels,
                mask_pool=c.mask_pool, latent_factor=self.latent_factor, unet_blocks=block_shapes(unet),
                controlnet_blocks=block_shapes(controlnet)))
        return {"text_encoder": (text, text.config.to_dict()), "segmenter": (segmenter, segmenter.config.to_dict()),
                "vae": (vae, diffusers_config(vae)), "unet": (unet, diffusers_config(unet)),
                "controlnet": (controlnet, diffusers_config(controlnet)),
                "semantic": (semantic, dataclasses.asdict(semantic.config))}

    def copy_source(self, folder: str, key: str, shapes: Mapping[str, Mapping[str, tuple[int, ...]]]) -> str:
        return controlnet_copy_source(folder, key, shapes)

    def write_extras(self, out: Path) -> None:
        from transformers import SegformerImageProcessorPil

        build_clip_tokenizer().save_pretrained(str(out / "tokenizer"))
        side = self.config.segmenter_side  # SegFormer's ADE20K processor: bilinear to the side, ImageNet's statistics
        processor = SegformerImageProcessorPil(size={"height": side, "width": side}, do_reduce_labels=True)
        processor.save_pretrained(str(out / "segmenter"))

    def family_draws(self) -> Mapping[str, Draw]:
        return {"input_ids": _ids, "timestep": lambda shape, g: torch.randint(0, 1000, shape, generator=g).float(),
                "lq_image": lambda shape, g: torch.rand(shape, generator=g) * 2 - 1,
                "segmentation": lambda shape, g: torch.rand(shape, generator=g).softmax(dim=1),
                "mask": lambda shape, g: torch.rand(shape, generator=g)}

    def force_upcast(self, path: Path) -> tuple[str, ...]:
        return ("lr_encoder", "vae_decoder") if vae_force_upcast(path) else ()

    # --- a step ----------------------------------------------------------------------------

    def predict(self, run: RunFn, x: torch.Tensor, tiled: Tensors, cond: Tensors, row: torch.Tensor) -> torch.Tensor:
        return guided(x, cond["text_embeddings"].shape[0], row, lambda batch, timestep: run(
            "controlnet_unet", sample=batch, timestep=timestep, text_embeddings=cond["text_embeddings"],
            cond_embedding=tiled["cond_embedding"], mask_embedding=tiled["mask_embedding"], mask=tiled["mask"])["noise_pred"])
