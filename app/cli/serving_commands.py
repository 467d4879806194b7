"""Commands that serve: triton-repo, serve, client, soak, kubernetes."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from diffsr.app.cli.common import bars, command, console, out, output_path, parse_size, writable
from diffsr.app.cli.request_options import request_options
from diffsr.export.core.errors import DiffsrError


@command("triton-repo")
def triton_repo(
    checkpoint: Annotated[Path, typer.Option(help="checkpoint folder (tokenizer, defaults, model widths)")],
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="model repository to create")],
    onnx: Annotated[Optional[Path], typer.Option(help="ONNX folder, for the onnxruntime flavour")] = None,
    engines: Annotated[Optional[Path], typer.Option(help="engine folder, for the tensorrt flavour")] = None,
    flavour: Annotated[str, typer.Option(help="onnxruntime or tensorrt")] = "onnxruntime",
    sampler_instances: Annotated[int, typer.Option(help="requests denoised at once")] = 2,
    max_output: Annotated[str, typer.Option(help="largest output, WIDTHxHEIGHT: any shape of at most that many pixels")] = "4096x4096",
    tile: Annotated[Optional[int], typer.Option(help="tile side in latent cells (default: the model's native side)")] = None,
    tile_overlap: Annotated[Optional[int], typer.Option(help="latent cells shared by neighbouring tiles (default: a quarter tile)")] = None,
    tile_batch: Annotated[Optional[int], typer.Option(help="tiles per submodule call (default 4; tensorrt: at most the engines' batch)")] = None,
    entry: Annotated[str, typer.Option(help="the endpoint: bls (runs the loop; a cancel reaches it) or ensemble")] = "bls",
    step_batch: Annotated[int, typer.Option(help="onnxruntime flavour: most loops' calls one run of a step submodule takes (0 or 1: off)")] = 0,
    step_batch_delay_us: Annotated[int, typer.Option(help="how long a step call may wait for others to batch with")] = 0,
    gallery: Annotated[Optional[Path], typer.Option(help="a gallery index (`diffsr gallery build`): a request without "
                                                          "references gets the photos nearest its photo")] = None,
    gallery_top_k: Annotated[Optional[int], typer.Option(help="how many photos --gallery picks (default 4)")] = None,
) -> None:
    """Generate the Triton model repository (BLS entry point, per-submodule models)."""
    from diffsr.export.model.checkpoint import open_checkpoint
    from diffsr.runtime.gallery import TOP_K
    from diffsr.triton_models.repository import ServingOptions, build_repository

    if gallery_top_k is not None and gallery is None:
        raise DiffsrError("--gallery-top-k says how many photos --gallery picks: give --gallery INDEX too")
    w, h = parse_size(max_output)
    options = ServingOptions(sampler_instances=sampler_instances, max_output_pixels=w * h, tile=tile,
                             tile_overlap=tile_overlap, tile_batch=tile_batch, entry=entry, step_batch=step_batch,
                             step_batch_delay_us=step_batch_delay_us, gallery=str(gallery) if gallery else None,
                             gallery_top_k=TOP_K if gallery_top_k is None else gallery_top_k)
    configs = build_repository(open_checkpoint(checkpoint), onnx, out_dir, flavour, engines, options)
    console.print(f"wrote {len(configs)} models ({flavour}) to {out_dir}: {', '.join(configs)}", soft_wrap=True)


@command()
def serve(
    repo: Annotated[Path, typer.Option(help="model repository made by `diffsr triton-repo`")],
    http_port: Annotated[int, typer.Option()] = 8000,
    grpc_port: Annotated[int, typer.Option()] = 8001,
    metrics_port: Annotated[int, typer.Option()] = 8002,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
    system: Annotated[bool, typer.Option("--system", help="use the tritonserver on PATH")] = False,
) -> None:
    """Run Triton on the repository until Ctrl-C, forwarding its log."""
    from diffsr.app.serving.triton_server import Ports, TritonServer
    from diffsr.calib.data import photo
    from diffsr.runtime.image import encode_png

    server = TritonServer(repo, Ports(http_port, grpc_port, metrics_port), host, system,
                          log_line=lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))
    with server:
        try:
            warm = server.warm_up(encode_png(photo("astronaut", (128, 128))))
        except DiffsrError as e:
            raise DiffsrError(f"warm-up request failed: {e}") from None
        console.print(f"warm-up at 128x128 -> 512x512: {warm:.2f} s", highlight=False)
        console.print(f"serving diffsr: http {server.http_url}, grpc {server.grpc_url}; Ctrl-C stops", soft_wrap=True)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        try:
            assert server.process is not None
            code = server.process.wait()
        except KeyboardInterrupt:
            console.print("stopping tritonserver")
            return
        raise DiffsrError(f"tritonserver exited with code {code}: {server.last_error()}")


@command()
@request_options
def client(
    values: dict[str, Any],
    out_file: Annotated[Path, typer.Option("--out", "-o", help="output PNG")],
    url: Annotated[str, typer.Option(help="host:port of the HTTP or gRPC endpoint")] = "127.0.0.1:8000",
    protocol: Annotated[str, typer.Option(help="http or grpc")] = "http",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="let --out be the input photo itself")] = False,
) -> None:
    """Upscale one image through a running endpoint and print the latency (the request's inputs are the server's
    model's: a family's own are sent as given, and refused by the server if its model takes none)."""
    from diffsr.app.serving.triton_client import TritonClient

    photos = {k: v for k, v in values.items() if isinstance(v, (Path, list))}
    paths = [Path(p) for v in photos.values() for p in (v if isinstance(v, list) else [v])]
    for path in paths:
        if not path.is_file():
            raise DiffsrError(f"input photo not found: {path}")
    output_path(out_file, overwrite, paths)
    sent = {k: (v.read_bytes() if isinstance(v, Path) else [Path(p).read_bytes() for p in v] if isinstance(v, list) else v)
            for k, v in values.items()}
    image = sent.pop("image")
    with TritonClient(url, protocol) as remote:
        result = remote.upscale(image, **sent)
    out_file.write_bytes(result.png)
    console.print(f"{values['image']} -> {out_file} via {protocol}://{url}: {result.latency_s:.3f} s", soft_wrap=True,
                  highlight=False)
    for slot, text in result.prompts.items():  # each prompt it ran with (none: a model without text, as refsr)
        if text:
            console.print(f"{slot}: {text}", soft_wrap=True, highlight=False, markup=False)
    if result.picked:
        console.print(f"references picked from the server's gallery: {', '.join(result.picked)}", soft_wrap=True,
                      highlight=False, markup=False)


@command()
def soak(
    url: Annotated[str, typer.Option(help="host:port of the running endpoint (HTTP or gRPC port)")],
    protocol: Annotated[str, typer.Option(help="http or grpc")] = "grpc",
    requests: Annotated[int, typer.Option(help="requests in all")] = 200,
    concurrency: Annotated[int, typer.Option(help="requests in flight")] = 4,
    bad_fraction: Annotated[float, typer.Option(help="share of bad requests (corrupt image, bad parameters, too large)")] = 0.1,
    steps: Annotated[int, typer.Option()] = 4,
    size: Annotated[str, typer.Option(help="LQ input size WIDTHxHEIGHT (x4 out)")] = "64x64",
    inputs: Annotated[int, typer.Option(help="distinct good inputs (photo, seed), each first sent alone")] = 4,
    server_pid: Annotated[Optional[int], typer.Option(help="the local tritonserver's pid: its memory (with its stubs) is checked")] = None,
    settle: Annotated[int, typer.Option(help="requests after which the memory baseline is read")] = 20,
    memory_tolerance: Annotated[float, typer.Option(help="largest memory growth after the baseline")] = 0.05,
    json_file: Annotated[Optional[Path], typer.Option("--json", help="write the report as JSON")] = None,
) -> None:
    """Many requests at a fixed concurrency with bad ones mixed in: every good answer must equal its solo
    image, every bad one be refused as the client's fault, memory stay flat; exit 1 otherwise."""
    from diffsr.app.measure.soak import SoakSettings, run_soak, summary

    settings = SoakSettings(requests, concurrency, bad_fraction, steps, parse_size(size), inputs, settle, memory_tolerance)
    writable(json_file)
    with bars() as draw:
        report = run_soak(url, settings, protocol, server_pid, on_progress=draw)
    for line in summary(report):
        out.print(line, highlight=False, soft_wrap=True)
    if json_file is not None:
        json_file.write_text(json.dumps(report.to_json(), indent=2))
    if not report.ok:
        raise typer.Exit(code=1)


