"""deploy/kubernetes/ against the Kubernetes schemas, and what the scale-out needs of them.

The schemas are the official Python client's models (``kubernetes`` on PyPI,
generated from the Kubernetes OpenAPI spec): every field of every object must
be one the API knows (a typo is an unknown field), and each object must
validate against its model (types, required fields). No cluster is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

models = pytest.importorskip("kubernetes.client.models", reason="the kubernetes client (requirements.txt) is missing")

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
_KINDS = {("apps/v1", "Deployment"): "V1Deployment", ("v1", "Service"): "V1Service",
          ("v1", "Secret"): "V1Secret", ("autoscaling/v2", "HorizontalPodAutoscaler"): "V2HorizontalPodAutoscaler"}
_SCALARS = {"str": str, "int": int, "bool": bool, "float": (int, float), "datetime": str, "date": str, "bytes": str}


def _documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        found += [(path.name, doc) for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    return found


def _problems(value: Any, type_name: str, where: str) -> Iterator[str]:
    """Unknown fields and wrong kinds of value, walking the model types of the OpenAPI spec."""
    if type_name.startswith(("list[", "List[")):
        if not isinstance(value, list):
            yield f"{where}: expected a list, got {type(value).__name__}"
            return
        for index, item in enumerate(value):
            yield from _problems(item, type_name[5:-1], f"{where}[{index}]")
    elif type_name.startswith(("dict(", "Dict[")):
        if not isinstance(value, dict):
            yield f"{where}: expected a mapping, got {type(value).__name__}"
            return
        inner = type_name[type_name.index(",") + 1:-1].strip()
        for key, item in value.items():
            yield from _problems(item, inner, f"{where}.{key}")
    elif type_name in _SCALARS:
        if isinstance(value, bool) and type_name != "bool" or not isinstance(value, _SCALARS[type_name]):
            yield f"{where}: expected {type_name}, got {value!r}"
    elif type_name == "object":
        return  # IntOrString, Quantity, raw JSON: anything
    else:
        model = getattr(models, type_name)
        if not isinstance(value, dict):
            yield f"{where}: expected a {type_name} object, got {type(value).__name__}"
            return
        fields = {json_key: attribute for attribute, json_key in model.attribute_map.items()}
        for key, item in value.items():
            if key not in fields:
                yield f"{where}.{key}: not a field of {type_name}"
            else:
                yield from _problems(item, model.openapi_types[fields[key]], f"{where}.{key}")


@pytest.mark.parametrize("name,doc", _documents(), ids=lambda value: value if isinstance(value, str) else "")
def test_every_object_is_valid_against_the_kubernetes_schema(name, doc):
    model_name = _KINDS.get((doc.get("apiVersion"), doc.get("kind")))
    assert model_name is not None, f"{name}: unexpected {doc.get('apiVersion')} {doc.get('kind')}"
    assert list(_problems(doc, model_name, f"{name}:{doc['kind']}")) == []
    getattr(models, model_name).model_validate(doc)  # required fields and strict types


def _objects() -> dict[tuple[str, str], dict[str, Any]]:
    return {(doc["kind"], doc["metadata"]["name"]): doc for _, doc in _documents()}


@pytest.mark.parametrize("tier", ["cloud", "edge"])
def test_deployments_probe_healthz_request_resources_and_take_the_token_from_a_secret(tier):
    objects = _objects()
    deployment = objects["Deployment", f"popex-{tier}"]
    pod = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    (container,) = pod["spec"]["containers"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/healthz"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    env = {item["name"]: item for item in container["env"]}
    reference = env["POPEX_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert "value" not in env["POPEX_TOKEN"]
    secret = objects["Secret", reference["name"]]
    assert reference["key"] in secret["stringData"]
    service = objects["Service", f"popex-{tier}"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()


def test_the_cloud_scales_on_cpu_and_keeps_an_edge_on_one_replica():
    objects = _objects()
    autoscaler = objects["HorizontalPodAutoscaler", "popex-cloud"]
    target = autoscaler["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", "popex-cloud")
    (metric,) = autoscaler["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert autoscaler["spec"]["minReplicas"] >= 2
    assert objects["Service", "popex-cloud"]["spec"]["sessionAffinity"] == "ClientIP"  # push and retry, same replica
    edge_command = " ".join(objects["Deployment", "popex-edge"]["spec"]["template"]["spec"]["containers"][0]["command"])
    assert "http://popex-cloud:8001" in edge_command


def test_a_typo_is_caught():
    doc = _objects()["Deployment", "popex-cloud"]
    broken = {**doc, "spec": {**doc["spec"], "replica": 3}}
    assert any("replica: not a field" in problem for problem in _problems(broken, "V1Deployment", "x"))
