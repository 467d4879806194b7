"""The reference gallery on real photos (skimage's) with a seeded clip-tiny gallery encoder: its graph against
transformers' `CLIPVisionModelWithProjection`, photos prepared as CLIP's image processor prepares them, an index built,
searched, brought up to date without re-embedding what it holds, reloaded; and the command line."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from diffsr.calib.data import PHOTOS, photo  # five photos
from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.attachments.clip_vision import CLIP_STD
from diffsr.export.model.attachments.gallery_encoder import GalleryEmbed, init_gallery_encoder
from diffsr.runtime.gallery import Encoder, Gallery, build_gallery, nearest
from diffsr.runtime.prompter import clip_pixels


def _model(spec):
    from transformers import CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection.from_pretrained(str(spec.path), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return init_gallery_encoder("clip-tiny", 0, tmp_path_factory.mktemp("ckpt"))


@pytest.fixture()
def encoder(spec):
    graph = GalleryEmbed(_model(spec)).eval()
    return Encoder(spec, lambda pixels: graph(pixels), batch=4)


@pytest.fixture()
def photos(tmp_path):
    """Ten photos: the calibration set and crops of it, some nested, PNG and JPEG (and a file that is no photo)."""
    folder = tmp_path / "photos"
    (folder / "more").mkdir(parents=True)
    for i, name in enumerate(PHOTOS):
        full = photo(name, None)
        Image.fromarray(full).save(folder / f"{name}.png")
        h, w = full.shape[:2]
        Image.fromarray(full[h // 4:, : w // 2]).save(folder / "more" / f"{name}-crop.jpg", quality=95)
    (folder / "notes.txt").write_text("not a photo")
    return folder


def test_the_graph_is_transformers_and_photos_are_prepared_as_clips_processor(spec):
    from transformers import AutoImageProcessor

    model = _model(spec)
    image = photo("coffee", None)[:, 60:]  # not square
    want = AutoImageProcessor.from_pretrained(str(spec.path))(images=image, return_tensors="pt").pixel_values
    pixels = clip_pixels(image, 28, 28)
    torch.testing.assert_close(pixels, want, rtol=0, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(GalleryEmbed(model)(pixels), model(pixel_values=pixels).image_embeds,
                                   rtol=1e-5, atol=1e-6)


def test_build_search_update_and_reload(encoder, photos, tmp_path):
    index = tmp_path / "index"
    gallery, added, kept, dropped = build_gallery(photos, index, encoder)
    assert (len(gallery), added, kept, dropped) == (10, 10, 0, 0)
    for name in PHOTOS:  # a gallery photo finds itself first
        first = nearest(gallery, encoder, photo(name, None), 3)[0]
        assert first.name == f"{name}.png" and first.score > 0.999
    # new photos: only they are embedded; a changed one is embedded again; a removed one is dropped
    calls = encoder.calls
    Image.fromarray(photo("coins", None)).save(photos / "coins.png")
    Image.fromarray(photo("rocket", None)[::-1]).save(photos / "more" / "rocket-crop.jpg")
    (photos / "camera.png").unlink()
    gallery, added, kept, dropped = build_gallery(photos, index, encoder)
    assert (added, kept, dropped, encoder.calls - calls) == (2, 8, 1, 2) and len(gallery) == 10
    names = {n for n, _ in gallery.photos.values()}
    assert "coins.png" in names and "camera.png" not in names
    assert sorted(gallery.photos)[-2:] == [10, 11] and gallery.next_id == 12  # new ids, none handed out twice
    reloaded = Gallery.load(index)
    query = photo("coins", None)
    assert nearest(reloaded, encoder, query, 10) == nearest(gallery, encoder, query, 10)
    assert len(nearest(reloaded, encoder, query, 50)) == 10  # k past the gallery: every photo, ranked
    scores = [m.score for m in nearest(reloaded, encoder, query, 10)]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0.999


def test_mistakes_are_refused(spec, encoder, photos, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DiffsrError, match="no photos in"):
        build_gallery(tmp_path / "empty", tmp_path / "i", encoder)
    with pytest.raises(DiffsrError, match="photo folder not found"):
        build_gallery(tmp_path / "nowhere", tmp_path / "i", encoder)
    with pytest.raises(DiffsrError, match="is not a gallery index"):
        Gallery.load(tmp_path)
    broken = tmp_path / "broken-index"
    build_gallery(photos, broken, encoder)
    meta = json.loads((broken / "photos.json").read_text())
    meta["photos"] = meta["photos"][1:]  # the two files disagree: refused, not searched with wrong names
    (broken / "photos.json").write_text(json.dumps(meta))
    with pytest.raises(DiffsrError, match="do not name the same photos"):
        Gallery.load(broken)
    gallery, *_ = build_gallery(photos, tmp_path / "index", encoder)
    with pytest.raises(DiffsrError, match="top-k 0 must be at least 1"):
        nearest(gallery, encoder, photo("coffee", None), 0)
    other_spec = init_gallery_encoder("clip-tiny", 1, tmp_path / "other")  # another seed: other vectors
    other = Encoder(other_spec, lambda pixels: GalleryEmbed(_model(other_spec))(pixels))
    with pytest.raises(DiffsrError, match="built with another gallery encoder"):
        build_gallery(photos, tmp_path / "index", other)
    with pytest.raises(DiffsrError, match="built with another gallery encoder"):
        nearest(gallery, other, photo("coffee", None), 1)
    calls = encoder.calls
    (photos / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DiffsrError, match="1 photo.* do not decode.*broken.png"):
        build_gallery(photos, tmp_path / "fresh", encoder)
    assert encoder.calls == calls  # before any photo was embedded
    (photos / "broken.png").unlink()
    (tmp_path / "a-file").write_text("")
    with pytest.raises(DiffsrError, match="is a file: give the index's folder"):
        build_gallery(photos, tmp_path / "a-file", encoder)
    with pytest.raises(DiffsrError, match="embed at least 1 photo"):
        Encoder(spec, encoder.embed, batch=0)


@pytest.mark.parametrize("damage, message", [
    (lambda i: (i / "photos.json").write_text("{"), "gallery index file is not valid JSON"),
    (lambda i: (i / "photos.json").write_text(json.dumps({k: v for k, v in json.loads((i / "photos.json").read_text())
                                                          .items() if k != "dim"})), "photos.json is malformed .*dim"),
    (lambda i: (i / "index.faiss").write_bytes((i / "index.faiss").read_bytes()[:50]), "index.faiss is no gallery index"),
], ids=["json", "key", "faiss"])
def test_a_damaged_index_is_refused_in_one_line(encoder, photos, tmp_path, damage, message):
    build_gallery(photos, tmp_path / "index", encoder)
    damage(tmp_path / "index")
    with pytest.raises(DiffsrError, match=message):
        Gallery.load(tmp_path / "index")


def test_a_gallery_photo_changed_since_the_build_is_not_used(encoder, photos, tmp_path):
    """Its vector is the old photo's: picked, it would be ranked by another photo's score."""
    gallery, *_ = build_gallery(photos, tmp_path / "index", encoder)
    match = nearest(gallery, encoder, photo("coffee", None), 1)
    assert gallery.files(match) == [photos / "coffee.png"]
    Image.fromarray(photo("astronaut", None)).save(photos / "coffee.png")
    with pytest.raises(DiffsrError, match="changed since the index was built"):
        gallery.files(match)


@pytest.mark.parametrize("sides", [(3, 51), (3, 52), (20_000, 3)], ids=["wide", "wider", "tall"])
def test_a_long_thin_photo_is_prepared_from_the_crops_region_as_clips_processor_prepares_it(spec, sides):
    """Over 16 times longer than wide: only the crop's source region is resized, not the whole photo (which took
    gigabytes at 200,000 px), and the pixels are still the processor's, within a level of 8 bits (Pillow samples the
    region with the whole photo's scale)."""
    from transformers import AutoImageProcessor

    thin = np.random.default_rng(0).integers(0, 255, (*sides, 3), dtype=np.uint8)
    want = AutoImageProcessor.from_pretrained(str(spec.path))(images=thin, return_tensors="pt",
                                                              input_data_format="channels_last").pixel_values
    level = 1 / 255 / min(CLIP_STD)
    torch.testing.assert_close(clip_pixels(thin, 28, 28), want, rtol=0, atol=level * 1.01)


