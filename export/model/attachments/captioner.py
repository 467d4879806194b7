"""The captioner: BLIP-2 with an OPT language model, the paper's own prompt (a caption of the LQ image).

A checkpoint may hold one in `captioner/`, in transformers' layout (config.json, generation_config.json,
model.safetensors, processor_config.json, tokenizer.json, tokenizer_config.json), so the published
`Salesforce/blip2-opt-2.7b` folder is one as it stands. It belongs to no family: any model can be prompted by it.

Three graphs, one signature each (`captioner_networks.py` holds the networks):

    caption_image    pixel_values (B, 3, 224, 224)              -> prefix (B, 32, D)
                     (ViT, Q-Former over 32 queries, language projection)
    caption_prefill  prefix (R, 32, D), input_ids (R, T) (BOS + prompt),
                     attention_mask (R, L)                      -> logits (R, V), keys, values (N, R, H, L, Dh)
    caption_decode   input_ids (R, 1), position_ids (R, 1),
                     attention_mask (R, L), past_keys, past_values -> logits (R, V), keys, values

B images, R language-model rows (`caption_batch`: one image's beams), T = `prompt_length`, L = `cache_length`. The cache
is allocated once at its full length L (the prefix, BOS, the prompt and every new token), so a decode step is one
fixed-shape call: position p writes slot p, `attention_mask` marks the slots filled so far (the one written now
included). The prefill's mask has the same width, only to size the cache. Ids, positions and masks are int32
(what TensorRT takes). A checkpoint's captioner is an attachment of its model (`ModelFamily.attachments`): these three
submodules besides the family's, so export, parity, FP16, INT8, engines and budget treat them as any other.

`init_captioner` writes a seeded one of a preset (weights drawn one tensor at a time, FP16, as `diffsr init`
draws the rest); its tokenizer is OPT's kind (GPT-2 byte-level BPE, `</s>` id 2 as BOS and EOS, `<pad>` 1),
trained offline on the words of CLIP's vocabulary, since OPT's own vocabulary cannot be downloaded here.
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
from diffsr.export.model.attachments.clip_vision import CLIP_MEAN, CLIP_STD
from diffsr.export.model.attachments.kv_cache import attended_mask, beams_dim, lm_signatures
from diffsr.export.model.dims import NamedDim
from diffsr.export.model.parts import Component, Draw
from diffsr.export.model.settings import MAX_NEW_TOKENS
from diffsr.export.model.signatures import Signature, TensorSpec

FOLDER = "captioner"
WEIGHTS = "model.safetensors"
BOS, PAD = 2, 1  # OPT's `</s>` (BOS and end of text) and `<pad>`
NEWLINE = "\u010a"  # "\n" as a byte-level token: the published checkpoint's end of caption (id 50118)
F32, IDS = "float32", "int32"
MAX_PROMPT = 32  # tokens of a caption prompt (after BOS)


@dataclass(frozen=True)
class CaptionerConfig:
    preset: str
    vision: tuple[int, int, int, int]  # ViT: hidden, layers, heads, MLP
    qformer: tuple[int, int, int, int]  # Q-Former: hidden, layers, heads, MLP
    text: tuple[int, int, int, int]  # OPT: hidden, layers, heads, FFN
    vocab_size: int  # the language model's rows (the published: 50304, above the tokenizer's 50266 ids)
    tokenizer_size: int  # tokens of the BPE vocabulary, specials included, at most (`<image>` is added after them)
    num_query_tokens: int = 32
    image_size: int = 224
    patch_size: int = 14
    max_positions: int = 2048
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.tokenizer_size + 1 > self.vocab_size:
            raise DiffsrError(f"captioner vocab_size {self.vocab_size} must exceed the tokenizer's {self.tokenizer_size} "
                              "tokens and <image>")


PRESETS: dict[str, CaptionerConfig] = {
    # Salesforce/blip2-opt-2.7b: ViT-g/14 (1408 wide, 39 layers) at 224 px, Q-Former (768, 12 layers, 32 queries),
    # OPT-2.7b (2560 wide, 32 layers): about 3.7 B parameters
    "blip2-opt-2.7b": CaptionerConfig(
        preset="blip2-opt-2.7b", vision=(1408, 39, 16, 6144), qformer=(768, 12, 12, 3072), text=(2560, 32, 32, 10240),
        vocab_size=50304, tokenizer_size=50265),
    # the same structure at tiny widths, for the tests; its head untied so that random weights do not just
    # repeat a token
    "blip2-tiny": CaptionerConfig(
        preset="blip2-tiny", vision=(32, 2, 4, 64), qformer=(32, 2, 4, 64), text=(32, 2, 4, 64),
        vocab_size=320, tokenizer_size=300, max_positions=128, tie_word_embeddings=False),
}


def captioner_preset(name: str) -> CaptionerConfig:
    if name not in PRESETS:
        raise DiffsrError(f"unknown captioner preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]


def blip2_config(c: CaptionerConfig, image_token: int, newline: int) -> Any:
    """transformers' `Blip2Config` of a preset (`image_token`: the `<image>` id, `newline`: the end of a caption)."""
    from transformers import Blip2Config

    (vh, vl, vn, vi), (qh, ql, qn, qi), (th, tl, tn, tf) = c.vision, c.qformer, c.text
    return Blip2Config(
        vision_config=dict(hidden_size=vh, num_hidden_layers=vl, num_attention_heads=vn, intermediate_size=vi,
                           image_size=c.image_size, patch_size=c.patch_size),
        qformer_config=dict(hidden_size=qh, num_hidden_layers=ql, num_attention_heads=qn, intermediate_size=qi,
                            cross_attention_frequency=2),
        text_config=dict(model_type="opt", vocab_size=c.vocab_size, hidden_size=th, num_hidden_layers=tl,
                         num_attention_heads=tn, ffn_dim=tf, word_embed_proj_dim=th, max_position_embeddings=c.max_positions,
                         bos_token_id=BOS, eos_token_id=newline, pad_token_id=PAD, prefix="</s>",
                         tie_word_embeddings=c.tie_word_embeddings),
        num_query_tokens=c.num_query_tokens, image_token_index=image_token, tie_word_embeddings=c.tie_word_embeddings)


