"""The prompter (LLaVA-1.5) on llava-tiny: a seeded one in transformers' layout, its photo and instruction prepared
as `LlavaProcessor` prepares them, its three graphs against transformers' own forward, and greedy and beam-search
texts token for token equal to `generate`, on real photos."""

import dataclasses
import json

import re

import pytest
import torch

from diffsr.calib.data import PHOTOS, photo
from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.attachments import open_attachments
from diffsr.export.model.attachments.captioner import init_captioner
from diffsr.export.model.attachments.prompter import (
    IMAGE,
    init_prompter,
    open_prompter,
    parameters_of,
    prompter_preset,
)
from diffsr.export.model.attachments.prompter_networks import GRAPHS, build_llava, load_llava
from diffsr.export.model.families.xpsr import HIGH_LEVEL, LOW_LEVEL
from diffsr.runtime.caption import CaptionLoop, CaptionSettings
from diffsr.runtime.prompter import LlavaPrompter, prompter_graphs
from tests.conftest import graphs_run

SIDE = 56  # llava-tiny's image size


@pytest.fixture(scope="module")
def prompter(tmp_path_factory):
    return init_prompter("llava-tiny", 0, tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def graphs(prompter):
    """The graphs' modules with the folder's weights, as the checkpoint loads a component."""
    from safetensors.torch import load_file

    llava = build_llava(prompter.path)
    llava.load_state_dict(load_file(str(prompter.path / "model.safetensors")), strict=True)
    llava = llava.float().eval()
    return {name: cls(llava).eval() for name, cls in GRAPHS.items()}


@pytest.fixture(scope="module")
def reference(prompter):
    return load_llava(prompter.path)


@pytest.fixture(scope="module")
def processor(prompter):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(prompter.path))


def _chat(instruction):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]


