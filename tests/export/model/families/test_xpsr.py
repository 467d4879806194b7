"""The xpsr family: XPSR's SD-1.5 ControlNet with semantic-fusion attention, its UNet with pixel attention, two prompts.

The official classes (github qyp2000/XPSR, `models/xpsr/`) cannot be imported here: scripts/xpsr_official_check.py
holds diffsr's networks to them where their code is at hand (docs/xpsr.md: strict loads both ways, the step within
1e-6). Here: the official forward written out statement for statement (the ControlNet's `forward` in `controlnet.py`,
its blocks' in `unet_2d_blocks.py`, the UNet's in `unet_2d_condition.py`) against the step graph, the release's
structure by its published counts, the request's second prompt, the export and parity, and the pipeline on two
backends."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from diffsr.app.measure.parity import check_parity
from diffsr.calib.data import photo
from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.checkpoint import load_submodule
from diffsr.export.model.families import preset
from diffsr.export.model.settings import Request
from diffsr.runtime.loading import load_pipeline
from diffsr.runtime.requests import parse_request


def _count(net: torch.nn.Module) -> tuple[int, int]:
    state = net.state_dict()
    return len(state), sum(t.numel() for t in state.values())


def test_the_release_preset_builds_the_official_networks():
    """The official classes at SD-1.5's widths (counted from their own code, on the meta device) hold a ControlNet of
    736 tensors and 620,216,909 parameters, a UNet of 998 and 1,107,755,524: the xpsr preset's, with the same names."""
    nets = preset("xpsr").networks()
    controlnet, unet = nets["controlnet"][0], nets["unet"][0]
    assert _count(controlnet) == (736, 620_216_909) and _count(unet) == (998, 1_107_755_524)
    names = set(controlnet.state_dict())
    assert {"down_blocks.0.attentions_connect.1.transformer_blocks.0.attn2.to_k.weight",
            "mid_block.attentions_lowlevel.0.proj_in.weight", "controlnet_cond_embedding.to_rgbs.2.weight",
            "conv_degradation.11.0.weight", "conv_degradation_mid.0.bias"} <= names
    assert unet.state_dict()["up_blocks.1.pixel_attentions.2.transformer_blocks.0.attn2.to_k.weight"].shape == (1280, 640)
    assert nets["controlnet"][1]["_class_name"] == "ControlNetModel" and nets["controlnet"][1]["use_lowlevel_prompt"]
    assert "mid_block_type" not in nets["controlnet"][1]  # the official class's arguments (diffusers 0.21's), no other


def test_a_request_carries_the_low_level_prompt_and_its_negative(xpsr_checkpoint):
    model, defaults = xpsr_checkpoint.model, xpsr_checkpoint.defaults
    request = parse_request(model, defaults, {"image": photo("coffee", (8, 8)), "prompt_low": "blurry, noisy"})
    assert model.input_values(request.settings) == {"prompt_low": "blurry, noisy",
                                                    "negative_prompt_low": "high resolution, best quality, clear"}
    texts = {"prompt": "a cat", "negative_prompt": "n", "prompt_low": "blurry", "negative_prompt_low": "clear"}
    ids = model.token_ids(xpsr_checkpoint.tokenizer(), texts, guided=True)["input_ids"]
    assert ids.shape == (4, 77)  # negative and positive high-level rows, then the low-level ones
    states = torch.arange(4.0).view(4, 1, 1).expand(4, 77, 32)
    cond = model.conditioning({"text_embeddings": states}, (64, 64))
    assert cond["text_embeddings"][:, 0, 0].tolist() == [0, 1] and cond["lowlevel_embeddings"][:, 0, 0].tolist() == [2, 3]
    with pytest.raises(DiffsrError, match="prompt_low must be text"):
        parse_request(model, defaults, {"image": photo("coffee", (8, 8)), "prompt_low": 3})


def _official_fusion(attn, attn_lowlevel, attn_connect, hidden, high, low):
    """`CrossAttnDownBlock2D` / `UNetMidBlock2DCrossAttn` with `use_lowlevel_prompt`: both prompts' attentions on the
    resnet's output, then `attn_connect` from the high-level result to the low-level one viewed as (B, HW, C)."""
    highlevel = attn(hidden, encoder_hidden_states=high, return_dict=False)[0]
    lowlevel = attn_lowlevel(hidden, encoder_hidden_states=low, return_dict=False)[0]
    pixels = lowlevel.view(lowlevel.shape[0], lowlevel.shape[1], -1).permute(0, 2, 1)
    return attn_connect(highlevel, encoder_hidden_states=pixels, return_dict=False)[0]