# --- what a checkpoint's captioner/ says --------------------------------------------------------------


@dataclass(frozen=True)
class Captioner(Attachment):
    """A checkpoint's captioner, read from its transformers config: the widths its graphs' signatures need. Attached
    to any family, it writes the request's prompt (`runtime/caption.py`, under the prompt policy)."""

    folder = FOLDER
    writes = True  # the prompt, continuing the request's `caption_prompt` (no instruction)
    part = "caption"
    stand_in = "a typed prompt, or the caption suffix alone (caption=never)"

    path: Path = field(compare=False)  # the captioner/ folder: two checkpoints' equal captioners are equal
    hidden: int  # D: the language model's width (the prefix's)
    layers: int
    heads: int
    vocab_size: int
    num_query_tokens: int
    image_size: int
    eos: int
    max_positions: int

    @classmethod
    def open(cls, folder: Path) -> Captioner:
        return open_captioner(folder)

    def components(self) -> dict[str, Component]:
        """captioner/: BLIP-2, its language model's head stored as its embedding where they are tied."""
        from diffsr.export.model.attachments.captioner_networks import EMBED_TOKENS, LM_HEAD, build_blip2

        return {FOLDER: Component(build_blip2, WEIGHTS, ((LM_HEAD, EMBED_TOKENS),))}

    def parts(self, submodule: str) -> tuple[tuple[str, ...], Any]:
        from diffsr.export.model.attachments.captioner_networks import GRAPHS

        return (FOLDER,), GRAPHS[submodule]

    def partial(self, submodule: str) -> bool:
        return True  # each graph is part of BLIP-2

    def file_errors(self, folder: Path) -> list[str]:
        """Its tokenizer: a config naming the class, and the vocabulary (one tokenizer.json, or vocab.json and
        merges.txt as OPT's slow tokenizer saves them)."""
        errors = []
        try:
            read_json(folder / "tokenizer_config.json", "captioner file", "copy the captioner's tokenizer files")
        except DiffsrError as e:
            errors.append(str(e))
        if not (folder / "tokenizer.json").is_file() and not all((folder / f).is_file() for f in ("vocab.json", "merges.txt")):
            errors.append(f"captioner file missing: {folder / 'tokenizer.json'} (or vocab.json and merges.txt): copy the "
                          "captioner's tokenizer files")
        return errors

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def cache_limit(self) -> int:
        """The longest cache its graphs take: the prefix, BOS, the longest prompt and the most new tokens,
        within the language model's positions."""
        return min(self.max_positions, self.num_query_tokens + 1 + MAX_PROMPT + MAX_NEW_TOKENS)

    def dims(self) -> tuple[NamedDim, ...]:
        q = self.num_query_tokens
        return (
            beams_dim("caption_batch"),
            NamedDim("prompt_length", "BOS and the caption prompt's tokens", "length", trace=6, odd=7, bound=1 + MAX_PROMPT,
                     native=1),
            # its trace and odd sizes leave room for the prefix and the prompt (the prefill pads to it)
            NamedDim("cache_length", "cache slots: the prefix, BOS, the prompt and the new tokens", "length",
                     trace=q + 9, odd=q + 11, bound=self.cache_limit, native=min(q + 1 + 30, self.cache_limit),
                     least=q + 2),
        )

    def declare(self) -> tuple[Signature, ...]:
        prefix = TensorSpec("prefix", F32, ("caption_batch", self.num_query_tokens, self.hidden))
        return (
            Signature("caption_image",
                      inputs=(TensorSpec("pixel_values", F32, ("batch", 3, self.image_size, self.image_size)),),
                      outputs=(TensorSpec("prefix", F32, ("batch", self.num_query_tokens, self.hidden)),)),
            *lm_signatures("caption_prefill", "caption_decode", prefix, "caption_batch", "prompt_length", "cache_length",
                           self.layers, self.heads, self.head_dim, self.vocab_size),
        )

    def sample_draws(self) -> dict[str, Draw]:
        """Token ids in the language model's rows; positions inside the prefix (below every cache length); masks
        of ones and zeros whose first slot is set (a row attends to something)."""
        q, vocab = self.num_query_tokens, self.vocab_size
        return {"input_ids": lambda shape, g: torch.randint(0, vocab, shape, generator=g, dtype=torch.int32),
                "position_ids": lambda shape, g: torch.randint(0, q, shape, generator=g, dtype=torch.int32),
                "attention_mask": attended_mask}


