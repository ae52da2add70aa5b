"""The environment of training workers: on CPU nodes, the allocator settings that keep a step's buffers in the heap."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from sphuatuo.recipe import SftStage
from sphuatuo.store.run_root import RunRoot
from sphuatuo.store.runtime import CPU_ENVIRONMENT, CPU_TRAINING_ENVIRONMENT, process_environment, training_environment

ALLOCATOR = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")


def test_cpu_trainers_keep_freed_memory_in_the_heap_and_engines_and_gpu_workers_are_untouched(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ALLOCATOR:
        monkeypatch.delenv(name, raising=False)
    cpu = training_environment(on_gpu=False)
    assert cpu == {**CPU_ENVIRONMENT, **CPU_TRAINING_ENVIRONMENT} and cpu["MALLOC_MMAP_MAX_"] == "0"
    assert not set(ALLOCATOR) & set(training_environment(on_gpu=True))
    assert not set(ALLOCATOR) & set(process_environment(on_gpu=False))  # vLLM engines allocate as they do
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1048576")  # the driver's own value wins, as for every variable
    assert training_environment(on_gpu=False)["MALLOC_TRIM_THRESHOLD_"] == "1048576"


@pytest.mark.slow
def test_a_ray_train_worker_on_cpu_runs_with_the_training_environment(tmp_path: Path, ray_cluster,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from sphuatuo.train.launcher import fit

    for name in ALLOCATOR:
        monkeypatch.delenv(name, raising=False)

    def record_environment(config: dict[str, Any]) -> None:
        seen = {name: os.environ.get(name) for name in (*ALLOCATOR, "DS_ACCELERATOR")}
        RunRoot(config["run_root"], config["filesystem"]).write_text(json.dumps(seen), config["stage_name"], "env.json")

    run = RunRoot(str(tmp_path / "run"))
    fit(run, "environment", SftStage(scaling={"num_workers": 1, "zero_stage": 0}), record_environment, {})
    seen = json.loads(run.read_text("environment", "env.json"))
    assert seen == {**{name: CPU_TRAINING_ENVIRONMENT[name] for name in ALLOCATOR}, "DS_ACCELERATOR": "cpu"}
