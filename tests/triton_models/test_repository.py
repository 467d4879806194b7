"""Generated configs parse into Triton's ModelConfig and agree with the signatures, both flavours."""

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.families import preset
from diffsr.triton_models.endpoint import used_name
from diffsr.triton_models.repository import OUTPUT, TRITON_DTYPES, ServingOptions, model_configs, write_config

SUBMODULES = preset("tiny").submodules
BATCHED = preset("tiny").stages.step  # the submodules every step calls
TINY_INPUT_DIMS = {  # tiny: 4 latent channels, CLIP 32 wide, f1 64 and f2 32 channels
    "text_encoder": {"input_ids": [-1, 77]},
    "lq_encoder": {"lq_image": [-1, 3, -1, -1]},
    "fusion_transformer": {"f1": [-1, 64, -1, -1], "sample": [-1, 4, -1, -1]},
    "controlnet_unet": {"sample": [-1, 4, -1, -1], "timestep": [-1], "text_embeddings": [-1, 77, 32],
                        "f2": [-1, 32, -1, -1]},
    "vae_decoder": {"latent": [-1, 4, -1, -1]},
}


@pytest.mark.parametrize("flavour", ["onnxruntime", "tensorrt"])
@pytest.mark.parametrize("entry", ["bls", "ensemble"])
def test_configs_parse_and_match_the_signatures(tiny_checkpoint, flavour, entry, tmp_path):
    configs = model_configs(tiny_checkpoint, flavour, ServingOptions(entry=entry))
    stages = {"preprocess", "sampler", "postprocess"} if entry == "ensemble" else set()
    assert set(configs) == {*SUBMODULES, *stages, "diffsr"}
    assert (configs["diffsr"].platform == "ensemble") == (entry == "ensemble")
    sigs = tiny_checkpoint.model.signatures()
    for name, config in configs.items():
        write_config(config, tmp_path / flavour / entry / name)
        parsed = text_format.Parse((tmp_path / flavour / entry / name / "config.pbtxt").read_text(), mc.ModelConfig())
        assert parsed == config and parsed.name == name
        assert list(parsed.version_policy.specific.versions) == [1]
        if name in SUBMODULES:
            for specs, values in ((sigs[name].inputs, parsed.input), (sigs[name].outputs, parsed.output)):
                assert [v.name for v in values] == [s.name for s in specs]
                for spec, value in zip(specs, values):
                    assert value.data_type == TRITON_DTYPES[spec.dtype]
            # the tiny model's shapes as Triton reads them: every named dim dynamic, fixed ones kept
            assert {i.name: list(i.dims) for i in parsed.input} == TINY_INPUT_DIMS[name]
            if flavour == "tensorrt":
                assert parsed.platform == "tensorrt_plan" and parsed.default_model_filename == "model.plan"
                assert parsed.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
            else:
                assert parsed.backend == "python" and parsed.parameters["onnx_file"].string_value == f"{name}.onnx"


def test_ensemble_wires_every_step_output_to_a_later_input(tiny_checkpoint):
    ensemble = model_configs(tiny_checkpoint, "onnxruntime", ServingOptions(entry="ensemble"))["diffsr"]
    available = {i.name for i in ensemble.input}
    optional = {i.name for i in ensemble.input if i.optional}
    # every input optional to Triton: a missing photo is the parse's to refuse, in its words, on either entry point
    assert optional == {"image", "prompt", "negative_prompt", "steps", "guidance_scale", "seed", "scheduler", "caption"}
    for step in ensemble.ensemble_scheduling.step:
        assert set(step.input_map.values()) <= available, step.model_name  # topological order
        available |= set(step.output_map.values())
    assert [o.name for o in ensemble.output] == [OUTPUT, used_name("prompt")] and {OUTPUT, "used_prompt"} <= available


def test_tensorrt_flavour_keeps_tensors_on_the_gpu(tiny_checkpoint):
    configs = model_configs(tiny_checkpoint, "tensorrt", ServingOptions())
    assert configs["diffsr"].parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"
    assert configs["diffsr"].parameters["device"].string_value == "cuda"
    configs = model_configs(tiny_checkpoint, "tensorrt", ServingOptions(entry="ensemble"))
    for name in ("preprocess", "sampler", "postprocess"):
        assert configs[name].parameters["FORCE_CPU_ONLY_INPUT_TENSORS"].string_value == "no"


def test_unknown_flavour_is_refused(tiny_checkpoint):
    with pytest.raises(DiffsrError, match="unknown flavour 'tflite'"):
        model_configs(tiny_checkpoint, "tflite", ServingOptions())


