import numpy as np

BOS, EOS = 49406, 49407


def test_real_clip_ids(tiny_checkpoint):
    ids = tiny_checkpoint.tokenizer()(["a photo of a cat"])
    assert ids.shape == (1, 77) and ids.dtype == np.int32
    # OpenAI CLIP's ids for this prompt, padded with end-of-text
    assert ids[0, :7].tolist() == [BOS, 320, 1125, 539, 320, 2368, EOS]
    assert (ids[0, 7:] == EOS).all()


def test_long_prompts_are_truncated_to_77(tiny_checkpoint):
    ids = tiny_checkpoint.tokenizer()(["sharp " * 300, "x"])
    assert ids.shape == (2, 77)
    assert ids[0, 0] == BOS and ids[0, -1] == EOS and (ids[0, 1:-1] != EOS).all()


def test_case_and_whitespace_are_normalised(tiny_checkpoint):
    tok = tiny_checkpoint.tokenizer()
    assert (tok(["High   Quality"]) == tok(["high quality"])).all()
