"""`sphuatuo doctor` and `sphuatuo submit` against the session's real Ray head on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, tiny_recipe
from sphuatuo.commands.doctor import doctor, format_checks
from sphuatuo.recipe import load_recipe

pytestmark = pytest.mark.slow


def test_doctor_passes_for_the_demo_recipe_on_this_cluster(tmp_path: Path, ray_cluster) -> None:
    recipe = load_recipe(REPO / "pipelines" / "demo.yaml", [f"run_root={tmp_path / 'run'}"])
    checks = doctor(recipe)
    report = format_checks(checks)
    assert all(check.ok for check in checks), report
    names = {check.name for check in checks}
    assert {"versions", "resources: teacher engine replica", "resources: sft training"} <= names
    assert any(name.startswith("run root from ") for name in names)
    assert any(name.startswith("cpu allocator on ") and "libjemalloc.so" in check.detail
               for name, check in ((check.name, check) for check in checks))
    assert report.endswith(f"{len(checks)} checks passed, 0 failed")


def test_doctor_names_each_problem_with_its_fix(tmp_path: Path, ray_cluster) -> None:
    recipe = tiny_recipe(tmp_path / "run", **{"stages.sft.scaling.use_gpu": True,
                                              "models.teacher.gpus_per_replica": 1,
                                              "models.teacher.tensor_parallel_size": 2,
                                              "models.student.model": str(tmp_path / "no-such-model")})
    checks = {check.name: check for check in doctor(recipe)}
    teacher = checks["resources: teacher engine replica"]
    assert not teacher.ok and "needs 2 CPU and 2 GPU on one node" in teacher.detail
    assert "tensor_parallel_size" in teacher.fix
    sft = checks["resources: sft training"]
    assert not sft.ok and "2 GPU in all" in sft.detail and "num_workers" in sft.fix
    models = next(check for name, check in checks.items() if name.startswith("models on "))
    assert not models.ok and "no-such-model" in models.detail and "shared storage" in models.fix
    assert format_checks(list(checks.values())).endswith(", 3 failed")


def test_submit_runs_a_recipe_to_succeeded_and_follows_its_logs(tmp_path: Path, ray_head) -> None:
    run_root = tmp_path / "run"
    recipe = tiny_recipe(run_root, **{"data.train": [{"path": "builtin:sample_bank", "limit": 2}],
                                      "data.test_fraction": 0.0, "models.teacher.backend": "hf",
                                      "models.judge.kind": "rule",
                                      "stages.teacher_cot.retry_with_reference": False})
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    result = subprocess.run(
        [sys.executable, "-m", "sphuatuo.cli", "submit", str(recipe_file), "--address", ray_head["dashboard"],
         "--set", "stages.teacher_cot.sampling.max_tokens=8", "--until", "teacher_cot"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "submitted job raysubmit_" in result.stdout and "SUCCEEDED" in result.stdout
    manifest = json.loads((run_root / "manifest.json").read_text())
    assert manifest["stages"]["teacher_cot"]["status"] == "done"
    assert list(manifest["stages"]) == ["questions", "teacher_cot"]  # --until reached the job too
    assert manifest["recipe"]["stages"]["teacher_cot"]["sampling"]["max_tokens"] == 8  # the --set reached the job


def test_submit_refuses_an_invalid_recipe_before_contacting_the_cluster(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sphuatuo.cli", "submit", str(REPO / "pipelines" / "demo.yaml"),
         "--address", "http://127.0.0.1:9", "--set", "stages.sft.epochs=-3"],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2 and "stages.sft.epochs" in result.stderr
