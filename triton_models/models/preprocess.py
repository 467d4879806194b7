"""Request -> the parsed request and its plan (the one parse and check, `runtime.requests`), then the pipeline's own
first steps: the photos prepared, the prompting stages (SISRM's segmenter, over BLS), the texts (an attachment such as
a captioner writing the prompt, through its models over BLS, where the policy asks; the prompting stages' words), their
token ids. `Preprocess` is shared by the BLS entry and the ensemble's
`preprocess` model, which hands what it made to the ensemble's next steps (the parsed settings as JSON)."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from diffsr.export.core.errors import DiffsrError
from diffsr.export.model.attachments.gallery_encoder import GalleryEncoder
from diffsr.export.model.families import model_from_json
from diffsr.export.model.family import ModelFamily
from diffsr.export.model.inputs import PromptSlot
from diffsr.export.model.parts import RunFn
from diffsr.export.model.settings import PipelineConfig, Request
from diffsr.runtime.gallery import Encoder, Gallery, picked_references
from diffsr.runtime.image import load_image
from diffsr.runtime.prompts import Write, make_prompter, request_texts, used_prompts
from diffsr.runtime.requests import Plan, check, parse_request
from diffsr.runtime.stages import prepare, prompting, token_ids
from diffsr.triton_models.endpoint import GALLERY, PICKED, SETTINGS, tensor_values, used_name
from diffsr.triton_models.models.common import bls_runners, from_torch
from diffsr.triton_models.models.metrics import Metrics
from diffsr.triton_models.models.requests import StageError, optional, parameters, respond

Cancelled = Callable[[], bool] | None


class Preprocess:
    """`folder` holds the tokenizers (and each attachment's files, under its folder); an attachment's models run over
    BLS on `params["device"]`; `metrics` (the entry model's) observe its captions."""

    def __init__(self, params: dict[str, str], folder: Path, metrics: Metrics | None = None):
        self.model = model_from_json(params["family"], json.loads(params["model"]), params.get("family_module"))
        self.defaults = PipelineConfig.from_json(json.loads(params["pipeline"]))
        self.scheduler_config = json.loads(params["scheduler"])
        self.max_pixels = int(params["max_output_pixels"])
        self.inputs = list(self.model.request_inputs())
        self.tokenizer = self.model.tokenizer(folder)
        self.device = torch.device(params.get("device", "cpu"))
        self.folder = folder
        self.metrics = metrics
        sigs = self.model.signatures()
        graphs = [name for a in self.model.attachments for name in a.graphs]
        graphs += [s.submodule for s in self.model.stages.once if s.prompting]
        run = self.run = bls_runners({name: [t.name for t in sigs[name].outputs] for name in graphs},
                                     gpu=self.device.type == "cuda")
        self.prompter = make_prompter(self.model, run, self.device, folder)
        self.picker = Picker(self.model, run, folder / GALLERY, int(params.get("gallery_top_k", 0)))

    def pick(self, req: Request) -> tuple[Request, list[str]]:
        """The request, with the gallery's photos nearest its photo as its references where it gives none (and the
        server has a gallery); the names picked."""
        return self.picker(req)

    def parse(self, request: Any) -> tuple[Request, Plan]:
        """The request's tensors -> the validated request and its plan; every mistake is the client's (one message)."""
        req = parse_request(self.model, self.defaults, tensor_values(self.inputs, lambda name: optional(request, name)))
        return req, check(self.model, req.settings, self.scheduler_config, req.photo.shape[:2], self.max_pixels)

    def __call__(self, req: Request, cancelled: Cancelled = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(the prepared photos and token ids by name, the prompt slots' texts used)."""
        cfg = req.settings
        tensors = prepare(self.model, req, self.folder, self.device)
        tensors, words = prompting(self.model, self.run, tensors, cfg, self.folder)
        texts = request_texts(self.model, cfg, self._writer(req, cancelled), words)
        tensors |= token_ids(self.model, self.tokenizer, texts, cfg.cfg, self.device)
        return tensors, used_prompts(self.model, texts)

    def _writer(self, req: Request, cancelled: Cancelled) -> Write | None:
        prompter = self.prompter
        if prompter is None:
            return None

        def write(slot: PromptSlot) -> str:
            start, tokens = time.perf_counter(), prompter.tokens
            made = prompter(req.photo, req.settings, slot.instruction, cancelled)
            if self.metrics is not None:
                self.metrics.caption.observe(time.perf_counter() - start)
                self.metrics.caption_tokens.increment(prompter.tokens - tokens)
            return made

        return write


class Picker:
    """A server's gallery: for a request without references, the `top_k` gallery photos nearest its photo, embedded by
    the checkpoint's gallery encoder (its `gallery_embed` model, over BLS) and read from the gallery's folder."""

    def __init__(self, model: ModelFamily, run: RunFn, index: Path, top_k: int):
        self.gallery, self.top_k = (Gallery.load(index), top_k) if index.is_dir() else (None, 0)
        self.listed = next((i.name for i in model.photo_lists()), "")
        spec = model.attachment("gallery_encoder")
        if self.gallery is not None and isinstance(spec, GalleryEncoder):
            embed = lambda pixels: run("gallery_embed", pixel_values=pixels)["image_embeds"]  # noqa: E731
            # the encoder's files beside this model (its image processor's settings); its digest the index's, which
            # `triton-repo` checked against the checkpoint's encoder when it made the repository
            spec = dataclasses.replace(spec, path=index.parent / spec.folder)
            self.encoder = Encoder(spec, embed, 1, digest=self.gallery.encoder)

    def __call__(self, req: Request) -> tuple[Request, list[str]]:
        if self.gallery is None or req.photos.get(self.listed):
            return req, []
        try:  # the gallery is the server's: a photo of it gone or broken is the server's fault, not the request's
            files, matches = picked_references(self.gallery, self.encoder, req.photo, self.top_k)
            photos = {**req.photos, self.listed: tuple(load_image(f) for f in files)}
        except DiffsrError as e:
            raise StageError(f"the server's gallery: {e}") from None
        return dataclasses.replace(req, photos=photos), [m.name for m in matches]


def text_tensor(name: str, text: str) -> Any:
    return pb_utils.Tensor(name, np.array([text.encode()], dtype=np.object_))


class TritonPythonModel:
    """The ensemble's first step: what the once-per-request stages take, the output size, the prompt used and the
    parsed settings."""

    def initialize(self, args: dict) -> None:
        params = parameters(args)
        self.preprocess = Preprocess(params, Path(args["model_repository"]) / args["model_version"])
        self.outputs = [o["name"] for o in json.loads(args["model_config"])["output"]]

    def execute(self, requests: list) -> list:
        return respond(requests, self._handle)

    def _handle(self, request: Any) -> list:
        req, plan = self.preprocess.parse(request)
        req, picked = self.preprocess.pick(req)
        tensors, prompts = self.preprocess(req, request.is_cancelled)
        tensors["output_size"] = torch.tensor(plan.size, dtype=torch.int32)
        made = {name: from_torch(name, t) for name, t in tensors.items()}
        made |= {used_name(slot): text_tensor(used_name(slot), text) for slot, text in prompts.items()}
        made[SETTINGS.name] = text_tensor(SETTINGS.name, json.dumps(req.settings.to_json()))
        made[PICKED.name] = text_tensor(PICKED.name, "\n".join(picked))
        return [made[name] for name in self.outputs]