@command()
def kubernetes(
    image: Annotated[str, typer.Option(help="the container built from this repository's Dockerfile, as the cluster pulls it")],
    repository: Annotated[str, typer.Option(help="the triton-repo model repository: s3://, gs://, as:// or pvc:CLAIM")],
    out_file: Annotated[Path, typer.Option("--out", "-o", help="YAML file to write")],
    name: Annotated[str, typer.Option()] = "diffsr",
    replicas: Annotated[int, typer.Option(help="pods at least")] = 1,
    max_replicas: Annotated[int, typer.Option(help="pods at most (the autoscaler's bound)")] = 4,
    gpus: Annotated[int, typer.Option(help="GPUs per pod")] = 1,
    queue_target_us: Annotated[int, typer.Option(help="scale out above this average queue time per request")] = 500_000,
    credentials_secret: Annotated[Optional[str], typer.Option(help="Secret whose keys become the pods' environment (object storage keys)")] = None,
) -> None:
    """Kubernetes manifests (Deployment, Service, autoscaler, disruption budget) for the Triton endpoint."""
    from diffsr.app.serving.kubernetes import ClusterOptions, write_manifests

    options = ClusterOptions(image, repository, name, replicas, max_replicas, gpus, queue_target_us, credentials_secret)
    writable(out_file)
    docs = write_manifests(options, out_file)
    console.print(f"wrote {', '.join(d['kind'] for d in docs)} to {out_file}", soft_wrap=True, highlight=False)
