"""The refsr family: LDM x4 as diffusers has it, and the preprint's reference parts.

No code or weights of the preprint are public: its attention is written out here as its text gives it (each reference
attended to alone, the results aggregated), and the base model is held to diffusers' own LDM super-resolution pipeline.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from diffsr.app.measure.parity import check_parity
from diffsr.calib.data import photo
from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.precision import Precision
from diffsr.export.model.checkpoint import load_submodule
from diffsr.export.model.families import preset
from diffsr.export.model.families.refsr_networks import LevelAttention, decoder_levels
from diffsr.export.model.settings import Request
from diffsr.runtime.loading import load_runners
from diffsr.runtime.pipeline import Pipeline
from diffsr.runtime.requests import parse_request
from diffsr.runtime.stages import run_once
from diffsr.runtime.tiling import tiling_for
from tests.conftest import diffusers_strict


def test_the_refsr_preset_is_ldm_x4():
    """LDM x4's UNet takes its 3-channel latent with the RGB LR photo after it (6 in, 3 out), 160 wide over four
    levels; its VQ autoencoder halves twice (factor 4) and holds 8192 codes; the encoder copies start as the UNet's."""
    model = preset("refsr")
    nets = model.networks()
    unet, vq = nets["unet"][1], nets["vqvae"][1]
    assert (unet["_class_name"], unet["in_channels"], unet["out_channels"]) == ("UNet2DModel", 6, 3)
    assert unet["block_out_channels"] == [160, 320, 320, 640] and unet["attention_head_dim"] == 32
    assert (vq["_class_name"], vq["num_vq_embeddings"], model.latent_factor) == ("VQModel", 8192, 4)
    shapes = {name: {k: tuple(v.shape) for k, v in net.state_dict().items()} for name, (net, _) in nets.items()}
    key = "lr_encoder.down_blocks.1.resnets.0.conv1.weight"
    assert model.copy_source("reference", key, shapes) == "unet/down_blocks.1.resnets.0.conv1.weight"
    assert model.copy_source("reference", "lr_encoder.conv_in.weight", shapes) == "reference/lr_encoder.conv_in.weight"
    assert decoder_levels(4) == (2, 1, 0, 0)  # each up block's output: halved twice, once, then full size twice


def test_diffusers_loads_the_base_folders_strictly(refsr_checkpoint):
    from diffusers import UNet2DModel, VQModel

    path = refsr_checkpoint.path
    diffusers_strict(UNet2DModel, path / "unet")
    diffusers_strict(VQModel, path / "vqvae")


def test_without_references_the_pipeline_is_diffusers_ldm_super_resolution(refsr_checkpoint):
    """No references: the stages that read them do not run, the residuals are zero, and the whole pipeline (the LR
    photo beside the latent, DDIM, the VQ decoder's quantisation) is diffusers' LDMSuperResolutionPipeline on the
    same folders, from the same seeded noise, step for step."""
    from diffusers import DDIMScheduler, LDMSuperResolutionPipeline, UNet2DModel, VQModel
    from PIL import Image

    ckpt = refsr_checkpoint
    lr = photo("coffee", (64, 32))  # sides multiples of 32: diffusers' preprocessing resizes nothing
    settings = ckpt.defaults.replace(steps=4, seed=3, tile=64)
    ours = Pipeline(load_runners("torch", ckpt), ckpt)(Request(lr, settings))
    pipe = LDMSuperResolutionPipeline(vqvae=diffusers_strict(VQModel, ckpt.path / "vqvae"),
                                      unet=diffusers_strict(UNet2DModel, ckpt.path / "unet"),
                                      scheduler=DDIMScheduler.from_config(ckpt.scheduler_config))
    theirs = pipe(Image.fromarray(lr), num_inference_steps=4, eta=0.0, generator=torch.Generator().manual_seed(3),
                  output_type="np").images[0]
    assert ours.image.shape == (128, 256, 3) == theirs.shape
    assert np.abs(ours.image.astype(int) - np.round(theirs * 255).astype(int)).max() <= 1


def test_the_step_with_zero_residuals_is_the_unet(refsr_checkpoint):
    """At a non-square latent, with weights drawn so that every input moves the output: the step graph's module on
    zero residuals equals UNet2DModel's forward on [latent, LR photo]; residuals move it."""
    from diffusers import UNet2DModel

    step = load_submodule(refsr_checkpoint, "unet")
    unet = diffusers_strict(UNet2DModel, refsr_checkpoint.path / "unet")
    g = torch.Generator().manual_seed(0)
    x, lr = torch.randn(2, 3, 8, 12, generator=g), torch.rand(2, 3, 8, 12, generator=g) * 2 - 1
    t = torch.tensor([700.0, 31.0])
    zero = torch.zeros(2, 80, 8, 12)
    with torch.no_grad():
        ours = step(x, t, lr, zero)
        theirs = unet(torch.cat([x, lr], 1), t).sample
        moved = step(x, t, lr, torch.randn(zero.shape, generator=g))
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    assert (moved - ours).abs().max() > 1e-2


