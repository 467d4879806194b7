"""The sisrm family: SegFormer as transformers has it, SD-2's ControlNet and UNet as diffusers has them, and SISRM's
segmentation attention, mask fusion and label words as the paper's equations give them.

No code or weights of SISRM are public: its equations are written out here, and every network it builds on is held to
its library's own class.
"""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file

from diffsr.app.measure.parity import check_parity
from diffsr.calib.data import photo
from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.precision import Precision
from diffsr.export.model.checkpoint import load_submodule, open_checkpoint
from diffsr.export.model.families import preset
from diffsr.export.model.families.sisrm import ADE20K
from diffsr.export.model.families.sisrm_networks import SegmentationAttention, add_segmentation_attention
from diffsr.runtime.loading import load_runners
from diffsr.runtime.pipeline import Pipeline
from diffsr.runtime.requests import parse_request
from diffsr.runtime.stages import prepare
from tests.conftest import diffusers_strict


def _segformer(folder):
    from transformers import SegformerForSemanticSegmentation, SegformerImageProcessorPil

    model, info = SegformerForSemanticSegmentation.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info.values()), info  # nothing missing, unexpected or mismatched
    return model.float().eval(), SegformerImageProcessorPil.from_pretrained(str(folder))


def _request(ckpt, lq, tiles=None, **values):
    """A parsed request of `lq`; `tiles`: the tiling it runs with."""
    request = parse_request(ckpt.model, ckpt.defaults, {"image": lq, **values})
    return dataclasses.replace(request, settings=request.settings.replace(**(tiles or {})))


def test_the_sisrm_preset_is_sd2_base_with_segformer_b2():
    """SeeSR's base (SD-2-base: linear projections, heads of 64 channels, OpenCLIP-H's 1024-wide states at 23 layers)
    and SegFormer-B2 on ADE20K's 150 classes, named as transformers' checkpoints name them."""
    model = preset("sisrm")
    nets = model.networks()
    unet, seg, text = nets["unet"][1], nets["segmenter"][1], nets["text_encoder"][1]
    assert unet["attention_head_dim"] == [5, 10, 20, 20] and unet["use_linear_projection"]
    assert unet["cross_attention_dim"] == 1024 and (text["hidden_size"], text["num_hidden_layers"]) == (1024, 23)
    assert seg["hidden_sizes"] == [64, 128, 320, 512] and seg["depths"] == [3, 4, 6, 3] and seg["decoder_hidden_size"] == 768
    assert len(seg["id2label"]) == 150 and seg["id2label"][7] == "bed " and seg["id2label"][149] == "flag"
    semantic = nets["semantic"][1]
    assert len(semantic["unet_blocks"]) == 16 and len(semantic["controlnet_blocks"]) == 7  # SD's transformer blocks


def test_transformers_and_diffusers_load_the_folders_as_they_stand(sisrm_checkpoint):
    from diffusers import ControlNetModel, UNet2DConditionModel

    path = sisrm_checkpoint.path
    model, processor = _segformer(path / "segmenter")
    assert model.config.id2label == dict(enumerate(ADE20K)) and processor.size == {"height": 128, "width": 128}
    diffusers_strict(UNet2DConditionModel, path / "unet")
    diffusers_strict(ControlNetModel, path / "controlnet")


def test_the_segmenter_graph_is_transformers_on_its_processors_pixels(sisrm_checkpoint, sisrm_onnx):
    """The photo as the folder's image processor prepares it, through the exported graph (ONNX Runtime): transformers'
    logits, num_labels x H/4 x W/4."""
    import onnxruntime as ort

    model, processor = _segformer(sisrm_checkpoint.path / "segmenter")
    rgb = photo("coffee", (70, 45))
    pixels = sisrm_checkpoint.model.view(rgb, sisrm_checkpoint.path)["pixel_values"]
    theirs = processor(images=rgb, return_tensors="pt")["pixel_values"]
    assert torch.equal(pixels, theirs) and pixels.shape == (1, 3, 128, 128)
    session = ort.InferenceSession(str(sisrm_onnx / "segmenter.onnx"), providers=["CPUExecutionProvider"])
    ours = session.run(None, {"pixel_values": pixels.numpy()})[0]
    with torch.no_grad():
        expected = model(pixel_values=theirs).logits.numpy()
    assert ours.shape == (1, 150, 32, 32)
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-4)


