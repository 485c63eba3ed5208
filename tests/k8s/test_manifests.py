"""k8s/: every kustomization rendered with a real kubectl and checked against KubeRay's CRDs.

Fast (a few seconds, no cluster): kubectl only renders; schemas come from ../shared/kuberay/crds.
"""

import copy
import re
import shlex
import shutil
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from rayjobs import kuberay
from cluster.manifests import (
    cluster_specs,
    containers,
    crd_schemas,
    pod_specs,
    render,
    validate,
)
from rayjobs.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT.parent / "shared" / "kuberay" / "crds"
KUSTOMIZATIONS = sorted(p.parent.relative_to(ROOT).as_posix() for p in (ROOT / "k8s").rglob("kustomization.yaml"))
RAY_VERSION = re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())[1]
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|KEY", re.IGNORECASE)


@pytest.fixture(scope="module")
def schemas():
    return crd_schemas(CRDS)


@pytest.fixture(scope="module")
def rendered():
    return {k: render(ROOT / k) for k in KUSTOMIZATIONS}


def _ray_docs(docs, kind=None):
    return [d for d in docs if d["kind"] in ((kind,) if kind else ("RayCluster", "RayJob", "RayService"))]


def test_the_kustomizations_are_the_expected_ones():
    assert KUSTOMIZATIONS == ["k8s/base", "k8s/overlays/cpu", "k8s/overlays/gpu", "k8s/overlays/teacher"]


TEACHER = "k8s/overlays/teacher"  # the CPU stack plus the teacher scoring service's RayService


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_renders_one_of_each_ray_object(rendered, target):
    kinds = sorted(d["kind"] for d in rendered[target])
    services = ["RayService"] * (2 if target == TEACHER else 1)
    assert kinds == ["NetworkPolicy", "RayCluster", "RayJob", *services, "ServiceAccount"]


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_ray_objects_pass_crd_schema_and_operator_checks(rendered, schemas, target):
    problems = [p for d in rendered[target] for p in validate(d, schemas)]
    assert problems == []


# ------------------------------------------------------------- the validator rejects bad input


def _set(path):
    def apply(doc, value):
        *parents, last = path
        node = doc
        for key in parents:
            node = node[key]
        node[last] = value

    return apply


