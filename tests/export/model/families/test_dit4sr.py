"""The dit4sr family: SD3.5's MM-DiT with DiT4SR's LR stream, three text encoders, flow matching.

The official DiT4SR class cannot be imported here (it is not a package); its shared parts are held to
diffusers' own `SD3Transformer2DModel`, its weight names to the official layout, and the whole family goes
through a new checkpoint, the export, parity and the in-process pipeline on two backends."""

from __future__ import annotations

import pytest
import torch
from diffusers import SD3Transformer2DModel

from diffsr.app.measure.parity import check_parity, psnr_db
from diffsr.calib.data import photo
from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.precision import Precision
from diffsr.export.graphs.manifest import read_manifest
from diffsr.export.model.checkpoint import load_submodule
from diffsr.export.model.families import preset
from diffsr.export.model.families.dit4sr import DiT4SR
from diffsr.export.model.families.dit4sr_networks import DiT4SRTransformer
from diffsr.export.model.settings import Request
from diffsr.runtime.loading import load_pipeline


@pytest.fixture(scope="module")
def dit4sr(dit4sr_checkpoint, dit4sr_onnx):
    return dit4sr_checkpoint, dit4sr_onnx


def _seeded_transformer() -> DiT4SRTransformer:
    torch.manual_seed(0)
    net = DiT4SRTransformer(preset("dit4sr-tiny").transformer_config()).eval()
    with torch.no_grad():  # the control layers the official code zero-initialises, alive here
        for name, p in net.named_parameters():
            if "control" in name:
                p.normal_(0, 0.05)
    return net


def test_without_the_lr_stream_the_transformer_is_diffusers_sd35():
    """The shared parts (patch and positional embedding, AdaLN, joint and dual attention with RMS QK-norm, the
    MLP, the output) on a non-square latent: diffusers' class, loaded strictly with the same weights."""
    ours = _seeded_transformer()
    config = preset("dit4sr-tiny").transformer_config()
    theirs = SD3Transformer2DModel(**config).eval()
    shared = {k: v for k, v in ours.state_dict().items() if k in theirs.state_dict()}
    theirs.load_state_dict(shared, strict=True)
    g = torch.Generator().manual_seed(1)
    sample, ctx = torch.randn(2, 16, 8, 12, generator=g), torch.randn(2, 101, 96, generator=g)
    pooled, t = torch.randn(2, 80, generator=g), torch.tensor([999.0, 250.0])
    with torch.no_grad():
        want = theirs(hidden_states=sample, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t).sample
        got = ours.velocity(sample, t, ctx, pooled)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-6


def test_the_weights_are_the_official_layout():
    """Beyond SD3.5's: per block the attention's four control projections and the MLP's depthwise conv, and in
    the dual-attention blocks attn2's control projections plus the text projections the official attn2 is
    built with (unused, but in the published files): 474 tensors at full size."""
    with torch.device("meta"):
        ours = set(DiT4SRTransformer(preset("dit4sr").transformer_config()).state_dict())
        sd35 = set(SD3Transformer2DModel(**preset("dit4sr").transformer_config()).state_dict())
    extra = ours - sd35
    assert sd35 <= ours and len(extra) == 24 * 10 + 13 * 18
    assert "transformer_blocks.0.attn2.to_add_out.weight" in extra and "transformer_blocks.13.attn2.to_q.weight" not in ours
    assert {k.split(".", 2)[2] for k in extra if k.startswith("transformer_blocks.23.")} == {
        f"{m}.{p}" for m in ("attn.to_q_control", "attn.to_k_control", "attn.to_v_control", "attn.to_out_control",
                             "ff.control_conv") for p in ("weight", "bias")}
    assert "pos_embed.pos_embed" in ours  # persistent: loaded from the published file, not recomputed


