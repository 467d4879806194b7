"""diffsr's XPSR networks against the official classes (github qyp2000/XPSR, `models/xpsr/`), both ways:

1. the official `ControlNetModel` and `UNet2DConditionModel` load a checkpoint `diffsr init` wrote (its controlnet/
   and unet/ folders) strictly: no missing or unexpected tensor;
2. the step graph (`controlnet_unet`, its conditioning embedding from `lr_encoder`) equals the official forward
   (ControlNet, then UNet with its residuals) in FP32 at a non-square latent, at three timesteps, with CFG's two rows;
3. diffsr loads the folders the official classes save (`save_pretrained`, as the release was written) and gives the
   same output again.

    python scripts/xpsr_official_check.py --official DIR [--preset xpsr-tiny] [--work /tmp/xpsr-check]

DIR holds the release's `models/xpsr/` (a checkout of qyp2000/XPSR). The release pins diffusers 0.21; the few names
diffusers has moved since are aliased here at import (nothing of the release is changed or copied), `basicsr` (for
RRDB, which the release's ControlNet does not build) is stubbed, and `einops` is PyPI's (`pip install einops`).
Needs the official code, so it is not part of the test suite; its result is in docs/xpsr.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import types
from pathlib import Path

import torch


def official_classes(folder: Path) -> tuple[type, type]:
    """The release's ControlNetModel and UNet2DConditionModel, imported under today's diffusers."""
    import diffusers.loaders
    import diffusers.models
    import diffusers.models.attention
    import diffusers.models.embeddings
    from diffusers.models.normalization import AdaGroupNorm
    from diffusers.models.transformers import dual_transformer_2d, transformer_2d

    diffusers.loaders.FromOriginalControlnetMixin = type("FromOriginalControlnetMixin", (), {})  # 0.21's mixin
    diffusers.models.attention.AdaGroupNorm = AdaGroupNorm
    diffusers.models.embeddings.PositionNet = diffusers.models.embeddings.GLIGENTextBoundingboxProjection
    sys.modules["diffusers.models.dual_transformer_2d"] = dual_transformer_2d
    sys.modules["diffusers.models.transformer_2d"] = transformer_2d
    rrdb = types.ModuleType("basicsr.archs.rrdbnet_arch")
    rrdb.RRDB = None  # the release's ControlNet builds it only with use_rrdb, which its config sets False
    for name, module in (("basicsr", types.ModuleType("basicsr")), ("basicsr.archs", types.ModuleType("basicsr.archs")),
                         ("basicsr.archs.rrdbnet_arch", rrdb)):
        sys.modules.setdefault(name, module)
    sys.path.insert(0, str(folder))
    from models.xpsr.controlnet import ControlNetModel
    from models.xpsr.unet_2d_condition import UNet2DConditionModel

    return ControlNetModel, UNet2DConditionModel


def load_strictly(cls: type, folder: Path) -> torch.nn.Module:
    model, info = cls.from_pretrained(str(folder), output_loading_info=True, low_cpu_mem_usage=False)
    bad = {k: v for k, v in info.items() if v}
    if bad:
        raise SystemExit(f"{cls.__name__} does not load {folder} strictly: {bad}")
    return model.eval()


def main() -> None:
    from diffsr.export.model.checkpoint import load_submodule, open_checkpoint
    from diffsr.export.model.random_init import init_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--official", type=Path, required=True)
    ap.add_argument("--preset", default="xpsr-tiny")
    ap.add_argument("--work", type=Path, default=Path("/tmp/xpsr-check"))
    args = ap.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    ckpt = init_checkpoint(args.preset, 0, args.work / "checkpoint")
    ControlNet, UNet = official_classes(args.official)
    controlnet, unet = load_strictly(ControlNet, ckpt.path / "controlnet"), load_strictly(UNet, ckpt.path / "unet")
    report: dict[str, object] = {"preset": args.preset, "strict_load": "both folders, no missing or unexpected tensor"}

    model = ckpt.model
    f, d = model.latent_factor, model.config.text_hidden
    h, w = 3 * model.latent_multiple, 5 * model.latent_multiple  # non-square
    g = torch.Generator().manual_seed(0)
    lq = torch.rand(1, 3, f * h, f * w, generator=g) * 2 - 1
    sample = torch.randn(2, 4, h, w, generator=g)
    high, low = torch.randn(2, 77, d, generator=g), torch.randn(2, 77, d, generator=g)

    def official(t: float) -> torch.Tensor:
        ts = torch.tensor(t)
        down, mid = controlnet(sample, ts, encoder_hidden_states=high, controlnet_cond=((lq + 1) / 2).repeat(2, 1, 1, 1),
                               lowlevel_encoder_hidden_states=low, return_dict=False)[2:4]
        return unet(sample, ts, high, low, down_block_additional_residuals=down, mid_block_additional_residual=mid,
                    return_dict=False)[0]

    def ours(ckpt_: object) -> object:
        encoder, step = load_submodule(ckpt_, "lr_encoder"), load_submodule(ckpt_, "controlnet_unet")

        def run(t: float) -> torch.Tensor:
            cond = encoder(lq)[0]
            return step(sample, torch.full((2,), t), high, low, cond)

        return run

    def compare(run: object, label: str) -> None:
        with torch.no_grad():
            for t in (951.0, 501.0, 1.0):
                want, got = official(t), run(t)  # type: ignore[operator]
                rel = float((got - want).norm() / want.norm())
                report[f"{label} t={int(t)}"] = rel
                print(f"{label}, t={int(t)}: relative error {rel:.2e}")
                if not rel <= 1e-4:
                    raise SystemExit(f"{label} differs from the official forward at t={t}: {rel:.2e}")

    compare(ours(ckpt), "diffsr's checkpoint")
    # 3. the folders as the official classes save them, loaded by diffsr
    saved = args.work / "saved"
    shutil.copytree(ckpt.path, saved)
    for folder, net in (("controlnet", controlnet), ("unet", unet)):
        shutil.rmtree(saved / folder)
        net.save_pretrained(str(saved / folder))
    compare(ours(open_checkpoint(saved)), "the official save")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
