"""The CLIP BPE tokenizer, built offline from the vocabulary that ships inside `open-clip-torch`, and a
T5-style one made from it for seeded checkpoints.

`open_clip` itself is never imported (it needs torchvision); its `bpe_simple_vocab_16e6.txt.gz` is
read through the installed distribution's file list and turned into the Hugging Face layout
(`tokenizer.json`) that every SD checkpoint carries. A published SD3 checkpoint's `tokenizer_3/` holds T5's
own SentencePiece vocabulary; a seeded one gets a Unigram vocabulary of CLIP's whole words instead
(`build_t5_tokenizer`): the same kind of tokenizer (T5's pieces, pad 0, end 1, unknown 2), other ids.
"""

from __future__ import annotations

import gzip
import importlib.metadata
from pathlib import Path
from typing import Any

import numpy as np

from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.files import read_json

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_SIZE = 49408  # CLIP BPE vocabulary (256 bytes, 256 word-ends, 48894 merges, 2 specials)
CLIP_LENGTH = 77  # CLIP's context length
N_MERGES = VOCAB_SIZE - 2 * 256 - 2


def _bytes_to_unicode() -> list[str]:
    """CLIP's byte-level alphabet: printable bytes map to themselves, the rest to code points >= 256."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    table = dict(zip(printable, printable)) | {b: 256 + i for i, b in enumerate(extra)}
    return [chr(table[b]) for b in [*printable, *extra]]


def _bpe_merges() -> list[tuple[str, str]]:
    try:
        files = importlib.metadata.files("open-clip-torch") or []
    except importlib.metadata.PackageNotFoundError:
        raise DiffsrError(
            "the CLIP vocabulary ships in open-clip-torch, which is not installed: "
            "run `pip install --no-deps open-clip-torch`"
        ) from None
    path = next((f.locate() for f in files if f.name == BPE_FILE), None)
    if path is None or not Path(path).is_file():
        raise DiffsrError(f"{BPE_FILE} is missing from the open-clip-torch install: reinstall it")
    lines = gzip.decompress(Path(path).read_bytes()).decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]  # line 0 is a header


END_OF_TEXT = "<|endoftext|>"
OPENCLIP_PAD = "!"  # SDXL's second tokenizer (OpenCLIP bigG) pads with "!", id 0


def build_clip_tokenizer(pad_token: str = END_OF_TEXT) -> Any:
    """The real CLIP tokenizer (transformers' `CLIPTokenizer`): 49408 tokens, ids identical to OpenAI's;
    padded with `pad_token`."""
    from transformers import CLIPTokenizer

    alphabet = _bytes_to_unicode()
    merges = _bpe_merges()
    tokens = alphabet + [a + "</w>" for a in alphabet] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", END_OF_TEXT]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, pad_token=pad_token)


def build_t5_tokenizer(vocab_size: int) -> Any:
    """A T5 tokenizer (transformers' `T5Tokenizer`: SentencePiece-style Unigram pieces, "▁" marking a word's
    start) of at most `vocab_size` pieces: T5's specials, the single characters, then CLIP's whole words in
    merge order (the earlier, the likelier)."""
    from transformers import T5Tokenizer

    alphabet = [c for c in _bytes_to_unicode() if c.isprintable() and not c.isspace()]
    words = [a + b[: -len("</w>")] for a, b in _bpe_merges() if b.endswith("</w>") and (a + b).isprintable()]
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -20.0) for c in alphabet] + [("▁" + c, -19.0) for c in alphabet]
    seen = {p for p, _ in pieces}
    for rank, word in enumerate(words):
        if len(pieces) >= vocab_size:
            break
        if "▁" + word not in seen:
            seen.add("▁" + word)
            pieces.append(("▁" + word, -3.0 - rank / len(words)))
    return T5Tokenizer(vocab=pieces, extra_ids=0)


class Tokenizer:
    """Prompts -> {input name: (N, length) int32 ids}, long prompts truncated and short ones padded: one
    tokenizer per input, read from its checkpoint folder (CLIP's: SD's `tokenizer/` pads with end-of-text,
    SDXL's `tokenizer_2/` as its config says, "!"; T5's: SD3's `tokenizer_3/`, as its config says)."""

    def __init__(self, folders: dict[str, Path], length: int | dict[str, int] = CLIP_LENGTH):
        if not folders:
            raise DiffsrError("a tokenizer needs at least one tokenizer folder")
        from transformers import CLIPTokenizer, T5Tokenizer

        self.lengths = length if isinstance(length, dict) else {name: length for name in folders}
        self._toks = {}
        for name, folder in folders.items():
            kind = tokenizer_class(folder)
            try:
                self._toks[name] = (T5Tokenizer if kind.startswith("T5") else CLIPTokenizer).from_pretrained(str(folder))
            except (OSError, ValueError, TypeError, KeyError) as e:
                raise DiffsrError(f"tokenizer {folder} does not load ({type(e).__name__}: {e}): replace it with the "
                                  "checkpoint's own") from None

    def __call__(self, prompts: list[str]) -> dict[str, np.ndarray]:
        return {name: np.asarray(tok(prompts, padding="max_length", max_length=self.lengths[name], truncation=True).input_ids,
                                 dtype=np.int32) for name, tok in self._toks.items()}


def tokenizer_class(folder: Path) -> str:
    """The class a tokenizer folder names (`tokenizer_config.json`'s `tokenizer_class`; CLIP's where it names none or
    has no config, as a checkpoint without one always read), its `tokenizer.json` read too: a missing
    `tokenizer.json`, or either file that is not JSON, is an error naming the file (checked when a checkpoint opens).
    A folder whose files are unchanged since the last look (same sizes and times) is not parsed again."""
    hint = "the checkpoint is incomplete: copy the folder from where the checkpoint came from"
    files = [f for f in (folder / "tokenizer.json", folder / "tokenizer_config.json") if f.is_file()]
    try:
        key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    except OSError:
        key = None
    if key is not None and key in _SEEN:
        return _SEEN[key]
    read_json(folder / "tokenizer.json", "tokenizer file", hint)
    config = read_json(folder / "tokenizer_config.json", "tokenizer file") if len(files) == 2 else {}
    kind = config.get("tokenizer_class") or "CLIPTokenizer"
    if not isinstance(kind, str):
        raise DiffsrError(f"{folder / 'tokenizer_config.json'}: tokenizer_class {kind!r} is not a class name: {hint}")
    if key is not None:
        _SEEN[key] = kind
    return kind


_SEEN: dict[tuple[tuple[str, int, int], ...], str] = {}  # tokenizer folders already read, by their files' stats