def test_a_published_segformer_folder_loads_in_diffsr(sisrm_checkpoint, tmp_path):
    """A SegFormer folder as transformers publishes one (`save_pretrained` of another width, its image processor
    without a resize) replaces the checkpoint's: diffsr's segmenter is that model, its photo the processor's of the
    photo resized to sides the graphs take (multiples of 4, 128 to 256 px for sisrm-tiny), and the pipeline runs on
    it."""
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessorPil

    path = tmp_path / "ckpt"
    shutil.copytree(sisrm_checkpoint.path, path)
    shutil.rmtree(path / "segmenter")
    torch.manual_seed(1)
    config = SegformerConfig(hidden_sizes=[16, 16, 32, 32], depths=[1, 1, 1, 1], num_attention_heads=[1, 1, 2, 2],
                             decoder_hidden_size=24, id2label=dict(enumerate(ADE20K)))
    published = SegformerForSemanticSegmentation(config).eval()
    published.save_pretrained(str(path / "segmenter"))
    SegformerImageProcessorPil(do_resize=False).save_pretrained(str(path / "segmenter"))
    ckpt = open_checkpoint(path)
    rgb = photo("astronaut", (150, 130))  # (width, height)
    pixels = ckpt.model.view(rgb, path)["pixel_values"]
    resized = np.asarray(Image.fromarray(rgb).resize((152, 132), Image.Resampling.BICUBIC))
    assert torch.equal(pixels, SegformerImageProcessorPil(do_resize=False)(resized, return_tensors="pt")["pixel_values"])
    assert ckpt.model.view(photo("astronaut", (300, 40)), path)["pixel_values"].shape == (1, 3, 128, 256)
    with torch.no_grad():
        ours = load_submodule(ckpt, "segmenter")(pixels)
        theirs = published(pixel_values=pixels).logits
    assert torch.allclose(ours, theirs, atol=1e-5) and ours.shape == (1, 150, 33, 38)
    result = Pipeline(load_runners("torch", ckpt), ckpt)(_request(ckpt, photo("astronaut", (30, 26)), steps=1))
    assert result.image.shape == (104, 120, 3)


def test_the_segmenter_sees_the_prepared_photos_frame(sisrm_checkpoint):
    """A photo whose prepared frame is padded (37 x 21 px -> 148 x 84 out, padded to 160 x 96): the segmenter's pixels
    are its processor's of the photo edge-padded to 40 x 24 px, the frame at the photo's own pixels, so its map (which
    the labeller stretches over the frame) lines up with the prepared photo."""
    ckpt = sisrm_checkpoint
    rgb = photo("coffee", (37, 21))
    tensors = prepare(ckpt.model, _request(ckpt, rgb), ckpt.path)
    assert tensors["lq_image"].shape[-2:] == (96, 160)
    edged = np.concatenate([rgb, np.repeat(rgb[-1:], 3, axis=0)])
    edged = np.concatenate([edged, np.repeat(edged[:, -1:], 3, axis=1)], axis=1)
    _, processor = _segformer(ckpt.path / "segmenter")
    assert torch.equal(tensors["pixel_values"], processor(images=edged, return_tensors="pt")["pixel_values"])


@pytest.mark.parametrize("broken, message", [
    ("classes", "names 149 classes; the label generator scores 150"),
    ("size", "its size .* must be multiples of 4 from 128 to 256 px"),
    ("processor", "its image processor does not load"),
])
def test_a_segmenter_folder_a_request_cannot_use_is_refused_on_opening(sisrm_checkpoint, tmp_path, broken, message):
    """Before any weights load, naming the file: id2label's classes not the label generator's, a processor's size
    the graphs do not take, a processor config that does not parse."""
    path = tmp_path / "ckpt"
    shutil.copytree(sisrm_checkpoint.path, path)
    config, processor = path / "segmenter" / "config.json", path / "segmenter" / "preprocessor_config.json"
    if broken == "classes":
        data = json.loads(config.read_text())
        data["id2label"].pop("149")
        config.write_text(json.dumps(data))
    elif broken == "size":
        processor.write_text(json.dumps(json.loads(processor.read_text()) | {"size": {"height": 130, "width": 128}}))
    else:
        processor.write_text("{")
    with pytest.raises(DiffsrError, match=message):
        open_checkpoint(path)


