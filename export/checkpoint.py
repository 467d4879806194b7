"""Checkpoint folders: write a seeded random-weight one, read any one that follows the layout.

    diffsr.json                  model widths (ModelConfig) and the pipeline's defaults
    tokenizer/                   tokenizer.json, tokenizer_config.json (CLIP BPE)
    text_encoder/                config.json, model.safetensors            (transformers CLIPTextModel)
    lq_encoder/                  config.json, model.safetensors            (ours)
    fusion_transformer/          config.json, model.safetensors            (ours)
    controlnet/  unet/  vae/     config.json, diffusion_pytorch_model.safetensors  (diffusers)
    scheduler/                   scheduler_config.json                     (diffusers)

Weights are loaded strictly: a missing, extra or mis-shaped tensor is an error naming the file.
Nothing cares how the weights were trained.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from diffsr.export.config import ModelConfig, dataclass_from_json, preset, text_config, unet_config, vae_config
from diffsr.export.errors import DiffsrError
from diffsr.export.files import read_json, require_new_folder
from diffsr.export.model import (
    ControlNetUNet,
    FusionConfig,
    FusionTransformer,
    LQEncoder,
    LQEncoderConfig,
    TextEncoder,
    VAEDecoder,
    config_to_json,
)
from diffsr.export.settings import PipelineConfig
from diffsr.export.signatures import SUBMODULES
from diffsr.export.tokenizer import Tokenizer, build_clip_tokenizer

FORMAT_VERSION = 1
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS = "model.safetensors"

# Stable Diffusion 1.x's training schedule, as written into a new checkpoint's scheduler/ folder.
SD_SCHEDULER_CONFIG: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "clip_sample": False,
}


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint folder says, read without building any network."""

    path: Path
    model: ModelConfig
    defaults: PipelineConfig
    scheduler_config: dict[str, Any]

    def tokenizer(self) -> Tokenizer:
        return Tokenizer(self.path / "tokenizer")


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path, "checkpoint file", "create one with `diffsr init` or fix --checkpoint")


def open_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    if not path.is_dir():
        raise DiffsrError(f"checkpoint folder not found: {path}: create one with `diffsr init --out {path}`")
    meta = _read_json(path / "diffsr.json")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DiffsrError(
            f"{path / 'diffsr.json'} has format_version {meta.get('format_version')!r}; this diffsr reads {FORMAT_VERSION}"
        )
    try:
        model = ModelConfig.from_json(meta["model"])
        defaults = PipelineConfig.from_json(meta.get("pipeline", {}))
    except (KeyError, TypeError) as e:
        raise DiffsrError(f"{path / 'diffsr.json'} is malformed: {e!r}") from None
    return Checkpoint(path, model, defaults, _read_json(path / "scheduler" / "scheduler_config.json"))


# --- reading weights ------------------------------------------------------------------------------


def _load_weights(module: nn.Module, file: Path) -> None:
    if not file.is_file():
        raise DiffsrError(f"checkpoint file missing: {file}")
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as e:
        raise DiffsrError(f"cannot read weights {file}: {e}") from None
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or shapes:
        detail = "; ".join(
            f"{what} {keys[:3]}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
            if keys
        )
        raise DiffsrError(f"weights in {file} do not match its config.json: {detail}")
    module.load_state_dict(state, strict=True)


def _diffusers(cls: Any, folder: Path) -> Any:
    config = _read_json(folder / "config.json")
    if config.get("_class_name", cls.__name__) != cls.__name__:
        raise DiffsrError(f"{folder / 'config.json'} describes a {config['_class_name']}, expected {cls.__name__}")
    try:
        model = cls.from_config(config)
    except (ValueError, TypeError, KeyError) as e:
        raise DiffsrError(f"{folder / 'config.json'} is not a valid {cls.__name__} config: {e}") from None
    _load_weights(model, folder / DIFFUSERS_WEIGHTS)
    return model


def _ours(cls: Any, config_cls: Any, folder: Path) -> nn.Module:
    config = dataclass_from_json(config_cls, _read_json(folder / "config.json"), str(folder / "config.json"))
    model = cls(config)
    _load_weights(model, folder / WEIGHTS)
    return model


def _text_encoder(folder: Path) -> CLIPTextModel:
    model = CLIPTextModel(CLIPTextConfig.from_dict(_read_json(folder / "config.json")))
    _load_weights(model, folder / WEIGHTS)
    return model


# component folder -> its loader; submodule -> the components it is made of, and how they combine
LOADERS: dict[str, Callable[[Path], nn.Module]] = {
    "text_encoder": _text_encoder,
    "lq_encoder": lambda f: _ours(LQEncoder, LQEncoderConfig, f),
    "fusion_transformer": lambda f: _ours(FusionTransformer, FusionConfig, f),
    "controlnet": lambda f: _diffusers(ControlNetModel, f),
    "unet": lambda f: _diffusers(UNet2DConditionModel, f),
    "vae": lambda f: _diffusers(AutoencoderKL, f),
}
PARTS: dict[str, tuple[tuple[str, ...], Callable[..., nn.Module]]] = {
    "text_encoder": (("text_encoder",), TextEncoder),
    "lq_encoder": (("lq_encoder",), lambda m: m),
    "fusion_transformer": (("fusion_transformer",), lambda m: m),
    "controlnet_unet": (("controlnet", "unet"), ControlNetUNet),
    "vae_decoder": (("vae",), VAEDecoder),
}


