"""The paper's own prompt: the prompt policy, and the pipeline captioning its LQ image through the checkpoint's
captioner (dit4sr-tiny with blip2-tiny, conftest) on every backend, against transformers' `generate`."""

import dataclasses

import numpy as np
import pytest
import torch

from diffsr.calib.data import photo
from diffsr.calib.record import Recorder
from diffsr.export.core.errors import DiffsrError
from diffsr.export.graphs.manifest import manifest_model
from diffsr.export.model.attachments.captioner import BOS
from diffsr.export.model.attachments.captioner_networks import load_blip2
from diffsr.export.model.families import model_from_json
from diffsr.export.model.settings import DEFAULT_PROMPT, PipelineConfig, Request
from diffsr.runtime.caption import pixel_values
from diffsr.runtime.loading import load_runners
from diffsr.runtime.pipeline import Pipeline
from diffsr.runtime.prompts import clean_caption, prompt_of, slot_text

SETTINGS = dict(steps=2, seed=3)
CAPTION_GRAPHS = ("caption_image", "caption_prefill", "caption_decode")


def test_a_caption_is_cleaned_and_completed():
    drop = "blur, blurry, out of focus, noise"
    assert clean_caption("a blurry photo of a cat. A dog on grass.", drop, "8k") == "A dog on grass, 8k"
    assert clean_caption("a cat, out of focus", drop, "8k") == "8k"  # every sentence names a degradation
    assert clean_caption("Noise everywhere.\nA red bus", drop, "") == "A red bus"
    assert clean_caption("a blurred glass.", drop, "sharp") == "a blurred glass, sharp"  # whole words only
    assert clean_caption("a cat.", "", "sharp") == "a cat, sharp"


def test_the_prompt_policy():
    asked = []

    def caption():
        asked.append(1)
        return "a cat on a mat."

    base = PipelineConfig(caption_suffix="sharp")
    assert prompt_of(base, caption) == "a cat on a mat, sharp"  # auto, no prompt: the caption
    assert prompt_of(base.replace(prompt="a dog"), caption) == "a dog" and len(asked) == 1  # a given prompt wins
    assert prompt_of(base.replace(prompt="a dog", caption="always"), caption) == "a dog, a cat on a mat, sharp"
    assert prompt_of(base.replace(caption="never"), caption) == "sharp" and len(asked) == 2
    assert prompt_of(PipelineConfig(), None) == DEFAULT_PROMPT  # no captioner: the default prompt, as before
    # caption="always" of a model without a captioner: the request's one check refuses it, once, in one message
    from diffsr.export.model.families import preset
    from diffsr.runtime.requests import check

    model = preset("tiny")
    assert model.settings_errors(base) == []
    with pytest.raises(DiffsrError, match='^caption="always" needs an attachment that writes the prompt \(a prompter/ or '
                                          'captioner/ folder: `diffsr init --prompter llava-tiny` or `--captioner'):
        check(model, base.replace(caption="always"), dict(model.scheduler_config), (16, 16))
    for bad, match in ((dict(caption="sometimes"), "caption='sometimes'"), (dict(caption_beams=6), "caption_beams=6"),
                       (dict(caption_tokens=0), "caption_tokens=0")):
        with pytest.raises(DiffsrError, match=match):
            PipelineConfig(**bad)


def test_the_captioner_joins_the_model(dit4sr_checkpoint, tmp_path):
    model = dit4sr_checkpoint.model
    assert model.submodules[:3] == CAPTION_GRAPHS and "captioner" in model.components()
    assert {"caption_batch", "prompt_length", "cache_length"} <= {d.name for d in model.dims()}
    again = model_from_json(model.name, model.to_json())  # what a manifest and the Triton models rebuild
    assert again == model and again.signatures() == model.signatures()
    assert model.with_attachments(()).submodules == tuple(n for n in model.submodules if n not in CAPTION_GRAPHS)
    assert model.owner("caption_decode") is model.attachment("captioner") and model.owner("transformer") is None
    assert manifest_model({"family": model.name, "model": model.to_json()}) == model


@pytest.fixture(scope="module")
def lq():
    return photo("coffee", (29, 22))


