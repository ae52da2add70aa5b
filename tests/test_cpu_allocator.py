"""The allocator of CPU processes: engines and training workers on Ray's jemalloc, which keeps a step's buffers for
the next step. A training worker's process is checked in tests/test_driver_environment.py, a kept engine process
handing its pages back in tests/test_engine_services.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from sphuatuo.commands.doctor import _allocator_check, _cpu_preload
from sphuatuo.engines import cpu_engine_environment
from sphuatuo.recipe import EngineConfig, load_recipe
from sphuatuo.store.runtime import CPU_ENVIRONMENT, JEMALLOC_CONF, training_environment

ALLOCATOR = ("LD_PRELOAD", "MALLOC_CONF")
PIPELINES = Path(__file__).parents[1] / "pipelines"


def test_cpu_engines_and_trainers_run_on_rays_jemalloc_and_gpu_workers_are_untouched(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ALLOCATOR:
        monkeypatch.delenv(name, raising=False)
    cpu = training_environment(on_gpu=False)
    assert {key: cpu[key] for key in CPU_ENVIRONMENT} == CPU_ENVIRONMENT
    assert Path(cpu["LD_PRELOAD"]).name == "libjemalloc.so" and Path(cpu["LD_PRELOAD"]).is_file()
    assert cpu["MALLOC_CONF"] == JEMALLOC_CONF
    engine = cpu_engine_environment(EngineConfig(model="builtin:tiny", cpus_per_replica=2))
    assert {key: engine[key] for key in (*CPU_ENVIRONMENT, *ALLOCATOR)} == {key: cpu[key] for key in
                                                                            (*CPU_ENVIRONMENT, *ALLOCATOR)}
    assert engine["OMP_NUM_THREADS"] == "2"
    assert not set(ALLOCATOR) & set(training_environment(on_gpu=True))
    monkeypatch.setenv("MALLOC_CONF", "narenas:1")  # the driver's own value wins, as for every variable
    assert training_environment(on_gpu=False)["MALLOC_CONF"] == "narenas:1"
    assert cpu_engine_environment(EngineConfig(model="builtin:tiny"))["MALLOC_CONF"] == "narenas:1"


def test_doctor_names_a_node_without_the_preloaded_allocator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    demo = PIPELINES / "demo.yaml"
    preload = _cpu_preload(load_recipe(demo))
    assert preload == training_environment(on_gpu=False)["LD_PRELOAD"]
    assert _allocator_check(preload, "10.0.0.1", {"preload_missing": False}).ok
    missing = _allocator_check(preload, "10.0.0.2", {"preload_missing": True})
    assert not missing.ok and preload in missing.detail and "glibc" in missing.detail and "same path" in missing.fix
    on_gpus = [f"stages.{stage}.scaling.use_gpu=true" for stage in ("sft", "dpo")]
    assert _cpu_preload(load_recipe(demo, on_gpus)) == preload  # its engines still run on CPU
    # GPU engines and trainers, hosted verifier and judge: no CPU process, no check.
    assert _cpu_preload(load_recipe(PIPELINES / "huatuo_o1_7b.yaml")) is None
    monkeypatch.setenv("LD_PRELOAD", "")  # the driver's choice of glibc: nothing to check
    assert _cpu_preload(load_recipe(demo)) is None
