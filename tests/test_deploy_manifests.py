"""examples/deploy/: the Kubernetes manifests validate against the Kubernetes schema (kubernetes-validate,
strict: unknown fields are errors) and agree with the image (Dockerfile's uid, start.sh's variables).

kserve.yaml's InferenceService is a custom resource: its pod fields (the predictor inlines a PodSpec)
are validated here as a Pod; its KServe fields are checked against the names of KServe's v1beta1
ComponentExtensionSpec. The whole resource was also validated once against KServe's CRD schema
(README, examples/deploy/README.md); that schema is not vendored.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "examples" / "deploy"
# KServe v1beta1 ComponentExtensionSpec + PredictorSpec's own fields (serving.kserve.io/v1beta1)
KSERVE_PREDICTOR_FIELDS = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "scaleMetricType", "autoScaling",
                           "containerConcurrency", "timeout", "canaryTrafficPercent", "logger", "batcher", "labels",
                           "annotations", "deploymentStrategy", "storageUris", "workerSpec", "model"}
POD_ONLY_ENV = {"SPARSEC_API_KEY", "HOME", "SPARSEC_HOME"}  # read by `sparsec serve` (envvar) or the process, not start.sh


def documents(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d]


def validate(doc: dict) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_kubernetes_manifest_validates_strictly():
    kinds = []
    for doc in documents("kubernetes.yaml"):
        validate(doc)
        kinds.append(doc["kind"])
    assert kinds == ["Deployment", "Service"]


def test_validation_catches_a_wrong_field():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    deployment = documents("kubernetes.yaml")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "8000"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)
    deployment = documents("kubernetes.yaml")[0]
    deployment["spec"]["replicaz"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(deployment)


def test_kserve_predictor_pod_fields_validate_and_kserve_fields_are_known():
    (isvc,) = documents("kserve.yaml")
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1" and isvc["kind"] == "InferenceService"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] in {"Standard", "RawDeployment"}
    predictor = dict(isvc["spec"]["predictor"])
    kserve = {k: predictor.pop(k) for k in list(predictor) if k in KSERVE_PREDICTOR_FIELDS}
    assert kserve["minReplicas"] <= kserve["maxReplicas"]
    validate({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": isvc["metadata"]["name"]}, "spec": predictor})
    assert [c["name"] for c in predictor["containers"]] == ["kserve-container"]


@pytest.mark.parametrize("name", ["kubernetes.yaml", "kserve.yaml"])
def test_manifests_agree_with_the_image_and_start_script(name):
    from runtimes.serve.package import START_SH

    uid = int(re.search(r"useradd [^\n]*--uid (\d+)", (DEPLOY / "Dockerfile").read_text()).group(1))
    for doc in documents(name):
        pod = doc["spec"]["template"]["spec"] if doc["kind"] == "Deployment" else doc["spec"].get("predictor")
        if pod is None:
            continue
        assert pod["securityContext"]["runAsUser"] == uid and pod["securityContext"]["runAsNonRoot"]
        (container,) = pod["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert set(env) - POD_ONLY_ENV <= set(re.findall(r"\$\{([A-Z_]+):", START_SH.format(backend="onnxruntime", model_name="m", prepare=""))), env
        port = container["ports"][0]["containerPort"]
        assert int(env["PORT"]) == port
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
            assert container[probe]["httpGet"]["path"] == path
            assert container[probe]["httpGet"]["port"] in (port, container["ports"][0].get("name"))
        assert pod["terminationGracePeriodSeconds"] > 30  # the server's --graceful-timeout default
