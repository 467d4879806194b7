"""`diffsr triton-repo`: a Triton model repository generated from the signatures and the request's declaration.

    diffsr (entry)      the model's request inputs (`ModelFamily.request_inputs`: image, prompt, ..., the family's
                        own) -> upscaled (PNG), used_prompt (and each other prompt slot's text: XPSR's
                        used_prompt_low); one python model on the client's own request (a cancel
                        reaches its loop):
                          parse and check the request once; decode the photos, prepare them, the prompt (an
                          attachment's models over BLS where the policy asks), token ids
                          the once-per-request stages   BLS: one model per submodule, tensorrt_plan or python + ONNX
                                                        Runtime (SD: the text encoder; the LQ encoder over tiles)
                          the loop over tiles, BLS: the step stage's submodules each step (SD: fusion_transformer,
                                                    controlnet_unet), then the decode stage
                          crop, colour correction, PNG

    `ServingOptions(entry="ensemble")`: `diffsr` is an ensemble of `preprocess` (which parses, and hands the parsed
    settings on as JSON), the untiled once-per-request stages' models, a `sampler` model running the tiled stages
    and the loop, and `postprocess` (Triton 2.51 does not pass a cancel on to the sampler).

    Every submodule of the model's family is a model of its own, called by the loop tile batch by tile
    batch (runtime/tiling.py), so no call holds a whole large image's activations.

Configs are built as Triton's own `ModelConfig` protobuf (shipped in tritonclient) and written in
its text format, so what is written is what Triton parses. Python models are two-line `model.py`
files importing the implementation from `diffsr.triton_models.models`.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from fnmatch import fnmatch
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from diffsr.export.core.errors import DiffsrError
from diffsr.export.core.files import read_json, require_new_folder
from diffsr.export.core.precision import Precision
from diffsr.export.engines.metadata import read_meta, verified_plans
from diffsr.export.graphs.manifest import checkpoint_digest, file_sha256, signature_hash, verified_files
from diffsr.export.model.checkpoint import Checkpoint
from diffsr.export.model.dims import BATCH_KINDS, TARGETS
from diffsr.export.model.families import module_of
from diffsr.export.model.family import ModelFamily
from diffsr.export.model.parts import Stage
from diffsr.export.model.settings import PipelineConfig
from diffsr.export.model.signatures import Signature, TensorSpec
from diffsr.runtime.gallery import TOP_K
from diffsr.runtime.tiling import tiling_for
from diffsr.triton_models.endpoint import (
    ENSEMBLE,
    GALLERY,
    OUTPUT,
    RESPONSE,
    SETTINGS,
    optional_inputs,
    request_specs,
    response_specs,
)

FLAVOURS = ("onnxruntime", "tensorrt")
REPOSITORY_MANIFEST = "diffsr-repository.json"  # at the repository's root (Triton loads only its folders)
TRITON_DTYPES = {"float32": mc.TYPE_FP32, "float16": mc.TYPE_FP16, "int32": mc.TYPE_INT32, "int64": mc.TYPE_INT64,
                 "bytes": mc.TYPE_STRING, "bool": mc.TYPE_BOOL}


@dataclass(frozen=True)
class ServingOptions:
    """Production settings; the README says why each is what it is."""

    sampler_instances: int = 2  # requests denoised at once; each holds an instance for all its steps
    model_instances: int = 1  # per submodule model; BLS calls from all samplers share them
    max_queue_size: int = 16  # sampler queue bound: beyond it a request is rejected at once
    queue_timeout_s: float = 120.0  # a request still queued after this is rejected
    max_output_pixels: int = 4096 * 4096  # larger requests are refused (INVALID_ARGUMENT); tiles bound the memory
    warmup: bool = True  # Triton runs each submodule's model once on zeros at the served shape before it is ready
    tile: int | None = None  # the sampler's tiling (PipelineConfig): None keeps the checkpoint's default
    tile_overlap: int | None = None
    tile_batch: int | None = None
    entry: str = "bls"  # the endpoint: a BLS model running the loop (cancellable), or "ensemble"
    # cross-request step batching (triton_models.step_batching): the most loops' calls one fusion_transformer
    # or controlnet_unet run takes; 0: off, the default (no gain measured on a 2-core CPU: README)
    step_batch: int = 0
    step_batch_delay_us: int = 0  # how long a call may wait for others; 0: only those already queued join
    # a gallery index (`diffsr gallery build`): a request without references gets its `gallery_top_k` photos nearest
    # the request's photo (read from the folder the index was built over) and the answer names them
    gallery: str | None = None
    gallery_top_k: int = TOP_K

    def __post_init__(self) -> None:
        if self.entry not in ENTRIES:
            raise DiffsrError(f"unknown entry point {self.entry!r}; choose one of {list(ENTRIES)}")
        if self.step_batch < 0 or self.step_batch_delay_us < 0:
            raise DiffsrError("--step-batch and its delay must be at least 0")

    def batched(self, model: ModelFamily, flavour: str) -> tuple[str, ...]:
        """The submodules served with step batching in a flavour: the step stage's, as python models of the
        onnxruntime flavour. TensorRT plans take no leading call axis (a front python model would cost a hop
        per call, unmeasured without a GPU), so asking for it there is an error."""
        if self.step_batch > 1 and flavour == "tensorrt":
            raise DiffsrError("step batching is served by the onnxruntime flavour's python models; the tensorrt "
                              "flavour's plans take one loop's call at a time (use --step-batch 0)")
        return model.stages.step if self.step_batch > 1 else ()


ENTRIES = ("bls", "ensemble")
OUTPUT_SIZE = TensorSpec("output_size", "int32", (2,))  # (h, w) of the upscaled image, before padding


def _dims(spec: TensorSpec) -> list[int]:
    return [d if isinstance(d, int) else -1 for d in spec.shape]


def _input(spec: TensorSpec, optional: bool = False) -> mc.ModelInput:
    return mc.ModelInput(name=spec.name, data_type=TRITON_DTYPES[spec.dtype], dims=_dims(spec), optional=optional)


def _output(spec: TensorSpec) -> mc.ModelOutput:
    return mc.ModelOutput(name=spec.name, data_type=TRITON_DTYPES[spec.dtype], dims=_dims(spec))


def _params(config: mc.ModelConfig, **values: str) -> None:
    for key, value in values.items():
        config.parameters[key].string_value = value


def _config(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], optional: tuple[str, ...] = ()) -> mc.ModelConfig:
    config = mc.ModelConfig(name=name, max_batch_size=0)
    config.version_policy.specific.versions.append(1)  # pinned: exactly the version this tool wrote
    config.input.extend(_input(s, s.name in optional) for s in inputs)
    config.output.extend(_output(s) for s in outputs)
    return config


def model_configs(ckpt: Checkpoint, flavour: str, options: ServingOptions,
                  onnx_files: dict[str, str] | None = None) -> dict[str, mc.ModelConfig]:
    """Every model's config, keyed by model name; `onnx_files` (onnxruntime): each submodule's file name
    (default: the FP32 graph's)."""
    if flavour not in FLAVOURS:
        raise DiffsrError(f"unknown flavour {flavour!r}; choose one of {list(FLAVOURS)}")
    model = ckpt.model
    sigs = model.signatures()
    gpu = flavour == "tensorrt"
    opt = TARGETS["server"].at(model.dims())
    kind = mc.ModelInstanceGroup.KIND_GPU if gpu else mc.ModelInstanceGroup.KIND_CPU
    batched = options.batched(model, flavour)
    model_params = dict(family=model.name, family_module=module_of(model) or "", model=json.dumps(model.to_json()))
    configs: dict[str, mc.ModelConfig] = {}
    for name, sig in sigs.items():
        config = _config(name, list(sig.inputs), list(sig.outputs))
        config.instance_group.add(count=options.model_instances, kind=kind)
        if gpu:
            config.platform = "tensorrt_plan"
            config.default_model_filename = "model.plan"
            _cuda_graph(config, sig, opt)
        else:
            config.backend = "python"
            _params(config, onnx_file=(onnx_files or {}).get(name, Precision.FP32.filename(name)))
        if name in batched:  # a leading axis of calls; the python model stacks them (step_batching)
            config.max_batch_size = options.step_batch
            config.dynamic_batching.max_queue_delay_microseconds = options.step_batch_delay_us
            _params(config, **model_params)
        if options.warmup:
            _warmup(config, sig, opt)
        configs[name] = config

    specs, optional = request_specs(model), optional_inputs(model)
    photo = next(t for t in model.prepared() if t.name == model.stages.photo)
    dec = sigs[model.stages.decode]
    defaults = ckpt.defaults.replace(tile=options.tile, tile_overlap=options.tile_overlap, tile_batch=options.tile_batch)
    tiling_for(model, defaults)  # a bad tiling fails here, not in the server
    pipeline_json = json.dumps(defaults.to_json())
    # what every model that parses requests or runs stages needs: the defaults, the training schedule, the limit
    pre_params = dict(pipeline=pipeline_json, scheduler=json.dumps(ckpt.scheduler_config),
                      max_output_pixels=str(options.max_output_pixels), gallery_top_k=str(options.gallery_top_k),
                      **model_params)
    responses = response_specs(model, options.gallery is not None)
    device = "cuda" if gpu else "cpu"

    decoded = TensorSpec("decoded", "float32", dec.outputs[0].shape)
    ensemble_stages, _ = split_stages(model)
    if options.entry == "bls":  # the entry model parses, pre- and postprocesses and runs the loop, on the client's request
        sampler = _config(ENSEMBLE, specs, responses, optional=optional)
    else:
        sampler = _config("sampler", [*sampler_inputs(model), OUTPUT_SIZE, SETTINGS], [decoded])
    _params(sampler, device=device, cuda_memory_pool_bytes=str(cuda_pool_bytes(ckpt) if gpu else 0),
            step_batched=",".join(batched), **pre_params)
    sampler.instance_group.add(count=options.sampler_instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    policy = sampler.dynamic_batching.default_queue_policy  # requests wait here, bounded, not unboundedly
    policy.timeout_action = mc.ModelQueuePolicy.REJECT
    policy.default_timeout_microseconds = int(options.queue_timeout_s * 1e6)
    policy.max_queue_size = options.max_queue_size

    pre = _config("preprocess", specs, [*model.prepared(), OUTPUT_SIZE, *responses[1:], SETTINGS],
                  optional=optional)
    _params(pre, device="cpu", **pre_params)
    pre.instance_group.add(count=options.model_instances, kind=mc.ModelInstanceGroup.KIND_CPU)
    post = _config("postprocess", [decoded, photo, OUTPUT_SIZE], [RESPONSE])
    _params(post, color_fix=ckpt.defaults.color_fix, lq_input=photo.name)
    post.instance_group.add(count=options.model_instances, kind=mc.ModelInstanceGroup.KIND_CPU)

    for config in (pre, sampler, post):
        config.backend = "python"
        if gpu:  # tensors stay on the GPU between BLS calls (DLPack), not copied to the host
            _params(config, FORCE_CPU_ONLY_INPUT_TENSORS="no")
    if options.entry == "bls":
        configs[ENSEMBLE] = sampler
    else:
        configs.update(preprocess=pre, sampler=sampler, postprocess=post)
        configs[ENSEMBLE] = _ensemble(model, specs, optional, ensemble_stages, responses)
    return configs


def split_stages(model: ModelFamily) -> tuple[list[Stage], list[Stage]]:
    """(the once-per-request stages an ensemble runs as steps of its own, those its sampler runs): an untiled stage
    whose inputs the preprocessing or an earlier such step makes is a step; tiled ones, any that needs what only the
    sampler makes, and any that reads a list of photos a request may leave empty (an ensemble cannot skip a step:
    `runtime.stages.not_run`), run in the sampler. Prompting stages run in the preprocessing (which hands their outputs
    on), in neither."""
    ready = {t.name for t in model.prepared()}
    emptiable = {i.tensor for i in model.photo_lists() if not i.low}
    steps, rest = [], []
    for stage in model.stages.once:
        if stage.prompting:
            continue
        sig = model.signature(stage.submodule)
        if not stage.tiled and all(t.name in ready and t.name not in emptiable for t in sig.inputs):
            steps.append(stage)
            ready |= {t.name for t in sig.outputs}
        else:
            rest.append(stage)
            emptiable |= {t.name for t in sig.outputs} if emptiable & {t.name for t in sig.inputs} else set()
    return steps, rest


def sampler_inputs(model: ModelFamily) -> list[TensorSpec]:
    """What the ensemble's sampler takes besides the output size and the settings: the outputs of the stages the
    ensemble ran, and what its own stages take from the preprocessing (the photo at least: the tiled stages')."""
    steps, rest = split_stages(model)
    made = {t.name: t for s in steps for t in model.signature(s.submodule).outputs}
    own = {t.name for s in rest for t in model.signature(s.submodule).outputs}
    needed = {t.name: t for s in rest for t in model.signature(s.submodule).inputs if t.name not in own}
    stepped = {t.name: t for t in model.prepared() if t.name in model.tiled_scales()}  # photos the step reads
    return list(({**needed, **stepped, **made}).values())


def loop_model(repository: Path) -> str:
    """The model of a repository that runs the denoising loop: the entry model, or the ensemble's sampler."""
    return "sampler" if (repository / "sampler").is_dir() else ENSEMBLE


def _warmup(config: mc.ModelConfig, sig: Signature, dims: dict[str, int]) -> None:
    """Triton's model warm-up: one call on zeros at the served (opt) shape while the model loads, so that
    first-call costs (allocations, ONNX Runtime's arena, TensorRT's first enqueue at a shape) are paid before
    the server reports ready. Zeros are valid for every input (token ids, timesteps, latents)."""
    warm = config.model_warmup.add(name="served shape", batch_size=1)
    for spec, shape in sig.input_shapes(dims).items():
        data = warm.inputs[spec]
        data.data_type = config.input[[i.name for i in config.input].index(spec)].data_type
        data.dims.extend(shape)
        data.zero_data = True


def _cuda_graph(config: mc.ModelConfig, sig: Signature, dims: dict[str, int]) -> None:
    """The TensorRT backend's CUDA graph, captured at the served (opt) shape; other shapes run without."""
    cuda = config.optimization.cuda
    cuda.graphs = True
    spec = cuda.graph_spec.add()
    for name, shape in sig.input_shapes(dims).items():
        spec.input[name].dim.extend(shape)


def cuda_pool_bytes(ckpt: Checkpoint) -> int:
    """A CUDA memory pool that holds the largest output any model returns at the server's max shape,
    twice (one in flight between BLS calls, one being written)."""
    dims = {name: r.max for name, r in TARGETS["server"].dim_ranges(ckpt.model.dims()).items()}
    sizes = [4 * math.prod(shape) for sig in ckpt.model.signatures().values() for shape in sig.output_shapes(dims).values()]
    return 2 * max(sizes)


def _ensemble(model: ModelFamily, specs: list[TensorSpec], optional: tuple[str, ...],
              stages: list[Stage], responses: list[TensorSpec]) -> mc.ModelConfig:
    """preprocess -> the untiled once-per-request stages' models -> sampler -> postprocess, every tensor under its
    own name."""
    config = _config(ENSEMBLE, specs, responses, optional=optional)
    config.platform = "ensemble"
    # the ensemble's tensors share one namespace with its inputs and outputs: a model's tensor whose name an input
    # has (a photo input `style`, a stage's output `style`) goes by another inside it
    taken = {s.name for s in specs} | {OUTPUT}
    inner = lambda names: {n: f"{n}.tensor" if n in taken else n for n in names}  # noqa: E731
    same = lambda names: {n: n for n in names}  # noqa: E731
    photo = model.stages.photo
    prepared = [t.name for t in model.prepared()]
    steps = [
        ("preprocess", same(s.name for s in specs),
         inner((*prepared, "output_size", SETTINGS.name)) | same(t.name for t in responses[1:])),
        *((s.submodule, inner(t.name for t in model.signature(s.submodule).inputs),
           inner(t.name for t in model.signature(s.submodule).outputs)) for s in stages),
        ("sampler", inner((*(t.name for t in sampler_inputs(model)), "output_size", SETTINGS.name)), inner(("decoded",))),
        ("postprocess", inner(("decoded", photo, "output_size")), {OUTPUT: OUTPUT}),
    ]
    for name, inputs, outputs in steps:
        step = config.ensemble_scheduling.step.add(model_name=name, model_version=1)
        step.input_map.update(inputs)
        step.output_map.update(outputs)
    return config


def write_config(config: mc.ModelConfig, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.pbtxt").write_text(text_format.MessageToString(config))


def build_repository(
    ckpt: Checkpoint, onnx_dir: Path | None, out: Path, flavour: str = "onnxruntime",
    engines_dir: Path | None = None, options: ServingOptions = ServingOptions(),
) -> dict[str, mc.ModelConfig]:
    """Write the model repository; ONNX files are checked against their manifest before copying."""
    require_new_folder(out)
    if flavour == "tensorrt":
        if engines_dir is None:
            raise DiffsrError("the tensorrt flavour needs --engines DIR (made by `diffsr build-engines`)")
        # the serving machine's TensorRT and GPU are checked by Triton when it loads the plans
        hashes = {name: signature_hash(sig) for name, sig in ckpt.model.signatures().items()}
        files = verified_plans(Path(engines_dir), ckpt.path, hashes)
        options = fit_tile_batch(options, engine_batch(files, ckpt.model), ckpt.defaults)
    else:
        if onnx_dir is None:
            raise DiffsrError("the onnxruntime flavour needs --onnx DIR (made by `diffsr export`)")
        # ONNX Runtime's fused graphs where the export made them (see export.ort_fusions)
        files = verified_files(Path(onnx_dir), ckpt, Precision.FP32, fused=True)
    configs = model_configs(ckpt, flavour, options, {name: path.name for name, path in files.items()})
    for name, config in configs.items():
        folder = out / name
        write_config(config, folder)
        version = folder / "1"
        version.mkdir()
        if name in ckpt.model.submodules:
            src = files[name]
            if not src.is_file():
                raise DiffsrError(f"{name}: {src} is missing")
            if flavour == "tensorrt":
                shutil.copy(src, version / "model.plan")
            else:
                shutil.copy(src, version / src.name)
                data = src.with_name(src.name + ".data")
                if data.is_file():
                    shutil.copy(data, version / data.name)
                (version / "model.py").write_text(_stub("onnx_model"))
        elif name == ENSEMBLE:
            if config.backend == "python":
                (version / "model.py").write_text(_stub("entry"))
        else:
            (version / "model.py").write_text(_stub(name))
    preprocessing = [n for n in ("preprocess", ENSEMBLE) if n in configs and configs[n].backend == "python"][:1]
    if options.gallery is not None:
        _copy_gallery(ckpt, options, out / preprocessing[0] / "1" / GALLERY)
    for folder, patterns in ckpt.model.reading_folders().items():  # the tokenizers; a family's processor configs
        for name in preprocessing:
            shutil.copytree(ckpt.path / folder, out / name / "1" / folder, ignore=_all_but(patterns))
    for attachment in ckpt.model.attachments:  # what its runner reads (a tokenizer, configs), not its weights
        for name in preprocessing:
            (out / name / "1" / attachment.folder).mkdir()
            for file in attachment.serving_files(ckpt.path / attachment.folder):
                shutil.copy(file, out / name / "1" / attachment.folder / file.name)
    graphs = sorted(p for p in out.glob("*/1/*") if p.suffix in (".onnx", ".plan"))
    manifest = {"flavour": flavour, "checkpoint_sha256": checkpoint_digest(ckpt.path),
                "graphs": {str(p.relative_to(out)): file_sha256(p) for p in graphs}}
    (out / REPOSITORY_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return configs


def _all_but(patterns: tuple[str, ...]) -> Callable[[str, list[str]], list[str]]:
    """`shutil.copytree`'s ignore: every file whose name matches none of the patterns."""
    return lambda folder, names: [n for n in names if not any(fnmatch(n, p) for p in patterns)]


def _copy_gallery(ckpt: Checkpoint, options: ServingOptions, to: Path) -> None:
    """A gallery index copied for the preprocessing model, once it is known to serve: the family takes a list of
    photos it can fill, the checkpoint's gallery encoder built it, its photos are where it says."""
    from diffsr.runtime.gallery import INDEX_FILE, PHOTOS_FILE, Gallery

    listed = next(iter(ckpt.model.photo_lists()), None)
    encoder = ckpt.model.attachment("gallery_encoder")
    if listed is None or encoder is None:
        raise DiffsrError(f"--gallery: this {ckpt.model.name} checkpoint "
                          f"{'takes no reference photos' if listed is None else 'has no gallery_encoder/'}")
    if not 1 <= options.gallery_top_k <= (listed.high or 0):
        raise DiffsrError(f"--gallery-top-k {options.gallery_top_k}: use 1 to {int(listed.high or 0)} ({listed.name})")
    index = Path(str(options.gallery))
    gallery = Gallery.load(index)
    if gallery.encoder != checkpoint_digest(encoder.path):
        raise DiffsrError(f"--gallery {index} was built with another gallery encoder than {ckpt.path}'s")
    gallery.files([])  # an index that does not say where its photos are is refused now, not at the first request
    if not len(gallery):
        raise DiffsrError(f"--gallery {index} holds no photos: build it over a folder of photos")
    if not Path(gallery.root).is_dir():
        raise DiffsrError(f"--gallery {index}: its photos' folder {gallery.root} is not here: the server reads them from "
                          "there (mount it at that path)")
    to.mkdir(parents=True)
    for name in (INDEX_FILE, PHOTOS_FILE):
        shutil.copy(index / name, to / name)


def verify_repository(repo: Path) -> None:
    """Refuse a repository whose graphs (ONNX files with their external data, TensorRT plans) are no
    longer the ones `triton-repo` copied: each is checked against the sha256 recorded then, before the
    server starts, so a mismatch is one clear message and not a model that loads something else. A
    repository without the record (not made by this tool) is taken as it is."""
    record = Path(repo) / REPOSITORY_MANIFEST
    if not record.is_file():
        return
    graphs = read_json(record, "model repository record")["graphs"]
    for rel, sha in graphs.items():
        path = Path(repo) / rel
        if not path.is_file():
            raise DiffsrError(f"model repository {repo}: {rel} is missing: regenerate it with `diffsr triton-repo`")
        if file_sha256(path) != sha:
            raise DiffsrError(f"model repository {repo}: {rel} is not the graph `diffsr triton-repo` copied (its sha256 "
                              f"differs): regenerate the repository from the ONNX or engine folder")


def engine_batch(plans: dict[str, Path], model: ModelFamily) -> int:
    """The most tiles every tiled engine takes in one call (a guided dim holds two rows per tile)."""
    kinds = {d.name: d.kind for d in model.dims()}
    most = []
    for name, plan in plans.items():
        spec = model.signature(name).inputs[0]
        kind = kinds.get(str(spec.shape[0]))
        if kind not in BATCH_KINDS:
            continue  # the text stage's batch is prompts
        largest = read_meta(plan).profile[spec.name][2][0]
        most.append(largest // 2 if kind == "guided" else largest)
    return min(most)


def fit_tile_batch(options: ServingOptions, most: int, defaults: PipelineConfig) -> ServingOptions:
    """Tiles per call within what the engines take: a larger asked batch is an error; the checkpoint's own
    setting shrinks to fit."""
    if options.tile_batch is None:
        return replace(options, tile_batch=min(defaults.tile_batch, most))
    if options.tile_batch > most:
        raise DiffsrError(f"--tile-batch {options.tile_batch} is above the engines' largest batch {most} "
                          "(build them with --max-batch to raise it)")
    return options


def _stub(module: str) -> str:
    return f'"""Generated by diffsr triton-repo."""\nfrom diffsr.triton_models.models.{module} import TritonPythonModel  # noqa: F401\n'


def pipeline_defaults(config: mc.ModelConfig) -> PipelineConfig:
    return PipelineConfig.from_json(json.loads(config.parameters["pipeline"].string_value))
