"""Train the demo model (preset `demo`) on BSD100 with bicubic x4 degradation, on the CPU, seeded.

    python scripts/train_demo.py --data ../shared/data/sr-benchmarks/bsd100 --out checkpoints/demo-x4

Two stages, one seed, fixed iteration counts (the same torch build and thread count give the same weights):

1. autoencoder: the factor-4 VAE (encoder, quant conv, post-quant conv, decoder) as a plain autoencoder on
   HR crops: L1 on pixels plus a small penalty on the latent's size. Its latent is then normalised per
   channel (mean 0, std 1 over the training crops) by folding the statistics into the quant conv and the
   post-quant conv, so the checkpoint's scaling factor stays 1.0 and the decoder's output is unchanged.
   The LQ encoder's encoder starts as (and stays) this encoder.
2. diffusion: the LQ encoder's fusion layers, the fusion transformer, ControlNet and UNet, with the VAE and
   the text encoder frozen: the epsilon objective of the checkpoint's own DDPM schedule (SD's), Min-SNR-5
   weighted, on the latents of HR crops, conditioned on the LQ crop (downscaled x4 with antialiased bicubic,
   quantised to 8 bits, upsampled by the pipeline's own bicubic) and on the default prompt's text states
   (the text encoder keeps its seeded weights: the prompt is a constant, so the model runs unguided, guidance
   1.0 in its diffsr.json).

The checkpoint is written after each stage (and every `--save-every` iterations) as `diffsr init` lays one
out, weights in FP16; `train_log.json` beside its weights holds the loss curve and the wall time.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from diffsr.export.model.checkpoint import Checkpoint, open_checkpoint, stored_weights
from diffsr.export.model.families.sd_networks import ControlNetUNet, TextEncoder
from diffsr.export.model.random_init import STORED_DTYPE, init_checkpoint
from diffsr.runtime.prompts import prompt_of

SCALE = 4
TRAINED = ("vae", "lq_encoder", "fusion_transformer", "controlnet", "unet")
AE_LR, DIFFUSION_LR = 1e-3, 2e-4
# the trained model's settings in its diffsr.json: unguided (no negative branch was trained); from the LQ
# latent noised to the first step, and the wavelet colour fix (each worth 1.8 and 0.2 dB on the astronaut
# photo against starting from noise and AdaIN); tiles of 32 latent cells (128 px), nearer the 12-cell crops
# it was trained on than one 128-cell tile, and half the time: the fusion transformer attends across a
# whole tile (docs/demo_model.md)
PIPELINE = {"guidance_scale": 1.0, "start": "lq", "color_fix": "wavelet", "tile": 32}
LQ_FROZEN = ("encoder.", "quant_conv.")  # the LQ encoder's copy of the VAE encoder


def load_images(folder: Path) -> list[torch.Tensor]:
    paths = sorted(folder.glob("*.png"))
    if not paths:
        raise SystemExit(f"no PNG images in {folder}")
    return [torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1).contiguous() for p in paths]


def crops(images: list[torch.Tensor], batch: int, side: int, rng: random.Random) -> torch.Tensor:
    """(batch, 3, side, side) uint8 HR crops, randomly flipped and rotated."""
    out = []
    for _ in range(batch):
        img = images[rng.randrange(len(images))]
        y, x = rng.randrange(img.shape[1] - side + 1), rng.randrange(img.shape[2] - side + 1)
        c = img[:, y:y + side, x:x + side]
        if rng.random() < 0.5:
            c = c.flip(2)
        out.append(torch.rot90(c, rng.randrange(4), (1, 2)))
    return torch.stack(out)


def to_unit(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 127.5 - 1.0


def degrade(hr: torch.Tensor) -> torch.Tensor:
    """uint8 HR crops -> the pipeline's LQ input: x4 down (antialiased bicubic, as MATLAB's imresize), 8 bits,
    then up with `runtime.image.upsample`'s bicubic, clamped to [-1, 1]."""
    side = hr.shape[-1]
    lr = F.interpolate(hr.float(), scale_factor=1 / SCALE, mode="bicubic", antialias=True, align_corners=False)
    lr = lr.round().clamp(0, 255)
    return F.interpolate(to_unit(lr), size=(side, side), mode="bicubic", align_corners=False).clamp(-1.0, 1.0)


def load_component(ckpt: Checkpoint, folder: str) -> nn.Module:
    component = ckpt.model.components()[folder]
    net = component.build(ckpt.path / folder)
    state = {k: v.float() for k, v in load_file(str(ckpt.path / folder / component.weights)).items()}
    net.load_state_dict(state, strict=True)
    return net


