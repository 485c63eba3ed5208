"""The cluster's security model, read from the rendered manifests (#17, item 7).

Ray's control plane needs a token (KubeRay ``authOptions``) and is reachable only from Ray pods
and the operator (NetworkPolicy); serving pods hold read-only S3 credentials, separate from
training's. Fails on the manifests before #17: no authOptions, no NetworkPolicy, one Secret.
"""

from pathlib import Path

import pytest

from cluster.manifests import render

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ["k8s/base", "k8s/overlays/cpu", "k8s/overlays/gpu"]
CONTROL_PORTS = {6379, 8265, 10001}


@pytest.fixture(scope="module", params=TARGETS)
def docs(request):
    return render(ROOT / request.param)


def _cluster_specs(docs):
    for d in docs:
        spec = d.get("spec", {})
        yield d["kind"], {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"),
                          "RayService": spec.get("rayClusterConfig")}.get(d["kind"])


def _containers(cluster_spec):
    groups = [cluster_spec["headGroupSpec"], *cluster_spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _secret_refs(container) -> set[str]:
    return {e["secretRef"]["name"] for e in container.get("envFrom", []) if "secretRef" in e}


def test_every_ray_cluster_requires_a_token(docs):
    specs = [(kind, spec) for kind, spec in _cluster_specs(docs) if spec is not None]
    assert {kind for kind, _ in specs} == {"RayCluster", "RayJob", "RayService"}
    assert all(spec.get("authOptions", {}).get("mode") == "token" for _, spec in specs)


def test_control_ports_admit_only_ray_pods_and_the_operator(docs):
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert len(policies) == 1
    spec = policies[0]["spec"]
    assert spec["podSelector"] == {"matchLabels": {"ray.io/is-ray-node": "yes"}} and spec["policyTypes"] == ["Ingress"]
    for rule in spec["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])}
        sources = rule.get("from")
        if sources is None:  # open to anyone: only the serve port
            assert ports == {8000}
            continue
        if not ports or ports & CONTROL_PORTS:
            labels = [s.get("podSelector", {}).get("matchLabels", {}) for s in sources]
            assert all(lab in ({"ray.io/is-ray-node": "yes"}, {"app.kubernetes.io/name": "kuberay-operator"},
                               {"app.kubernetes.io/created-by": "kuberay-operator"}) for lab in labels), rule


def test_serving_pods_hold_read_only_credentials_separate_from_training(docs):
    for kind, spec in _cluster_specs(docs):
        if spec is None:
            continue
        refs = set().union(*(_secret_refs(c) for c in _containers(spec)))
        if kind == "RayService":
            assert refs == {"raystill-s3-serving"}
        else:
            assert "raystill-s3" in refs and "raystill-s3-serving" not in refs
