"""The captioner (BLIP-2 OPT) on blip2-tiny: a seeded one in transformers' layout, its three graphs against
transformers' own forward, and greedy and beam-search captions token for token equal to `generate`, on real
photos."""

import dataclasses
import json

import pytest
import torch

from diffsr.calib.data import PHOTOS, photo
from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.attachments.captioner import (
    BOS,
    PAD,
    PRESETS,
    captioner_preset,
    init_captioner,
    open_captioner,
    parameters_of,
)
from diffsr.export.model.attachments.captioner_networks import caption_graphs, load_blip2
from diffsr.runtime.caption import CaptionLoop, CaptionSettings, captioner_graphs, pixel_values
from tests.conftest import graphs_run


@pytest.fixture(scope="module")
def captioner(tmp_path_factory):
    return init_captioner("blip2-tiny", 0, tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def blip2(captioner):
    return load_blip2(captioner.path)


@pytest.fixture(scope="module")
def reference(captioner):
    """transformers' model as it loads by default (SDPA attention): what `generate` runs."""
    from transformers import Blip2ForConditionalGeneration

    return Blip2ForConditionalGeneration.from_pretrained(str(captioner.path), dtype=torch.float32).eval()


def test_a_seeded_captioner_is_a_blip2_folder_transformers_loads(captioner):
    from transformers import AutoProcessor

    files = {p.name for p in captioner.path.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "processor_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= files
    processor = AutoProcessor.from_pretrained(str(captioner.path))
    image = photo("coffee", None)
    inputs = processor(images=image, text="a photo of", return_tensors="pt")
    image_token = json.loads((captioner.path / "config.json").read_text())["image_token_index"]
    assert inputs.input_ids[0, :32].eq(image_token).all() and inputs.input_ids[0, 32] == BOS
    torch.testing.assert_close(pixel_values(image, 224), inputs.pixel_values, rtol=0, atol=1e-6)
    assert captioner.eos == processor.tokenizer.convert_tokens_to_ids("\u010a") != BOS  # a caption ends at "\n"
    assert processor.tokenizer.pad_token_id == PAD and len(processor.tokenizer) == PRESETS["blip2-tiny"].tokenizer_size + 1


def test_presets_and_errors():
    assert parameters_of(captioner_preset("blip2-opt-2.7b")) == pytest.approx(3.74e9, rel=0.01)
    with pytest.raises(DiffsrError, match="unknown captioner preset 'blip3'"):
        captioner_preset("blip3")


def test_a_checkpoint_holds_one_captioner(captioner, tmp_path):
    with pytest.raises(DiffsrError, match="already exists"):
        init_captioner("blip2-tiny", 0, captioner.path.parent)
    with pytest.raises(DiffsrError, match="no captioner in"):
        open_captioner(tmp_path)


def test_the_graphs_are_transformers_forward(captioner, blip2, reference):
    """The prefix, the prefill's logits and a decode step's at a non-zero cache length, against transformers'
    forward on the whole sequence (placeholders replaced by the image features) within 1e-4 relative."""
    graphs = caption_graphs(blip2)
    image = pixel_values(photo("astronaut", None), 224)
    image_token = json.loads((captioner.path / "config.json").read_text())["image_token_index"]
    prompt = [BOS, 40, 41, 42]
    with torch.no_grad():
        prefix = graphs["caption_image"](image)
        torch.testing.assert_close(prefix, reference.get_image_features(image).pooler_output, rtol=1e-5, atol=1e-5)
        length = 32 + len(prompt) + 3
        mask = torch.zeros(1, length, dtype=torch.int64)
        mask[:, : 32 + len(prompt)] = 1
        logits, keys, values = graphs["caption_prefill"](prefix, torch.tensor([prompt]), mask)
        assert keys.shape == (2, 1, 4, length, 8) and keys[:, :, :, 32 + len(prompt):].abs().max() == 0
        ids = torch.tensor([[image_token] * 32 + prompt])
        want = reference(input_ids=ids, pixel_values=image).logits[:, -1]
        torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
        for step, token in enumerate((77, 78)):  # two steps: the second reads a cache the first wrote
            position = 32 + len(prompt) + step
            mask[:, position] = 1
            logits, keys, values = graphs["caption_decode"](torch.tensor([[token]]), torch.tensor([[position]]), mask,
                                                            keys, values)
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
            want = reference(input_ids=ids, pixel_values=image).logits[:, -1]
            torch.testing.assert_close(logits, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def _padded(rows, width):
    return [row + [PAD] * (width - len(row)) for row in rows]


@pytest.mark.parametrize("ending", [False, True], ids=["to-the-limit", "ending-early"])
@pytest.mark.parametrize("beams", [1, 4], ids=["greedy", "beams4"])
def test_captions_are_generates_token_for_token(captioner, blip2, reference, beams, ending):
    """Five photos in one batch: our loop over the graphs against `generate(num_beams=...)`. Random weights rarely
    say "\n"; `ending` makes the token they say most the end of a caption, so that captions end, beams finish
    and are ranked before the limit."""
    from collections import Counter

    images = torch.cat([pixel_values(photo(name, None), 224) for name in PHOTOS])
    run = graphs_run(caption_graphs(blip2), captioner_graphs(captioner))
    eos = captioner.eos
    if ending:
        greedy = CaptionLoop(run, captioner_graphs(dataclasses.replace(captioner, eos=eos)))(
            images, [BOS], CaptionSettings(max_new_tokens=12))
        eos = Counter(t for row in greedy for t in row[2:]).most_common(1)[0][0]
    settings = CaptionSettings(max_new_tokens=12, num_beams=beams)
    ours = CaptionLoop(run, captioner_graphs(dataclasses.replace(captioner, eos=eos)))(images, [BOS], settings)
    with torch.no_grad():
        want = reference.generate(pixel_values=images, max_new_tokens=12, num_beams=beams, eos_token_id=eos)[:, 33:].tolist()
    assert _padded(ours, len(want[0])) == want
    assert len({tuple(row) for row in ours}) > 1  # the photos' captions differ: the image reaches the tokens
    lengths = {len(row) for row in ours}
    assert (min(lengths) < 12) == ending  # captions end early only where the end token is said