def test_the_pipeline_prompts_itself_with_the_caption_generate_makes(dit4sr_checkpoint, lq):
    """No prompt: the caption is `generate`'s greedy caption of the LQ image, decoded, cleaned and completed by the
    suffix; a given prompt is used as it is and no captioner graph runs."""
    from transformers import AutoTokenizer

    ckpt = dit4sr_checkpoint
    runners = {name: Recorder(r) for name, r in load_runners("torch", ckpt).items()}  # each call's feed, kept
    pipe = Pipeline(runners, ckpt)
    result = pipe(Request(lq, ckpt.defaults.replace(**SETTINGS)))
    folder = ckpt.path / "captioner"
    reference = load_blip2(folder)
    with torch.no_grad():
        ids = reference.generate(pixel_values=pixel_values(lq, 224), max_new_tokens=ckpt.defaults.caption_tokens)
    caption = AutoTokenizer.from_pretrained(str(folder)).decode(ids[0, 33:], skip_special_tokens=True).strip()
    assert caption and result.prompt == clean_caption(caption, ckpt.defaults.caption_drop, ckpt.defaults.caption_suffix)
    assert len(runners["caption_image"].feeds) == 1 and len(runners["caption_decode"].feeds) > 0
    assert result.timings["caption"] > result.timings["caption_image"] > 0 and result.timings["caption_token"] > 0
    calls = {name: len(r.feeds) for name, r in runners.items()}
    given = pipe(Request(lq, ckpt.defaults.replace(prompt="a cup of coffee", **SETTINGS)))
    assert given.prompt == "a cup of coffee"
    assert all(len(runners[name].feeds) == calls[name] for name in CAPTION_GRAPHS)
    assert not np.array_equal(given.image, result.image)  # the prompt reaches the image


def test_onnxruntime_captions_as_pytorch_and_fp16_keeps_the_logits(dit4sr_checkpoint, dit4sr_onnx, lq):
    """ONNX Runtime's FP32 graphs make PyTorch's caption; the FP16 graphs' logits stay within 1e-2 (relative, over
    the prefill and the decode steps of a real caption) and their caption's token agreement is reported."""
    from diffsr.export.core.precision import Precision
    from diffsr.runtime.caption import CaptionLoop, CaptionSettings, captioner_graphs

    ckpt, spec = dit4sr_checkpoint, dit4sr_checkpoint.model.attachment("captioner")
    cfg = ckpt.defaults.replace(**SETTINGS)
    torch_prompt = Pipeline(load_runners("torch", ckpt), ckpt)(Request(lq, cfg)).prompt
    ort = load_runners("onnxruntime", ckpt, onnx_dir=dit4sr_onnx)
    assert Pipeline(ort, ckpt)(Request(lq, cfg)).prompt == torch_prompt
    half = load_runners("onnxruntime", ckpt, onnx_dir=dit4sr_onnx, precision=Precision.FP16)
    calls: list = []

    def run_both(name, **feed):  # FP32 drives the search; FP16 is fed the same inputs and compared
        full, fp16 = ort[name].infer(feed), half[name].infer(feed)
        calls.append((name, full, fp16))
        return full

    settings = CaptionSettings(max_new_tokens=cfg.caption_tokens)
    tokens = CaptionLoop(run_both, captioner_graphs(spec))(pixel_values(lq, 224), [BOS], settings)[0]
    worst = max(float((b["logits"] - a["logits"]).norm() / a["logits"].norm()) for name, a, b in calls if "logits" in a)
    agree = [int(a["logits"].argmax()) == int(b["logits"].argmax()) for _, a, b in calls if "logits" in a]
    print(f"FP16 captioner: logits within {worst:.2e} relative of FP32 over {len(agree)} calls; next-token agreement "
          f"{sum(agree)}/{len(agree)}; FP32 caption {len(tokens)} tokens")
    assert worst < 1e-2


def test_the_prompt_slots_under_the_policy():
    """XPSR's two slots: a LLaVA prompter writes each from its own instruction (the prompt cleaned and completed by
    the suffix, the low-level text kept as written, on one line); a typed text stays (and leads with "always"); a
    captioner writes the prompt alone; without a prompter, the defaults."""
    from pathlib import Path

    from diffsr.export.model.attachments.captioner import Captioner
    from diffsr.export.model.attachments.prompter import Prompter
    from diffsr.export.model.families import preset
    from diffsr.export.model.families.xpsr import HIGH_LEVEL, LOW_LEVEL
    from diffsr.runtime.prompts import request_texts, used_prompts

    llava = Prompter(Path("prompter"), 32, 2, 2, 8, 520, 16, 56, 512, 2, 513, 512)
    blip2 = Captioner(Path("captioner"), 32, 2, 4, 320, 32, 224, 50, 128)
    asked: list = []

    def write(slot):
        asked.append(slot.instruction)
        return {HIGH_LEVEL: "A bus on a street.\nIt is blurry.", LOW_LEVEL: "The image is\nblurry and noisy."}[
            slot.instruction]

    xpsr = preset("xpsr-tiny")
    cfg = xpsr.defaults.replace(caption_suffix="sharp")
    texts = request_texts(xpsr.with_attachments((llava,)), cfg, write)
    assert used_prompts(xpsr, texts) == {"prompt": "A bus on a street, sharp", "prompt_low": "The image is blurry and noisy."}
    assert asked == [HIGH_LEVEL, LOW_LEVEL] and texts["negative_prompt_low"] == "high resolution, best quality, clear"
    typed = cfg.replace(inputs={"prompt_low": "jpeg artifacts"}, prompt="a red bus")
    assert used_prompts(xpsr, request_texts(xpsr.with_attachments((llava,)), typed, write)) == {
        "prompt": "a red bus", "prompt_low": "jpeg artifacts"} and len(asked) == 2
    always = used_prompts(xpsr, request_texts(xpsr.with_attachments((llava,)), typed.replace(caption="always"), write))
    assert always == {"prompt": "a red bus, A bus on a street, sharp", "prompt_low": "jpeg artifacts, The image is blurry "
                      "and noisy."}
    asked.clear()
    captioned = used_prompts(xpsr, request_texts(xpsr.with_attachments((blip2,)), cfg, write))
    assert captioned == {"prompt": "A bus on a street, sharp", "prompt_low": ""} and asked == [HIGH_LEVEL]  # one slot
    assert used_prompts(xpsr, request_texts(xpsr, cfg, None)) == {"prompt": "sharp", "prompt_low": ""}
    assert used_prompts(xpsr, request_texts(xpsr.with_attachments((llava,)), cfg.replace(caption="never"), write)) == {
        "prompt": "sharp", "prompt_low": ""}