def test_the_attention_is_each_reference_alone_then_their_mean():
    """One decoder level's attention written out as the preprint's text gives it: for each reference, LR queries
    attend (softmax(q k^T / sqrt(d)) v, per head) to that reference's keys and values alone; the results' mean,
    projected. The module's result is that, and the same whatever the references' order."""
    torch.manual_seed(0)
    attn = LevelAttention(16, 24, head_dim=4, groups=4, eps=1e-5, bands=3).eval()  # rows in three bands
    lr, refs = torch.randn(2, 16, 3, 5), torch.randn(3, 16, 4, 4)
    with torch.no_grad():
        kv = attn.keys_values(refs)
        got = attn(lr, kv, "mean")
        shuffled = attn(lr, kv[[2, 0, 1]], "mean")
        q = attn.to_q(attn.norm_query(lr).flatten(2).transpose(1, 2))  # (B, 15, 16)
        outs = []
        for r in range(3):
            tokens = attn.norm_reference(refs[r:r + 1]).flatten(2).transpose(1, 2)
            k, v = attn.to_k(tokens), attn.to_v(tokens)  # (1, 16, 16)
            heads = []
            for h in range(4):
                qh, kh, vh = (t[..., 4 * h:4 * h + 4] for t in (q, k, v))
                heads.append(torch.softmax(qh @ kh.transpose(1, 2) / 2.0, -1) @ vh)
            outs.append(torch.cat(heads, -1))
        expected = attn.to_out(torch.stack(outs).mean(0)).transpose(1, 2).reshape(2, 24, 3, 5)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(shuffled, got, atol=1e-6)


def _request(ckpt, lr, names, tiles=None, **values):
    """A parsed request of `lr` with references of these (name, size) photos; `tiles`: the tiling it runs with."""
    refs = [photo(n, size) for n, size in names]
    request = parse_request(ckpt.model, ckpt.defaults, {"image": lr, "references": refs, **values})
    return dataclasses.replace(request, settings=request.settings.replace(**(tiles or {})))


def test_references_change_the_image_and_their_order_does_not(refsr_checkpoint):
    """On a non-square photo over several tiles: one reference moves the image away from none; two references in
    either order give the same image; ten of odd sizes and modes run."""
    ckpt = refsr_checkpoint
    pipe = Pipeline(load_runners("torch", ckpt), ckpt)
    lr = photo("chelsea", (37, 21))
    tiles = dict(steps=2, seed=1, tile=8, tile_overlap=2)
    none = pipe(_request(ckpt, lr, [], tiles)).image
    one = pipe(_request(ckpt, lr, [("coffee", (50, 31))], tiles)).image
    ab = pipe(_request(ckpt, lr, [("coffee", (50, 31)), ("rocket", (17, 60))], tiles)).image
    ba = pipe(_request(ckpt, lr, [("rocket", (17, 60)), ("coffee", (50, 31))], tiles)).image
    assert none.shape == one.shape == (84, 148, 3)
    assert np.abs(none.astype(int) - one.astype(int)).mean() > 0.5
    assert np.abs(ab.astype(int) - ba.astype(int)).max() <= 1
    ten = _request(ckpt, lr, [(n, (13 + 7 * i, 40 - 3 * i)) for i, n in enumerate(["camera", "astronaut"] * 5)], tiles)
    assert pipe(ten).image.shape == (84, 148, 3) and "references" in pipe.timings
    with pytest.raises(DiffsrError, match="references: 11 photos given; send 0 to 10"):
        _request(ckpt, lr, [("camera", (8, 8))] * 11)


def test_a_request_without_references_runs_no_reference_stage(refsr_checkpoint):
    ckpt = refsr_checkpoint
    runners, calls = load_runners("torch", ckpt), []

    def run(name, **feeds):
        calls.append(name)
        return runners[name].infer(feeds)

    request = _request(ckpt, photo("camera", (16, 16)), [])
    from diffsr.runtime.requests import check
    from diffsr.runtime.stages import prepare

    plan = check(ckpt.model, request.settings, ckpt.scheduler_config, request.photo.shape[:2])
    tiled, _ = run_once(ckpt.model, run, prepare(ckpt.model, request, ckpt.path), tiling_for(ckpt.model, request.settings))
    assert calls == ["lr_encoder"] and plan.size == (64, 64)
    assert tiled["reference_residuals"].shape == (1, 80, 16, 16) and not tiled["reference_residuals"].any()
    assert set(tiled) == {"lr_image", "z_lq", "reference_residuals"}  # the step reads the LR photo's tile too


