"""`diffsr eval`: the SR papers' metrics against values worked out by hand, the pairing of folders and its
errors, and the command on real crops of Set14 (tests/data/set14-crops: 64 x 48 HR crops of images 1, 3
(greyscale) and 14, with the same regions of the set's MATLAB-bicubic LR images)."""

import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from diffsr.app.cli.main import app
from diffsr.app.measure.quality import bicubic, load_pair, pair_images, psnr_y, ssim_y, y_channel
from diffsr.export.core.errors import DiffsrError

CROPS = Path(__file__).parents[2] / "data" / "set14-crops"


def _flat(rgb, shape=(16, 16)):
    return np.broadcast_to(np.array(rgb, np.uint8), (*shape, 3)).copy()


def test_y_is_bt601_studio_range():
    assert y_channel(_flat((0, 0, 0)))[0, 0] == pytest.approx(16.0)
    assert y_channel(_flat((255, 255, 255)))[0, 0] == pytest.approx(16 + 65.481 + 128.553 + 24.966)  # 235
    assert y_channel(_flat((255, 0, 0)))[0, 0] == pytest.approx(81.481)


def test_psnr_by_hand_and_the_border_crop():
    a, b = _flat((100, 100, 100)), _flat((110, 110, 110))
    dy = 10 * (65.481 + 128.553 + 24.966) / 255  # the Y difference of a grey step of 10
    assert psnr_y(a, b, 4) == pytest.approx(10 * math.log10(255**2 / dy**2), abs=1e-9)
    framed = a.copy()
    framed[:4] = framed[-4:] = framed[:, :4] = framed[:, -4:] = 0  # differs only inside the 4 px border
    assert psnr_y(framed, a, 4) == 100.0 and psnr_y(framed, a, 3) < 100.0


def test_ssim_by_hand():
    """Two flat images: only SSIM's luminance term is left, (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) with
    C1 = (0.01 * 255)^2; identical images score 1."""
    a, b = _flat((100, 100, 100), (32, 32)), _flat((110, 110, 110), (32, 32))
    ya, yb = y_channel(a)[0, 0], y_channel(b)[0, 0]
    c1 = (0.01 * 255) ** 2
    assert ssim_y(a, b, 4) == pytest.approx((2 * ya * yb + c1) / (ya**2 + yb**2 + c1), rel=1e-9)
    photo = np.asarray(Image.open(CROPS / "img_001_SRF_4_HR.png"))
    assert ssim_y(photo, photo, 4) == pytest.approx(1.0) and ssim_y(photo, photo[::-1].copy(), 4) < 0.5


def test_pairs_by_name_and_the_errors(tmp_path):
    pairs = pair_images(CROPS, CROPS)  # Set14 keeps both sides in one folder, tagged _HR and _LR
    assert [p.name for p in pairs] == ["img_001_SRF_4", "img_003_SRF_4", "img_014_SRF_4"]
    lr, hr = load_pair(pairs[1], 4)
    assert lr.shape == (12, 16, 3) and hr.shape == (48, 64, 3)  # the greyscale image comes as RGB
    hr_only, lr_only = tmp_path / "hr", tmp_path / "lr"
    shutil.copytree(CROPS, hr_only, ignore=shutil.ignore_patterns("*_LR.png"))
    shutil.copytree(CROPS, lr_only, ignore=shutil.ignore_patterns("*_HR.png", "img_014*"))
    with pytest.raises(DiffsrError, match=r"unpaired images .*img_014_SRF_4_HR.png \(no LR image\)"):
        pair_images(hr_only, lr_only)
    (hr_only / "img_014_SRF_4_HR.png").unlink()
    (lr_only / "img_001_SRF_4_LR.png").write_bytes((CROPS / "img_014_SRF_4_HR.png").read_bytes())
    with pytest.raises(DiffsrError, match=r"img_001_SRF_4_LR.png is 64x48 but img_001_SRF_4_HR.png is 64x48: the HR image must be 4x the LR one"):
        load_pair(pair_images(hr_only, lr_only)[0], 4)
    with pytest.raises(DiffsrError, match="does not exist"):
        pair_images(tmp_path / "none", None)
    # an HR image up to 3 px larger than 4x its LR is cropped to it (BasicSR's test sets); more is refused
    wide = np.asarray(Image.open(CROPS / "img_001_SRF_4_HR.png"))
    Image.fromarray(np.pad(wide, ((0, 3), (0, 2), (0, 0)), mode="edge")).save(hr_only / "img_001_SRF_4_HR.png")
    shutil.copy(CROPS / "img_001_SRF_4_LR.png", lr_only / "img_001_SRF_4_LR.png")
    assert (load_pair(pair_images(hr_only, lr_only)[0], 4)[1] == wide).all()
    Image.fromarray(np.pad(wide, ((0, 4), (0, 0), (0, 0)), mode="edge")).save(hr_only / "img_001_SRF_4_HR.png")
    with pytest.raises(DiffsrError, match=r"is 64x52: the HR image must be 4x the LR one \(up to 3 pixels more"):
        load_pair(pair_images(hr_only, lr_only)[0], 4)
    Image.fromarray(wide[:16, :16]).save(hr_only / "img_001_SRF_4_HR.png")
    with pytest.raises(DiffsrError, match=r"img_001_SRF_4_HR.png is 16x16: too small to score \(at least 19 pixels"):
        load_pair(pair_images(hr_only, None)[0], 4)
    shutil.copy(CROPS / "img_001_SRF_4_HR.png", hr_only / "img_001_SRF_4_HR.png")
    made_lr, made_hr = load_pair(pair_images(hr_only, None)[0], 4)  # no LR folder: bicubic downscales
    assert made_lr.shape == (12, 16, 3)
    assert psnr_y(bicubic(made_lr, (64, 48)), made_hr, 4) > 20


