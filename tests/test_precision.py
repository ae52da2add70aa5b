"""`dtype: auto` picks bf16 only where the CPU computes it natively, fp32 elsewhere; explicit dtypes and GPU
engines are left alone; no shipped CPU recipe forces bf16."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import REPO
from sphuatuo.commands.doctor import _dtype_check
from sphuatuo.engines.precision import OVERRIDE, cpu_dtype, engine_dtype
from sphuatuo.engines.vllm import processor_config
from sphuatuo.recipe import EngineConfig, load_recipe

SAPPHIRE_RAPIDS = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
EPYC_AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})


def test_auto_is_bf16_only_on_cpus_with_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(OVERRIDE, raising=False)
    native = cpu_dtype(SAPPHIRE_RAPIDS)
    assert native.dtype == "bfloat16" and "amx_bf16" in native.reason and "avx512_bf16" in native.reason
    emulated = cpu_dtype(EPYC_AVX2)
    assert emulated.dtype == "float32" and "no native bf16" in emulated.reason


def test_the_override_forces_a_dtype_and_refuses_others(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OVERRIDE, "float32")
    assert cpu_dtype(SAPPHIRE_RAPIDS).dtype == "float32"
    monkeypatch.setenv(OVERRIDE, "float64")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        cpu_dtype(SAPPHIRE_RAPIDS)


def test_explicit_and_gpu_dtypes_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OVERRIDE, "float32")
    assert engine_dtype(EngineConfig(model="m", dtype="bfloat16")) == "bfloat16"
    assert engine_dtype(EngineConfig(model="m", gpus_per_replica=1)) == "auto"
    assert engine_dtype(EngineConfig(model="m")) == "float32"


def test_a_cpu_engine_with_auto_reaches_vllm_with_the_machines_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OVERRIDE, "float32")
    config = processor_config(EngineConfig(model="builtin:tiny"), "/cache/tiny", seed=0)
    assert config.engine_kwargs["dtype"] == "float32"


@pytest.mark.parametrize("recipe", sorted((REPO / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_no_shipped_recipe_forces_bf16_on_a_cpu_engine(recipe: Path) -> None:
    loaded = load_recipe(recipe)
    engines = {"teacher": loaded.models.teacher, "student": loaded.models.student, "judge": loaded.models.judge.engine}
    for role, engine in engines.items():
        if engine is not None and engine.gpus_per_replica == 0 and engine.backend != "openai":
            assert engine.dtype != "bfloat16", f"{recipe.name}: models.{role} forces bf16 on a CPU engine"


def test_doctor_reports_the_choice_and_fails_a_forced_bf16_on_an_avx2_node() -> None:
    recipe = load_recipe(REPO / "pipelines" / "demo.yaml")
    native = {"cpu_dtype": "bfloat16", "cpu_dtype_reason": "the CPU has native bf16 (avx512_bf16)"}
    check = _dtype_check(recipe, "10.0.0.1", native)
    assert check.ok and "run in bfloat16" in check.detail and "avx512_bf16" in check.detail
    forced = load_recipe(REPO / "pipelines" / "demo.yaml", ["models.student.dtype=bfloat16"])
    avx2 = {"cpu_dtype": "float32", "cpu_dtype_reason": "no native bf16 on this x86_64 CPU"}
    check = _dtype_check(forced, "10.0.0.2", avx2)
    assert not check.ok and "student set dtype bfloat16" in check.detail and "dtype: auto" in check.fix
    assert _dtype_check(recipe, "10.0.0.2", avx2).ok