def _official_controlnet(net, sample, t, high, low, controlnet_cond):
    """`ControlNetModel.forward`: the conditioning embedding of the [0, 1] photo at every call, the down blocks, the
    mid block, the zero convolutions (conditioning scale 1)."""
    emb = net.time_embedding(net.time_proj(t).to(sample.dtype))
    embedding = torch.nn.functional.silu(net.controlnet_cond_embedding.conv_in(controlnet_cond))
    for block in net.controlnet_cond_embedding.blocks:
        embedding = torch.nn.functional.silu(block(embedding))
    sample = net.conv_in(sample) + net.controlnet_cond_embedding.conv_out(embedding)
    down_block_res_samples = (sample,)
    for block in net.down_blocks:
        if hasattr(block, "attentions_lowlevel"):
            output_states = ()
            for resnet, attn, attn_lowlevel, attn_connect in zip(block.resnets, block.attentions, block.attentions_lowlevel,
                                                                 block.attentions_connect):
                sample = resnet(sample, emb)
                sample = _official_fusion(attn, attn_lowlevel, attn_connect, sample, high, low)
                output_states = output_states + (sample,)
            for downsampler in block.downsamplers or []:
                sample = downsampler(sample)
                output_states = output_states + (sample,)
        else:
            sample, output_states = block(sample, emb)
        down_block_res_samples += output_states
    mid = net.mid_block
    sample = mid.resnets[0](sample, emb)
    for attn, attn_lowlevel, attn_connect, resnet in zip(mid.attentions, mid.attentions_lowlevel, mid.attentions_connect,
                                                         mid.resnets[1:]):
        sample = _official_fusion(attn, attn_lowlevel, attn_connect, sample, high, low)
        sample = resnet(sample, emb)
    down = [zero(r) for zero, r in zip(net.controlnet_down_blocks, down_block_res_samples)]
    return down, net.controlnet_mid_block(sample)


def _official_unet(net, sample, t, high, down_block_additional_residuals, mid_block_additional_residual):
    """`UNet2DConditionModel.forward` with a ControlNet's residuals: added to the skips and after the mid block, and
    handed to each up block (`pixelwise_hidden_states`), whose every layer ends in its pixel attention to the
    residual of its own skip, `rearrange(x, 'b c h w -> b (h w) c')`."""
    emb = net.time_embedding(net.time_proj(t).to(sample.dtype))
    sample = net.conv_in(sample)
    down_block_res_samples = (sample,)
    for block in net.down_blocks:
        if hasattr(block, "attentions"):
            sample, res_samples = block(hidden_states=sample, temb=emb, encoder_hidden_states=high)
        else:
            sample, res_samples = block(hidden_states=sample, temb=emb)
        down_block_res_samples += res_samples
    down_block_res_samples = tuple(s + r for s, r in zip(down_block_res_samples, down_block_additional_residuals))
    sample = net.mid_block(sample, emb, encoder_hidden_states=high) + mid_block_additional_residual
    residuals = list(down_block_additional_residuals)
    for i, block in enumerate(net.up_blocks):
        n = len(block.resnets)
        res_samples, down_block_res_samples = down_block_res_samples[-n:], down_block_res_samples[:-n]
        pixelwise, residuals = residuals[-n:], residuals[:-n]
        upsample_size = down_block_res_samples[-1].shape[2:] if i < len(net.up_blocks) - 1 else None
        attentions = block.attentions if hasattr(block, "attentions") else [None] * n
        for resnet, attn, pix_attn in zip(block.resnets, attentions, block.pixel_attentions):
            sample = torch.cat([sample, res_samples[-1]], dim=1)
            res_samples = res_samples[:-1]
            pixel = pixelwise[-1].permute(0, 2, 3, 1).reshape(pixelwise[-1].shape[0], -1, pixelwise[-1].shape[1])
            pixelwise = pixelwise[:-1]
            sample = resnet(sample, emb)
            if attn is not None:
                sample = attn(sample, encoder_hidden_states=high, return_dict=False)[0]
            sample = pix_attn(sample, encoder_hidden_states=pixel, return_dict=False)[0]
        for upsampler in block.upsamplers or []:
            sample = upsampler(sample, upsample_size)
    return net.conv_out(net.conv_act(net.conv_norm_out(sample)))


