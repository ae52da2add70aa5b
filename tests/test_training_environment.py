"""The environment of training workers: on CPU nodes, an allocator that keeps a step's buffers for the next step."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from sphuatuo.commands.doctor import _allocator_check, _cpu_trainer_preload
from sphuatuo.recipe import SftStage, load_recipe
from sphuatuo.store.run_root import RunRoot
from sphuatuo.store.runtime import CPU_ENVIRONMENT, JEMALLOC_CONF, process_environment, training_environment

ALLOCATOR = ("LD_PRELOAD", "MALLOC_CONF")


def test_cpu_trainers_run_on_rays_jemalloc_and_engines_and_gpu_workers_are_untouched(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ALLOCATOR:
        monkeypatch.delenv(name, raising=False)
    cpu = training_environment(on_gpu=False)
    assert {key: cpu[key] for key in CPU_ENVIRONMENT} == CPU_ENVIRONMENT
    assert Path(cpu["LD_PRELOAD"]).name == "libjemalloc.so" and Path(cpu["LD_PRELOAD"]).is_file()
    assert cpu["MALLOC_CONF"] == JEMALLOC_CONF
    assert not set(ALLOCATOR) & set(training_environment(on_gpu=True))
    assert not set(ALLOCATOR) & set(process_environment(on_gpu=False))  # vLLM engines allocate as they do
    monkeypatch.setenv("MALLOC_CONF", "narenas:1")  # the driver's own value wins, as for every variable
    assert training_environment(on_gpu=False)["MALLOC_CONF"] == "narenas:1"


def test_doctor_names_a_node_without_the_preloaded_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    demo = Path(__file__).parents[1] / "pipelines" / "demo.yaml"
    preload = _cpu_trainer_preload(load_recipe(demo))
    assert preload == training_environment(on_gpu=False)["LD_PRELOAD"]
    assert _allocator_check(preload, "10.0.0.1", {"preload_missing": False}).ok
    missing = _allocator_check(preload, "10.0.0.2", {"preload_missing": True})
    assert not missing.ok and preload in missing.detail and "glibc" in missing.detail and "same path" in missing.fix
    on_gpus = [f"stages.{stage}.scaling.use_gpu=true" for stage in ("sft", "dpo")]
    assert _cpu_trainer_preload(load_recipe(demo, on_gpus)) is None  # no CPU trainer, no check
    monkeypatch.setenv("LD_PRELOAD", "")  # the driver's choice of glibc: nothing to check
    assert _cpu_trainer_preload(load_recipe(demo)) is None


@pytest.mark.slow
def test_a_ray_train_worker_on_cpu_trains_with_jemalloc_loaded(tmp_path: Path, ray_cluster,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from sphuatuo.train.launcher import fit

    for name in ALLOCATOR:
        monkeypatch.delenv(name, raising=False)

    def record_environment(config: dict[str, Any]) -> None:
        mapped = Path("/proc/self/maps").read_text()
        seen = {"jemalloc_mapped": "libjemalloc.so" in mapped, "MALLOC_CONF": os.environ.get("MALLOC_CONF"),
                "DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR")}
        RunRoot(config["run_root"], config["filesystem"]).write_text(json.dumps(seen), config["stage_name"], "env.json")

    run = RunRoot(str(tmp_path / "run"))
    fit(run, "environment", SftStage(scaling={"num_workers": 1, "zero_stage": 0}), record_environment, {})
    seen = json.loads(run.read_text("environment", "env.json"))
    assert seen == {"jemalloc_mapped": True, "MALLOC_CONF": JEMALLOC_CONF, "DS_ACCELERATOR": "cpu"}
