"""The CPU overlay shrinks every shipped recipe without changing its shape (no Ray: the runs are in
test_shapes.py)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from sphuatuo.overlay import Overlay, apply_overlay, read_overlay, shape_changes
from sphuatuo.recipe import RecipeError, load_recipe

CPU = REPO / "pipelines" / "overlays" / "cpu.yaml"
SHIPPED = sorted((REPO / "pipelines").glob("*.yaml"))


@pytest.mark.parametrize("recipe_file", SHIPPED, ids=lambda p: p.stem)
def test_the_cpu_overlay_changes_only_sizes_and_the_result_fits_a_cpu_machine(recipe_file: Path) -> None:
    raw = yaml.safe_load(recipe_file.read_text())
    shrunk = apply_overlay(copy.deepcopy(raw), read_overlay(CPU), str(recipe_file))
    assert shape_changes(raw, shrunk) == []

    recipe = load_recipe(recipe_file, overlays=[CPU])
    original = load_recipe(recipe_file)
    engines = {"teacher": recipe.models.teacher, "student": recipe.models.student}
    if recipe.models.judge.engine:
        engines["judge"] = recipe.models.judge.engine
    if hasattr(recipe.stages, "verifiable_problems"):
        engines.update({f"small {i}": e for i, e in enumerate(recipe.stages.verifiable_problems.small_models)})
    for role, engine in engines.items():
        if engine.backend == "openai":  # keeps its name; served by whatever listens at the overlay's base_url
            assert engine.model == "gpt-4o" and engine.base_url == "http://127.0.0.1:8000/v1"
        else:
            assert engine.model == ("builtin:tiny-judge" if role == "judge" else "builtin:tiny-think")
            assert engine.gpus_per_replica == 0 and engine.tensor_parallel_size == 1
    for name in ("sft", "dpo", "rl"):
        stage = getattr(recipe.stages, name, None)
        if stage is None:
            continue
        before = getattr(original.stages, name)
        assert stage.scaling.use_gpu is False and stage.scaling.num_workers == 2 and stage.max_steps == 2
        assert (stage.finetuning, stage.scaling.zero_stage) == (before.finetuning, before.scaling.zero_stage)
        assert bool(stage.checkpoint_every_steps) == bool(before.checkpoint_every_steps)
        if name == "rl":  # every step's completions fill whole groups, as TRL's GRPO requires
            per_step = stage.micro_batch_size * stage.grad_accumulation * stage.scaling.num_workers
            assert per_step % stage.group_size == 0 and stage.group_size == before.group_size
    # Every sampling budget, stated in the recipe or left at its stage's default, is the overlay's at most.
    budgets = {f"{stage_name}.{name}": value.max_tokens for stage_name, stage in recipe.stages
               for name, value in stage if name.endswith("sampling")}
    assert budgets and max(budgets.values()) <= 128, budgets
    if "protocols" in yaml.safe_load(recipe_file.read_text())["stages"]["evaluate"]:  # sp_paper decodes 450
        assert recipe.stages.evaluate.max_protocol_tokens == 128
    for kind in ("train", "test"):
        for shrunk_source, source in zip(getattr(recipe.data, kind), getattr(original.data, kind), strict=True):
            assert shrunk_source.format == source.format
            assert shrunk_source.path.startswith("builtin:") or Path(shrunk_source.path).is_file()
    assert recipe.run_root == original.run_root  # storage is shape: an s3:// root stays one


def test_shape_changes_names_what_an_overlay_must_not_touch() -> None:
    before = {"models": {"judge": {"kind": "llm", "engine": {"backend": "vllm", "model": "Qwen/QwQ-32B"}}},
              "stages": {"preference_pairs": {"strategies": ["self_correction"]}}}
    after = copy.deepcopy(before)
    after["models"]["judge"]["engine"].update(backend="hf", model="builtin:tiny")
    after["stages"]["preference_pairs"]["strategies"] = ["sampled"]
    assert sorted(shape_changes(before, after)) == ["models.judge.engine.backend",
                                                    "stages.preference_pairs.strategies.0"]


def test_an_overlay_without_a_file_for_a_recipe_format_fails_naming_the_source(tmp_path: Path) -> None:
    overlay = tmp_path / "partial.yaml"
    overlay.write_text(yaml.safe_dump({"data": {"train_files": {"medqa": "medqa.jsonl"}}}))
    with pytest.raises(RecipeError, match=r"data\.train\.1 reads format 'medmcqa', for which the overlay has no file"):
        load_recipe(REPO / "pipelines" / "huatuo_o1_7b.yaml", overlays=[overlay])
    overlay.write_text("engines: {modle: builtin:tiny}\n")
    with pytest.raises(RecipeError, match=r"overlay .*partial.yaml: engines.modle: Extra inputs are not permitted"):
        load_recipe(REPO / "pipelines" / "sp_huatuo_7b.yaml", overlays=[overlay])


def test_set_overrides_apply_after_the_overlay_and_the_cli_takes_both() -> None:
    recipe = load_recipe(REPO / "pipelines" / "sp_huatuo_7b.yaml", ["stages.sft.max_steps=5"], [CPU])
    assert recipe.stages.sft.max_steps == 5 and recipe.stages.dpo.max_steps == 2
    raw = yaml.safe_load((REPO / "pipelines" / "huatuo_o1_7b.yaml").read_text())
    with pytest.raises(ValueError, match="no file"):  # an empty overlay knows no small file for medqa
        apply_overlay(copy.deepcopy(raw), Overlay())
    result = subprocess.run([sys.executable, "-m", "sphuatuo.cli", "validate", "pipelines/sp_huatuo_7b_multinode.yaml",
                             "--overlay", "pipelines/overlays/cpu.yaml"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_under_the_overlay_the_full_fine_tuning_recipes_differ_in_their_storage_only() -> None:
    """Under the overlay the two full fine-tuning recipes are one run on two kinds of storage (local, s3://): a
    shape run of either is a shape run of both."""
    full = load_recipe(REPO / "pipelines" / "sp_huatuo_7b_full.yaml", overlays=[CPU]).model_dump()
    multinode = load_recipe(REPO / "pipelines" / "sp_huatuo_7b_multinode.yaml", overlays=[CPU]).model_dump()
    differing = sorted(name for name in full.keys() | multinode.keys() if full.get(name) != multinode.get(name))
    assert differing == ["name", "run_root"]
    assert multinode["run_root"].startswith("s3://") and not full["run_root"].startswith("s3://")
    # Without the overlay they differ in sizes as well (8 vs 16 GPUs).
    assert load_recipe(REPO / "pipelines" / "sp_huatuo_7b_full.yaml").stages.sft.scaling.num_workers == 8