HEAD = ["spec", "headGroupSpec"]
HEAD_C0 = [*HEAD, "template", "spec", "containers", 0]
WORKER0 = ["spec", "workerGroupSpecs", 0]
BREAKAGES = {
    "wrong type": (_set([*WORKER0, "maxReplicas"]), "four", "is not of type 'integer'"),
    "unknown field": (_set([*HEAD_C0, "resourcez"]), {}, "'resourcez' was unexpected"),
    "unknown top-level spec field": (_set(["spec", "enableAutoscaling"]), True, "'enableAutoscaling' was unexpected"),
    "bad enum": (_set(["spec", "autoscalerOptions", "upscalingMode"]), "Fast", "is not one of"),
    "int rayStartParam": (_set([*HEAD, "rayStartParams", "num-cpus"]), 0, "is not of type 'string'"),
    "int32 overflow": (_set([*WORKER0, "maxReplicas"]), 2**40, "is not a 'int32'"),
    "bad quantity": (_set([*HEAD_C0, "resources", "limits", "cpu"]), "two", "does not match"),
    "null where not nullable": (_set([*HEAD_C0, "resources"]), None, "None is not of type 'object'"),
    "CEL rule": (_set(["spec", "managedBy"]), "me", "managedBy field value must be"),
    "bad name": (_set(["metadata", "name"]), "Ray_Cluster", "does not match"),
    "operator: min > max": (_set([*WORKER0, "minReplicas"]), 9, "minReplicas 9 > maxReplicas"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_broken_raycluster_fails(rendered, schemas, breakage):
    good = _ray_docs(rendered["k8s/overlays/cpu"], "RayCluster")[0]
    mutate, value, expected = BREAKAGES[breakage]
    bad = copy.deepcopy(good)
    mutate(bad, value)
    problems = validate(bad, schemas)
    assert any(expected in p for p in problems), problems


def test_missing_required_field_and_operator_rules_fail(rendered, schemas):
    cluster = copy.deepcopy(_ray_docs(rendered["k8s/base"], "RayCluster")[0])
    del cluster["spec"]["headGroupSpec"]
    assert any("'headGroupSpec' is a required property" in p for p in validate(cluster, schemas))

    job = copy.deepcopy(_ray_docs(rendered["k8s/base"], "RayJob")[0])
    job["spec"]["shutdownAfterJobFinishes"] = False  # with ttlSecondsAfterFinished > 0
    assert any("needs shutdownAfterJobFinishes" in p for p in validate(job, schemas))

    service = copy.deepcopy(_ray_docs(rendered["k8s/base"], "RayService")[0])
    service["spec"]["serveConfigV2"] = "applications: [unclosed"
    assert any("serveConfigV2: not valid YAML" in p for p in validate(service, schemas))


# ------------------------------------------------------------- raystill's rules, every target


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_every_container_is_bounded_and_unprivileged(rendered, target):
    seen = 0
    for doc in _ray_docs(rendered[target]):
        for path, c in containers(doc):
            where = f"{doc['kind']}.{path}"
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set((c.get("resources") or {}).get(bound) or {}), f"{where}: {bound}"
            sc = c.get("securityContext") or {}
            assert sc.get("privileged") is False and sc.get("allowPrivilegeEscalation") is False, where
            seen += 1
    # 3 kinds x (head + worker + autoscaler) + the job submitter (+ the teacher's cluster)
    assert seen == 10 + 3 * (target == TEACHER)


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_pods_run_as_non_root_and_only_the_head_gets_a_token(rendered, target):
    for doc in _ray_docs(rendered[target]):
        for path, pod in pod_specs(doc):
            assert pod["securityContext"]["runAsNonRoot"] is True, path
            assert pod["serviceAccountName"] == "raystill", path
            assert pod["automountServiceAccountToken"] is path.endswith("headGroupSpec.template.spec"), path


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_no_secret_values_in_manifests(rendered, target):
    assert not [d for d in rendered[target] if d["kind"] == "Secret"]
    for doc in _ray_docs(rendered[target]):
        for path, c in containers(doc):
            for env in c.get("env") or []:
                if SECRET_NAME.search(env["name"]):
                    assert "value" not in env, f"{path}: {env['name']} must come from a Secret"
                    assert "secretKeyRef" in env.get("valueFrom", {}), f"{path}: {env['name']}"
        if doc["kind"] == "RayService":
            serve = yaml.safe_load(doc["spec"]["serveConfigV2"])
            for app in serve["applications"]:
                names = (app.get("runtime_env") or {}).get("env_vars") or {}
                assert not [n for n in names if SECRET_NAME.search(n)], "secrets in serveConfigV2 runtime_env"


def test_secrets_example_has_no_values():
    for line in (ROOT / "k8s" / "secrets.example.env").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            assert not SECRET_NAME.search(key) or value == "", f"{key} has a value in the example"


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_images_are_pinned_and_ray_versions_agree(rendered, target):
    for doc in _ray_docs(rendered[target]):
        for path, c in containers(doc):
            if path.endswith("autoscalerOptions"):
                continue  # the sidecar runs the head's image unless set
            name, _, tag = c["image"].rpartition(":")
            assert name and "/" not in tag and tag not in ("", "latest"), f"{path}: {c['image']}"
        for _, cluster in cluster_specs(doc):
            assert cluster["rayVersion"] == RAY_VERSION


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_heads_schedule_no_work_and_clusters_autoscale(rendered, target):
    for doc in _ray_docs(rendered[target]):
        for path, cluster in cluster_specs(doc):
            head = cluster["headGroupSpec"]
            assert head["rayStartParams"]["num-cpus"] == "0", path
            ports = {p["name"]: p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}
            assert ports["dashboard"] == 8265
            assert cluster["enableInTreeAutoscaling"] is True
            assert cluster["autoscalerOptions"]["idleTimeoutSeconds"] > 0
            for group in cluster["workerGroupSpecs"]:
                assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
                assert group["maxReplicas"] > group["minReplicas"], "a group that cannot scale"


def test_gpu_overlay_requests_one_gpu_per_worker_and_cpu_overlay_none(rendered):
    for doc in _ray_docs(rendered["k8s/overlays/gpu"]):
        for _, cluster in cluster_specs(doc):
            for group in cluster["workerGroupSpecs"]:
                res = group["template"]["spec"]["containers"][0]["resources"]
                assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "1"
                assert any(t["key"] == "nvidia.com/gpu" for t in group["template"]["spec"]["tolerations"])
        for _, c in containers(doc):
            assert c.get("image", "").endswith("-gpu") or "image" not in c
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(rendered["k8s/overlays/cpu"])


def test_cpu_overlay_is_small(rendered):
    for doc in _ray_docs(rendered["k8s/overlays/cpu"]):
        for path, cluster in cluster_specs(doc):
            for group in cluster["workerGroupSpecs"]:
                assert group["minReplicas"] == 0 and group["maxReplicas"] == 2, path
        for path, c in containers(doc):
            cpu = str(c["resources"]["limits"]["cpu"])
            assert (float(cpu[:-1]) / 1000 if cpu.endswith("m") else float(cpu)) <= 2, path


# ------------------------------------------------------------- the RayJob


def _entrypoint(doc):
    argv = shlex.split(doc["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "rayjobs.pipeline"]
    config = argv[argv.index("--config") + 1]
    overrides = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    return config, overrides


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_rayjob_runs_the_pipeline_to_s3_and_cleans_up(rendered, target):
    job = _ray_docs(rendered[target], "RayJob")[0]
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] > 0 and spec["backoffLimit"] >= 1
    config, overrides = _entrypoint(job)
    assert config.startswith("/app/examples/configs/")
    runs_root = [o.partition("=")[2] for o in overrides if o.startswith("runs_root=")]
    assert runs_root and runs_root[0].startswith("s3://")


@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_rayjob_overrides_are_valid_config_keys(rendered, target):
    """The entrypoint's --set overrides load. Until the k8s profile config exists, they are
    checked against the demo config (the keys, not the profile, are what this test is about)."""
    config, overrides = _entrypoint(_ray_docs(rendered[target], "RayJob")[0])
    local = ROOT / config.removeprefix("/app/")
    cfg = load_config(local if local.is_file() else ROOT / "examples/configs/demo.yaml", overrides)
    assert cfg.runs_root.startswith("s3://")
    if target.endswith("gpu"):
        assert cfg.generation.engine.accelerator == "gpu" and cfg.distillation.scaling.use_gpu


# ------------------------------------------------------------- the RayService's serveConfigV2


GENERATED = kuberay.generated_manifests(ROOT)


def test_generated_manifests_are_the_base_and_the_gpu_patch():
    assert [p.relative_to(ROOT).as_posix() for p in GENERATED] == [
        "k8s/base/rayservice.student.yaml",
        "k8s/overlays/gpu/rayservice.serve-config.yaml",
        "k8s/overlays/teacher/rayservice.teacher.yaml",
    ]


@pytest.mark.parametrize("manifest", GENERATED, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_committed_serve_config_is_up_to_date(manifest):
    doc = yaml.safe_load(manifest.read_text())
    config, overrides = kuberay.manifest_source(doc)
    expected = kuberay.render_serve_config_v2(load_config(ROOT / config, overrides), kuberay.manifest_app(doc))
    assert doc["spec"]["serveConfigV2"] == expected, "stale: run `python -m rayjobs.kuberay --all`"


def test_serve_config_comes_from_the_k8s_profile():
    if not (ROOT / kuberay.DEFAULT_CONFIG).is_file():
        pytest.skip(f"{kuberay.DEFAULT_CONFIG} does not exist yet")
    for manifest in GENERATED:
        config, _ = kuberay.manifest_source(yaml.safe_load(manifest.read_text()))
        fix = f"python -m rayjobs.kuberay --all --config {kuberay.DEFAULT_CONFIG}"
        assert config == kuberay.DEFAULT_CONFIG, f"{manifest}: run `{fix}`"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Ray's own pydantic fields
@pytest.mark.parametrize("target", KUSTOMIZATIONS)
def test_rendered_service_serves_what_its_overlay_means(rendered, target):
    from ray.serve.schema import ServeDeploySchema

    for service in _ray_docs(rendered[target], "RayService"):
        serve = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
        app = serve.applications[0]
        if service["metadata"]["name"] == "raystill-teacher":
            expected = (kuberay.TEACHER_APP_NAME, "/teacher", kuberay.TEACHER_IMPORT_PATH)
        else:
            expected = (kuberay.APP_NAME, "/", kuberay.APP_IMPORT_PATH)
        assert (app.name, app.route_prefix, app.import_path) == expected
        assert app.args["accelerator"] == ("gpu" if target.endswith("gpu") else "cpu")
        assert app.args["host"] == "0.0.0.0"  # the exposure check sees the pod's bind: no key, no start
        _serves_on_its_port_with_the_key(service, serve, app)


def _serves_on_its_port_with_the_key(service, serve, app):
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {p["name"]: p["containerPort"] for p in head["ports"]}["serve"] == serve.http_options.port
    assert serve.http_options.host == "0.0.0.0"
    # The API key named by serving.api_key_env reaches every serving pod from the Secret.
    for path, c in containers(service):
        if not path.endswith("autoscalerOptions"):
            env = {e["name"]: e for e in c.get("env") or []}
            ref = env[app.args["api_key_env"]]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "raystill-api-key" and not ref.get("optional"), path


# ------------------------------------------------------------- the generator itself


def test_rewrite_keeps_comments_and_only_touches_the_block():
    text = (ROOT / "k8s/base/rayservice.student.yaml").read_text()
    stale = text.replace("proxy_location: EveryNode", "proxy_location: HeadOnly")
    doc = yaml.safe_load(text)
    config, overrides = kuberay.manifest_source(doc)
    fixed = kuberay.update_manifest_text(stale, doc["spec"]["serveConfigV2"], config, overrides)
    assert fixed == text


def test_check_mode_reports_a_stale_manifest(tmp_path, capsys):
    for rel in ("examples/configs", "k8s"):
        shutil.copytree(ROOT / rel, tmp_path / rel)
    assert kuberay.main(["--all", "--check", "--root", str(tmp_path)]) == 0
    base = tmp_path / kuberay.DEFAULT_MANIFEST
    stale = re.sub(r"max_replicas: \d+", "max_replicas: 99", base.read_text(), count=1)
    assert stale != base.read_text()
    base.write_text(stale)
    assert kuberay.main(["--all", "--check", "--root", str(tmp_path)]) == 1
    assert "k8s/base/rayservice.student.yaml: stale" in capsys.readouterr().out
    config, _ = kuberay.manifest_source(yaml.safe_load(base.read_text()))
    assert kuberay.main(["--manifest", kuberay.DEFAULT_MANIFEST, "--config", config, "--root", str(tmp_path)]) == 0
    assert kuberay.main(["--all", "--check", "--root", str(tmp_path)]) == 0


# ------------------------------------------------------------- the image


def test_dockerfile_builds_on_the_pinned_ray_images():
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile, re.MULTILINE)[1]
    cpu_base = re.search(r"--build-arg BASE_IMAGE=(\S+)", dockerfile)[1]
    python = SpecifierSet(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"])
    # Ray builds its LLM image for Python 3.12 and CUDA 13.0 only (see the Dockerfile's header).
    assert base == f"rayproject/ray-llm:{RAY_VERSION}-py312-cu130" and "3.12" in python
    assert cpu_base == f"rayproject/ray:{RAY_VERSION}-py311-cpu" and "3.11" in python
    assert re.search(r"^ARG EXTRA=gpu$", dockerfile, re.MULTILINE)
    assert 'pip install $torch_source ".[${EXTRA}]"' in dockerfile
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", "runs", ".cache", ".git", "**/*.env"} <= set(ignored)


def test_cpu_image_removes_what_make_env_removes():
    removed = re.search(r"pip uninstall --quiet -y (.+)", (ROOT / "Makefile").read_text())[1]
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    assert f'if [ "$EXTRA" = cpu ]; then pip uninstall -y {removed}; fi' in dockerfile


def test_dockerfile_final_check_imports_modules_that_exist():
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    modules = re.search(r'python -c "import ([^"]+)"', dockerfile)[1].split(", ")
    assert modules and all((ROOT / f"{m.replace('.', '/')}.py").is_file() for m in modules), modules