def assemble(name: str, components: dict[str, nn.Module]) -> nn.Module:
    """A submodule from its components, in eval mode."""
    if name not in PARTS:
        raise DiffsrError(f"unknown submodule {name!r}; choose one of {list(SUBMODULES)}")
    parts, combine = PARTS[name]
    return combine(*(components[p] for p in parts)).eval().requires_grad_(False)


def load_submodule(ckpt: Checkpoint, name: str) -> nn.Module:
    """The PyTorch reference of one submodule, float32 on the CPU; loads only its components."""
    parts = PARTS[name][0] if name in PARTS else ()
    return assemble(name, {p: LOADERS[p](ckpt.path / p) for p in parts})


def load_reference(path: str | Path) -> tuple[Checkpoint, dict[str, nn.Module]]:
    ckpt = open_checkpoint(path)
    return ckpt, {name: load_submodule(ckpt, name) for name in SUBMODULES}


# --- writing a seeded random-weight checkpoint -----------------------------------------------------


def _save(module: nn.Module, folder: Path, weights: str, config: dict[str, Any]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(folder / weights), {"format": "pt"})


def _randomize_zero_weights(module: nn.Module, std: float = 0.02) -> None:
    """Zero-initialised layers (ControlNet's zero convs, scale embeddings) get small random values,
    as a trained model would have: otherwise the control path is dead and parity tests prove nothing."""
    for param in module.parameters():
        if param.dim() >= 2 and not param.any():
            param.data.normal_(0.0, std)


@torch.no_grad()
def random_components(cfg: ModelConfig, seed: int) -> dict[str, nn.Module]:
    """Every component of a preset with seeded random weights, keyed by checkpoint folder."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_config(cfg))
    unet = UNet2DConditionModel(**unet_config(cfg))
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_channels=cfg.f2_channels, conditioning_embedding_out_channels=(cfg.f2_channels,)
    )
    text = CLIPTextModel(CLIPTextConfig(**text_config(cfg)))
    lq = LQEncoder(LQEncoderConfig(cfg.vae_channels, cfg.vae_layers_per_block, cfg.vae_norm_groups,
                                   cfg.f1_channels, cfg.lq_fusion_heads, cfg.scaling_factor))
    lq.encoder.load_state_dict(vae.encoder.state_dict())  # the LQ encoder starts as a copy of the VAE's
    lq.quant_conv.load_state_dict(vae.quant_conv.state_dict())
    fusion = FusionTransformer(FusionConfig(cfg.f1_channels, cfg.f2_channels, cfg.fusion_heads, cfg.fusion_blocks))
    for module in (controlnet, lq, fusion):
        _randomize_zero_weights(module)
    return {"text_encoder": text, "lq_encoder": lq, "fusion_transformer": fusion,
            "controlnet": controlnet, "unet": unet, "vae": vae}


def write_checkpoint(components: dict[str, nn.Module], cfg: ModelConfig, out: str | Path) -> Checkpoint:
    out = Path(out)
    require_new_folder(out)
    for name in ("vae", "unet", "controlnet"):
        config = {k: v for k, v in components[name].config.items() if not k.startswith("_")}
        config["_class_name"] = type(components[name]).__name__
        _save(components[name], out / name, DIFFUSERS_WEIGHTS, config)
    _save(components["text_encoder"], out / "text_encoder", WEIGHTS, components["text_encoder"].config.to_dict())
    for name in ("lq_encoder", "fusion_transformer"):
        _save(components[name], out / name, WEIGHTS, config_to_json(components[name].config))
    build_clip_tokenizer().save_pretrained(str(out / "tokenizer"))
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD_SCHEDULER_CONFIG, indent=2) + "\n")
    meta = {"format_version": FORMAT_VERSION, "model": cfg.to_json(), "pipeline": PipelineConfig().to_json()}
    (out / "diffsr.json").write_text(json.dumps(meta, indent=2) + "\n")
    return open_checkpoint(out)


def init_checkpoint(preset_name: str, seed: int, out: str | Path) -> Checkpoint:
    """Write a random-weight checkpoint of a preset; the same preset and seed give the same bytes."""
    cfg = preset(preset_name)
    require_new_folder(Path(out))  # checked before minutes of random init on sd15
    return write_checkpoint(random_components(cfg, seed), cfg, out)


def ensure_checkpoint(preset_name: str, seed: int, out: str | Path) -> Checkpoint:
    """The checkpoint in `out`, created there first (seeded random weights) if it is not yet there."""
    out = Path(out)
    if (out / "diffsr.json").is_file():
        return open_checkpoint(out)
    return init_checkpoint(preset_name, seed, out)