def _official_attention(attn, hidden, context):
    """DiT4SR's processor, statement for statement as the official code orders it (square grids, `chunk`, the
    LR keys computed and then replaced by the noisy keys normalised twice)."""
    b, heads = hidden.shape[0], attn.heads
    split = lambda t: t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)  # noqa: E731
    xs, xc = hidden.chunk(2, dim=1)
    residual_c = xc
    q, k, v = split(attn.to_q(xs)), split(attn.to_k(xs)), split(attn.to_v(xs))
    qc = split(attn.to_q_control(attn.to_q(xc)))
    kc = split(attn.to_k_control(attn.to_k(xc)))
    vc = split(attn.to_v_control(attn.to_v(xc)))
    q, qc = attn.norm_q(q), attn.norm_q(qc)
    k = attn.norm_k(k)
    kc = attn.norm_k(k)
    q, k, v = torch.cat([q, qc], 2), torch.cat([k, kc], 2), torch.cat([v, vc], 2)
    if context is not None:
        q = torch.cat([q, attn.norm_added_q(split(attn.add_q_proj(context)))], 2)
        k = torch.cat([k, attn.norm_added_k(split(attn.add_k_proj(context)))], 2)
        v = torch.cat([v, split(attn.add_v_proj(context))], 2)
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, hidden.shape[-1])
    img, txt = o[:, : hidden.shape[1]], o[:, hidden.shape[1]:]
    if context is not None and not attn.context_pre_only:
        txt = attn.to_add_out(txt)
    o_s, o_c = img.chunk(2, dim=1)
    return torch.cat([attn.to_out[0](o_s), attn.to_out_control(o_c + residual_c)], dim=1), txt


def _official_ff(ff, hidden):
    a = ff.net[1](ff.net[0](hidden))
    a_s, a_c = a.chunk(2, dim=1)
    side = int(a_c.shape[1] ** 0.5)
    g = ff.control_conv(a_c.reshape(a.shape[0], side, side, -1).permute(0, 3, 1, 2))
    a_s = a_s + 1.2 * g.reshape(a.shape[0], a.shape[-1], -1).permute(0, 2, 1)
    return ff.net[2](torch.cat([a_s, a_c], dim=1))


