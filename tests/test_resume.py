"""A driver killed in the middle of a generation stage, once in the teacher's pass and, re-run, once more in the
judge's: each re-run finishes what the killed one left, every question id is written exactly once, and the rows
written before a kill are kept, not generated again."""

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
TEACHER_PASS, JUDGE_PASS = ("teacher_cot", "first_generated"), ("teacher_cot", "first_raw")


def _killed_mid_pass(command: list[str], env: dict[str, str], run: RunRoot, folder: tuple[str, str],
                     log: Path) -> tuple[set[str], dict[str, float]]:
    """Starts a driver and SIGKILLs its whole process group once `folder` holds at least 4 rows; returns the keys
    written by then and each parquet file's modification time."""
    with log.open("w") as stderr:
        driver = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr,
                                  start_new_session=True)
        deadline = time.monotonic() + 300
        while len(run.read_column("key", *folder)) < 4:
            assert driver.poll() is None, "the run ended before it could be interrupted"
            assert time.monotonic() < deadline, "no rows were written in 5 minutes"
            time.sleep(0.5)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    written = set(run.read_column("key", *folder))
    assert 4 <= len(written) < QUESTIONS, f"{'/'.join(folder)}: the kill should land mid-pass"
    return written, {Path(f).name: os.path.getmtime(f) for f in run.parquet_files(*folder)}


def _written_once_and_kept(run: RunRoot, folder: tuple[str, str], before: dict[str, float]) -> None:
    keys = run.read_column("key", *folder)
    assert sorted(keys) == sorted(set(keys)) and len(keys) == QUESTIONS  # every question exactly once
    after = {Path(f).name: os.path.getmtime(f) for f in run.parquet_files(*folder)}
    assert all(after.get(name) == mtime for name, mtime in before.items())  # kept, untouched


def test_a_driver_killed_in_each_pass_of_a_generation_stage_resumes_without_regenerating(tmp_path: Path,
                                                                                       ray_head) -> None:
    # Both engines on transformers, one row per batch, so each pass outlasts the poll: the teacher's, then the LLM
    # judge's (the tiny model), which answers after the teacher's pass is written.
    run_root = tmp_path / "run"
    recipe = tiny_recipe(run_root, **{"data.train": [{"path": "builtin:sample_bank", "limit": QUESTIONS}],
                                      "data.test_fraction": 0.0,
                                      "models.teacher.backend": "hf", "models.teacher.batch_size": 1,
                                      "models.judge": {"kind": "llm", "engine": {
                                          "backend": "hf", "model": "builtin:tiny", "batch_size": 1}},
                                      "stages.teacher_cot.retry_with_reference": False,
                                      "stages.teacher_cot.sampling.max_tokens": 24})
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    command = [sys.executable, "-m", "sphuatuo.cli", "run", str(recipe_file), "--until", "teacher_cot"]
    env = {**os.environ, "RAY_ADDRESS": ray_head["address"]}
    run = RunRoot(str(run_root))

    teacher_written, teacher_files = _killed_mid_pass(command, env, run, TEACHER_PASS, tmp_path / "first.log")
    # The second driver finishes the teacher's pass from where the first stopped, and dies in the judge's.
    judge_written, judge_files = _killed_mid_pass(command, env, run, JUDGE_PASS, tmp_path / "second.log")
    _written_once_and_kept(run, TEACHER_PASS, teacher_files)
    assert (f"teacher_cot/first_generated: {len(teacher_written)} rows already written, "
            f"{QUESTIONS - len(teacher_written)} to go") in (tmp_path / "second.log").read_text()

    finished = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr[-3000:]
    _written_once_and_kept(run, JUDGE_PASS, judge_files)
    assert (f"teacher_cot/first_raw: {len(judge_written)} rows already written, "
            f"{QUESTIONS - len(judge_written)} to go") in finished.stderr
    assert f"teacher_cot/first_generated: {QUESTIONS} rows already written, 0 to go" in finished.stderr
    judged = run.read_column("id", "teacher_cot", "first")
    assert sorted(judged) == sorted(set(judged)) and len(judged) == QUESTIONS
    # The run keeps its own log (saved after each stage): the last re-run's pass and stage throughput are in it.
    run_log = run.read_text("run.log")
    assert f"teacher_cot/first_raw: {QUESTIONS - len(judge_written)} rows in " in run_log
    assert "stage teacher_cot: done in" in run_log and "output tok/s" in run_log
    # `--until teacher_cot`: the later stages are left for the next run.
    assert list(json.loads(run.read_text("manifest.json"))["stages"]) == ["questions", "teacher_cot"]
