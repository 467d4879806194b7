"""The FP16 step of the export: a keep-list in, checked FP16 graphs and a manifest out, progress as events."""

import shutil

import pytest
from rich.console import Console
from rich.progress import Progress as RichProgress

from diffsr.app.cli.common import Bars
from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.progress import Progress
from diffsr.export.graphs.exporter import write_fp16
from diffsr.export.graphs.manifest import read_manifest
from diffsr.export.graphs.to_fp16 import KeptLayer
from diffsr.export.model.families import preset

SUBMODULES = preset("tiny").submodules


@pytest.fixture()
def onnx_copy(tiny_onnx, tmp_path):
    return shutil.copytree(tiny_onnx, tmp_path / "onnx")


def _kept(manifest):
    return {name: [KeptLayer(**k) for k in manifest["submodules"][name]["fp16"]["kept_fp32"]] for name in SUBMODULES}


def test_write_fp16_reproduces_the_export_and_reports_progress(tiny_checkpoint, onnx_copy):
    before = read_manifest(onnx_copy)
    events: list[Progress] = []
    after = write_fp16(onnx_copy, tiny_checkpoint, _kept(before), {"note": "again"}, on_progress=events.append)
    for name in SUBMODULES:  # the same keep-list gives the same bytes
        assert after["submodules"][name]["fp16"]["sha256"] == before["submodules"][name]["fp16"]["sha256"], name
    assert after["fp16_calibration"] == {"note": "again"}
    assert {e.task for e in events} == {"fp16"}
    assert [e.done for e in events] == sorted(e.done for e in events)
    assert events[-1].done == events[-1].total == len(SUBMODULES)


def test_keeping_fewer_layers_changes_the_graph(tiny_checkpoint, onnx_copy):
    before = read_manifest(onnx_copy)
    kept = _kept(before) | {"controlnet_unet": []}
    after = write_fp16(onnx_copy, tiny_checkpoint, kept, {})
    assert after["submodules"]["controlnet_unet"]["fp16"]["kept_fp32"] == []
    assert after["submodules"]["controlnet_unet"]["fp16"]["sha256"] != before["submodules"]["controlnet_unet"]["fp16"]["sha256"]


def test_a_missing_keep_list_or_foreign_folder_is_refused(tiny_checkpoint, onnx_copy, tmp_path):
    kept = _kept(read_manifest(onnx_copy))
    del kept["vae_decoder"]
    with pytest.raises(DiffsrError, match=r"no FP16 keep-list for \['vae_decoder'\]"):
        write_fp16(onnx_copy, tiny_checkpoint, kept, {})
    (onnx_copy / "lq_encoder.onnx").write_bytes(b"changed")
    with pytest.raises(DiffsrError, match="lq_encoder: .* does not match its sha256"):
        write_fp16(onnx_copy, tiny_checkpoint, _kept(read_manifest(onnx_copy)), {})


def test_the_cli_draws_events_by_their_fields():
    progress = RichProgress(console=Console(file=open("/dev/null", "w")))
    draw = Bars(progress)
    draw(Progress("export", "text_encoder fp32", 0, 5))
    draw(Progress("export", "lq_encoder fp32", 1, 5))
    draw(Progress("fp16 check", "calibration run 1/2", 1, 7))
    tasks = {t.description.split(":")[0]: t for t in progress.tasks}
    assert set(tasks) == {"export", "fp16 check"}
    assert (tasks["export"].completed, tasks["export"].total) == (1, 5)
    assert tasks["export"].description == "export: lq_encoder fp32"
    assert (tasks["fp16 check"].completed, tasks["fp16 check"].total) == (1, 7)


def test_graphs_already_exported_from_this_checkpoint_are_kept(tiny_checkpoint, onnx_copy):
    from diffsr.export.graphs.exporter import export_onnx

    before = read_manifest(onnx_copy)
    (onnx_copy / "fusion_transformer.onnx").write_bytes(b"spoiled")  # this one must be exported again
    events: list[Progress] = []
    after = export_onnx(tiny_checkpoint, onnx_copy, on_progress=events.append)
    kept = {e.item.split()[0] for e in events if e.item.endswith("up to date")}
    assert kept == set(SUBMODULES) - {"fusion_transformer"}
    for name in SUBMODULES:
        assert after["submodules"][name]["fp32"]["sha256"] == before["submodules"][name]["fp32"]["sha256"], name
    assert "fp16" not in after["submodules"]["vae_decoder"]  # one FP32 graph replaced: the FP16 set is redone
    assert not (onnx_copy / "vae_decoder.fp16.onnx").exists()
    again = export_onnx(tiny_checkpoint, onnx_copy)  # nothing to do now
    assert {n: e["fp32"]["sha256"] for n, e in again["submodules"].items()} == {
        n: e["fp32"]["sha256"] for n, e in after["submodules"].items()}


def test_a_complete_export_keeps_its_fp16_graphs(tiny_checkpoint, onnx_copy):
    from diffsr.export.graphs.exporter import export_onnx

    before = read_manifest(onnx_copy)
    export_onnx(tiny_checkpoint, onnx_copy)
    after = read_manifest(onnx_copy)
    assert after["submodules"] == before["submodules"] and after["fp16_calibration"] == before["fp16_calibration"]
