"""The demo recipes end to end at a reduced size: every stage through real Ray, vLLM and TRL (the demos train on one
Ray Train worker without DeepSpeed, the faster choice on 2 cores; ZeRO over two workers runs in the shape tests),
reporting to MLflow (its SQLite store in the run root); then a re-run that must do no work.

The Self-Play demo runs with the project's tiny-think model in SmolLM2's place (a size, as the shape runs' CPU
overlay): it closes every chain with an option letter, so every stage has rows, and it trains and generates in
seconds where SmolLM2 takes minutes. The o1 demo keeps SmolLM2: what it checks is that SFT teaches a real model
the o1 format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import load_dataset
from mlflow import MlflowClient

from conftest import REPO, rows_only_on_workers
from sphuatuo.commands.export import export_run
from sphuatuo.commands.report import write_report
from sphuatuo.pipeline import recipe_stages, run_pipeline
from sphuatuo.recipe import Recipe, load_recipe
from sphuatuo.stages.evaluate import protocol_label

pytestmark = pytest.mark.slow

SMALL = [
    "models.teacher.model=builtin:tiny-think",
    "models.student.model=builtin:tiny-think",
    "models.judge.engine.model=builtin:tiny-think",
    "data.train.0.limit=24",
    "data.test_fraction=0.25",
    "stages.teacher_cot.sampling.max_tokens=128",
    "stages.student_answers.sampling.max_tokens=128",
    "stages.preference_pairs.sampling.max_tokens=128",
    "stages.evaluate.sampling.max_tokens=96",
    "stages.evaluate.max_protocol_tokens=96",
    "stages.sft.max_length=512",
    "stages.dpo.max_length=512",
    "tracking.report_to=[mlflow]",
]


def test_demo_recipe_end_to_end_then_rerun_does_no_work(tmp_path: Path, ray_cluster) -> None:
    recipe = load_recipe(REPO / "pipelines" / "demo.yaml", [f"run_root={tmp_path / 'run'}", *SMALL])
    run = run_pipeline(recipe)
    report = Path(write_report(run)).read_text()

    stages = json.loads(run.read_text("manifest.json"))["stages"]
    assert list(stages) == [stage.NAME for stage in recipe_stages(Recipe)]
    assert stages["questions"]["rows_out"] == 24
    assert stages["teacher_cot"]["status"] == "done" and stages["teacher_cot"]["output_tokens"] > 0
    assert stages["sft"]["status"] == "done", stages["sft"]["error"]
    assert stages["sft"]["rows_out"] == stages["teacher_cot"]["rows_out"] > 0
    assert stages["student_answers"]["status"] == "done" and stages["student_answers"]["rows_out"] == 2 * 18
    for name in ("preference_pairs", "dpo"):
        # A 135M student may write no verified correction; then the stages must say so, not crash.
        assert stages[name]["status"] in ("done", "skipped"), stages[name]["error"]
    # The demo is an ablation: one DPO model per pair strategy, each evaluated when it has pairs.
    counts = stages["preference_pairs"]["details"].get("strategies", {})
    runs = stages["dpo"]["details"].get("runs", {})
    for strategy, c in counts.items():
        assert c["paired"] <= c["verified"] and f"| {strategy} | {c['wrong']} |" in report
        trained = runs[f"dpo_{strategy}"]["status"] == "done"
        assert trained == (c["paired"] > 0) == (f"dpo_{strategy}" in stages["evaluate"]["details"]["models"])
    evaluated = stages["evaluate"]["details"]["models"]
    assert {"base", "sft"} <= set(evaluated) and all(m["n"] == 6 for m in evaluated.values())
    # Their engines (one core each) start two at a time, side by side: one start per model, in pairs.
    starts = [start["seconds"] for start in stages["evaluate"]["details"]["engines"]["starts"]]
    assert len(starts) == len(evaluated) and starts[0] == starts[1]
    assert run.read_text("run.log").count(" up side by side in ") == len(evaluated) // 2

    assert "| sft | done |" in report and "![sft loss](sft_loss.png)" in report
    assert run.exists("sft_loss.png") and run.exists("sft", "model", "model.safetensors")
    for name in evaluated:
        assert f"| {name} | 6 |" in report
    # Every model under both protocols, the paper's labelled with the settings it ran with.
    protocols = stages["evaluate"]["details"]["protocols"]
    assert list(protocols) == ["project", "sp_paper"]
    for name, entry in protocols.items():
        assert set(entry["models"]) == set(evaluated)
        result = entry["models"]["sft"]
        assert f"| {protocol_label(name, entry['settings'])} | sft | 6 | {result['accuracy']:.1%} |" in report
    assert protocol_label("sp_paper", protocols["sp_paper"]["settings"]).startswith(
        "sp_paper (T 0.7, top_p 0.9, 96 tokens, raw prompt")

    # The demo's pairs, every strategy's, export to LLaMA-Factory's ranking format and load in `datasets`.
    written = export_run(run, tmp_path / "export")
    pairs = run.read_rows("preference_pairs", "pairs")
    if pairs:
        info = json.loads(written["dataset_info"].read_text())
        dpo = load_dataset("json", data_files=str(written["llamafactory_dpo"]), split="train")
        assert len(dpo) == len(pairs) and sorted(dpo["strategy"]) == sorted(p["strategy"] for p in pairs)
        assert all(row["chosen"]["from"] == row["rejected"]["from"] == "gpt" for row in dpo)
        strategies = {p["strategy"] for p in pairs}
        assert len(strategies) == 1 or {f"sphuatuo_dpo_{s}" for s in strategies} <= set(info)

    # The demo's MLflow run holds the training metrics and the evaluation table (the SFT and DPO trainers' own
    # runs are nested under it).
    client = MlflowClient(f"sqlite:///{run.fs_path('tracking', 'mlflow.db')}")
    experiment = client.get_experiment_by_name("demo")
    (pipeline,) = client.search_runs([experiment.experiment_id], "tags.`sphuatuo.recipe` = 'demo' and "
                                     "attributes.run_name = 'demo'")
    assert pipeline.data.params["fingerprint.sft"] == stages["sft"]["fingerprint"]
    assert len(client.get_metric_history(pipeline.info.run_id, "sft/loss")) == stages["sft"]["details"]["steps"] > 1
    table = json.loads(Path(client.download_artifacts(pipeline.info.run_id, "evaluation.json",
                                                      str(tmp_path))).read_text())
    assert sorted(row[0] for row in table["data"]) == sorted([*evaluated, *evaluated])  # one row per protocol
    for name, result in evaluated.items():
        assert pipeline.data.metrics[f"evaluate/{name}/project/accuracy"] == result["accuracy"]
    trained = {r.info.run_name for r in client.search_runs(
        [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{pipeline.info.run_id}'")}
    assert "sft" in trained and trained <= {"sft", *runs}
    tracked_runs = len(client.search_runs([experiment.experiment_id]))

    manifest_before = run.read_text("manifest.json")
    files_before = sorted(p.name for p in Path(run.path).rglob("*.parquet"))
    run_pipeline(recipe)
    assert run.read_text("manifest.json") == manifest_before
    assert sorted(p.name for p in Path(run.path).rglob("*.parquet")) == files_before
    assert len(client.search_runs([experiment.experiment_id])) == tracked_runs  # nothing ran, nothing tracked


RELEASED = REPO / "tests" / "fixtures" / "released"
O1_SMALL = [
    "data.train.0.limit=8",
    f"stages.sft.data={RELEASED / 'medical_o1_sft_sample.json'}",
    f"stages.rl.data={RELEASED / 'medical_o1_verifiable_problem_sample.jsonl'}",
    "stages.sft.epochs=1",
    "stages.rl.max_steps=2",
    # The SFT model's replies in the format run about 32 tokens: half the demo's budget still holds them, and GRPO
    # generates and trains on half the tokens per step.
    "stages.rl.max_response_length=64",
    "stages.evaluate.models=[rl]",
    # Two protocols, so two evaluation passes: a short budget each (what is checked is the table, not the score).
    "stages.evaluate.sampling.max_tokens=32",
]


def test_o1_demo_learns_the_format_so_rl_rewards_are_not_zero(tmp_path: Path, ray_cluster,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The o1 demo's SFT and RL at a reduced size, started from released-format files so that it skips the
    search: SFT on the paths plus the project-written examples teaches SmolLM2 the `## Thinking` /
    `## Final Response` format, so GRPO sees rewards above 0 (a broken format scores 0)."""
    recipe = load_recipe(REPO / "pipelines" / "huatuo_o1_demo.yaml", [f"run_root={tmp_path / 'run'}", *O1_SMALL])
    with rows_only_on_workers(monkeypatch):  # the released files too are read on a worker
        run = run_pipeline(recipe)
    report = Path(write_report(run)).read_text()
    stages = json.loads(run.read_text("manifest.json"))["stages"]

    # Started at `sft` and `rl` from released-format files, the search stages are skipped and say why.
    search = stages["reasoning_search"]
    assert search["status"] == "skipped" and "stages.sft.data" in search["error"]
    sft = stages["sft"]
    assert sft["status"] == "done", sft["error"]
    assert sft["details"]["origins"] == {"released": 4, "project-written": 64} and sft["rows_rejected"] == 1
    assert run.read_text("sft", "released_rejects.jsonl").count("missing or empty: Question") == 1
    examples = run.read_rows("sft", "data")
    assert sorted({row["origin"] for row in examples}) == ["project-written", "released"]
    assert all(e["completion"][0]["content"].startswith("## Thinking\n\n") for e in examples)
    rl = stages["rl"]
    assert rl["status"] == "done", rl["error"]
    rewards = [entry["reward"] for entry in json.loads(run.read_text("rl", "train_log.json")) if "reward" in entry]
    assert len(rewards) == 2 and max(rewards) > 0, rewards  # a 0 everywhere means no completion kept the format
    assert "![rl reward](rl_reward.png)" in report and run.exists("rl_reward.png")
    assert "rl: The mean reward " in report and "Per step: " in report
    assert "<h3>RL reward</h3>" in run.read_text("report.html")

    # The RL model is evaluated under both protocols, and the report's protocol table shows both with intervals.
    protocols = stages["evaluate"]["details"]["protocols"]
    assert list(protocols) == ["project", "o1_paper"] and protocols["o1_paper"]["settings"]["temperature"] == 0.5
    for name, entry in protocols.items():
        result = entry["models"]["rl"]
        assert result["n"] == 2
        low, high = result["ci95"]
        assert (f"| {protocol_label(name, entry['settings'])} | rl | 2 | {result['accuracy']:.1%} | "
                f"{low:.1%} – {high:.1%} | {result['first_match_accuracy']:.1%} |") in report
