"""A recipe edited between two runs on one run root, on the real engines: the stages the edit touches run
again into fresh folders (the old rows kept aside), the others are reused untouched, and the run, the
manifest and `sphuatuo status` say which and why."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from conftest import tiny_recipe
from sphuatuo.commands.status import stage_statuses
from sphuatuo.pipeline import run_pipeline
from sphuatuo.stages import questions
from sphuatuo.stages.self_play import teacher_cot
from sphuatuo.store.manifest import read_manifest
from sphuatuo.store.run_root import RunRoot

pytestmark = pytest.mark.slow

STAGES = (questions, teacher_cot)


def _recipe(run_root: Path, temperature: float):
    return tiny_recipe(run_root, **{"data.train": [{"path": "builtin:sample_bank", "limit": 6}],
                                    "models.judge.kind": "rule", "stages.teacher_cot.retry_with_reference": False,
                                    "stages.teacher_cot.sampling.max_tokens": 8,
                                    "stages.teacher_cot.sampling.temperature": temperature})


def _mtimes(run: RunRoot, *folder: str) -> dict[str, float]:
    return {file: os.path.getmtime(file) for file in run.parquet_files(*folder)}


def test_an_edited_recipe_reruns_only_the_stages_it_touches(tmp_path: Path, ray_cluster,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    run = run_pipeline(_recipe(tmp_path / "run", 0.0), stages=STAGES)
    first = read_manifest(run).stages
    questions_files, teacher_files = _mtimes(run, "questions", "train"), _mtimes(run, "teacher_cot", "first")
    assert teacher_files and all(json.loads(row["sampling"])["temperature"] == 0.0
                                 for row in run.read_rows("teacher_cot", "first"))

    with caplog.at_level(logging.INFO, logger="sphuatuo"):
        run_pipeline(_recipe(tmp_path / "run", 0.0), stages=STAGES)  # unchanged: nothing runs
    assert "stage questions: reused" in caplog.text and "stage teacher_cot: reused" in caplog.text
    assert _mtimes(run, "teacher_cot", "first") == teacher_files

    caplog.clear()
    edited = _recipe(tmp_path / "run", 0.7)
    statuses = [(s.name, s.state) for s in stage_statuses(run, edited)]  # every stage of the recipe's kind
    assert statuses[:2] == [("questions", "done"), ("teacher_cot", "stale")]
    assert {state for _, state in statuses[2:]} == {"pending"}
    with caplog.at_level(logging.INFO, logger="sphuatuo"):
        run_pipeline(edited, stages=STAGES)
    assert "stage questions: reused" in caplog.text
    assert "stage teacher_cot: stale, runs again: stages.teacher_cot.sampling.temperature: 0.0 -> 0.7" in caplog.text
    assert _mtimes(run, "questions", "train") == questions_files

    train = len(run.read_rows("questions", "train"))
    rows = run.read_rows("teacher_cot", "first")
    assert len(rows) == train > 0 and all(json.loads(row["sampling"])["temperature"] == 0.7 for row in rows)
    kept = f"teacher_cot@{first['teacher_cot'].fingerprint[:12]}"
    assert len(run.read_rows(".superseded", kept, "first")) == train  # the old rows, kept until gc
    second = read_manifest(run).stages
    assert second["questions"].fingerprint == first["questions"].fingerprint
    assert second["teacher_cot"].fingerprint != first["teacher_cot"].fingerprint
    assert second["teacher_cot"].status == "done" and second["teacher_cot"].rows_in == train
    assert [s.state for s in stage_statuses(run)] == ["done", "done"]