def test_a_seeded_prompter_is_a_llava_folder_transformers_loads_strictly(prompter):
    from transformers import LlavaForConditionalGeneration

    files = {p.name for p in prompter.path.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
            "tokenizer_config.json", "chat_template.jinja"} <= files
    _, info = LlavaForConditionalGeneration.from_pretrained(str(prompter.path), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    from safetensors import safe_open

    with safe_open(str(prompter.path / "model.safetensors"), "pt") as f:  # the published folder's names
        prefixes = {k.split(".")[0] + "." + k.split(".")[1] for k in f.keys()}
    assert prefixes == {"vision_tower.vision_model", "multi_modal_projector.linear_1", "multi_modal_projector.linear_2",
                        "language_model.model", "language_model.lm_head"}
    assert (prompter.image_tokens, prompter.kv_heads, prompter.head_dim) == (16, 2, 8)


@pytest.mark.parametrize("instruction", [LOW_LEVEL, HIGH_LEVEL], ids=["chat-template", "its-own-template"])
def test_the_photo_and_the_instruction_are_prepared_as_the_processor_does(prompter, processor, instruction):
    """Pixels (a non-square photo: the short side resized, the centre cropped) and ids (the chat template, the image
    token repeated, BOS) equal `LlavaProcessor`'s."""
    runner = LlavaPrompter(prompter, run=lambda name, **feed: pytest.fail("nothing runs"))
    image = photo("coffee", None)[:, 40:]  # 400 x 560: not square
    text = instruction if IMAGE in instruction else processor.apply_chat_template(_chat(instruction),
                                                                                  add_generation_prompt=True)
    want = processor(text=text, images=image, return_tensors="pt")
    torch.testing.assert_close(runner.pixels(image), want.pixel_values, rtol=0, atol=1e-6)
    assert runner.ids(instruction) == want.input_ids[0].tolist()
    assert want.input_ids[0].eq(prompter.image_token).sum() == prompter.image_tokens


def test_presets_and_errors(prompter, tmp_path):
    assert parameters_of(prompter_preset("llava-1.5-7b")) == pytest.approx(7.06e9, rel=0.01)
    with pytest.raises(DiffsrError, match="unknown prompter preset 'llava-2'"):
        prompter_preset("llava-2")
    with pytest.raises(DiffsrError, match="already exists"):
        init_prompter("llava-tiny", 0, prompter.path.parent)
    with pytest.raises(DiffsrError, match="no prompter in"):
        open_prompter(tmp_path)
    init_captioner("blip2-tiny", 0, prompter.path.parent)  # two writers of the prompts: refused on opening
    try:
        with pytest.raises(DiffsrError, match="holds prompter/ and captioner/: a checkpoint has one attachment"):
            open_attachments(prompter.path.parent)
    finally:
        import shutil

        shutil.rmtree(prompter.path.parent / "captioner")
    for name, text, message in (("chat_template.jinja", "{% for %}", "chat template does not parse"),
                                ("preprocessor_config.json", "{", "image processor file is not valid JSON"),
                                ("preprocessor_config.json", '{"size": {"shortest_edge": 8}}', "short side .8 px. must be "
                                 "at least its crop")):
        path = prompter.path / name
        kept = path.read_bytes() if path.exists() else None
        path.write_text(text)
        try:
            assert any(re.search(message, e) for e in prompter.file_errors(prompter.path)), prompter.file_errors(prompter.path)
        finally:
            path.write_bytes(kept) if kept is not None else path.unlink()
    assert prompter.file_errors(prompter.path) == []
    template = prompter.path / "chat_template.jinja"
    kept = template.read_text()
    template.write_text("{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}{% generation %}"
                        "{{ m['content'] }}{% endgeneration %}{% endfor %}")  # transformers' own tags render
    try:
        assert prompter.file_errors(prompter.path) == []
    finally:
        template.write_text(kept)
    runner = LlavaPrompter(prompter, run=lambda name, **feed: pytest.fail("nothing runs"))
    with pytest.raises(DiffsrError, match="takes the photo once"):
        runner.ids(f"{IMAGE} and {IMAGE}")
    with pytest.raises(DiffsrError, match="too long"):
        runner.ids("describe " * 60)


def test_the_graphs_are_transformers_forward(prompter, graphs, reference, processor):
    """The image features, the prefill's logits and two decode steps' (the second reads what the first wrote),
    against transformers' forward on the whole sequence within 1e-4 relative."""
    image = photo("astronaut", None)
    inputs = processor(text=processor.apply_chat_template(_chat(LOW_LEVEL), add_generation_prompt=True), images=image,
                       return_tensors="pt")
    ids, pixels = inputs.input_ids, inputs.pixel_values
    with torch.no_grad():
        features = graphs["prompter_image"](pixels)
        want = reference.model.get_image_features(pixels).pooler_output[0]
        torch.testing.assert_close(features[0], want, rtol=1e-5, atol=1e-5)
        length = ids.shape[1] + 3
        mask = torch.zeros(1, length, dtype=torch.int64)
        mask[:, : ids.shape[1]] = 1
        logits, keys, values = graphs["prompter_prefill"](features, ids, mask)
        assert keys.shape == (2, 1, 2, length, 8) and keys[:, :, :, ids.shape[1]:].abs().max() == 0
        want = reference(input_ids=ids, pixel_values=pixels).logits[:, -1]
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        for step, token in enumerate((77, 78)):
            position = ids.shape[1]
            mask[:, position] = 1
            logits, keys, values = graphs["prompter_decode"](torch.tensor([[token]]), torch.tensor([[position]]), mask,
                                                             keys, values)
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
            want = reference(input_ids=ids, pixel_values=pixels).logits[:, -1]
            torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@pytest.mark.parametrize("ending", [False, True], ids=["to-the-limit", "ending-early"])
@pytest.mark.parametrize("beams", [1, 4], ids=["greedy", "beams4"])
def test_texts_are_generates_token_for_token(prompter, graphs, reference, processor, beams, ending):
    """Five photos in one batch, XPSR's low-level question: our loop over the graphs against
    `generate(num_beams=...)`. Random weights rarely say `</s>`; `ending` makes the token they say most the end,
    so that texts end, beams finish and are ranked before the limit."""
    from collections import Counter

    text = processor.apply_chat_template(_chat(LOW_LEVEL), add_generation_prompt=True)
    inputs = processor(text=[text] * len(PHOTOS), images=[photo(name, None) for name in PHOTOS], return_tensors="pt")
    ids = inputs.input_ids[0].tolist()
    run, eos = graphs_run(graphs, prompter_graphs(prompter)), prompter.eos
    if ending:
        greedy = CaptionLoop(run, prompter_graphs(prompter))(inputs.pixel_values, ids, CaptionSettings(max_new_tokens=12))
        eos = Counter(t for row in greedy for t in row[2:]).most_common(1)[0][0]
    settings = CaptionSettings(max_new_tokens=12, num_beams=beams)
    ours = CaptionLoop(run, prompter_graphs(dataclasses.replace(prompter, eos=eos)))(inputs.pixel_values, ids, settings)
    with torch.no_grad():
        want = reference.generate(**inputs, max_new_tokens=12, num_beams=beams, do_sample=False,
                                  eos_token_id=eos)[:, len(ids):].tolist()
    assert [row + [prompter.pad] * (len(want[0]) - len(row)) for row in ours] == want
    assert len({tuple(row) for row in ours}) > 1  # the photos' texts differ: the image reaches the tokens
    assert (min(len(row) for row in ours) < 12) == ending


def test_the_runner_writes_what_generate_writes(prompter, graphs, reference, processor):
    """A slot's text: the instruction as given (XPSR's own template), greedy to the settings' limit, decoded on one
    line."""
    from diffsr.export.model.settings import PipelineConfig

    image = photo("camera", None)
    runner = LlavaPrompter(prompter, graphs_run(graphs, prompter_graphs(prompter)))
    made = runner(image, PipelineConfig(caption_tokens=10), HIGH_LEVEL)
    inputs = processor(text=HIGH_LEVEL, images=image, return_tensors="pt")
    with torch.no_grad():
        tokens = reference.generate(**inputs, max_new_tokens=10, do_sample=False)[0, inputs.input_ids.shape[1]:]
    assert made == " ".join(processor.tokenizer.decode(tokens, skip_special_tokens=True).split())
    assert runner.tokens == 10 and set(runner.timings) == {"prompter_image", "prompter_token"}
    assert json.loads((prompter.path / "config.json").read_text())["image_token_index"] == prompter.image_token


def test_a_cancel_stops_the_text_between_decode_steps(prompter, graphs):
    """The cancel check runs before every decode step: a client's cancel after three steps ends the text there (the
    endpoint's BLS entry passes its request's `is_cancelled`)."""
    from diffsr.export.model.settings import PipelineConfig

    run, calls = graphs_run(graphs, prompter_graphs(prompter)), []

    def counted(name, **feed):
        calls.append(name)
        return run(name, **feed)

    runner = LlavaPrompter(prompter, counted)
    with pytest.raises(DiffsrError, match="cancelled while writing the prompt"):
        runner(photo("camera", None), PipelineConfig(caption_tokens=40), LOW_LEVEL,
               cancelled=lambda: calls.count("prompter_decode") >= 3)
    assert calls == ["prompter_image", "prompter_prefill", *["prompter_decode"] * 3]
