"""A driver killed in the middle of a generation stage (in the teacher's pass, or in the judge's): the re-run
finishes it, every question id is written exactly once, and the rows written before the kill are kept, not
generated again."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, tiny_recipe
from sphuatuo.store.run_root import RunRoot

pytestmark = pytest.mark.slow

QUESTIONS = 30


# The pass the driver dies in, and the judge that makes it so: the rule judge has no pass of its own; the LLM
# judge (the tiny model through transformers, one row per batch) answers after the teacher's pass is written.
KILLED_IN = {
    "teacher_pass": ("first_generated", {"kind": "rule"}),
    "judge_pass": ("first_raw", {"kind": "llm", "engine": {"backend": "hf", "model": "builtin:tiny", "batch_size": 1}}),
}


@pytest.mark.parametrize("killed_in", KILLED_IN)
def test_killed_driver_resumes_a_generation_stage_without_regenerating(tmp_path: Path, ray_head,
                                                                       killed_in: str) -> None:
    pass_name, judge = KILLED_IN[killed_in]
    run_root = tmp_path / "run"
    recipe = tiny_recipe(run_root, **{"data.train": [{"path": "builtin:sample_bank", "limit": QUESTIONS}],
                                      "data.test_fraction": 0.0,
                                      "models.teacher.backend": "hf", "models.teacher.batch_size": 1,
                                      "models.judge": judge,
                                      "stages.teacher_cot.retry_with_reference": False,
                                      "stages.teacher_cot.sampling.max_tokens": 24})
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    command = [sys.executable, "-m", "sphuatuo.cli", "run", str(recipe_file), "--until", "teacher_cot"]
    env = {**os.environ, "RAY_ADDRESS": ray_head["address"]}
    run = RunRoot(str(run_root))
    folder = ("teacher_cot", pass_name)

    driver = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + 300
    while len(run.read_column("key", *folder)) < 4:
        assert driver.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "no rows were written in 5 minutes"
        time.sleep(0.5)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()

    before = {Path(f).name: os.path.getmtime(f) for f in run.parquet_files(*folder)}
    written_before = set(run.read_column("key", *folder))
    assert 4 <= len(written_before) < QUESTIONS, "the kill should land mid-stage"

    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]

    keys = run.read_column("key", *folder)
    assert sorted(keys) == sorted(set(keys)) and len(keys) == QUESTIONS  # every question exactly once
    after = {Path(f).name: os.path.getmtime(f) for f in run.parquet_files(*folder)}
    assert all(after.get(name) == mtime for name, mtime in before.items())  # kept, untouched
    assert f"{len(written_before)} rows already written, {QUESTIONS - len(written_before)} to go" in finished.stderr
    judged = run.read_column("id", "teacher_cot", "first")
    assert sorted(judged) == sorted(set(judged)) and len(judged) == QUESTIONS
    # The run keeps its own log (saved after each stage): the re-run's pass and stage throughput are in it.
    run_log = run.read_text("run.log")
    assert f"teacher_cot/{pass_name}: {QUESTIONS - len(written_before)} rows in " in run_log
    assert "stage teacher_cot: done in" in run_log and "output tok/s" in run_log
    # `--until teacher_cot`: the later stages are left for the next run.
    assert list(json.loads(run.read_text("manifest.json"))["stages"]) == ["questions", "teacher_cot"]
