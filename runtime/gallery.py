"""A reference gallery: every photo of a folder embedded once by a checkpoint's gallery encoder
(`export/model/attachments/gallery_encoder.py`), then searched with a request's photo for its nearest references.

The index is faiss (Meta's similarity-search library: well kept, CPU and GPU builds, indexes saved and loaded as one
file, vectors added and removed by id without touching the others): exact inner product over L2-normalised
embeddings (cosine similarity), an `IndexIDMap2` over an `IndexFlatIP`. Exact search reads every vector once a query:
100,000 photos of 512 floats are 200 MB and a query takes milliseconds on a CPU (`diffsr gallery bench`); past
millions, faiss' HNSW or IVF indexes trade exactness for speed behind the same calls.

An index is a folder: `index.faiss` (the vectors by id) and `photos.json` (each id's file, relative to the photos'
folder, and its content's sha256; the encoder's digest; the embedding's width; the next id). Building again over the
same folder embeds only photos that are new (by name) or changed (by content), and drops the ones that are gone:
adding photos never re-embeds the old ones (a photo renamed or moved is embedded again under its new name). An index
built by another encoder is refused (its vectors would not compare).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from PIL import Image

from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.files import PHOTO_SUFFIXES, read_json
from diffsr.export.core.progress import Progress
from diffsr.export.graphs.manifest import checkpoint_digest
from diffsr.export.model.checkpoint import Checkpoint, load_submodule
from diffsr.export.model.attachments.gallery_encoder import GalleryEncoder
from diffsr.runtime.image import MAX_INPUT_PIXELS, load_image
from diffsr.runtime.prompter import ClipPreparation

INDEX_FILE, PHOTOS_FILE = "index.faiss", "photos.json"
Embed = Callable[[torch.Tensor], torch.Tensor]  # pixel_values (B, 3, S, S) -> image_embeds (B, P)

TOP_K = 4  # the gallery photos picked as references where no count is given (upscale, a server)


@dataclass(frozen=True)
class Match:
    name: str  # the photo's file, relative to the gallery's folder
    score: float  # cosine similarity to the query, -1 to 1


class Encoder:
    """Photos -> L2-normalised embeddings (float32, (N, P)), prepared as the folder's CLIP image processor prepares
    them, `batch` at a time through `embed` (any backend's call of the `gallery_embed` graph)."""

    def __init__(self, spec: GalleryEncoder, embed: Embed, batch: int = 16, digest: str | None = None):
        if batch < 1:
            raise DiffsrError(f"batch={batch}: embed at least 1 photo at a time")
        self.spec, self.embed, self.batch = spec, embed, batch
        self.pixels = ClipPreparation.of(spec.path, spec.image_size)
        # the encoder folder's digest; given where the folder is a copy without its weights (a server's, whose
        # repository was checked against the gallery when it was made)
        self.digest = digest or checkpoint_digest(spec.path)
        self.calls = 0  # photos embedded so far

    def __call__(self, photos: list[NDArray[np.uint8]]) -> NDArray[np.float32]:
        out = []
        for i in range(0, len(photos), self.batch):
            pixels = torch.cat([self.pixels(p) for p in photos[i: i + self.batch]])
            with torch.no_grad():
                out.append(self.embed(pixels).float().cpu().numpy())
            self.calls += len(photos[i: i + self.batch])
        vectors = np.concatenate(out) if out else np.zeros((0, self.spec.projection_dim), np.float32)
        return normalised(vectors)


def normalised(vectors: NDArray[Any]) -> NDArray[np.float32]:
    v = np.ascontiguousarray(vectors, dtype=np.float32)
    out: NDArray[np.float32] = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    return out


@dataclass
class Gallery:
    """The index and what each id is."""

    dim: int
    encoder: str  # the encoder's digest
    photos: dict[int, tuple[str, str]] = field(default_factory=dict)  # id -> (name, sha256)
    index: Any = None
    next_id: int = 0  # ids are never handed out twice, removals included
    root: str = ""  # the photos' folder, absolute: where a search's picks are read from

    def __post_init__(self) -> None:
        import faiss

        if self.index is None:
            self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, names: list[str], hashes: list[str], vectors: NDArray[np.float32]) -> None:
        if vectors.shape != (len(names), self.dim):
            raise DiffsrError(f"gallery vectors of shape {vectors.shape} for {len(names)} photos of width {self.dim}")
        ids = np.arange(self.next_id, self.next_id + len(names), dtype=np.int64)
        self.next_id += len(names)
        self.index.add_with_ids(normalised(vectors), ids)
        self.photos |= {int(i): (n, h) for i, n, h in zip(ids, names, hashes)}

    def remove(self, names: set[str]) -> None:
        ids = [i for i, (n, _) in self.photos.items() if n in names]
        if ids:
            self.index.remove_ids(np.asarray(ids, dtype=np.int64))
            for i in ids:
                del self.photos[i]

    def search(self, queries: NDArray[np.float32], k: int) -> list[list[Match]]:
        """The `k` nearest photos of each query (fewer where the gallery holds fewer), nearest first."""
        if k < 1:
            raise DiffsrError(f"top-k {k} must be at least 1")
        if len(self) == 0:
            raise DiffsrError("the gallery is empty: build it from a folder of photos first")
        scores, ids = self.index.search(normalised(queries), min(k, len(self)))
        return [[Match(self.photos[int(i)][0], float(s)) for s, i in zip(row_s, row_i) if i >= 0]
                for row_s, row_i in zip(scores, ids)]

    def save(self, out: Path) -> None:
        """Both files written beside their old versions, then moved over them (a crash leaves the old index whole, or
        at worst a pair that `load` refuses)."""
        import faiss

        out.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(out / (INDEX_FILE + ".new")))
        entries = [{"id": i, "name": n, "sha256": h} for i, (n, h) in sorted(self.photos.items())]
        meta = {"encoder": self.encoder, "dim": self.dim, "next_id": self.next_id, "root": self.root, "photos": entries}
        (out / (PHOTOS_FILE + ".new")).write_text(json.dumps(meta, indent=1) + "\n")
        (out / (INDEX_FILE + ".new")).replace(out / INDEX_FILE)
        (out / (PHOTOS_FILE + ".new")).replace(out / PHOTOS_FILE)

    @classmethod
    def load(cls, path: Path) -> Gallery:
        import faiss

        if not (path / INDEX_FILE).is_file() or not (path / PHOTOS_FILE).is_file():
            raise DiffsrError(f"{path} is not a gallery index (no {INDEX_FILE} and {PHOTOS_FILE}): make one with "
                              "`diffsr gallery build`")
        meta = read_json(path / PHOTOS_FILE, "gallery index file", "build the index again with `diffsr gallery build`")
        try:
            index: Any = faiss.read_index(str(path / INDEX_FILE))  # an IndexIDMap2 (its id_map below)
            held = {int(i) for i in faiss.vector_to_array(index.id_map)}
        except (RuntimeError, AttributeError) as e:
            raise DiffsrError(f"{path / INDEX_FILE} is no gallery index faiss reads ({str(e).splitlines()[0]}): build "
                              "the index again with `diffsr gallery build`") from None
        try:
            photos = {int(p["id"]): (str(p["name"]), str(p["sha256"])) for p in meta["photos"]}
            dim, encoder = int(meta["dim"]), str(meta["encoder"])
            next_id = int(meta.get("next_id", max(photos, default=-1) + 1))
        except (KeyError, TypeError, ValueError) as e:
            raise DiffsrError(f"{path / PHOTOS_FILE} is malformed ({type(e).__name__}: {e}): build the index again with "
                              "`diffsr gallery build`") from None
        if held != set(photos):
            raise DiffsrError(f"{path}: {INDEX_FILE} and {PHOTOS_FILE} do not name the same photos ({index.ntotal} vectors, "
                              f"{len(photos)} photos): build the index again")
        return cls(dim, encoder, photos, index, next_id, str(meta.get("root", "")))

    def files(self, matches: list[Match]) -> list[Path]:
        """The photo files of a search's matches, in its folder; one gone since the build is an error naming it."""
        if not self.root:
            raise DiffsrError("this gallery index does not say where its photos are: build it again with `diffsr gallery "
                              "build`")
        files = [Path(self.root) / m.name for m in matches]
        gone = [str(f) for f in files if not f.is_file()]
        if gone:
            raise DiffsrError(f"gallery photos {gone} are gone: build the index again over {self.root}")
        stored = {name: sha for name, sha in self.photos.values()}
        changed = [str(f) for f, m in zip(files, matches) if _sha256(f) != stored[m.name]]
        if changed:  # picked by the old photo's embedding
            raise DiffsrError(f"gallery photos {changed} changed since the index was built: build it again over "
                              f"{self.root}")
        return files


