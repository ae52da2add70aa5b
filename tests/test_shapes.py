"""Shipped GPU recipes, exactly as shipped, end to end on CPU through `pipelines/overlays/cpu.yaml`.

The overlay changes sizes only (tests/test_overlay.py holds it to that): the project's tiny-think model (it writes
the Self-Play format) in place of QwQ-32B, Qwen2.5-7B and the o1 recipe's small models, tiny-judge as the judge (a
fair coin: it passes about half of the replies, so every stage gets rows), a few rows of each data format,
short budgets, two training steps on two workers. Everything else runs as the cluster runs it: the same back-ends
(GPT-4o through the OpenAI API, here a real `vllm serve` on loopback answering to `gpt-4o`), the one-token LLM
judge, LoRA under ZeRO-2, the Chinese prompt family, and both evaluation protocols the recipe names. The two full
fine-tuning recipes are one run under the overlay on two kinds of storage (test_overlay.py holds them to that): the
multinode one runs here on its object store. The demos have their own
end-to-end tests (test_end_to_end.py); they need no overlay.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import OPENAI_SERVER_KEY, REPO, moto_s3, rows_only_on_workers
from sphuatuo.commands.report import write_report
from sphuatuo.pipeline import recipe_stages, run_pipeline
from sphuatuo.recipe import load_recipe
from sphuatuo.store.run_root import RunRoot

pytestmark = pytest.mark.slow

CPU = REPO / "pipelines" / "overlays" / "cpu.yaml"


def _shipped(name: str, *overrides: str):
    return load_recipe(REPO / "pipelines" / f"{name}.yaml", list(overrides), [CPU])


def _stages(run: RunRoot) -> dict[str, Any]:
    return json.loads(run.read_text("manifest.json"))["stages"]


def _check_self_play(recipe, run: RunRoot) -> None:
    """What every Self-Play recipe must show after a shape run: every stage done, the paper's Chinese prompts, the
    student's wrong answers corrected in its own words, a DPO model trained on the verified corrections and
    evaluated beside the base and SFT models, both protocols in manifest and report. The judge passes about half of
    the replies: on this machine 6 of 12 teacher answers, 6 of 12 student answers, 1 of 6 corrections. The one skip
    allowed is DPO's when the judge verified none of the corrections (on another CPU kind, other rounding)."""
    stages = _stages(run)
    assert list(stages) == [stage.NAME for stage in recipe_stages(type(recipe))]
    for name, record in stages.items():
        print(f"shape {recipe.name}: {name} {record['status']} {record['seconds']:.1f} s {record.get('error') or ''}")
    teacher_rows = run.read_rows("teacher_cot", "first")
    assert teacher_rows and {row["prompt_version"].split("/")[0] for row in teacher_rows} == {"self_play_zh"}
    counts = stages["preference_pairs"]["details"]["strategies"]["self_correction"]
    trained = counts["paired"] > 0
    for name, record in stages.items():
        if name == "dpo" and not trained:
            assert record["status"] == "skipped" and "zero preference pairs" in record["error"], record
            continue
        assert record["status"] == "done", f"{name}: {record['status']} {record.get('error')}"

    assert stages["teacher_cot"]["rows_out"] > 0 and stages["sft"]["details"]["steps"] >= 1
    assert run.exists("sft", "model", "model.safetensors")
    assert counts["wrong"] > 0 and counts["corrected"] == counts["wrong"] and counts["paired"] == counts["verified"]
    if trained:
        pairs = run.read_rows("preference_pairs", "pairs")
        assert len(pairs) == counts["paired"] and {pair["strategy"] for pair in pairs} == {"self_correction"}
        assert stages["dpo"]["details"]["runs"]["dpo"]["steps"] >= 1
    models = ["base", "dpo", "sft"] if trained else ["base", "sft"]
    protocols = stages["evaluate"]["details"]["protocols"]
    assert list(protocols) == ["project", "sp_paper"]
    for entry in protocols.values():
        assert sorted(entry["models"]) == models and all(r["n"] == 4 for r in entry["models"].values())
    write_report(run)
    report = run.read_text("report.md")
    for model in models:
        # The paper's sampling and raw prompt; its 450-token budget capped by the overlay, and the label says so.
        assert f"| sp_paper (T 0.7, top_p 0.9, 128 tokens, raw prompt) | {model} |" in report