def _official_forward(net, sample, lr, ctx, pooled, t):
    h, w = sample.shape[-2:]
    x = torch.cat([net.pos_embed(sample), net.pos_embed(lr)], dim=1)  # diffusers' own patch embedding
    temb, ctx = net.time_text_embed(t, pooled), net.context_embedder(ctx)
    for block in net.transformer_blocks:
        if block.use_dual_attention:
            nx, gate, shift_mlp, scale_mlp, gate_mlp, nx2, gate2 = block.norm1(x, emb=temb)
        else:
            nx, gate, shift_mlp, scale_mlp, gate_mlp = block.norm1(x, emb=temb)
        if block.context_pre_only:
            nctx = block.norm1_context(ctx, temb)
        else:
            nctx, c_gate, c_shift, c_scale, c_gate_mlp = block.norm1_context(ctx, emb=temb)
        out, ctx_out = _official_attention(block.attn, nx, nctx)
        x = x + gate.unsqueeze(1) * out
        if block.use_dual_attention:
            x = x + gate2.unsqueeze(1) * _official_attention(block.attn2, nx2, None)[0]
        nx = block.norm2(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        x = x + gate_mlp.unsqueeze(1) * _official_ff(block.ff, nx)
        if not block.context_pre_only:
            ctx = ctx + c_gate.unsqueeze(1) * ctx_out
            nctx = block.norm2_context(ctx) * (1 + c_scale[:, None]) + c_shift[:, None]
            ctx = ctx + c_gate_mlp.unsqueeze(1) * block.ff_context(nctx)
    x = net.proj_out(net.norm_out(x.chunk(2, dim=1)[0], temb))
    p = net.config.patch_size
    x = x.reshape(x.shape[0], h // p, w // p, p, p, -1)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], -1, h, w)


def test_the_lr_stream_is_the_official_codes():
    """Against the official forward written out statement for statement (on the square latents it takes):
    the LR queries and values through the stacked control projections, its keys the noisy ones normalised
    twice, the residual before `to_out_control`, attn2 with the LR tokens, the 1.2-weighted depthwise conv."""
    net = _seeded_transformer()
    g = torch.Generator().manual_seed(3)
    sample, lr = torch.randn(2, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
    ctx, pooled, t = torch.randn(2, 101, 96, generator=g), torch.randn(2, 80, generator=g), torch.tensor([900.0, 40.0])
    with torch.no_grad():
        want = _official_forward(net, sample, lr.repeat(2, 1, 1, 1), ctx, pooled, t)
        got = net(sample, t, lr, ctx, pooled)
    assert float((got - want).abs().max() / want.abs().max()) <= 1e-6


def test_the_lr_latent_steers_the_velocity():
    net = _seeded_transformer()
    g = torch.Generator().manual_seed(2)
    sample, lr = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g)
    ctx, pooled, t = torch.randn(1, 101, 96, generator=g), torch.randn(1, 80, generator=g), torch.tensor([500.0])
    with torch.no_grad():
        a, b = net(sample, t, lr, ctx, pooled), net(sample, t, lr.flip(-1), ctx, pooled)
    assert not torch.allclose(a, b, atol=1e-4) and torch.isfinite(a).all()


def test_a_new_checkpoint_is_sd35_layout_with_the_official_defaults(dit4sr):
    ckpt, _ = dit4sr
    assert isinstance(ckpt.model, DiT4SR)
    assert {p.name for p in ckpt.path.iterdir()} == {
        "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3", "transformer",
        "vae", "scheduler", "diffsr.json", "captioner"}  # the session's dit4sr checkpoint has a captioner (conftest)
    d = ckpt.defaults
    assert (d.steps, d.guidance_scale, d.scheduler, d.tile_overlap) == (40, 8.0, "flow-euler", 24)
    ids = ckpt.tokenizer()(["a photo of a cat", ""])
    assert ids["input_ids_3"].shape == (2, 24) and ids["input_ids"].shape == (2, 77)
    t5 = ids["input_ids_3"]
    assert t5[1, 0] == 1 and t5[1, 1:].max() == 0 and (t5[0] == 1).sum() == 1  # ends with </s>, pads with 0
    with pytest.raises(DiffsrError, match=r"'ddim' samples a diffusion process.*\['flow-euler'\]"):
        load_pipeline("torch", ckpt)(Request(photo("coffee", (16, 16)), d.replace(scheduler="ddim")))


def test_the_lr_encoder_is_the_shifted_scaled_posterior_mean(dit4sr):
    ckpt, _ = dit4sr
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(ckpt.path / "vae")).float().eval()
    image = torch.rand(1, 3, 32, 48) * 2 - 1
    with torch.no_grad():
        want = (vae.encode(image).latent_dist.mean - 0.0609) * 1.5305
        got = load_submodule(ckpt, "lr_encoder")(image)
    assert float((got - want).abs().max()) <= 1e-5


def test_export_and_parity_hold_every_submodule(dit4sr):
    ckpt, onnx_dir = dit4sr
    report = check_parity(ckpt, onnx_dir, size=(32, 24), steps=3, shapes=("min", "odd"))
    assert {o.submodule for o in report.outputs} == set(ckpt.model.submodules)
    assert report.passed, report.to_json()


def test_fp16_graphs_hold_the_image(dit4sr):
    """FP16 (T5 and the transformer through the FP16 check): every submodule within FP16's tolerance, the
    image >= 30 dB; the timestep embedding's Sin and Cos (arguments up to 1000) are among what the check kept FP32."""
    ckpt, onnx_dir = dit4sr
    report = check_parity(ckpt, onnx_dir, Precision.FP16, size=(32, 24), steps=3, shapes=("min",))
    assert {o.submodule for o in report.outputs} == set(ckpt.model.submodules)
    assert report.passed, report.to_json()
    kept = read_manifest(onnx_dir)["submodules"]["transformer"]["fp16"]["kept_fp32"]
    assert {"Sin", "Cos"} <= {k["op_type"] for k in kept}, kept


def test_int8_transformer_holds_the_image_on_unseen_photos(dit4sr, tmp_path):
    """`diffsr quantize` on the transformer (Q/DQ on its linears), one calibration photo over 3 steps; the
    INT8 pipeline >= 30 dB of FP32 on the held-out photos."""
    import onnx
    from typer.testing import CliRunner

    from diffsr.app.cli.main import app

    ckpt, onnx_dir = dit4sr
    out = tmp_path / "onnx"
    result = CliRunner().invoke(app, ["quantize", "--checkpoint", str(ckpt.path), "--onnx", str(onnx_dir), "--out", str(out),
                                      "--calib-size", "1", "--calib-steps", "3"])
    assert result.exit_code == 0, result.output
    graph = onnx.load(str(out / "transformer.int8.onnx"), load_external_data=False).graph
    produced = {o: n for n in graph.node for o in n.output}
    quantized = [n for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in produced
                 and produced[n.input[1]].op_type == "DequantizeLinear"]
    assert len(quantized) >= 20, len(quantized)
    report = check_parity(ckpt, out, Precision.INT8, size=(32, 24), steps=3, shapes=("min",))
    assert [o.submodule for o in report.outputs] == ["transformer"]
    assert all(i.psnr_db >= 30.0 for i in report.images) and report.passed, report.to_json()
    assert report.outputs[0].rel > 1e-4  # INT8 really ran


def test_the_pipeline_on_two_backends_at_any_size(dit4sr):
    """A non-square photo with odd sides comes back at exactly 4x on PyTorch and ONNX Runtime, the same image;
    tiled too (64 px tiles)."""
    ckpt, onnx_dir = dit4sr
    image = photo("coffee", (29, 22))
    config = ckpt.defaults.replace(steps=4)
    torch_image = load_pipeline("torch", ckpt)(Request(image, config)).image
    ort_image = load_pipeline("onnxruntime", ckpt, onnx_dir=onnx_dir)(Request(image, config)).image
    assert torch_image.shape == ort_image.shape == (88, 116, 3)
    assert psnr_db(torch_image, ort_image) >= 45
    tiled = load_pipeline("torch", ckpt)(Request(image, config.replace(tile=8, tile_overlap=2))).image
    assert tiled.shape == (88, 116, 3)


def test_the_triton_repository_serves_its_submodules(dit4sr):
    """Both flavours' configs: the five submodules, the step stage batched (onnxruntime), the three
    token inputs of the preprocessing (T5's at the checkpoint's fixed length)."""
    from diffsr.triton_models.repository import ServingOptions, model_configs

    ckpt, _ = dit4sr
    for flavour, batch in (("onnxruntime", 4), ("tensorrt", 0)):
        configs = model_configs(ckpt, flavour, ServingOptions(entry="ensemble", step_batch=batch))
        assert set(ckpt.model.submodules) <= set(configs)
        assert configs["transformer"].max_batch_size == batch and configs["vae_decoder"].max_batch_size == 0
        ids = {i.name: list(i.dims) for i in configs["preprocess"].output if i.name.startswith("input_ids")}
        assert ids == {"input_ids": [-1, 77], "input_ids_2": [-1, 77], "input_ids_3": [-1, 24]}, ids


@pytest.fixture(scope="module")
def without_t5(dit4sr_checkpoint, tmp_path_factory):
    """dit4sr-tiny as diffusers allows it without T5: no text_encoder_3/ nor tokenizer_3/, and the
    checkpoint says so (`text_encoder_3: false` in diffsr.json's model)."""
    import json
    import shutil

    from diffsr.export.model.checkpoint import open_checkpoint

    path = shutil.copytree(dit4sr_checkpoint.path, tmp_path_factory.mktemp("no-t5") / "ck")
    shutil.rmtree(path / "text_encoder_3")
    shutil.rmtree(path / "tokenizer_3")
    meta = json.loads((path / "diffsr.json").read_text())
    meta["model"]["text_encoder_3"] = False
    (path / "diffsr.json").write_text(json.dumps(meta))
    return open_checkpoint(path)


def test_without_t5_the_prompt_has_zeros_for_t5s_tokens(without_t5, dit4sr_checkpoint):
    """Four submodules, two tokenisers, and the image of the full checkpoint's pipeline with T5's output
    replaced by zeros (diffusers' `_get_t5_prompt_embeds` without a T5); the full checkpoint's T5 does
    change the image."""
    from diffsr.runtime.loading import load_runners
    from diffsr.runtime.pipeline import Pipeline

    assert without_t5.model.with_attachments(()).submodules == ("text_encoder", "lr_encoder", "transformer", "vae_decoder")
    assert set(without_t5.tokenizer()(["a cat"])) == {"input_ids", "input_ids_2"}
    image = photo("coffee", (24, 16))
    config = dit4sr_checkpoint.defaults.replace(steps=2, caption="never")  # the default prompt, not a caption
    dropped = load_pipeline("torch", without_t5)(Request(image, config)).image
    runners = load_runners("torch", dit4sr_checkpoint)
    t5 = runners["t5_encoder"]

    class Zeros:  # the full checkpoint's T5, its output zeroed
        def __getattr__(self, name):
            return getattr(t5, name)

        def infer(self, feeds):
            return {k: torch.zeros_like(v) for k, v in t5.infer(feeds).items()}

    zeroed = Pipeline({**runners, "t5_encoder": Zeros()}, dit4sr_checkpoint)(Request(image, config)).image
    full = Pipeline(runners, dit4sr_checkpoint)(Request(image, config)).image
    assert (dropped == zeroed).all() and (dropped != full).any()


def test_without_t5_the_repository_has_no_t5(without_t5):
    from diffsr.triton_models.repository import ServingOptions, model_configs

    configs = model_configs(without_t5, "onnxruntime", ServingOptions(entry="ensemble"))
    assert "t5_encoder" not in configs and "text_encoder" in configs
    ids = {i.name for i in configs["preprocess"].output if i.name.startswith("input_ids")}
    assert ids == {"input_ids", "input_ids_2"}
