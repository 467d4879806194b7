"""`diffsr init`: a checkpoint folder of a preset with seeded random weights, written in bounded memory.

Every network is built with its parameters on the meta device; each parameter is then drawn on its
own, from a generator seeded by (seed, component, key), and stored in FP16 as SDXL checkpoints are
published. Memory holds one component's FP16 tensors at a time (the SDXL UNet's 5.1 GB), never a
network in FP32; the same preset and seed give the same bytes whatever the order of work.

The draws follow PyTorch's own initialisation: weights and biases of linear and convolution layers
uniform in +-1/sqrt(fan_in), norms one and zero, embeddings N(0, 0.02). Layers a trained model has
moved away from zero (ControlNet's zero convolutions) are drawn like any other, so the control path
is alive and parity tests prove something. Copies are copies: ControlNet's encoder starts as the
UNet's, the LQ encoder as the VAE's encoder.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from diffsr.export.model.checkpoint import (
    COMPONENTS,
    SD_SCHEDULER_CONFIG,
    Checkpoint,
    empty_parameters,
    open_checkpoint,
)
from diffsr.export.model.checkpoint import FORMAT_VERSION as CHECKPOINT_FORMAT
from diffsr.export.model.config import ModelConfig, preset, text_config, unet_config, vae_config
from diffsr.export.core.files import require_new_folder
from diffsr.export.families.sd_networks import FusionConfig, FusionTransformer, LQEncoder, LQEncoderConfig, config_to_json
from diffsr.export.core.progress import OnProgress, Progress, ignore
from diffsr.export.model.settings import PipelineConfig
from diffsr.export.model.tokenizer import OPENCLIP_PAD, build_clip_tokenizer

STORED_DTYPE = torch.float16


def networks(cfg: ModelConfig) -> dict[str, tuple[nn.Module, dict[str, Any]]]:
    """Each component folder's network (parameters on the meta device) and the config.json that builds it."""
    with empty_parameters():
        vae = AutoencoderKL(**vae_config(cfg))
        unet = UNet2DConditionModel(**unet_config(cfg))
        controlnet = ControlNetModel.from_unet(
            unet, conditioning_channels=cfg.f2_channels, conditioning_embedding_out_channels=(cfg.f2_channels,),
            load_weights_from_unet=False,
        )
        text = CLIPTextModel(CLIPTextConfig(**text_config(cfg)))
        lq = LQEncoder(LQEncoderConfig(cfg.vae_channels, cfg.vae_layers_per_block, cfg.vae_norm_groups,
                                       cfg.f1_channels, cfg.lq_fusion_heads, cfg.scaling_factor))
        fusion = FusionTransformer(FusionConfig(cfg.f1_channels, cfg.f2_channels, cfg.fusion_heads, cfg.fusion_blocks))
        found: dict[str, tuple[nn.Module, dict[str, Any]]] = {
            "text_encoder": (text, text.config.to_dict()),
            "lq_encoder": (lq, config_to_json(lq.config)),
            "fusion_transformer": (fusion, config_to_json(fusion.config)),
        }
        for name, net in (("vae", vae), ("unet", unet), ("controlnet", controlnet)):
            config = {k: v for k, v in net.config.items() if not k.startswith("_")}
            found[name] = (net, config | {"_class_name": type(net).__name__})
        if cfg.sdxl:
            text_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config(cfg, second=True)))
            found["text_encoder_2"] = (text_2, text_2.config.to_dict())
    return found


def _source(folder: str, key: str, shapes: dict[str, dict[str, tuple[int, ...]]]) -> str:
    """The seed name of a tensor: a copy is drawn under its original's name."""
    if folder == "controlnet" and shapes["unet"].get(key) == shapes["controlnet"][key]:
        return f"unet/{key}"  # ControlNet is a trainable copy of the UNet's encoder
    if folder == "lq_encoder" and key.split(".")[0] in ("encoder", "quant_conv"):
        return f"vae/{key}"  # the LQ encoder starts as the VAE's encoder
    return f"{folder}/{key}"


def _draw(module: nn.Module, kind: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
        return torch.ones(shape) if kind == "weight" else torch.zeros(shape)
    if isinstance(module, nn.Embedding):
        return torch.randn(shape, generator=generator) * 0.02
    weight = getattr(module, "weight", None)
    fan_in = math.prod(weight.shape[1:]) if weight is not None and weight.dim() >= 2 else (
        math.prod(shape[1:]) if len(shape) >= 2 else shape[-1])
    bound = 1.0 / math.sqrt(max(fan_in, 1))
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def random_tensors(folder: str, net: nn.Module, seed: int,
                   shapes: dict[str, dict[str, tuple[int, ...]]]) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, FP16 tensor) for every parameter and persistent buffer of a component, each drawn alone."""
    buffers = dict(net.named_buffers())  # real even now: their values are the network's own
    kinds = {}
    for module_name, module in net.named_modules():
        for kind, _ in module.named_parameters(recurse=False):
            kinds[f"{module_name}.{kind}" if module_name else kind] = (module, kind)
    for key, shape in shapes[folder].items():
        if key in buffers:
            buffer = buffers[key]
            yield key, buffer.to(STORED_DTYPE) if buffer.is_floating_point() else buffer.clone()
            continue
        digest = hashlib.sha256(f"{seed}/{_source(folder, key, shapes)}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        module, kind = kinds.get(key, (net, key))
        yield key, _draw(module, kind, shape, generator).to(STORED_DTYPE)


def init_checkpoint(preset_name: str, seed: int, out: str | Path, on_progress: OnProgress = ignore) -> Checkpoint:
    """Write a random-weight checkpoint of a preset; the same preset and seed give the same bytes."""
    cfg = preset(preset_name)
    out = Path(out)
    require_new_folder(out)
    found = networks(cfg)
    shapes = {name: {k: tuple(v.shape) for k, v in net.state_dict().items()} for name, (net, _) in found.items()}
    for i, (folder, (net, config)) in enumerate(found.items()):
        on_progress(Progress("init", folder, i, len(found)))
        (out / folder).mkdir(parents=True)
        (out / folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tensors = dict(random_tensors(folder, net, seed, shapes))  # one component's FP16 tensors at a time
        save_file(tensors, str(out / folder / COMPONENTS[folder][1]), {"format": "pt"})
        del tensors
    build_clip_tokenizer().save_pretrained(str(out / "tokenizer"))
    if cfg.sdxl:
        build_clip_tokenizer(pad_token=OPENCLIP_PAD).save_pretrained(str(out / "tokenizer_2"))
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_SCHEDULER_CONFIG, indent=2) + "\n")
    meta = {"format_version": CHECKPOINT_FORMAT, "model": cfg.to_json(), "pipeline": PipelineConfig().to_json()}
    (out / "diffsr.json").write_text(json.dumps(meta, indent=2) + "\n")
    on_progress(Progress("init", "written", len(found), len(found)))
    return open_checkpoint(out)


def ensure_checkpoint(preset_name: str, seed: int, out: str | Path) -> Checkpoint:
    """The checkpoint in `out`, created there first (seeded random weights) if it is not yet there."""
    out = Path(out)
    if (out / "diffsr.json").is_file():
        return open_checkpoint(out)
    return init_checkpoint(preset_name, seed, out)