@pytest.mark.parametrize("entry, loop", [("bls", "diffsr"), ("ensemble", "sampler")])
def test_the_loop_queue_is_bounded_and_times_out(tiny_checkpoint, entry, loop):
    options = ServingOptions(max_queue_size=5, queue_timeout_s=2, entry=entry)
    policy = model_configs(tiny_checkpoint, "onnxruntime", options)[loop].dynamic_batching.default_queue_policy
    assert policy.max_queue_size == 5 and policy.default_timeout_microseconds == 2_000_000
    assert policy.timeout_action == mc.ModelQueuePolicy.REJECT


def test_tensorrt_models_capture_cuda_graphs_at_the_served_shape(tiny_checkpoint):
    configs = model_configs(tiny_checkpoint, "tensorrt", ServingOptions())
    cuda = configs["controlnet_unet"].optimization.cuda
    assert cuda.graphs
    # the server's opt: one image, guided (two latent rows), the native 64-cell latent (512 px)
    assert {k: list(v.dim) for k, v in cuda.graph_spec[0].input.items()} == {
        "sample": [2, 4, 64, 64], "timestep": [2], "text_embeddings": [2, 77, 32], "f2": [1, 32, 64, 64]}
    # twice the largest output at the server's largest shapes: the decoder's 4 images of 1024 x 1024 in FP32
    assert int(configs["diffsr"].parameters["cuda_memory_pool_bytes"].string_value) == 2 * 4 * 3 * 1024 * 1024 * 4


def test_onnxruntime_flavour_serves_the_fused_graphs(tiny_repo):
    for name in SUBMODULES:
        config = text_format.Parse((tiny_repo / name / "config.pbtxt").read_text(), mc.ModelConfig())
        assert config.parameters["onnx_file"].string_value == f"{name}.ort.onnx"
        assert (tiny_repo / name / "1" / f"{name}.ort.onnx").is_file()


def test_unknown_entry_point_is_refused():
    with pytest.raises(DiffsrError, match="unknown entry point 'grpc'"):
        ServingOptions(entry="grpc")


def test_a_repository_whose_graph_changed_is_refused_before_the_server_starts(tiny_checkpoint, tiny_onnx, tmp_path):
    from diffsr.app.serving.triton_server import Ports, TritonServer
    from diffsr.triton_models.repository import build_repository, verify_repository

    repo = tmp_path / "models"
    build_repository(tiny_checkpoint, tiny_onnx, repo)
    verify_repository(repo)  # as written: accepted
    graph = repo / "controlnet_unet" / "1" / "controlnet_unet.ort.onnx"
    graph.write_bytes(graph.read_bytes() + b"\0")
    server = TritonServer(repo, Ports.free())
    with pytest.raises(DiffsrError, match="controlnet_unet/1/controlnet_unet.ort.onnx is not the graph"):
        server.start()
    assert server.process is None  # refused before anything was launched
    graph.unlink()
    with pytest.raises(DiffsrError, match="is missing: regenerate it"):
        verify_repository(repo)


def test_step_batching_configs(tiny_checkpoint):
    """With --step-batch N (onnxruntime flavour) the per-step models take a leading call axis (max batch N)
    behind the dynamic batcher, and the loop is told which models take it; off by default; the tensorrt
    flavour's plans take none, and asking for it there is an error."""
    for entry, loop in (("bls", "diffsr"), ("ensemble", "sampler")):
        configs = model_configs(tiny_checkpoint, "onnxruntime", ServingOptions(entry=entry, step_batch=8,
                                                                               step_batch_delay_us=500))
        for name in SUBMODULES:
            batched = name in BATCHED
            assert configs[name].max_batch_size == (8 if batched else 0), name
            assert configs[name].HasField("dynamic_batching") == batched, name
            if batched:
                assert configs[name].dynamic_batching.max_queue_delay_microseconds == 500
        assert configs[loop].parameters["step_batched"].string_value == ",".join(BATCHED)
    off = model_configs(tiny_checkpoint, "onnxruntime", ServingOptions(entry="ensemble"))
    assert all(off[name].max_batch_size == 0 for name in SUBMODULES)
    assert off["sampler"].parameters["step_batched"].string_value == ""
    plans = model_configs(tiny_checkpoint, "tensorrt", ServingOptions())
    assert all(plans[name].max_batch_size == 0 for name in SUBMODULES)
    with pytest.raises(DiffsrError, match="step batching is served by the onnxruntime flavour"):
        model_configs(tiny_checkpoint, "tensorrt", ServingOptions(step_batch=4))
    with pytest.raises(DiffsrError, match="at least 0"):
        ServingOptions(step_batch=-1)