def test_guidance_and_prompts_are_refused_and_the_prompt_is_not_read(refsr_checkpoint):
    """LDM x4 has no text: a guidance scale or a prompt is refused with the request, in its words (a prompt was ignored
    silently); a prompt tokenises to nothing."""
    ckpt = refsr_checkpoint
    pipe = Pipeline(load_runners("torch", ckpt), ckpt)
    for setting, message in (({"guidance_scale": 3.0}, "guidance_scale=3.0: the refsr family has no text conditioning"),
                             ({"prompt": "a cat"}, "prompt='a cat': the refsr family has no text conditioning"),
                             ({"negative_prompt": "blur"}, "negative_prompt='blur': the refsr family")):
        with pytest.raises(DiffsrError, match=message):
            pipe.plan(_request(ckpt, photo("camera", (16, 16)), [], **setting))
    assert ckpt.model.tokenizer(ckpt.path)(["anything"]) == {}


def test_export_and_parity_cover_the_reference_path(refsr_checkpoint, refsr_onnx):
    """Every graph against PyTorch at three shapes (references 1, 4 and 3), and the pipeline with references and with
    none."""
    report = check_parity(refsr_checkpoint, refsr_onnx, steps=2)
    assert report.passed, report.to_json()
    assert [i.photo for i in report.images] == ["astronaut", "astronaut, no references"]
    assert {o.submodule for o in report.outputs} == set(refsr_checkpoint.model.submodules)
    assert min(i.psnr_db for i in report.images) >= 45


def test_the_reference_stages_run_once_per_request_whatever_the_steps(refsr_checkpoint):
    """With references, over tiles four a call: the reference encoder runs once and the attention once per batch of
    tiles, for one step as for five, each batch sharing the references' rows as they are (not copied per tile); the
    step runs every step (its count grows, theirs does not). Summed rather than averaged, the attention gives the
    same image whatever the tiles per call."""
    ckpt = refsr_checkpoint
    runners = load_runners("torch", ckpt)
    pipe = Pipeline(runners, ckpt)
    counts: list[dict[str, int]] = []
    rows: list[int] = []

    def counted(seen, name, **feed):
        seen[name] = seen.get(name, 0) + 1
        if name == "reference_attention":
            rows.append(feed["reference_kv"].shape[0])
        return runners[name].infer(feed)

    refs = [("coffee", (50, 31)), ("rocket", (20, 9)), ("camera", (33, 33))]
    for steps in (1, 5):
        seen: dict[str, int] = {}
        pipe.run = lambda name, seen=seen, **feed: counted(seen, name, **feed)
        pipe(_request(ckpt, photo("chelsea", (37, 21)), refs, dict(steps=steps, tile=8, tile_overlap=2, tile_batch=4)))
        counts.append(seen)
    assert counts[0]["reference_encoder"] == counts[1]["reference_encoder"] == 1
    assert counts[0]["reference_attention"] == counts[1]["reference_attention"] == 7  # 28 tiles, four a call
    assert set(rows) == {3} and counts[1]["unet"] == 5 * counts[0]["unet"]


def test_summed_references_do_not_depend_on_the_tiles_per_call(refsr_checkpoint, tmp_path):
    import shutil

    from diffsr.export.model.checkpoint import open_checkpoint

    path = tmp_path / "summed"
    shutil.copytree(refsr_checkpoint.path, path)
    config = json.loads((path / "reference" / "config.json").read_text())
    (path / "reference" / "config.json").write_text(json.dumps(config | {"aggregation": "sum"}))
    ckpt = open_checkpoint(path)
    pipe = Pipeline(load_runners("torch", ckpt), ckpt)
    refs = [("coffee", (50, 31)), ("rocket", (20, 9)), ("camera", (33, 33))]
    images = [pipe(_request(ckpt, photo("chelsea", (37, 21)), refs, dict(steps=2, tile=8, tile_overlap=2,
                                                                          tile_batch=batch))).image for batch in (1, 4)]
    assert np.abs(images[0].astype(int) - images[1].astype(int)).max() <= 1


def test_fp16_graphs_hold_the_image_with_references_and_without(refsr_checkpoint, refsr_onnx):
    """FP16 (through the FP16 check): every graph within FP16's tolerance at the smallest shapes, the pipeline with
    two references and with none."""
    report = check_parity(refsr_checkpoint, refsr_onnx, Precision.FP16, size=(32, 24), steps=3, shapes=("min",))
    assert report.passed, report.to_json()
    assert len(report.images) == 2 and min(i.psnr_db for i in report.images) >= 40
