"""The prompter: LLaVA-1.5, a vision-language model that writes a family's prompts of the LQ photo, each slot from an
instruction (XPSR's high-level and low-level prompts; any family's prompt).

A checkpoint may hold one in `prompter/`, in transformers' layout for `LlavaForConditionalGeneration` (config.json,
generation_config.json, model.safetensors or its shards and index, processor_config.json, preprocessor_config.json,
the chat template, tokenizer.json, tokenizer_config.json), tensors under the names the published
`llava-hf/llava-1.5-7b-hf` folder stores them (`vision_tower.`, `multi_modal_projector.`, `language_model.model.`,
`language_model.lm_head.`), so that folder is one as it stands, and transformers loads diffsr's.

Three graphs, one signature each (`prompter_networks.py` holds the networks):

    prompter_image    pixel_values (B, 3, S, S)                     -> image_features (B, N, D)
                      (CLIP ViT's hidden states of `vision_feature_layer`, its CLS left out, the projector)
    prompter_prefill  image_features (R, N, D), input_ids (R, T) (the templated instruction, its `<image>` token
                      repeated N times), attention_mask (R, L)       -> logits (R, V), keys, values (N_l, R, H_kv, L, Dh)
    prompter_decode   input_ids (R, 1), position_ids (R, 1),
                      attention_mask (R, L), past_keys, past_values -> logits (R, V), keys, values

N image tokens ((S / patch)^2: 576 for LLaVA-1.5's 336 px), R language-model rows (`prompter_batch`: one image's
beams), T = `prompter_length`, L = `prompter_cache`. The prefill puts the image features where the ids hold `<image>`,
in order, as transformers' forward does; the cache is the captioner's kind (`kv_cache.py`): allocated once at its
full length, one fixed-shape decode step per token.

`init_prompter` writes a seeded one of a preset (weights drawn one tensor at a time, FP16, shards of at most 2 GB
as the published folder's); its tokenizer is LLaMA's kind (BPE over SentencePiece's `▁` with byte fallback, `<unk>`
0, `<s>` 1, `</s>` 2, the 256 byte tokens, `<image>` and `<pad>` added after the vocabulary as LLaVA's), trained
offline on the words of CLIP's vocabulary, since LLaMA's own cannot be downloaded here.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.files import read_json
from diffsr.export.model.attachment import Attachment
from diffsr.export.model.attachments.clip_vision import CLIP_MEAN, CLIP_STD, clip_processing
from diffsr.export.model.attachments.kv_cache import attended_mask, beams_dim, lm_signatures
from diffsr.export.model.dims import NamedDim
from diffsr.export.model.parts import Component, Draw
from diffsr.export.model.settings import MAX_NEW_TOKENS
from diffsr.export.model.signatures import Signature, TensorSpec

FOLDER = "prompter"
WEIGHTS = "model.safetensors"
SHARD_BYTES = 2 * 1024**3  # a seeded folder's shards at most (the published: about 5 GB)
IMAGE, PAD = "<image>", "<pad>"
F32, IDS = "float32", "int32"
MAX_TEXT = 96  # tokens of a templated instruction besides its image tokens (BOS included)
# LLaVA-1.5's conversation (`llava_v1` without its system sentence), as llava-hf's processors render it:
# "USER: <image>\n{instruction} ASSISTANT:"
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] != 'system' -%}{{ message['role'].upper() + ': ' }}{%- endif -%}"
    "{%- for c in message['content'] if c['type'] == 'image' -%}{{ '<image>\n' }}{%- endfor -%}"
    "{%- for c in message['content'] if c['type'] == 'text' -%}{{ c['text'] + ' ' }}{%- endfor -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}")
# what a slot without an instruction of its own asks (a family's one prompt): XPSR's high-level instruction
DEFAULT_INSTRUCTION = "Please provide a descriptive summary of the content of this image."


@dataclass(frozen=True)
class PrompterConfig:
    preset: str
    vision: tuple[int, int, int, int]  # CLIP ViT: hidden, layers, heads, MLP
    text: tuple[int, int, int, int, int]  # LLaMA: hidden, layers, heads, key/value heads, FFN
    vocab_size: int  # the language model's rows (the published: 32064, above the tokenizer's 32002 ids)
    tokenizer_size: int  # tokens of the BPE vocabulary, specials and bytes included, at most
    image_size: int = 336
    patch_size: int = 14
    max_positions: int = 4096

    def __post_init__(self) -> None:
        if self.tokenizer_size + 2 > self.vocab_size:
            raise DiffsrError(f"prompter vocab_size {self.vocab_size} must hold the tokenizer's {self.tokenizer_size} "
                              "tokens, <image> and <pad>")


PRESETS: dict[str, PrompterConfig] = {
    # llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px (1024 wide, 24 layers), a two-layer GELU projector,
    # Vicuna-7B (LLaMA: 4096 wide, 32 layers, 32 heads, FFN 11008): about 7.06 B parameters
    "llava-1.5-7b": PrompterConfig(preset="llava-1.5-7b", vision=(1024, 24, 16, 4096), text=(4096, 32, 32, 32, 11008),
                                   vocab_size=32064, tokenizer_size=32000),
    # the same structure at tiny widths, for the tests: 56 px (16 image tokens), grouped key/value heads (2 of 4)
    "llava-tiny": PrompterConfig(preset="llava-tiny", vision=(32, 2, 4, 64), text=(32, 2, 4, 2, 64), vocab_size=520,
                                 tokenizer_size=512, image_size=56, max_positions=512),
}


def prompter_preset(name: str) -> PrompterConfig:
    if name not in PRESETS:
        raise DiffsrError(f"unknown prompter preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def llava_config(c: PrompterConfig, image_token: int, pad: int) -> Any:
    """transformers' `LlavaConfig` of a preset (`image_token`, `pad`: the ids of `<image>` and `<pad>`)."""
    from transformers import LlavaConfig

    (vh, vl, vn, vi), (th, tl, tn, tk, tf) = c.vision, c.text
    return LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", hidden_size=vh, num_hidden_layers=vl, num_attention_heads=vn,
                           intermediate_size=vi, image_size=c.image_size, patch_size=c.patch_size, projection_dim=768,
                           hidden_act="quick_gelu"),
        text_config=dict(model_type="llama", vocab_size=c.vocab_size, hidden_size=th, num_hidden_layers=tl,
                         num_attention_heads=tn, num_key_value_heads=tk, intermediate_size=tf, rms_norm_eps=1e-5,
                         max_position_embeddings=c.max_positions, bos_token_id=1, eos_token_id=2, pad_token_id=pad,
                         tie_word_embeddings=False),
        image_token_index=image_token, image_seq_length=(c.image_size // c.patch_size) ** 2, projector_hidden_act="gelu",
        vision_feature_select_strategy="default", vision_feature_layer=-2, tie_word_embeddings=False)


