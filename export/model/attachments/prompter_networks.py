"""The prompter's three graphs (`prompter.py` declares them) around transformers' LLaVA parts: the CLIP vision tower,
the projector and the LLaMA causal language model, held under the published folder's names (`LlavaWeights`).

What `generate` does, split where a deployment splits it: the vision tower's hidden states of
`vision_feature_layer` without CLS, projected, replace the `<image>` tokens of the ids in order; LLaMA's rotary
positions are given explicitly (0, 1, ... with no padding); every attention is eager (an explicit additive mask, what
ONNX and TensorRT take). The cache is the fixed-length one of `kv_cache.py`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.files import read_json
from diffsr.export.model.attachments.clip_vision import clip_hidden
from diffsr.export.model.attachments.kv_cache import DecodeStep, prefill


class VisionTower(nn.Module):
    """CLIP's vision transformer under `vision_model.`, as the published folder (and transformers 4) names it."""

    def __init__(self, config: Any):
        super().__init__()
        from transformers import CLIPVisionModel

        self.vision_model = CLIPVisionModel(config)


class LlavaWeights(nn.Module):
    """LLaVA's networks under the names the published folder stores them: `vision_tower.vision_model.` (CLIP's
    vision transformer), `multi_modal_projector.`, `language_model.` (LlamaForCausalLM: `model.` and `lm_head.`).
    transformers 5 loads the same tensors into `LlavaForConditionalGeneration` (its own names map these)."""

    def __init__(self, config: Any):
        super().__init__()
        from transformers import LlamaForCausalLM
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        self.config = config
        self.vision_tower = VisionTower(config.vision_config)
        self.multi_modal_projector = LlavaMultiModalProjector(config)
        self.language_model = LlamaForCausalLM(config.text_config)


class Rotary(nn.Module):
    """LLaMA's rotary embedding (the default kind: LLaMA-1/2, Vicuna) with its frequencies computed in the forward, from
    the config, as transformers computes them at init: its non-persistent buffer is not bound by an export, and the
    graph folds these into constants."""

    def __init__(self, config: Any):
        super().__init__()
        rope = getattr(config, "rope_parameters", None) or {}
        if rope.get("rope_type", "default") != "default":
            raise DiffsrError(f"the prompter's LLaMA uses {rope['rope_type']!r} rotary scaling; diffsr takes the default "
                              "kind (LLaVA-1.5's)")
        self.base = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        self.dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = 1.0 / (self.base ** (torch.arange(0, self.dim, 2, dtype=torch.float, device=x.device) / self.dim))
        freqs = position_ids[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


class PrompterImage(nn.Module):
    """pixel_values -> the image features: CLIP's vision transformer up to `vision_feature_layer` (the layers after it
    are never run; `clip_vision.py`), CLS left out, through the projector (what `get_image_features` computes)."""

    def __init__(self, llava: LlavaWeights):
        super().__init__()
        # held under the folder's names (the weights bind by them)
        self.vision_tower, self.multi_modal_projector = llava.vision_tower, llava.multi_modal_projector
        layers = len(self.vision_tower.vision_model.encoder.layers)
        self.depth = int(llava.config.vision_feature_layer) % (layers + 1)  # hidden state k: after k layers

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = clip_hidden(self.vision_tower.vision_model, pixel_values, self.depth)
        return self.multi_modal_projector(x[:, 1:])  # (B, N, D)


class PrompterPrefill(nn.Module):
    """Image features + the templated ids -> the next token's logits and the cache, padded to the mask's length."""

    def __init__(self, llava: LlavaWeights):
        super().__init__()
        self.language_model = llava.language_model
        self.image_token = int(llava.config.image_token_index)

    def forward(self, image_features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor):
        lm = self.language_model
        tokens = lm.get_input_embeddings()(input_ids)  # (B, T, D)
        is_image = input_ids == self.image_token
        # the k-th `<image>` of a row takes its k-th feature (transformers' masked scatter, as a gather); counted in
        # FP32 (exact to 2^24; TensorRT's CumSum takes no integers)
        index = (is_image.float().cumsum(1) - 1).clamp(0, image_features.shape[1] - 1).long()
        picked = torch.gather(image_features, 1, index[..., None].expand(-1, -1, image_features.shape[2]))
        embeds = torch.where(is_image[..., None], picked, tokens)
        return prefill(lm, embeds, attention_mask.shape[1], logits_to_keep=1)  # (B, V), (N, B, H, L, Dh) twice


GRAPHS = {"prompter_image": PrompterImage, "prompter_prefill": PrompterPrefill, "prompter_decode": DecodeStep}


def build_llava(folder: Path) -> nn.Module:
    """The prompter's networks from its folder's config.json, without weights (a checkpoint `Component`), every
    attention eager."""
    from transformers import LlavaConfig
    from transformers.initialization import no_init_weights

    try:
        config = LlavaConfig.from_dict(read_json(folder / "config.json", "prompter file"), attn_implementation="eager")
        for sub in (config.vision_config, config.text_config):
            sub._attn_implementation = "eager"
        with no_init_weights():  # the checkpoint assigns every weight; and drawing them cannot run on fake tensors
            llava = LlavaWeights(config)
        llava.language_model.model.rotary_emb = Rotary(config.text_config)
        return llava
    except (ValueError, TypeError, KeyError) as e:
        raise DiffsrError(f"{folder / 'config.json'} is not a valid LlavaConfig: {e}") from None


def load_llava(folder: Any) -> Any:
    """The prompter's reference as transformers loads it, FP32 on the CPU, eager attention (the graphs' kind)."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager")
    return model.eval().requires_grad_(False)
