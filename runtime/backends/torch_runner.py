"""The PyTorch reference backend: the checkpoint's modules, called eagerly."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from export.signatures import Signature
from runtime.backends.base import Runner


class TorchRunner(Runner):
    def __init__(self, signature: Signature, module: nn.Module, device: torch.device | str = "cpu"):
        super().__init__(signature)
        self.module = module.to(device)

    @torch.inference_mode()
    def _infer(self, feed: Mapping[str, torch.Tensor], dims: Mapping[str, int]) -> dict[str, torch.Tensor]:
        out = self.module(*(feed[t.name] for t in self.signature.inputs))
        out = out if isinstance(out, tuple) else (out,)
        return {t.name: o for t, o in zip(self.signature.outputs, out)}
