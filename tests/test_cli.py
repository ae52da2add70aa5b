"""The `sphuatuo` command as a user types it (no Ray needed for these)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures" / "questions"


def _sphuatuo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sphuatuo.cli", *args], capture_output=True, text=True)


def test_help_lists_every_command() -> None:
    result = _sphuatuo("--help")
    assert result.returncode == 0
    for command in ("run", "demo", "validate", "data", "report", "models"):
        assert command in result.stdout


def test_data_check_prints_counts_and_each_reason_and_writes_rejects(tmp_path: Path) -> None:
    rejects = tmp_path / "rejects.jsonl"
    result = _sphuatuo("data", "check", str(FIXTURES / "medmcqa_sample.jsonl"), "--rejects", str(rejects))
    assert result.returncode == 0, result.stderr
    first_line = result.stdout.splitlines()[0]
    valid, rejected = int(first_line.split()[0]), int(first_line.split(",")[1].split()[0])
    assert valid > 0 and rejected > 0
    written = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert len(written) == rejected
    for reject in written:
        assert f"row {reject['row']}" in result.stdout and reject["reason"] in result.stdout


def test_data_check_of_the_shipped_bank_and_of_a_missing_file() -> None:
    bank = _sphuatuo("data", "check", "builtin:sample_bank")
    assert bank.returncode == 0 and ", 0 rejected" in bank.stdout.splitlines()[0]
    missing = _sphuatuo("data", "check", "no/such/file.csv")
    assert missing.returncode == 2 and "no/such/file.csv" in missing.stderr


def test_eval_refuses_open_ended_questions_without_a_judge() -> None:
    result = _sphuatuo("eval", "builtin:tiny", "--data", str(FIXTURES / "sp_conversations_sample.json"))
    assert result.returncode == 2 and "open-ended questions need a judge: pass --judge-model" in result.stderr


def test_run_until_a_stage_the_recipe_lacks_names_its_stages(tmp_path: Path) -> None:
    demo = Path(__file__).parent.parent / "pipelines" / "demo.yaml"
    result = _sphuatuo("run", str(demo), "--set", f"run_root={tmp_path / 'run'}", "--until", "rl")
    assert result.returncode == 2
    assert ("--until rl: not a stage of this recipe; its stages: questions, teacher_cot, sft, student_answers, "
            "preference_pairs, dpo, evaluate") in result.stderr


def test_doctor_without_a_cluster_says_how_to_start_one() -> None:
    from ray._private.services import find_gcs_addresses

    if find_gcs_addresses():  # `auto` joins any Ray running on this machine (the suite's own, once started)
        pytest.skip("a Ray cluster runs on this machine")
    demo = Path(__file__).parent.parent / "pipelines" / "demo.yaml"
    result = subprocess.run([sys.executable, "-m", "sphuatuo.cli", "doctor", str(demo)], capture_output=True,
                            text=True, env={**os.environ, "RAY_ADDRESS": ""})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no running Ray cluster found at 'auto': start one (`ray start --head`" in result.stderr