def photo_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DiffsrError(f"photo folder not found: {folder}")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in PHOTO_SUFFIXES)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _unreadable(path: Path) -> str:
    """Why Pillow cannot read a photo file (its header and structure checked without decoding it), or ''."""
    try:
        with Image.open(path) as img:
            if img.width * img.height > MAX_INPUT_PIXELS:
                return f"{img.width}x{img.height}, above the {MAX_INPUT_PIXELS} pixel limit"
            img.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        return str(e) or type(e).__name__
    return ""


def _chunks(items: list[Path], size: int) -> Iterator[list[Path]]:
    for i in range(0, len(items), size):
        yield items[i: i + size]


def build_gallery(folder: Path, out: Path, encoder: Encoder,
                  on_progress: Callable[[Progress], None] | None = None) -> tuple[Gallery, int, int, int]:
    """Embed a folder's photos into the index at `out` (made, or brought up to date: only new or changed photos are
    embedded, photos no longer in the folder dropped). (the gallery, photos embedded, kept, dropped)."""
    files = photo_files(folder)
    if not files:
        raise DiffsrError(f"no photos in {folder} (looked for {', '.join(PHOTO_SUFFIXES)})")
    if out.exists() and not out.is_dir():
        raise DiffsrError(f"--out {out} is a file: give the index's folder (made if new)")
    try:  # now, not after the embedding
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DiffsrError(f"cannot make the index folder {out}: {e.strerror}") from None
    gallery = Gallery.load(out) if (out / PHOTOS_FILE).exists() else Gallery(encoder.spec.projection_dim, encoder.digest)
    if gallery.encoder != encoder.digest or gallery.dim != encoder.spec.projection_dim:
        raise DiffsrError(f"{out} was built with another gallery encoder: build a new index (its vectors would not "
                          "compare with this encoder's)")
    root = str(folder.resolve())
    if gallery.root and gallery.root != root:
        raise DiffsrError(f"{out} indexes the photos of {gallery.root}, not {root}: build a new index for {folder}")
    gallery.root = root
    hashes = {p: _sha256(p) for p in files}
    names = {p: p.relative_to(folder).as_posix() for p in files}
    held = {n: h for n, h in gallery.photos.values()}
    current = set(names.values())
    changed = {n for n, h in held.items() if n in current and h != hashes[folder / n]}
    gone = set(held) - current
    gallery.remove(gone | changed)
    todo = [p for p in files if names[p] not in held or names[p] in changed]
    broken = [f"{p}: {why}" for p in todo if (why := _unreadable(p))]
    if broken:  # before the embedding, which may take minutes
        raise DiffsrError(f"{len(broken)} photo(s) in {folder} do not decode; remove or mend them: {'; '.join(broken[:5])}")
    for done, chunk in enumerate(_chunks(todo, encoder.batch)):
        gallery.add([names[p] for p in chunk], [hashes[p] for p in chunk], encoder([load_image(p) for p in chunk]))
        if on_progress is not None:
            on_progress(Progress("gallery", "photos", min((done + 1) * encoder.batch, len(todo)), len(todo)))
    gallery.save(out)
    return gallery, len(todo), len(files) - len(todo), len(gone)