def test_the_step_is_the_official_forward(xpsr_checkpoint):
    """The step graph, fed `lr_encoder`'s hoisted conditioning embedding, against the official ControlNet then UNet
    written out (the embedding recomputed inside, from the [0, 1] photo, as the release does every step), FP32 at a
    non-square latent, guidance's two rows, three timesteps."""
    step = load_submodule(xpsr_checkpoint, "controlnet_unet")
    lr = load_submodule(xpsr_checkpoint, "lr_encoder")
    g = torch.Generator().manual_seed(3)
    photo_ = torch.rand(1, 3, 48, 80, generator=g) * 2 - 1  # latent 6 x 10
    sample = torch.randn(2, 4, 6, 10, generator=g)
    high, low = torch.randn(2, 77, 32, generator=g), torch.randn(2, 77, 32, generator=g)
    net = step.controlnet
    net.controlnet_cond_embedding = lr.controlnet.controlnet_cond_embedding  # the step holds none: it is hoisted
    with torch.no_grad():
        cond, _ = lr(photo_)
        for t in (951.0, 501.0, 1.0):
            timestep = torch.tensor([t, t])
            down, mid = _official_controlnet(net, sample, timestep, high, low, ((photo_ + 1) / 2).repeat(2, 1, 1, 1))
            want = _official_unet(step.unet, sample, timestep, high, down, mid)
            got = step(sample, timestep, high, low, cond)
            assert float((got - want).norm() / want.norm()) < 1e-5, t


def test_every_input_of_the_step_moves_its_output(xpsr_checkpoint):
    """Seeded weights are drawn non-zero everywhere (the zero convolutions too): the low-level prompt, the high-level
    one, the photo's embedding, the latent and the timestep each change the noise."""
    step = load_submodule(xpsr_checkpoint, "controlnet_unet")
    g = torch.Generator().manual_seed(0)
    feed = dict(sample=torch.randn(2, 4, 8, 12, generator=g), timestep=torch.tensor([500.0, 500.0]),
                text_embeddings=torch.randn(2, 77, 32, generator=g), lowlevel_embeddings=torch.randn(2, 77, 32, generator=g),
                cond_embedding=torch.randn(1, 32, 8, 12, generator=g))
    with torch.no_grad():
        base = step(**feed)
        for name in feed:
            moved = dict(feed, **{name: feed[name] + 0.5 if name != "timestep" else feed[name] - 300})
            assert not torch.allclose(step(**moved), base, atol=1e-5), name


def test_export_and_parity_hold_every_submodule(xpsr_checkpoint, xpsr_onnx):
    report = check_parity(xpsr_checkpoint, xpsr_onnx, size=(24, 20), steps=3, shapes=("min", "odd"))
    assert {o.submodule for o in report.outputs} == {"prompter_image", "prompter_prefill", "prompter_decode",
                                                     "text_encoder", "lr_encoder", "controlnet_unet", "vae_decoder"}
    assert report.passed, report.to_json()


def test_the_pipeline_on_two_backends_at_any_size(xpsr_checkpoint, xpsr_onnx):
    """A 23x17 photo comes back at exactly 92x68 on PyTorch and ONNX Runtime alike (DDPM's noise from the request's
    seed on both), tiled too; the low-level prompt reaches the image."""
    ckpt = xpsr_checkpoint
    config = ckpt.defaults.replace(steps=3, inputs={"prompt_low": "blurry, noisy, low resolution"})
    request = Request(photo("coffee", (23, 17)), config)
    torch_image = load_pipeline("torch", ckpt)(request).image
    ort_image = load_pipeline("onnxruntime", ckpt, onnx_dir=xpsr_onnx)(request).image
    assert torch_image.shape == ort_image.shape == (68, 92, 3)
    assert np.abs(torch_image.astype(int) - ort_image.astype(int)).max() <= 1
    tiled = load_pipeline("torch", ckpt)(dataclasses.replace(request, settings=config.replace(tile=8, tile_overlap=2)))
    assert tiled.image.shape == (68, 92, 3)
    other = load_pipeline("torch", ckpt)(dataclasses.replace(request, settings=config.replace(inputs={})))
    assert not np.array_equal(other.image, torch_image)