def test_a_processor_config_in_the_older_integer_form_reads_as_transformers_reads_it(spec, tmp_path):
    """openai's CLIP folders write `"size": 224, "crop_size": 224`: the short side and the square."""
    from diffsr.export.model.attachments.clip_vision import clip_processing

    folder = tmp_path / "older"
    shutil.copytree(spec.path, folder)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    (folder / "preprocessor_config.json").write_text(json.dumps(config | {"size": 28, "crop_size": 28}))
    assert clip_processing(folder, 28) == clip_processing(spec.path, 28) and spec.file_errors(folder) == []


def test_a_photo_over_the_pixel_limit_is_refused_before_the_embedding(encoder, photos, tmp_path):
    Image.new("L", (4097, 4097)).save(photos / "huge.png")
    calls = encoder.calls
    with pytest.raises(DiffsrError, match="huge.png: 4097x4097, above the 16777216 pixel limit"):
        build_gallery(photos, tmp_path / "index", encoder)
    assert encoder.calls == calls


def test_the_command_line_builds_and_searches(tiny_checkpoint, photos, tmp_path):
    """`diffsr gallery build` and `search` on a checkpoint with a gallery encoder (a copy of the tiny one)."""
    from diffsr.app.cli.main import app

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint.path, ckpt)
    init_gallery_encoder("clip-tiny", 0, ckpt)
    runner = CliRunner()
    built = runner.invoke(app, ["gallery", "build", str(photos), "--checkpoint", str(ckpt), "--out", str(tmp_path / "i")])
    assert built.exit_code == 0, built.output
    assert "10 photos (10 embedded, 0 kept, 0 dropped)" in built.output
    query = tmp_path / "query.png"
    Image.fromarray(photo("astronaut", None)).save(query)
    found = runner.invoke(app, ["gallery", "search", str(query), "--checkpoint", str(ckpt), "--index", str(tmp_path / "i"),
                                "--top-k", "2"])
    assert found.exit_code == 0, found.output
    lines = found.stdout.strip().splitlines()
    assert len(lines) == 2 and lines[0].endswith("\tastronaut.png") and float(lines[0].split("\t")[0]) > 0.999
    missing = runner.invoke(app, ["gallery", "build", str(photos), "--checkpoint", str(tiny_checkpoint.path), "--out",
                                  str(tmp_path / "j")])
    assert missing.exit_code == 2 and "has no gallery_encoder/" in missing.output
    none = runner.invoke(app, ["gallery", "build", str(photos), "--checkpoint", str(ckpt), "--out", str(tmp_path / "k"),
                               "--batch", "0"])  # it made an empty index
    assert none.exit_code == 2 and "'--batch': Input should be greater than or equal to 1" in none.output, none.output
    assert np.isfinite(float(lines[1].split("\t")[0]))