def nearest(gallery: Gallery, encoder: Encoder, photo: NDArray[np.uint8], k: int) -> list[Match]:
    """The `k` gallery photos most like `photo`."""
    if gallery.encoder != encoder.digest:
        raise DiffsrError("the gallery was built with another gallery encoder than this checkpoint's")
    return gallery.search(encoder([photo]), k)[0]


def torch_encoder(ckpt: Checkpoint, batch: int = 16) -> Encoder:
    """The checkpoint's gallery encoder on PyTorch (CPU): what builds and searches a gallery."""
    spec = ckpt.model.attachment("gallery_encoder")
    if not isinstance(spec, GalleryEncoder):
        raise DiffsrError(f"{ckpt.path} has no gallery_encoder/: add one with `diffsr init --gallery-encoder clip-tiny`, "
                          "or copy a CLIP vision folder (CLIPVisionModelWithProjection) there")
    module = load_submodule(ckpt, "gallery_embed")
    return Encoder(spec, lambda pixels: module(pixel_values=pixels), batch)


def picked_references(index: Path | Gallery, encoder: Encoder, photo: NDArray[np.uint8],
                      k: int) -> tuple[list[Path], list[Match]]:
    """The `k` photos of a gallery (or the one at `index`) most like a request's photo: (their files, the matches),
    nearest first."""
    gallery = index if isinstance(index, Gallery) else Gallery.load(index)
    matches = nearest(gallery, encoder, photo, k)
    return gallery.files(matches), matches