def test_a_caption_request_past_the_graphs_cache_is_refused(dit4sr_checkpoint, lq):
    from diffsr.runtime.caption import CaptionLoop, CaptionSettings, captioner_graphs

    spec = dit4sr_checkpoint.model.attachment("captioner")
    small = dataclasses.replace(spec, max_positions=spec.num_query_tokens + 4)

    loop = CaptionLoop(lambda name, **feed: pytest.fail("nothing runs"), captioner_graphs(small))
    with pytest.raises(DiffsrError, match="needs 37 positions"):
        loop(pixel_values(lq, 224), [BOS], CaptionSettings(max_new_tokens=4))


def test_a_checkpoint_from_before_captions_reads_its_default_prompt_as_the_suffix(tiny_checkpoint, tmp_path):
    """The legacy tiny checkpoint's diffsr.json holds the default prompt as `prompt`: it becomes the caption suffix
    (the same prompt without a captioner; a captioner added is used). A prompt of its own stays its prompt; a
    policy of "always" without a captioner is refused on opening."""
    import json
    import shutil

    from diffsr.export.model.checkpoint import open_checkpoint

    defaults = tiny_checkpoint.defaults
    assert defaults.prompt is None and defaults.caption_suffix == DEFAULT_PROMPT
    assert prompt_of(defaults, None) == DEFAULT_PROMPT
    path = shutil.copytree(tiny_checkpoint.path, tmp_path / "ck")
    meta = json.loads((path / "diffsr.json").read_text())
    meta["pipeline"]["prompt"] = "a cat"
    (path / "diffsr.json").write_text(json.dumps(meta))
    assert open_checkpoint(path).defaults.prompt == "a cat"
    meta["pipeline"]["caption"] = "always"
    (path / "diffsr.json").write_text(json.dumps(meta))
    with pytest.raises(DiffsrError, match='diffsr.json\'s pipeline settings: caption="always" needs an attachment that writes'):
        open_checkpoint(path)


def test_engine_profiles_hold_the_cache_from_its_least_to_its_longest(dit4sr_checkpoint):
    """TensorRT's profiles of the captioner (server target): one image's beams, BOS to BOS + 32 prompt tokens, the
    cache from the prefix + 2 slots, opt the default caption's 63, to blip2-tiny's 128 positions."""
    from diffsr.export.engines.build import engine_profiles
    from diffsr.export.model.dims import TARGETS

    profiles = engine_profiles(dit4sr_checkpoint.model, TARGETS["server"])
    keys = profiles["caption_decode"]["past_keys"]
    assert (keys.min, keys.opt, keys.max) == ((2, 1, 4, 34, 8), (2, 1, 4, 63, 8), (2, 5, 4, 128, 8))
    ids = profiles["caption_prefill"]["input_ids"]
    assert (ids.min, ids.opt, ids.max) == ((1, 1), (1, 1), (5, 33))
    assert profiles["caption_image"]["pixel_values"].max == (4, 3, 224, 224)  # the server's images


def test_a_familys_words_follow_the_typed_prompt_and_the_caption_before_the_suffix():
    """The prompt's parts in order: the typed prompt, the caption (its degraded sentences dropped), the words a family's
    prompting stages said (SISRM's labels), the suffix; the policy decides, as without words, whether a caption is
    written."""
    from diffsr.export.model.inputs import PromptSlot

    cfg, slot = PipelineConfig(caption_suffix="clean", caption_drop="blurry"), PromptSlot("prompt")
    caption = lambda: "A cat on a sofa. The photo is blurry."  # noqa: E731
    assert slot_text(slot, cfg, None, "clean", caption, "wall, sofa") == "A cat on a sofa, wall, sofa, clean"
    assert slot_text(slot, cfg, "mine", "clean", caption, "wall") == "mine, wall, clean"  # auto: typed, no caption
    assert slot_text(slot, cfg.replace(caption="always"), "mine", "clean", caption, "wall") == \
        "mine, A cat on a sofa, wall, clean"
    assert slot_text(slot, cfg, None, "clean", None, "wall") == "wall, clean"
    assert slot_text(slot, cfg, None, "clean", caption, "") == "A cat on a sofa, clean"  # no words: as before
