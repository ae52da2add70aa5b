"""Cluster definitions: the `ray up` configs pass the schema that ships inside Ray, the KubeRay manifests
have the shape the operator and the autoscaler need, and the job they run is a recipe that validates."""

from __future__ import annotations

import copy
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from sphuatuo.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent
CLUSTER = REPO / "cluster"
LAUNCHER_CONFIGS = ["aws.yaml", "gcp.yaml"]
GPU_NODE_TYPES = {"gpu_inference", "gpu_training"}
SHARED = "/mnt/shared"


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _manifests(name: str) -> dict[str, dict[str, Any]]:
    """The documents of a KubeRay manifest file, by kind."""
    docs = list(yaml.safe_load_all((CLUSTER / "kuberay" / name).read_text(encoding="utf-8")))
    return {doc["kind"]: doc for doc in docs}


# ---------------------------------------------------------------------------------------------
# `ray up` configs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_rays_schema(name: str) -> None:
    """What `ray up` does before it launches anything: merge the provider's defaults, then validate
    against ray/autoscaler/ray-schema.json."""
    validate_config(prepare_config(copy.deepcopy(_yaml(CLUSTER / name))))


def test_the_schema_refuses_a_typo() -> None:
    """The check above is a real one: an unknown key fails it."""
    config = _yaml(CLUSTER / "aws.yaml")
    config["idle_timeout_minute"] = 5
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minute"):
        validate_config(prepare_config(config))


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_layout(name: str) -> None:
    config = _yaml(CLUSTER / name)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}, "no workloads on the head"
    assert GPU_NODE_TYPES <= set(types)
    for node_type in GPU_NODE_TYPES:
        assert types[node_type]["min_workers"] == 0, f"{node_type} must scale from zero"
        assert 0 < types[node_type]["max_workers"] <= config["max_workers"]
    assert types["gpu_inference"]["resources"]["GPU"] >= 2  # a tensor-parallel-2 teacher fits one node
    assert types["gpu_training"]["resources"]["GPU"] == 8
    assert config["idle_timeout_minutes"] > 0
    assert any(SHARED in command and "mount" in command for command in config["initialization_commands"])
    assert any('-e ".[gpu]"' in command for command in config["setup_commands"])
    assert config["file_mounts"] == {"~/sphuatuo": "."}


# ---------------------------------------------------------------------------------------------
# KubeRay manifests
# ---------------------------------------------------------------------------------------------


def _check_cluster_spec(spec: dict[str, Any], claim: str) -> None:
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "no workloads on the head"
    pods = [head["template"]["spec"]] + [group["template"]["spec"] for group in spec["workerGroupSpecs"]]
    for pod in pods:
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        for container in pod["containers"]:
            shared = [mount for mount in container["volumeMounts"] if mount["mountPath"] == SHARED]
            assert len(shared) == 1
            assert volumes[shared[0]["name"]]["persistentVolumeClaim"]["claimName"] == claim
    groups = {group["groupName"]: group for group in spec["workerGroupSpecs"]}
    assert set(groups) == {"gpu-inference", "gpu-training"}
    gpus = {}
    for name, group in groups.items():
        assert group["minReplicas"] == 0 and group["replicas"] == 0 and group["maxReplicas"] > 0
        (container,) = group["template"]["spec"]["containers"]
        gpus[name] = int(container["resources"]["limits"]["nvidia.com/gpu"])
    assert gpus["gpu-inference"] >= 2 and gpus["gpu-training"] == 8


def test_raycluster_manifest() -> None:
    docs = _manifests("raycluster.yaml")
    assert set(docs) == {"PersistentVolumeClaim", "RayCluster"}
    claim = docs["PersistentVolumeClaim"]
    assert claim["apiVersion"] == "v1" and claim["spec"]["accessModes"] == ["ReadWriteMany"]
    cluster = docs["RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    _check_cluster_spec(cluster["spec"], claim["metadata"]["name"])


def test_rayjob_runs_a_shipped_recipe_on_the_same_cluster() -> None:
    job = _manifests("rayjob.yaml")["RayJob"]
    assert job["apiVersion"] == "ray.io/v1"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    raycluster = _manifests("raycluster.yaml")
    assert spec["rayClusterSpec"] == raycluster["RayCluster"]["spec"], "rayjob.yaml drifted from raycluster.yaml"
    _check_cluster_spec(spec["rayClusterSpec"], raycluster["PersistentVolumeClaim"]["metadata"]["name"])

    command = shlex.split(spec["entrypoint"])
    assert command[:2] == ["sphuatuo", "run"] and len(command) == 3
    recipe_path = REPO / command[2]
    assert recipe_path.parent == REPO / "pipelines" and recipe_path.is_file()
    recipe = load_recipe(recipe_path)
    assert recipe.run_root.startswith(SHARED + "/"), "the run root must be on the shared volume"

    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"]
    assert all(isinstance(value, str) for value in runtime_env["env_vars"].values())


@pytest.mark.parametrize("name", ["raycluster.yaml", "rayjob.yaml"])
def test_secrets_only_by_reference(name: str) -> None:
    """Tokens and keys come from a Kubernetes Secret, never a literal in the manifest or runtime env."""
    def secretish(name: str) -> bool:
        return bool({"TOKEN", "KEY", "SECRET", "PASSWORD"} & set(name.upper().split("_")))

    def env_lists(node: Any) -> list[list[dict[str, Any]]]:
        if isinstance(node, dict):
            found = [node["env"]] if isinstance(node.get("env"), list) else []
            return found + [env for value in node.values() for env in env_lists(value)]
        if isinstance(node, list):
            return [env for item in node for env in env_lists(item)]
        return []

    docs = _manifests(name)
    variables = [variable for env in env_lists(docs) for variable in env]
    secrets = [variable for variable in variables if secretish(variable["name"])]
    assert secrets, "expected HF_TOKEN from a Secret"
    for variable in secrets:
        assert "value" not in variable and "secretKeyRef" in variable["valueFrom"], variable["name"]
    if "RayJob" in docs:
        env_vars = yaml.safe_load(docs["RayJob"]["spec"]["runtimeEnvYAML"]).get("env_vars", {})
        assert not [key for key in env_vars if secretish(key)]
