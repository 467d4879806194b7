"""`diffsr kubernetes`: manifests that scale the Triton endpoint out over GPU nodes.

One document list, written as YAML:

- a Deployment of `tritonserver` pods (the image built from this repository's `Dockerfile`), one GPU
  each, serving a model repository made by `diffsr triton-repo` from object storage (`s3://`, `gs://`,
  `as://`: Triton reads those itself, credentials from a Secret) or from a PersistentVolumeClaim
  (`pvc:NAME`); readiness on Triton's `/v2/health/ready` (no traffic before every model is loaded),
  liveness by `python3 -m diffsr.app.serving.stub_probe` (Triton's `/v2/health/live` stays 200 when a python
  backend stub has died: see that module), and a startup probe that allows for loading engines;
- a Service for HTTP, gRPC and the metrics port;
- a HorizontalPodAutoscaler on the average time a request waits in the entry model's queue (where
  requests wait for an instance that runs their loop), a per-pod metric that a Prometheus adapter derives from Triton's
  `nv_inference_queue_duration_us` and `nv_inference_request_success` counters (the adapter rule is
  in the README; the pods are annotated for scraping on the metrics port);
- a PodDisruptionBudget, so draining a node never takes every replica at once.

Nothing here can run a cluster: the manifests are checked offline against Kubernetes' schemas.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from diffsr.export.core.errors import DiffsrError

OBJECT_STORES = ("s3://", "gs://", "as://")
PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
QUEUE_METRIC = "diffsr_queue_time_us"  # per pod: queue microseconds per successful request, over 1 min


@dataclass(frozen=True)
class ClusterOptions:
    image: str  # built from this repository's Dockerfile and pushed where the cluster pulls
    repository: str  # s3://bucket/path, gs://..., as://..., or pvc:CLAIM
    name: str = "diffsr"
    replicas: int = 1
    max_replicas: int = 4
    gpus: int = 1  # per pod
    queue_target_us: int = 500_000  # scale out when requests wait longer than this on average
    credentials_secret: str | None = None  # a Secret whose keys become the pod's environment (cloud keys)

    def __post_init__(self) -> None:
        if not (self.repository.startswith(OBJECT_STORES) or self.repository.startswith("pvc:")):
            raise DiffsrError(f"repository {self.repository!r}: give s3://, gs://, as:// or pvc:CLAIM")
        if self.repository.startswith("pvc:") and not self.repository[4:]:
            raise DiffsrError("repository pvc: needs a claim name, e.g. pvc:diffsr-models")
        if not 1 <= self.replicas <= self.max_replicas:
            raise DiffsrError(f"replicas {self.replicas} must be 1 to max replicas {self.max_replicas}")
        if self.gpus < 1:
            raise DiffsrError(f"gpus {self.gpus} must be at least 1 per pod")
        if not self.image:
            raise DiffsrError("an image is needed: build the repository's Dockerfile and push it")


def _probe(path: str, period: int, failures: int) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": "http"}, "periodSeconds": period, "failureThreshold": failures}


def manifests(o: ClusterOptions) -> list[dict[str, Any]]:
    labels = {"app.kubernetes.io/name": o.name}
    on_volume = o.repository.startswith("pvc:")
    model_repository = "/models" if on_volume else o.repository
    container: dict[str, Any] = {
        "name": "tritonserver",
        "image": o.image,
        "args": ["tritonserver", f"--model-repository={model_repository}", "--strict-readiness=true",
                 *(f"--{kind}-port={port}" for kind, port in PORTS.items())],
        "ports": [{"name": kind, "containerPort": port} for kind, port in PORTS.items()],
        "resources": {"limits": {"nvidia.com/gpu": o.gpus}, "requests": {"nvidia.com/gpu": o.gpus}},
        "readinessProbe": _probe("/v2/health/ready", 5, 3),
        # Triton's /v2/health/live stays 200 with a dead python backend stub (the entry model's, or a python
        # flavour submodule's); the stub probe fails then, and the kubelet restarts the container
        "livenessProbe": {"exec": {"command": ["python3", "-m", "diffsr.app.serving.stub_probe"]}, "periodSeconds": 10,
                          "failureThreshold": 3, "timeoutSeconds": 5},
        "startupProbe": _probe("/v2/health/ready", 10, 90),  # up to 15 min to fetch and load engines
    }
    pod: dict[str, Any] = {"containers": [container]}
    if o.credentials_secret:
        container["envFrom"] = [{"secretRef": {"name": o.credentials_secret}}]
    if on_volume:
        container["volumeMounts"] = [{"name": "models", "mountPath": "/models", "readOnly": True}]
        claim = {"claimName": o.repository[4:], "readOnly": True}
        pod["volumes"] = [{"name": "models", "persistentVolumeClaim": claim}]
    meta = {"name": o.name, "labels": labels}
    return [
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta,
         "spec": {"replicas": o.replicas, "selector": {"matchLabels": labels},
                  "template": {"metadata": {"labels": labels, "annotations": {
                      "prometheus.io/scrape": "true", "prometheus.io/port": str(PORTS["metrics"])}}, "spec": pod}}},
        {"apiVersion": "v1", "kind": "Service", "metadata": meta,
         "spec": {"selector": labels, "ports": [{"name": k, "port": p, "targetPort": k} for k, p in PORTS.items()]}},
        {"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": meta,
         "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": o.name},
                  "minReplicas": o.replicas, "maxReplicas": o.max_replicas,
                  "metrics": [{"type": "Pods", "pods": {"metric": {"name": QUEUE_METRIC},
                                                        "target": {"type": "AverageValue",
                                                                   "averageValue": str(o.queue_target_us)}}}]}},
        {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta,
         "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}}},
    ]


def write_manifests(o: ClusterOptions, path: Path) -> list[dict[str, Any]]:
    docs = manifests(o)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return docs