def test_the_self_play_recipe_runs_in_its_shape(tmp_path: Path, ray_cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """sp_huatuo_7b as shipped, and its rows stay in the cluster: the driver reads no stage's rows (see
    `rows_only_on_workers`)."""
    recipe = _shipped("sp_huatuo_7b", f"run_root={tmp_path / 'run'}")
    with rows_only_on_workers(monkeypatch):
        run = run_pipeline(recipe)
    _check_self_play(recipe, run)


def test_the_full_fine_tuning_recipes_run_in_their_shape_on_an_object_store(tmp_path: Path, ray_cluster,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """sp_huatuo_7b_multinode as shipped, its run root on a real S3-compatible server under the shipped bucket's
    name: every weight trained under ZeRO-3, checkpoints and exports in the bucket, engines loading the SFT model from
    it. The session's Ray nodes have no provider chain of their own (a cluster's nodes would), so the one change to
    the recipe beyond the overlay is `storage.credentials: driver`, which relays the driver's."""
    import boto3

    bucket, prefix = "sphuatuo-runs", "sp_huatuo_7b_multinode"
    with moto_s3(bucket) as (endpoint, _, _):
        for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                            "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}.items():
            monkeypatch.setenv(name, value)
        recipe = _shipped("sp_huatuo_7b_multinode", "storage.credentials=driver")
        assert recipe.run_root == f"s3://{bucket}/{prefix}"
        assert recipe.stages.sft.finetuning == recipe.stages.dpo.finetuning == "full"
        assert recipe.stages.sft.scaling.zero_stage == recipe.stages.dpo.scaling.zero_stage == 3
        run = run_pipeline(recipe)
        _check_self_play(recipe, run)

        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                for o in page.get("Contents", [])]
        assert f"{prefix}/manifest.json" in keys and f"{prefix}/report.md" in keys
        # Full fine-tuning exports a whole model (no adapter), and its checkpoint lies in the bucket.
        assert f"{prefix}/sft/model/model.safetensors" in keys
        assert not any(key.startswith(f"{prefix}/sft/model/adapter") for key in keys)
        assert any(key.startswith(f"{prefix}/checkpoints/") for key in keys), keys


def test_the_huatuo_o1_recipe_runs_in_its_shape_with_gpt4o_served_locally(tmp_path: Path, ray_cluster,
                                                                          openai_server: str,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_SERVER_KEY)  # the variable the recipe names
    shipped = [f"run_root={tmp_path / 'run'}", f"models.teacher.base_url={openai_server}",
               f"models.judge.engine.base_url={openai_server}",  # the loopback server's port
               "data.train.0.limit=3", "data.train.1.limit=3"]  # three small-model passes per item: few items

    # As shipped: three small models answer each multiple-choice item and those all three get right are too
    # simple; GPT-4o filters the rest, then rewrites them. The random model behind the name writes no verdict the
    # filter can read: each item is asked again with a new seed, then rejected with its reply, and the stages
    # after say why they have nothing to do, as a run whose generator fails must.
    recipe = _shipped("huatuo_o1_7b", *shipped)
    run = run_pipeline(recipe)
    stages = _stages(run)
    assert list(stages) == [stage.NAME for stage in recipe_stages(type(recipe))]
    assert stages["verifiable_problems"]["rows_out"] == 0
    rejects = run.read_rows("verifiable_problems", "rejects")
    assert len(rejects) == 6 and {r["step"] for r in rejects} <= {"small_models", "filter"}
    assert all(r["reason"].startswith("unreadable after 2 tries") for r in rejects if r["step"] == "filter")
    assert all(r["reason"] == "answered correctly by all 3 small models" for r in rejects if r["step"] != "filter")
    for name in ("reasoning_search", "sft", "rl"):
        assert stages[name]["status"] == "skipped" and stages[name]["error"], name
    for name, record in stages.items():
        print(f"shape {recipe.name} as shipped: {name} {record['status']} {record['seconds']:.1f} s")