# --- what a checkpoint's prompter/ says --------------------------------------------------------------


@dataclass(frozen=True)
class Prompter(Attachment):
    """A checkpoint's prompter, read from its transformers config: the widths its graphs' signatures need. Attached to
    any family, it writes each of the family's prompt slots from the slot's instruction (`runtime/prompter.py`)."""

    folder = FOLDER
    writes = True
    instructed = True
    part = "prompter"
    stand_in = "typed prompts, or the defaults (caption=never)"

    path: Path = field(compare=False)
    hidden: int  # D: the language model's width (the image features')
    layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    image_tokens: int  # N
    image_size: int
    image_token: int
    eos: int
    pad: int
    max_positions: int

    @classmethod
    def open(cls, folder: Path) -> Prompter:
        return open_prompter(folder)

    def components(self) -> dict[str, Component]:
        from diffsr.export.model.attachments.prompter_networks import build_llava

        return {FOLDER: Component(build_llava, WEIGHTS)}

    def parts(self, submodule: str) -> tuple[tuple[str, ...], Any]:
        from diffsr.export.model.attachments.prompter_networks import GRAPHS

        return (FOLDER,), GRAPHS[submodule]

    def partial(self, submodule: str) -> bool:
        return True  # each graph is part of LLaVA (and the vision tower's last layers are never read)

    def file_errors(self, folder: Path) -> list[str]:
        errors = []
        try:
            read_json(folder / "tokenizer_config.json", "prompter file", "copy the prompter's tokenizer files")
        except DiffsrError as e:
            errors.append(str(e))
        if not (folder / "tokenizer.json").is_file() and not (folder / "tokenizer.model").is_file():
            errors.append(f"prompter file missing: {folder / 'tokenizer.json'} (or tokenizer.model): copy the "
                          "prompter's tokenizer files")
        try:
            clip_processing(folder, self.image_size)
            for name in ("chat_template.jinja", "chat_template.json"):
                if (folder / name).is_file():
                    parse_template(folder / name)
        except DiffsrError as e:
            errors.append(str(e))
        return errors

    def serving_files(self, folder: Path) -> list[Path]:
        return sorted(f for f in folder.iterdir() if f.is_file() and f.suffix in (".json", ".txt", ".model", ".jinja"))

    @property
    def cache_limit(self) -> int:
        """The longest cache its graphs take: the image tokens, the templated instruction and the most new tokens,
        within the language model's positions."""
        return min(self.max_positions, self.image_tokens + MAX_TEXT + MAX_NEW_TOKENS)

    def dims(self) -> tuple[NamedDim, ...]:
        n = self.image_tokens
        return (
            beams_dim("prompter_batch"),
            NamedDim("prompter_length", "the templated instruction's tokens, its image tokens included", "length",
                     trace=n + 13, odd=n + 17, bound=n + MAX_TEXT, native=n + 24, least=n + 1),
            # its trace and odd sizes leave room for the instruction (the prefill pads the cache to it); its opt, a
            # templated question and 77 new tokens (XPSR's default: what CLIP reads of a prompt)
            NamedDim("prompter_cache", "cache slots: the instruction, its image tokens and the new tokens", "length",
                     trace=n + 21, odd=n + 27, bound=self.cache_limit, native=min(n + 24 + 77, self.cache_limit),
                     least=n + 2),
        )

    def declare(self) -> tuple[Signature, ...]:
        features = TensorSpec("image_features", F32, ("prompter_batch", self.image_tokens, self.hidden))
        return (
            Signature("prompter_image",
                      inputs=(TensorSpec("pixel_values", F32, ("batch", 3, self.image_size, self.image_size)),),
                      outputs=(TensorSpec("image_features", F32, ("batch", self.image_tokens, self.hidden)),)),
            *lm_signatures("prompter_prefill", "prompter_decode", features, "prompter_batch", "prompter_length",
                           "prompter_cache", self.layers, self.kv_heads, self.head_dim, self.vocab_size),
        )

    def sample_draws(self) -> dict[str, Draw]:
        """Token ids in the language model's rows, one in four `<image>` (the prefill's path from the features);
        positions inside the image tokens (below every cache length); masks of ones and zeros whose first slot is
        set (a row attends to something)."""
        n, vocab, image = self.image_tokens, self.vocab_size, self.image_token

        def ids(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
            drawn = torch.randint(0, vocab, shape, generator=g, dtype=torch.int32)
            return torch.where(torch.randint(0, 4, shape, generator=g) == 0, image, drawn).int()

        return {"input_ids": ids,
                "position_ids": lambda shape, g: torch.randint(0, n, shape, generator=g, dtype=torch.int32),
                "attention_mask": attended_mask}


def parse_template(path: Path) -> str:
    """A chat template file's template (`chat_template.jinja`, or the `chat_template` of `chat_template.json`),
    compiled as transformers compiles it to render (its Jinja environment and extensions: `{% generation %}`, loop
    controls): one that does not compile is refused naming the file, not found at the first request."""
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        text = read_json(path, "prompter file").get("chat_template") if path.suffix == ".json" else path.read_text(
            encoding="utf-8")
    except UnicodeDecodeError:
        raise DiffsrError(f"{path} is not UTF-8 text") from None
    if not isinstance(text, str):
        raise DiffsrError(f"{path} holds no chat_template string")
    try:
        _compile_jinja_template(text)
    except jinja2.TemplateSyntaxError as e:
        raise DiffsrError(f"{path}: the chat template does not parse (line {e.lineno}: {e.message})") from None
    return text


def open_prompter(folder: Path) -> Prompter:
    if not (folder / "config.json").is_file():
        raise DiffsrError(f"no prompter in {folder}: add one with `diffsr init --prompter llava-tiny` or copy a LLaVA-1.5 "
                          "folder there")
    config = read_json(folder / "config.json", "prompter file")
    text, vision = config.get("text_config", {}), config.get("vision_config", {})
    if config.get("model_type") != "llava" or text.get("model_type", "llama") != "llama":
        raise DiffsrError(f"{folder / 'config.json'} is not a LLaVA config with a LLaMA language model")
    if config.get("vision_feature_select_strategy", "default") != "default" or not isinstance(
            config.get("vision_feature_layer", -2), int):
        raise DiffsrError(f"{folder / 'config.json'}: diffsr takes LLaVA-1.5's image features (one vision_feature_layer, "
                          "the 'default' strategy: CLS left out)")
    hidden, heads = text.get("hidden_size", 4096), text.get("num_attention_heads", 32)
    size, patch = vision.get("image_size", 224), vision.get("patch_size", 32)
    eos = text.get("eos_token_id", 2)
    return Prompter(folder, hidden, text.get("num_hidden_layers", 32), text.get("num_key_value_heads") or heads,
                    text.get("head_dim") or hidden // heads, text.get("vocab_size", 32000), (size // patch) ** 2, size,
                    config.get("image_token_index", config.get("image_token_id", 32000)),
                    eos[0] if isinstance(eos, list) else eos, config.get("pad_token_id", text.get("pad_token_id")) or 0,
                    text.get("max_position_embeddings", 2048))


# --- a seeded one ----------------------------------------------------------------------------------


def build_llama_tokenizer(size: int) -> Any:
    """LLaMA's kind of tokenizer (transformers' `LlamaTokenizer`: BPE over `▁`-joined words with byte fallback,
    `<unk>` 0, `<s>` 1 as BOS, `</s>` 2 as EOS, `<0x00>` to `<0xFF>` from 3) of `size` tokens, trained here on the
    whole words of CLIP's vocabulary; `<image>` and `<pad>` added after them."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer

    from diffsr.export.model.tokenizer import _bpe_merges

    words = [a + b[: -len("</w>")] for a, b in _bpe_merges() if b.endswith("</w>")]
    specials = ["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))]
    bpe = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=specials, show_progress=False)
    bpe.train_from_iterator((" ".join(words[i: i + 16]) for i in range(0, len(words), 16)), trainer)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = LlamaTokenizer(vocab=bpe.get_vocab(), merges=merges, add_bos_token=True, add_eos_token=False,
                               legacy=False)
    tokenizer.add_tokens([AddedToken(IMAGE, special=True, normalized=False)], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": PAD})
    return tokenizer


def _llava_weights(config: Any) -> Any:
    """The network of a config on the meta device, for its tensors' names and shapes (the published layout)."""
    from accelerate import init_empty_weights

    from diffsr.export.model.attachments.prompter_networks import LlavaWeights

    with init_empty_weights(include_buffers=False):
        return LlavaWeights(config)


def init_prompter(preset_name: str, seed: int, checkpoint: Path) -> Prompter:
    """Write a seeded prompter of a preset into `checkpoint/prompter` (which must not exist yet)."""
    from transformers import CLIPImageProcessorPil, GenerationConfig, LlavaProcessor

    from diffsr.export.model.draw import STORED_DTYPE, draw_parameter

    c = prompter_preset(preset_name)
    out = Path(checkpoint) / FOLDER
    if out.exists():
        raise DiffsrError(f"{out} already exists: a checkpoint holds one prompter")
    tokenizer = build_llama_tokenizer(c.tokenizer_size)
    image_token, pad = tokenizer.convert_tokens_to_ids(IMAGE), tokenizer.convert_tokens_to_ids(PAD)
    if pad >= c.vocab_size:
        raise DiffsrError(f"the {preset_name} tokenizer has {len(tokenizer)} tokens, more than the model's {c.vocab_size}")
    images = CLIPImageProcessorPil(size={"shortest_edge": c.image_size},
                                   crop_size={"height": c.image_size, "width": c.image_size},
                                   image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=c.patch_size,
                               vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    config = llava_config(c, image_token, pad)
    model = _llava_weights(config)
    modules = dict(model.named_modules())
    out.mkdir(parents=True)
    processor.save_pretrained(str(out))
    config.save_pretrained(str(out))
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=pad).save_pretrained(str(out))
    # one tensor drawn at a time, written in shards: a 7B model is never whole in memory
    written: list[list[str]] = []  # each written shard's names
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for key, tensor in model.state_dict().items():
        owner, _, kind = key.rpartition(".")
        if shard and size + 2 * tensor.numel() > SHARD_BYTES:
            written.append(_save(shard, out / f"model-{len(written) + 1:05d}.safetensors"))
            shard, size = {}, 0
        shard[key] = draw_parameter(modules[owner], kind, tuple(tensor.shape), seed, f"{FOLDER}/{key}").to(STORED_DTYPE)
        size += 2 * tensor.numel()
    if written:  # shards named by an index, as the published folder's
        written.append(_save(shard, out / f"model-{len(written) + 1:05d}.safetensors"))
        weight_map = {key: f"model-{i + 1:05d}.safetensors" for i, keys in enumerate(written) for key in keys}
        (out / f"{WEIGHTS}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2) + "\n")
    else:
        _save(shard, out / WEIGHTS)
    (out / "diffsr_prompter.json").write_text(json.dumps({"preset": asdict(c), "seed": seed}, indent=2) + "\n")
    return open_prompter(out)


def _save(tensors: dict[str, torch.Tensor], path: Path) -> list[str]:
    from safetensors.torch import save_file

    save_file(tensors, str(path), {"format": "pt"})
    return list(tensors)


def parameters_of(c: PrompterConfig) -> int:
    """A preset's parameter count, from its config alone (nothing is built)."""
    model = _llava_weights(llava_config(c, c.tokenizer_size, c.tokenizer_size + 1))
    return sum(math.prod(p.shape) for p in model.parameters())