def test_the_segmentation_attention_is_eq_7_and_8():
    """A transformer block whose text cross-attention is followed by the segmentation attention, written out: t the
    text attention on the normalised states h, s the mask tokens E attended to by (h + t), the block's output its input
    plus t plus s; with E zero the block is diffusers' own."""
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(0)
    block = BasicTransformerBlock(16, 2, 8, cross_attention_dim=12).eval()
    plain = BasicTransformerBlock(16, 2, 8, cross_attention_dim=12).eval()
    plain.load_state_dict(block.state_dict())
    seg = SegmentationAttention(16, 2, 10).eval()
    tokens: dict[str, torch.Tensor] = {}
    holder = torch.nn.Module()
    holder.block = block
    add_segmentation_attention(holder, torch.nn.ModuleList([seg]), tokens)
    x, c, e = torch.randn(2, 15, 16), torch.randn(2, 7, 12), torch.randn(2, 6, 10)
    with torch.no_grad():
        tokens["mask"] = e
        got = block(x, encoder_hidden_states=c)
        h1 = x + block.attn1(block.norm1(x))
        h = block.norm2(h1)
        t = block.attn2.to_out[0](_attend(block.attn2.to_q(h), block.attn2.to_k(c), block.attn2.to_v(c), 2))
        s = seg.to_out(_attend(seg.to_q(h + t), seg.to_k(e), seg.to_v(e), 2))
        h2 = h1 + t + s
        expected = h2 + block.ff(block.norm3(h2))
        tokens["mask"] = torch.zeros_like(e)
        zeroed, theirs = block(x, encoder_hidden_states=c), plain(x, encoder_hidden_states=c)
    assert torch.allclose(got, expected, atol=1e-5) and (s.abs().max() > 1e-2)
    assert torch.allclose(zeroed, theirs, atol=1e-6)


