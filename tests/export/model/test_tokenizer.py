import numpy as np

BOS, EOS = 49406, 49407


def test_real_clip_ids(tiny_checkpoint):
    ids = tiny_checkpoint.tokenizer()(["a photo of a cat"])["input_ids"]
    assert ids.shape == (1, 77) and ids.dtype == np.int32
    # OpenAI CLIP's ids for this prompt, padded with end-of-text
    assert ids[0, :7].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert (ids[0, 7:] == EOS).all()


def test_long_prompts_are_truncated_to_77(tiny_checkpoint):
    ids = tiny_checkpoint.tokenizer()(["sharp " * 300, "x"])["input_ids"]
    assert ids.shape == (2, 77)
    assert ids[0, 0] == BOS and ids[0, -1] == EOS and (ids[0, 1:-1] != EOS).all()


def test_case_and_whitespace_are_normalised(tiny_checkpoint):
    tok = tiny_checkpoint.tokenizer()
    assert (tok(["High   Quality"])["input_ids"] == tok(["high quality"])["input_ids"]).all()


def test_sdxl_tokenises_twice_the_second_padded_with_exclamation_marks(tiny_checkpoint, sdxl_checkpoint):
    assert set(tiny_checkpoint.tokenizer()(["x"])) == {"input_ids"}
    ids = sdxl_checkpoint.tokenizer()(["a photo of a cat"])
    assert set(ids) == {"input_ids", "input_ids_2"}
    assert ids["input_ids"][0, :7].tolist() == ids["input_ids_2"][0, :7].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert (ids["input_ids"][0, 7:] == EOS).all() and (ids["input_ids_2"][0, 7:] == 0).all()  # "!" is id 0