def save_component(ckpt: Checkpoint, folder: str, net: nn.Module) -> None:
    weights = ckpt.path / folder / ckpt.model.components()[folder].weights
    stored = sorted(stored_weights(ckpt, folder).stored())  # the stored keys (persistent buffers included): headers only
    state = net.state_dict()
    save_file({k: state[k].detach().to(STORED_DTYPE if state[k].is_floating_point() else state[k].dtype).contiguous()
               for k in stored}, str(weights), {"format": "pt"})


def encode(vae: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return vae.quant_conv(vae.encoder(x))[:, : vae.config.latent_channels]  # the mean: a plain autoencoder


def decode(vae: nn.Module, z: torch.Tensor) -> torch.Tensor:
    return vae.decoder(vae.post_quant_conv(z))


@torch.no_grad()
def normalise_latent(vae: nn.Module, sample: torch.Tensor) -> tuple[list[float], list[float]]:
    """Fold the latent's per-channel mean and std over `sample` into the quant convs: z' = (z - m) / s."""
    z = encode(vae, sample)
    m, s = z.mean((0, 2, 3)), z.std((0, 2, 3))
    c, q, p = len(m), vae.quant_conv, vae.post_quant_conv
    q.weight[:c] /= s.view(c, 1, 1, 1)
    q.bias[:c] = (q.bias[:c] - m) / s
    p.bias += (p.weight[:, :, 0, 0] @ m)  # W (s z' + m) + b
    p.weight *= s.view(1, c, 1, 1)
    return m.tolist(), s.tolist()


def cosine_lr(step: int, total: int, peak: float, warmup: int = 200) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def plot_log(log_path: Path, png: Path) -> None:
    """The loss curves of a run's train_log.json, both stages side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = json.loads(log_path.read_text())
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for ax, stage, what in ((axes[0], "autoencoder", "L1 (+ latent penalty)"), (axes[1], "diffusion", "Min-SNR-5 epsilon MSE")):
        ax.plot([e["iter"] for e in log[stage]], [e["loss"] for e in log[stage]])
        ax.set(title=f"{stage}: {what}", xlabel="iteration (batch 16)", yscale="log")
        ax.grid(alpha=0.3)
    fig.suptitle(f"demo model, seed {log['seed']}, {log['threads']} CPU threads: {log['wall_s'] / 60:.0f} min")
    fig.tight_layout()
    fig.savefig(png, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/sr-benchmarks/bsd100"))
    ap.add_argument("--out", type=Path, help="the checkpoint folder to write")
    ap.add_argument("--plot", nargs=2, type=Path, metavar=("LOG", "PNG"), help="only plot a run's train_log.json")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ae-iters", type=int, default=4000)
    ap.add_argument("--diffusion-iters", type=int, default=4500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--ae-crop", type=int, default=32, help="the autoencoder's HR crop side in pixels")
    ap.add_argument("--crop", type=int, default=48, help="the diffusion stage's HR crop side (latent side: crop / 4)")
    ap.add_argument("--from-autoencoder", type=Path, default=None,
                    help="start from this run's checkpoint after its autoencoder stage (skip stage 1)")
    ap.add_argument("--save-every", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.plot is not None:
        return plot_log(*args.plot)
    if args.out is None:
        ap.error("--out is required")

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    rng = random.Random(args.seed)
    images = load_images(args.data)
    if args.out.exists():
        shutil.rmtree(args.out)
    ckpt = init_checkpoint("demo", args.seed, args.out)
    nets = {folder: load_component(ckpt, folder) for folder in (*TRAINED, "text_encoder")}
    log: dict = {"seed": args.seed, "threads": args.threads, "batch": args.batch, "ae_crop": args.ae_crop, "crop": args.crop,
                 "images": len(images), "torch": torch.__version__, "autoencoder": [], "diffusion": []}
    started = time.perf_counter()

    def write(stage: str) -> None:
        for folder in TRAINED:
            save_component(ckpt, folder, nets[folder])
        log["wall_s"] = round(time.perf_counter() - started, 1)
        log["last_stage"] = stage
        (args.out / "train_log.json").write_text(json.dumps(log, indent=1) + "\n")

    # --- 1. autoencoder -------------------------------------------------------------------------
    if args.from_autoencoder is not None:
        done = open_checkpoint(args.from_autoencoder)
        nets.update({folder: load_component(done, folder) for folder in TRAINED})
        previous = json.loads((args.from_autoencoder / "train_log.json").read_text())
        log.update({k: previous[k] for k in ("autoencoder", "latent_mean", "latent_std", "ae_crop")})
        log["autoencoder_wall_s"] = previous["wall_s"]
        args.ae_iters = 0
        rng = random.Random(args.seed + 1)  # the diffusion stage's crops differ from a full run's
    vae = nets["vae"].train()
    opt = torch.optim.AdamW(vae.parameters(), lr=AE_LR, weight_decay=0.0)
    t0, running = time.perf_counter(), 0.0
    for it in range(args.ae_iters):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(it, args.ae_iters, AE_LR)
        x = to_unit(crops(images, args.batch, args.ae_crop, rng))
        z = encode(vae, x)
        recon = decode(vae, z)
        loss = F.l1_loss(recon, x) + 1e-4 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        running += loss.item()
        if (it + 1) % 50 == 0:
            mse = F.mse_loss(recon.detach().clamp(-1, 1), x).item()
            entry = {"iter": it + 1, "loss": round(running / 50, 5), "psnr": round(10 * math.log10(4 / mse), 2),
                     "s": round(time.perf_counter() - t0, 1)}
            log["autoencoder"].append(entry)
            print("autoencoder", entry, flush=True)
            running = 0.0
        if (it + 1) % args.save_every == 0:
            write("autoencoder")
    vae.eval().requires_grad_(False)
    if args.ae_iters:
        mean, std = normalise_latent(vae, to_unit(crops(images, 256, args.crop, rng)))
        log["latent_mean"], log["latent_std"] = mean, std
    lq_encoder = nets["lq_encoder"]
    with torch.no_grad():
        for name, p in lq_encoder.named_parameters():
            if name.startswith(LQ_FROZEN):
                p.copy_(vae.get_parameter(name))
    write("autoencoder")

    # --- 2. diffusion ---------------------------------------------------------------------------
    from diffusers import DDPMScheduler

    alphas = DDPMScheduler.from_config(ckpt.scheduler_config).alphas_cumprod.float()
    snr = alphas / (1 - alphas)
    tokens = ckpt.tokenizer()([prompt_of(ckpt.defaults, None)])  # the prompt it runs with (no captioner)
    with torch.no_grad():
        text = TextEncoder(nets["text_encoder"].eval())(torch.from_numpy(tokens["input_ids"]))  # (1, 77, D)
    step_net = ControlNetUNet(nets["controlnet"], nets["unet"]).train()
    fusion = nets["fusion_transformer"].train()
    lq_encoder.train()
    trainable = [p for n, p in lq_encoder.named_parameters() if not n.startswith(LQ_FROZEN)]
    for n, p in lq_encoder.named_parameters():
        p.requires_grad_(not n.startswith(LQ_FROZEN))
    trainable += [*fusion.parameters(), *step_net.parameters()]
    opt = torch.optim.AdamW(trainable, lr=DIFFUSION_LR, weight_decay=1e-2)
    t0, running = time.perf_counter(), 0.0
    for it in range(args.diffusion_iters):
        for g in opt.param_groups:
            g["lr"] = cosine_lr(it, args.diffusion_iters, DIFFUSION_LR)
        hr = crops(images, args.batch, args.crop, rng)
        with torch.no_grad():
            x0 = encode(vae, to_unit(hr))
        f1, _ = lq_encoder(degrade(hr))
        t = torch.randint(0, len(alphas), (args.batch,))
        eps = torch.randn_like(x0)
        a = alphas[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
        f2 = fusion(f1, xt)
        pred = step_net(xt, t.float(), text.expand(args.batch, -1, -1), f2)
        weight = (snr[t].clamp(max=5.0) / snr[t]).view(-1, 1, 1, 1)  # Min-SNR-5 for epsilon
        loss = (weight * (pred - eps).pow(2)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        running += loss.item()
        if (it + 1) % 50 == 0:
            entry = {"iter": it + 1, "loss": round(running / 50, 5), "s": round(time.perf_counter() - t0, 1)}
            log["diffusion"].append(entry)
            print("diffusion", entry, flush=True)
            running = 0.0
        if (it + 1) % args.save_every == 0:
            write("diffusion")
    write("done")
    meta = json.loads((args.out / "diffsr.json").read_text())
    meta["pipeline"].update(PIPELINE)
    (args.out / "diffsr.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"trained in {log['wall_s'] / 60:.1f} min; checkpoint in {args.out}")
    open_checkpoint(args.out)  # it reads back


if __name__ == "__main__":
    main()
