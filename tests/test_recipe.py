"""Recipes: every shipped recipe validates; a broken one is refused with each field named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sphuatuo.recipe import RecipeError, load_recipe

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"


@pytest.mark.parametrize("path", sorted(PIPELINES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_validate(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.name


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    return path


def _demo_raw() -> dict:
    return yaml.safe_load((PIPELINES / "demo.yaml").read_text())


def test_wrong_type_and_unknown_key_are_named_with_the_file(tmp_path: Path) -> None:
    raw = _demo_raw()
    raw["stages"]["sft"]["learning_rate"] = "fast"
    raw["stages"]["dpo"]["betta"] = 0.1
    path = _write(tmp_path, raw)
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    message = str(caught.value)
    assert str(path) in message
    assert "stages.sft.learning_rate:" in message and "'fast'" in message
    assert "stages.dpo.betta: unknown field" in message
    assert len(caught.value.problems) == 2


def test_missing_required_field_and_bad_values(tmp_path: Path) -> None:
    raw = _demo_raw()
    del raw["models"]["teacher"]["model"]
    raw["stages"]["teacher_cot"]["sampling"]["top_p"] = 1.5
    raw["models"]["judge"] = {"kind": "llm"}
    problems = "\n".join(pytest.raises(RecipeError, load_recipe, _write(tmp_path, raw)).value.problems)
    assert "models.teacher.model: Field required" in problems
    assert "stages.teacher_cot.sampling.top_p:" in problems
    assert "models.judge: Value error, judge kind 'llm' needs an `engine`" in problems


def test_not_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="file not found"):
        load_recipe(tmp_path / "absent.yaml")


def test_overrides_are_typed_and_validated() -> None:
    recipe = load_recipe(PIPELINES / "demo.yaml", ["stages.sft.epochs=2", "run_root=/tmp/x", "data.test_fraction=0.5"])
    assert recipe.stages.sft.epochs == 2.0 and recipe.run_root == "/tmp/x" and recipe.data.test_fraction == 0.5
    with pytest.raises(RecipeError, match="stages.sft.epochs"):
        load_recipe(PIPELINES / "demo.yaml", ["stages.sft.epochs=-1"])
    with pytest.raises(RecipeError, match="not of the form"):
        load_recipe(PIPELINES / "demo.yaml", ["stages.sft.epochs"])


def test_validate_command_exit_codes(tmp_path: Path) -> None:
    good = subprocess.run([sys.executable, "-m", "sphuatuo.cli", "validate", str(PIPELINES / "demo.yaml")],
                          capture_output=True, text=True)
    assert good.returncode == 0, good.stderr
    assert "valid recipe 'demo'" in good.stdout

    raw = _demo_raw()
    raw["stages"]["sft"]["scaling"]["zero_stage"] = 1
    bad = subprocess.run([sys.executable, "-m", "sphuatuo.cli", "validate", str(_write(tmp_path, raw))],
                         capture_output=True, text=True)
    assert bad.returncode == 1
    assert "recipe.yaml: invalid recipe" in bad.stderr
    assert "stages.sft.scaling.zero_stage:" in bad.stderr


def test_engine_replicas_are_a_count_or_an_autoscaling_range() -> None:
    fixed = load_recipe(PIPELINES / "demo.yaml", ["models.teacher.replicas=3"]).models.teacher
    assert (fixed.min_replicas, fixed.max_replicas) == (3, 3)
    ranged = load_recipe(PIPELINES / "demo.yaml", ["models.teacher.replicas=[1, 4]"]).models.teacher
    assert (ranged.min_replicas, ranged.max_replicas) == (1, 4)
    for bad in ("[4, 1]", "0", "[0, 2]"):
        with pytest.raises(RecipeError, match="models.teacher: .*replicas must be N >= 1 or \\[min, max\\]"):
            load_recipe(PIPELINES / "demo.yaml", [f"models.teacher.replicas={bad}"])


def test_training_scale_is_checked_the_global_batch_and_offload() -> None:
    recipe = load_recipe(PIPELINES / "sp_huatuo_7b_multinode.yaml")
    sft, dpo = recipe.stages.sft, recipe.stages.dpo
    assert sft.scaling.num_workers == 16 and sft.scaling.zero_stage == dpo.scaling.zero_stage == 3
    assert sft.finetuning == dpo.finetuning == "full" and dpo.beta == 0.3 and dpo.loss_type == "sigmoid"
    assert (sft.global_batch_size, dpo.global_batch_size) == (16, 32)  # METHOD.md's effective batches

    with pytest.raises(RecipeError) as caught:
        load_recipe(PIPELINES / "sp_huatuo_7b_multinode.yaml", ["stages.sft.grad_accumulation=2"])
    assert ("stages.sft: Value error, global_batch_size 16 != micro_batch_size 1 x grad_accumulation 2 x "
            "scaling.num_workers 16 = 32") in caught.value.problems[0]
    with pytest.raises(RecipeError, match="stages.sft.scaling: Value error, offload_optimizer / offload_params need"):
        load_recipe(PIPELINES / "demo.yaml", ["stages.sft.scaling.offload_optimizer=true"])
    with pytest.raises(RecipeError, match="offload_params needs zero_stage 3"):
        load_recipe(PIPELINES / "sp_huatuo_7b.yaml", ["stages.sft.scaling.offload_params=true"])