def test_eval_on_set14_crops(tiny_checkpoint, tiny_onnx, server, tmp_path):
    """Bicubic first, then PyTorch, ONNX Runtime (FP32 and FP16) and the endpoint (the session's tritonserver of
    this checkpoint) with the difference to PyTorch in dB; the JSON holds every image's scores, the picture the
    crops side by side."""
    args = ["eval", "--checkpoint", str(tiny_checkpoint.path), "--onnx", str(tiny_onnx), "--hr", str(CROPS), "--lr", str(CROPS),
            "--backends", "torch,onnxruntime,triton", "--precision", "fp32,fp16", "--steps", "2",
            "--json", str(tmp_path / "q.json"), "--plot", str(tmp_path / "q.png"), "--triton-url", server.http_url]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "q.json").read_text())
    labels = [c["label"] for c in report["configs"]]
    assert labels == ["bicubic", "torch fp32", "onnxruntime fp32", "onnxruntime fp16", "triton fp32"]
    assert report["reference"] == "torch fp32"
    bicubic_row = report["configs"][0]
    by_hand = [psnr_y(bicubic(lr, (64, 48)), hr, 4) for lr, hr in (load_pair(p, 4) for p in pair_images(CROPS, CROPS))]
    assert [i["psnr_y"] for i in bicubic_row["images"]] == pytest.approx(by_hand)
    assert bicubic_row["psnr_y"] == pytest.approx(np.mean(by_hand))
    torch_row, ort_row = report["configs"][1], report["configs"][2]
    assert abs(torch_row["psnr_y"] - ort_row["psnr_y"]) < 0.05  # the same model, two runtimes
    endpoint = report["configs"][4]  # the endpoint serves the ONNX Runtime graphs: the same images, near enough
    assert [i["psnr_y"] for i in endpoint["images"]] == pytest.approx([i["psnr_y"] for i in ort_row["images"]], abs=0.01)
    assert "dB vs torch fp32" in result.output
    sheet = Image.open(tmp_path / "q.png")
    assert sheet.size[0] > 3 * 160 and sheet.size[1] > 3 * 160  # 3 images x (bicubic | torch fp32 | HR)


@pytest.mark.parametrize("args,message", [
    (["--backends", "torch,triton-ensemble"], r"backends \['triton-ensemble'\]: choose one or more of"),
    (["--backends", "onnxruntime"], "the onnxruntime row needs --onnx DIR"),
    (["--backends", "tensorrt", "--onnx", "x"], "the tensorrt row needs --engines DIR"),
])
def test_eval_checks_its_rows_before_loading(tiny_checkpoint, args, message):
    result = CliRunner().invoke(app, ["eval", "--checkpoint", str(tiny_checkpoint.path), "--hr", str(CROPS), *args])
    assert result.exit_code == 2 and re.search(message, result.output), result.output
    limit = CliRunner().invoke(app, ["eval", "--checkpoint", str(tiny_checkpoint.path), "--hr", str(CROPS), "--limit", "0"])
    assert limit.exit_code == 2 and "--limit" in limit.output
