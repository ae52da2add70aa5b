"""`sphuatuo doctor`: check the connected Ray cluster against a recipe before spending GPU hours.

A small probe task runs on every alive node and reports its package versions, visible GPUs, whether
it can write to the run root, and which of the recipe's local model paths it can read. Each problem
comes back with the fix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from sphuatuo.engines.precision import cpu_dtype
from sphuatuo.recipe import EngineConfig, Recipe
from sphuatuo.store.manifest import package_versions
from sphuatuo.store.run_root import RunRoot
from sphuatuo.store.runtime import training_environment


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


@ray.remote(num_cpus=0)
def _probe(run_root: str, node_id: str, model_paths: list[str], preload: str | None) -> dict[str, Any]:
    """Runs on one node: what that node sees."""
    import torch

    choice = cpu_dtype()
    report: dict[str, Any] = {"versions": package_versions(), "gpus": torch.cuda.device_count(), "write_error": None,
                              "cpu_dtype": choice.dtype, "cpu_dtype_reason": choice.reason,
                              "preload_missing": bool(preload) and not os.path.isfile(preload)}
    try:
        RunRoot(run_root).write_text(node_id, ".doctor", f"{node_id}.txt")
    except Exception as err:  # noqa: BLE001 - any failure to write is the finding
        report["write_error"] = f"{type(err).__name__}: {err}"
    report["unreadable_models"] = [path for path in model_paths if not os.path.isdir(path)]
    return report


def _engines(recipe: Recipe) -> dict[str, EngineConfig]:
    engines = {"teacher": recipe.models.teacher, "student": recipe.models.student}
    if recipe.models.judge.engine is not None:
        engines["judge"] = recipe.models.judge.engine
    return engines


def _local_model_paths(recipe: Recipe) -> list[str]:
    """Model paths the nodes must read: absolute local paths (hub ids and built-ins are fetched or built)."""
    return sorted({e.model for e in _engines(recipe).values() if e.model.startswith("/")})


def _resource_checks(recipe: Recipe, nodes: list[dict[str, Any]]) -> list[Check]:
    checks = []
    largest = {key: max((n["Resources"].get(key, 0) for n in nodes), default=0) for key in ("CPU", "GPU")}
    total = {key: sum(n["Resources"].get(key, 0) for n in nodes) for key in ("CPU", "GPU")}
    for role, engine in _engines(recipe).items():
        gpus = engine.gpus_per_replica * engine.tensor_parallel_size
        cpus = engine.cpus_per_replica * engine.tensor_parallel_size
        fits = gpus <= largest["GPU"] and cpus <= largest["CPU"]
        checks.append(Check(
            f"resources: {role} engine replica", fits,
            f"needs {cpus:g} CPU and {gpus:g} GPU on one node; the largest node has {largest['CPU']:g} CPU and "
            f"{largest['GPU']:g} GPU",
            "" if fits else "add a worker group with nodes that large (cluster/aws.yaml: gpu_inference) or lower "
                            f"models.{role}.tensor_parallel_size / gpus_per_replica"))
    for name in recipe.TRAINING_STAGES:
        scaling = getattr(recipe.stages, name).scaling
        gpus = scaling.num_workers if scaling.use_gpu else 0
        cpus = scaling.num_workers * scaling.cpus_per_worker
        fits = gpus <= total["GPU"] and cpus <= total["CPU"]
        checks.append(Check(
            f"resources: {name} training", fits,
            f"needs {scaling.num_workers} workers: {cpus:g} CPU and {gpus} GPU in all; the cluster has "
            f"{total['CPU']:g} CPU and {total['GPU']:g} GPU now",
            "" if fits else "start GPU training nodes (cluster/aws.yaml: gpu_training) or let the autoscaler add "
                            f"them, or lower stages.{name}.scaling.num_workers"))
    return checks


def doctor(recipe: Recipe) -> list[Check]:
    """Run every check against the Ray cluster this process is connected to."""
    nodes = [node for node in ray.nodes() if node["Alive"]]
    run = RunRoot(recipe.run_root)
    model_paths = _local_model_paths(recipe)
    preload = _cpu_preload(recipe)
    probes = ray.get([
        _probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
        .remote(run.uri, node["NodeID"], model_paths, preload)
        for node in nodes
    ])
    driver = package_versions()
    checks = []

    mismatched = sorted({
        f"{package} {report['versions'].get(package, 'missing')} on {node['NodeManagerAddress']} "
        f"(driver: {version})"
        for node, report in zip(nodes, probes)
        for package, version in driver.items()
        if report["versions"].get(package) != version
    })
    checks.append(Check("versions", not mismatched,
                        "same on all nodes: " + ", ".join(f"{k} {v}" for k, v in driver.items()) if not mismatched
                        else "; ".join(mismatched),
                        "" if not mismatched else "install one environment everywhere: the same container image, "
                                                  "or `pip install --no-deps -r requirements-cpu.lock -e .`"))

    for node, report in zip(nodes, probes):
        where = node["NodeManagerAddress"]
        declared = int(node["Resources"].get("GPU", 0))
        checks.append(Check(f"gpus on {where}", report["gpus"] == declared,
                            f"Ray schedules {declared} GPU, torch sees {report['gpus']}",
                            "" if report["gpus"] == declared else
                            "check the NVIDIA driver and CUDA_VISIBLE_DEVICES on that node, or start Ray there "
                            "with --num-gpus matching the hardware"))
        readable = report["write_error"] is None and run.exists(".doctor", f"{node['NodeID']}.txt")
        checks.append(Check(f"run root from {where}", readable,
                            f"{run.uri} is writable there and visible to the driver" if readable else
                            report["write_error"] or f"{where} wrote to {run.uri}, but the driver cannot see it",
                            "" if readable else "put run_root on storage every node mounts (NFS at the same path) "
                                                "or an object store (s3://…, gs://…)"))
        missing = report["unreadable_models"]
        checks.append(Check(f"models on {where}", not missing,
                            "all local model paths readable" if not missing else f"cannot read {', '.join(missing)}",
                            "" if not missing else "copy the model to shared storage mounted at the same path "
                                                   "on every node"))

        checks.append(_dtype_check(recipe, where, report))
        if preload:
            checks.append(_allocator_check(preload, where, report))

    return checks + _resource_checks(recipe, nodes)


def _dtype_check(recipe: Recipe, where: str, report: dict[str, Any]) -> Check:
    """What `dtype: auto` picks on a node's CPU, and a failure where a CPU engine forces bf16 on a CPU that
    would emulate it."""
    slow = sorted(role for role, engine in _engines(recipe).items()
                  if engine.gpus_per_replica == 0 and engine.dtype == "bfloat16" and report["cpu_dtype"] != "bfloat16")
    detail = f"CPU engines with dtype auto run in {report['cpu_dtype']}: {report['cpu_dtype_reason']}"
    if slow:
        detail += f"; but {', '.join(slow)} set dtype bfloat16"
    return Check(f"engine dtype on {where}", not slow, detail,
                 "" if not slow else "set dtype: auto (or float32) for CPU engines: emulated bf16 runs about 4x "
                                     "slower than fp32")


def _cpu_preload(recipe: Recipe) -> str | None:
    """The library CPU engines and training workers will preload (the driver's path), or None where nothing
    generates or trains on CPU."""
    cpu_training = not all(getattr(recipe.stages, name).scaling.use_gpu for name in recipe.TRAINING_STAGES)
    cpu_engines = any(engine.backend != "openai" and not engine.gpus_per_replica
                      for engine in _engines(recipe).values())
    if not (cpu_training or cpu_engines):
        return None
    return training_environment(on_gpu=False).get("LD_PRELOAD") or None


def _allocator_check(preload: str, where: str, report: dict[str, Any]) -> Check:
    """CPU engines and training workers get the driver's path to Ray's jemalloc; a node without that file runs them
    on glibc's malloc, after a loader error in every process's log."""
    missing = report["preload_missing"]
    return Check(f"cpu allocator on {where}", not missing,
                 f"{preload} is missing there: its CPU engines and training workers would fall back to glibc's malloc"
                 if missing else f"CPU engines and training workers preload {preload}",
                 "" if not missing else "install the environment at the same path on every node (one container "
                                        "image), or set LD_PRELOAD= in the driver's environment to run on glibc")


def format_checks(checks: list[Check]) -> str:
    lines = []
    for check in checks:
        lines.append(f"[{'ok' if check.ok else 'FAIL'}] {check.name}: {check.detail}")
        if check.fix:
            lines.append(f"       fix: {check.fix}")
    failed = sum(not c.ok for c in checks)
    lines.append(f"{len(checks) - failed} checks passed, {failed} failed")
    return "\n".join(lines)