def test_warmup_runs_each_submodule_once_at_the_served_shape(tiny_checkpoint):
    """`ServingOptions.warmup`: Triton's model warm-up on zeros at the served (opt) shape, per submodule model
    (the session's server starts with it, so Triton accepts it); off, no warm-up."""
    from diffsr.export.model.dims import TARGETS

    opt = TARGETS["server"].at(tiny_checkpoint.model.dims())
    on = model_configs(tiny_checkpoint, "onnxruntime", ServingOptions())
    for name, sig in tiny_checkpoint.model.signatures().items():
        (warm,) = on[name].model_warmup
        assert {k: list(v.dims) for k, v in warm.inputs.items()} == {k: list(v) for k, v in sig.input_shapes(opt).items()}
        assert all(v.zero_data for v in warm.inputs.values()) and warm.batch_size == 1
    off = model_configs(tiny_checkpoint, "onnxruntime", ServingOptions(warmup=False))
    assert not any(off[name].model_warmup for name in SUBMODULES)


def test_engine_tile_batch_shrinks_the_checkpoints_own_default(tiny_checkpoint):
    """The tensorrt flavour fits the tiles per call to the engines: the checkpoint's own `tile_batch`, not the
    settings class's default, is what shrinks; a larger asked batch is an error."""
    from dataclasses import replace

    from diffsr.triton_models.repository import fit_tile_batch

    defaults = replace(tiny_checkpoint.defaults, tile_batch=2)
    assert fit_tile_batch(ServingOptions(), 8, defaults).tile_batch == 2  # was 4, the class default
    assert fit_tile_batch(ServingOptions(), 1, defaults).tile_batch == 1
    assert fit_tile_batch(ServingOptions(tile_batch=3), 4, defaults).tile_batch == 3
    with pytest.raises(DiffsrError, match="above the engines' largest batch 2"):
        fit_tile_batch(ServingOptions(tile_batch=3), 2, defaults)


def test_an_ensemble_runs_stages_of_an_emptiable_list_in_its_sampler():
    """refsr's reference encoder reads `references`, which a request may leave empty: the ensemble cannot skip a
    step, so its sampler runs it (and the stage after it), given the prepared references and the LR photo its step
    reads; SD's text encoder stays an ensemble step."""
    from diffsr.export.model.families import preset
    from diffsr.triton_models.repository import sampler_inputs, split_stages

    refsr = preset("refsr-tiny")
    steps, rest = split_stages(refsr)
    assert steps == [] and [s.submodule for s in rest] == ["lr_encoder", "reference_encoder", "reference_attention"]
    assert {t.name for t in sampler_inputs(refsr)} == {"lr_image", "references"}
    assert [s.submodule for s in split_stages(preset("tiny"))[0]] == ["text_encoder"]


def test_the_preprocessing_runs_the_prompting_stages_and_hands_their_segmentation_on(sisrm_checkpoint):
    """sisrm's segmenter and label generator run in the preprocessing (their words join the prompt before it is
    tokenised): in neither the ensemble's steps nor its sampler; the preprocessing hands on the segmentation at the
    latent's sides, which the sampler's tiled mask encoder takes, and holds the segmenter's configs (for its image
    processor and label names), not its weights."""
    from diffsr.triton_models.repository import ServingOptions, model_configs, sampler_inputs, split_stages

    model = sisrm_checkpoint.model
    steps, rest = split_stages(model)
    assert [s.submodule for s in steps] == ["text_encoder"]
    assert [s.submodule for s in rest] == ["lr_encoder", "mask_encoder"]
    assert {t.name for t in sampler_inputs(model)} == {"text_embeddings", "lq_image", "segmentation"}
    configs = model_configs(sisrm_checkpoint, "onnxruntime", ServingOptions(entry="ensemble"))
    assert {o.name for o in configs["preprocess"].output} >= {"segmentation", "input_ids", "lq_image", "used_prompt"}
    assert "pixel_values" not in {o.name for o in configs["preprocess"].output}
    from diffsr.triton_models.repository import _all_but

    ignore = _all_but(model.reading_folders()["segmenter"])
    assert sorted(ignore("segmenter", sorted(p.name for p in (sisrm_checkpoint.path / "segmenter").iterdir()))) == \
        ["model.safetensors"]