def open_captioner(folder: Path) -> Captioner:
    if not (folder / "config.json").is_file():
        raise DiffsrError(f"no captioner in {folder}: add one with `diffsr init --captioner blip2-tiny` or copy a "
                          "BLIP-2 folder there")
    config = read_json(folder / "config.json", "captioner file")
    text, vision = config.get("text_config", {}), config.get("vision_config", {})
    if text.get("model_type") != "opt" or config.get("image_token_index", config.get("image_token_id")) is None:
        raise DiffsrError(f"{folder / 'config.json'} is not a BLIP-2 OPT config with an image token id")
    eos = text.get("eos_token_id", BOS)
    return Captioner(folder, text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"],
                     text["vocab_size"], config.get("num_query_tokens", 32), vision.get("image_size", 224),
                     eos[0] if isinstance(eos, list) else eos, text.get("max_position_embeddings", 2048))


# --- a seeded one ----------------------------------------------------------------------------------


def build_opt_tokenizer(size: int) -> Any:
    """OPT's kind of tokenizer (transformers' `GPT2Tokenizer`, byte-level BPE, `<s>` 0, `<pad>` 1, `</s>` 2 as BOS
    and EOS, `<unk>` 3) of `size` tokens, trained here on the whole words of CLIP's vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Tokenizer

    from diffsr.export.model.tokenizer import _bpe_merges

    words = [a + b[: -len("</w>")] for a, b in _bpe_merges() if b.endswith("</w>")]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator((" ".join(words[i: i + 16]) + "\n" for i in range(0, len(words), 16)), trainer)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in json.loads(bpe.to_str())["model"]["merges"]]
    return GPT2Tokenizer(vocab=bpe.get_vocab(), merges=merges, bos_token="</s>", eos_token="</s>", unk_token="</s>",
                         pad_token="<pad>", add_bos_token=True)


def init_captioner(preset_name: str, seed: int, checkpoint: Path) -> Captioner:
    """Write a seeded captioner of a preset into `checkpoint/captioner` (which must not exist yet)."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import Blip2ForConditionalGeneration, Blip2Processor, BlipImageProcessorPil

    from diffsr.export.model.draw import STORED_DTYPE, draw_parameter

    c = captioner_preset(preset_name)
    out = Path(checkpoint) / FOLDER
    if out.exists():
        raise DiffsrError(f"{out} already exists: a checkpoint holds one captioner")
    # CLIP's words give the BPE trainer up to about 43,500 tokens: a preset asking more (OPT's 50,265) gets that
    # many, `<image>` after them; the language model's rows above are never used, as the published model's above
    # its tokenizer are not
    tokenizer = build_opt_tokenizer(c.tokenizer_size)
    if len(tokenizer) > c.tokenizer_size:
        raise DiffsrError(f"the {preset_name} tokenizer has {len(tokenizer)} tokens, more than {c.tokenizer_size}")
    size = {"height": c.image_size, "width": c.image_size}
    processor = Blip2Processor(image_processor=BlipImageProcessorPil(size=size, image_mean=list(CLIP_MEAN),
                                                                     image_std=list(CLIP_STD)),
                               tokenizer=tokenizer, num_query_tokens=c.num_query_tokens)
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    config = blip2_config(c, image_token, tokenizer.convert_tokens_to_ids(NEWLINE))
    with init_empty_weights(include_buffers=False):
        model = Blip2ForConditionalGeneration(config)
    tied = {"language_model.lm_head.weight"} if c.tie_word_embeddings else set()
    modules = dict(model.named_modules())
    tensors = {}
    for key, tensor in model.state_dict().items():
        if key in tied:
            continue
        owner, _, kind = key.rpartition(".")
        if tensor.device.type != "meta":  # a buffer: its value is the network's own
            tensors[key] = tensor.to(STORED_DTYPE) if tensor.is_floating_point() else tensor.clone()
            continue
        tensors[key] = draw_parameter(modules[owner], kind, tuple(tensor.shape), seed, f"{FOLDER}/{key}").to(STORED_DTYPE)
    out.mkdir(parents=True)
    processor.save_pretrained(str(out))
    config.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    save_file(tensors, str(out / WEIGHTS), {"format": "pt"})
    (out / "diffsr_captioner.json").write_text(json.dumps({"preset": asdict(c), "seed": seed}, indent=2) + "\n")
    return open_captioner(out)


def parameters_of(c: CaptionerConfig) -> int:
    """A preset's parameter count, from its config alone (nothing is built)."""
    from accelerate import init_empty_weights
    from transformers import Blip2ForConditionalGeneration

    with init_empty_weights(include_buffers=False):
        model = Blip2ForConditionalGeneration(blip2_config(c, c.tokenizer_size, 0))
    head = model.language_model.lm_head.weight
    tied = c.tie_word_embeddings and head is not model.language_model.get_input_embeddings().weight
    return sum(math.prod(p.shape) for p in model.parameters()) - (math.prod(head.shape) if tied else 0)