def _attend(q, k, v, heads):
    """softmax(q k^T / sqrt(d)) v per head, (B, N, C) in and out."""
    b, n, c = q.shape
    split = lambda t: t.reshape(b, t.shape[1], heads, c // heads).transpose(1, 2)  # noqa: E731
    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / (c // heads) ** 0.5, dim=-1)
    return (weights @ split(v)).transpose(1, 2).reshape(b, n, c)


def test_the_step_is_sd_controlnet_with_mask_fused_residuals(sisrm_checkpoint):
    """The step graph's module against diffusers' ControlNetModel and UNet2DConditionModel on the same folders, at a
    non-square latent with guidance's doubled rows: E_m zero and M one give SD's ControlNet step; E_m zero and any M
    give the UNet fed M * each ControlNet residual (Eq. 10, M average-pooled to the residual's sides); E_m moves it."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    ckpt = sisrm_checkpoint
    step = load_submodule(ckpt, "controlnet_unet")
    controlnet = diffusers_strict(ControlNetModel, ckpt.path / "controlnet")
    unet = diffusers_strict(UNet2DConditionModel, ckpt.path / "unet")
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(4, 4, 8, 12, generator=g), torch.randn(4, 77, 32, generator=g)
    t = torch.tensor([700.0, 31.0, 700.0, 31.0])
    lq = torch.rand(2, 3, 64, 96, generator=g)
    mask = torch.rand(2, 1, 8, 12, generator=g)
    zero = torch.zeros(2, 16, 8, 12)
    with torch.no_grad():
        cond = controlnet.controlnet_cond_embedding(lq)
        down, mid = controlnet(x, t, text, torch.cat([lq, lq]), return_dict=False)
        plain = unet(x, t, text, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
        ones = step(x, t, text, cond, zero, torch.ones_like(mask))
        masks = torch.cat([mask, mask])
        pooled = [F.avg_pool2d(masks, masks.shape[-1] // r.shape[-1]) * r for r in [*down, mid]]
        fused = unet(x, t, text, down_block_additional_residuals=pooled[:-1],
                     mid_block_additional_residual=pooled[-1]).sample
        ours = step(x, t, text, cond, zero, mask)
        moved = step(x, t, text, cond, torch.randn(zero.shape, generator=g), mask)
    assert torch.allclose(ones, plain, atol=1e-5)
    assert torch.allclose(ours, fused, atol=1e-5) and (ours - plain).abs().max() > 1e-3
    assert (moved - ours).abs().max() > 1e-3


def _label_words(ckpt, rgb, k):
    """The label generator written out: the segmentation's (the SegFormer logits' softmax over classes) global
    average, the linear layer, softmax, the top k classes' `id2label` names; the photo framed as the pipeline frames
    it (`rgb` is one whose prepared frame is not padded)."""
    model, processor = _segformer(ckpt.path / "segmenter")
    weights = load_file(ckpt.path / "semantic" / "model.safetensors")
    with torch.no_grad():
        logits = model(pixel_values=processor(images=rgb, return_tensors="pt")["pixel_values"]).logits
        scores = torch.softmax(F.linear(logits.softmax(1).mean((2, 3)), weights["label_generator.weight"].float(),
                                        weights["label_generator.bias"].float()), -1)[0]
    return ", ".join(model.config.id2label[i] for i in scores.topk(k).indices.tolist())


def test_the_label_words_join_the_prompt(sisrm_checkpoint):
    """The prompt the image is made with: the label words and the suffix; a typed prompt first, verbatim; `labels`
    words (none: the suffix alone, or the typed prompt alone)."""
    ckpt = sisrm_checkpoint
    pipe = Pipeline(load_runners("torch", ckpt), ckpt)
    rgb = photo("chelsea", (40, 28))
    suffix = ckpt.defaults.caption_suffix
    words = _label_words(ckpt, rgb, 5)
    assert len(words.split(", ")) == 5 and all(w in ADE20K for w in words.split(", "))
    assert pipe(_request(ckpt, rgb, steps=1)).prompt == f"{words}, {suffix}"
    assert pipe(_request(ckpt, rgb, steps=1, prompt="a cat", labels=2)).prompt == \
        f"a cat, {_label_words(ckpt, rgb, 2)}, {suffix}"
    assert pipe(_request(ckpt, rgb, steps=1, labels=0)).prompt == suffix
    assert pipe(_request(ckpt, rgb, steps=1, prompt="a cat", labels=0)).prompt == "a cat"


def test_the_segmentation_changes_the_image_and_runs_once_per_request(sisrm_checkpoint):
    """Over tiles, two a call: the segmenter and the label generator run once whatever the steps, the mask encoder
    once per batch of tiles. Another segmentation (every cell sky; no label words, so the prompt is the same) moves
    every step's noise prediction and so the image; the pipeline being deterministic, the segmentation alone moved it
    (seeded weights move it by little: PyTorch's initialisation keeps the new attentions' outputs small)."""
    ckpt = sisrm_checkpoint
    runners = load_runners("torch", ckpt)
    pipe = Pipeline(runners, ckpt)
    request = _request(ckpt, photo("coffee", (37, 21)), dict(tile=8, tile_overlap=2, tile_batch=2), steps=2, labels=0)
    seen: dict[str, int] = {}
    predictions: dict[bool, list[torch.Tensor]] = {False: [], True: []}

    def run(name, sky=False, **feed):
        seen[name] = seen.get(name, 0) + 1
        out = dict(runners[name].infer(feed))
        if name == "labeller" and sky:
            out["segmentation"] = F.one_hot(torch.full(out["segmentation"].shape[-2:], ADE20K.index("sky")),
                                            len(ADE20K)).permute(2, 0, 1)[None].float()
        if name == "controlnet_unet":
            predictions[sky].append(out["noise_pred"])
        return out

    pipe.run = run
    first = pipe(request).image
    counts = dict(seen)
    again = pipe(request).image
    pipe.run = lambda name, **feed: run(name, sky=True, **feed)
    other = pipe(request).image
    assert counts["segmenter"] == counts["labeller"] == 1
    assert counts["mask_encoder"] == counts["lr_encoder"] > 1 and counts["controlnet_unet"] == 2 * counts["lr_encoder"]
    ours, theirs = predictions[False][0], predictions[True][0]
    assert (ours - theirs).norm() / ours.norm() > 1e-3
    assert np.array_equal(first, again) and not np.array_equal(first, other)


def test_export_and_parity_cover_every_graph(sisrm_checkpoint, sisrm_onnx):
    report = check_parity(sisrm_checkpoint, sisrm_onnx, steps=2)
    assert report.passed, report.to_json()
    assert {o.submodule for o in report.outputs} == set(sisrm_checkpoint.model.submodules)
    assert min(i.psnr_db for i in report.images) >= 45


def test_fp16_graphs_hold_the_image(sisrm_checkpoint, sisrm_onnx):
    """FP16 (through the FP16 check): every graph within FP16's tolerance at the smallest shapes, and the image."""
    report = check_parity(sisrm_checkpoint, sisrm_onnx, Precision.FP16, size=(32, 24), steps=3, shapes=("min",))
    assert report.passed, report.to_json()
    assert min(i.psnr_db for i in report.images) >= 40


@pytest.mark.parametrize("labels", [-1, 21])
def test_a_label_count_out_of_range_is_refused(sisrm_checkpoint, labels):
    with pytest.raises(DiffsrError, match="labels"):
        _request(sisrm_checkpoint, photo("coffee", (20, 20)), labels=labels)



def test_a_prompting_stage_reads_the_photos_alone():
    """A prompting stage runs before the texts are tokenised: one that reads token ids (or a later stage's outputs), or
    runs over tiles, is refused when the family is checked."""
    from diffsr.export.model.families.sisrm import SISRM
    from diffsr.export.model.parts import Stage

    stages = SISRM.stages
    for once in ((Stage("text_encoder", "text", prompting=True), *stages.once[2:]),
                 (stages.once[0], dataclasses.replace(stages.once[1], tiled=True), *stages.once[2:])):
        bad = type("Bad", (SISRM,), {"stages": dataclasses.replace(stages, once=once)})
        with pytest.raises(DiffsrError, match="prompting stage .* must be untiled and read only photos"):
            bad(SISRM.presets["sisrm-tiny"]).check_stages()
