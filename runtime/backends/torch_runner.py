"""PyTorch backend: the checkpoint's modules, called eagerly.

FP32 on the CPU is the reference every other backend is held to. On CUDA (backend `torch-cuda`) the
modules run in FP16 with channels-last convolutions and PyTorch's SDPA attention kernels (the
default of diffusers' attention processors, transformers' CLIP and our own attention), and the
pipeline captures each denoising step in a CUDA graph: the GPU path where TensorRT is absent, and
the baseline TensorRT must beat. Inputs and outputs keep the signature's dtypes whatever runs inside.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from diffsr.export.core.precision import Precision
from diffsr.export.model.signatures import Signature
from diffsr.runtime.backends.base import TORCH_DTYPES, Runner

COMPUTE_DTYPES = {Precision.FP32: torch.float32, Precision.FP16: torch.float16}


class TorchRunner(Runner):
    def __init__(
        self, signature: Signature, module: nn.Module, device: torch.device | str = "cpu",
        precision: Precision = Precision.FP32, channels_last: bool = False,
    ):
        super().__init__(signature)
        self.device, self.dtype = torch.device(device), COMPUTE_DTYPES[precision]
        self.channels_last = channels_last
        self.module = module.to(device=self.device, dtype=self.dtype).eval()
        if channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stubs omit it

    def _prepare(self, t: torch.Tensor) -> torch.Tensor:
        t = t.to(self.device, self.dtype if t.is_floating_point() else t.dtype)
        if self.channels_last and t.dim() == 4:
            t = t.contiguous(memory_format=torch.channels_last)
        return t

    @torch.inference_mode()
    def _infer(self, feed: Mapping[str, torch.Tensor], dims: Mapping[str, int]) -> dict[str, torch.Tensor]:
        out = self.module(*(self._prepare(feed[t.name]) for t in self.signature.inputs))
        outputs = out if isinstance(out, tuple) else (out,)
        return {t.name: o.to(TORCH_DTYPES[t.dtype]) for t, o in zip(self.signature.outputs, outputs)}
