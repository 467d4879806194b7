"""Lean runners: loaded on first use, released least recently used first to stay within the pipeline's
smallest working set; a real pipeline on them gives the eager image."""

import numpy as np
import pytest

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.settings import Request
from diffsr.runtime.backends.base import Runner
from diffsr.runtime.backends.on_demand import on_demand
from diffsr.runtime.loading import load_runners
from diffsr.runtime.pipeline import Pipeline


class Counting(Runner):
    """A stand-in network for the residency's bookkeeping: counts its loads, computes nothing."""

    loads: dict[str, int] = {}

    def load(self) -> "Counting":
        Counting.loads[self.signature.name] = Counting.loads.get(self.signature.name, 0) + 1
        return self

    def infer(self, feed):
        return {}

    def _infer(self, feed, dims):
        return {}


def test_the_denoising_loop_keeps_its_pair_and_the_rest_is_evicted(tiny_checkpoint):
    sigs = tiny_checkpoint.model.signatures()
    sizes = {"text_encoder": 40, "lq_encoder": 30, "fusion_transformer": 10, "controlnet_unet": 100, "vae_decoder": 30}
    runners = on_demand(sigs, {n: (lambda n=n: Counting(sigs[n]).load()) for n in sizes}, sizes,
                        tiny_checkpoint.model.stages.step)  # budget 110
    Counting.loads = {}
    one_run = ["text_encoder", "lq_encoder", *["fusion_transformer", "controlnet_unet"] * 5, "vae_decoder"]
    for name in one_run * 2:  # two pipeline runs
        runners[name]._infer({}, {})
    # the loop's pair loads once per run, not once per step; everything is evicted by something once a run
    assert Counting.loads == dict.fromkeys(sizes, 2)
    loaded = {n for n, r in runners.items() if r.inner is not None}
    assert loaded == {"vae_decoder"} and sum(sizes[n] for n in loaded) <= 110


def test_a_runner_that_fails_to_load_holds_no_room(tiny_checkpoint):
    sigs = tiny_checkpoint.model.signatures()

    def broken():
        raise DiffsrError("cannot load")

    sizes = dict.fromkeys(sigs, 10) | {"controlnet_unet": 100}
    loaders = {n: (lambda n=n: Counting(sigs[n]).load()) for n in sigs} | {"controlnet_unet": broken}
    runners = on_demand(sigs, loaders, sizes, tiny_checkpoint.model.stages.step)
    runners["fusion_transformer"]._infer({}, {})
    with pytest.raises(DiffsrError, match="cannot load"):
        runners["controlnet_unet"]._infer({}, {})
    runners["text_encoder"]._infer({}, {})
    assert runners["fusion_transformer"].inner is not None  # not pushed out by the runner that never loaded


def test_a_lean_pipeline_gives_the_eager_image_and_holds_one_stage(tiny_checkpoint, photo_lq):
    config = tiny_checkpoint.defaults.replace(steps=3)
    eager = Pipeline(load_runners("torch", tiny_checkpoint), tiny_checkpoint)(Request(photo_lq, config)).image
    lean = load_runners("torch", tiny_checkpoint, lean=True)
    assert np.array_equal(Pipeline(lean, tiny_checkpoint)(Request(photo_lq, config)).image, eager)
    assert lean["text_encoder"].inner is None  # evicted on the way
    for runner in lean.values():
        runner.release()
    assert all(r.inner is None for r in lean.values())


def test_tensorrt_runners_are_not_lean(tiny_checkpoint):
    with pytest.raises(DiffsrError, match="lean .* are for torch and onnxruntime"):
        load_runners("tensorrt", tiny_checkpoint, lean=True)
