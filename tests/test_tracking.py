"""Trackers, for real: MLflow (its SQLite store in the run root, and a tracking server the test starts on loopback),
W&B offline (its run files read back record by record) and TensorBoard (its event files read back).

The fast tests drive `Tracking` directly, as the pipeline does, with a stage's logged steps and an evaluation's
scores; the slow one runs a pipeline whose SFT stage trains on Ray Train workers that report to both trackers, then
evaluates the base and SFT models, and opens what each tracker holds.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from conftest import REPO, raw_test_recipe, tiny_recipe
from sphuatuo.pipeline import run_pipeline
from sphuatuo.recipe import O1Recipe, Recipe
from sphuatuo.store import secrets
from sphuatuo.store.run_root import RunRoot
from sphuatuo.store.tracking import EVALUATION_COLUMNS, Tracking

TOKEN_VARIABLE = "SPHUATUO_TEST_TRACKER_TOKEN"
TOKEN = "tok-5d1e0c2b9a8f"

LOG_HISTORY = [{"loss": 2.5, "grad_norm": 1.0, "learning_rate": 1e-3, "epoch": 0.5, "step": 1},
               {"loss": 2.0, "grad_norm": 0.8, "learning_rate": 5e-4, "epoch": 1.0, "step": 2},
               {"train_runtime": 3.2, "train_loss": 2.25, "epoch": 1.0, "step": 2}]


def _score(correct: int, n: int, low: float, high: float) -> dict[str, Any]:
    return {"n": n, "correct": correct, "accuracy": correct / n, "ci95": [low, high],
            "first_match_accuracy": correct / n, "unparsable": 1, "truncated": 2}


PROTOCOLS = {
    "project": {"settings": {}, "models": {"base": _score(1, 4, 0.05, 0.7), "sft": _score(2, 4, 0.15, 0.85)}},
    "strict": {"settings": {}, "models": {"base": _score(0, 4, 0.0, 0.49), "sft": _score(1, 4, 0.05, 0.7)}},
}


def wandb_records(path: Path) -> list[Any]:
    """The records of a W&B run file (`run-<id>.wandb`): a LevelDB-style log of protobuf `Record`s, in 32 KiB
    blocks of chunks (4-byte checksum, 2-byte length, 1-byte type: full, first, middle, last) after a 7-byte
    header (`:W&B`, magic, version)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, position, pending, records = 32768, 7, b"", []
    while position + 7 <= len(data):
        left = block - position % block
        if left < 7:
            position += left
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0 and length == 0:  # padding to the end of the block
            position += left
            continue
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_run(folder: Path) -> dict[str, Any]:
    """The one W&B run under `folder`: its name, group, job type, config and the keys it logged to its history."""
    (run_file,) = folder.glob("offline-run-*/run-*.wandb")
    run: dict[str, Any] = {"history": set(), "config": {}}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.update(name=record.run.display_name, group=record.run.run_group, job_type=record.run.job_type)
            run["config"].update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            run["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            run["history"].update(item.key or "/".join(item.nested_key) for item in record.history.item)
    return run


def tensorboard_scalars(folder: Path) -> dict[str, float]:
    """The last value of each scalar in the event files under `folder`: TFRecords (8-byte length, 4-byte CRC,
    the data, 4-byte CRC) of tensorboardX's `Event` protobufs."""
    from tensorboardX.proto import event_pb2

    scalars = {}
    for events in folder.glob("events.out.tfevents.*"):
        data, position = events.read_bytes(), 0
        while position < len(data):
            (length,) = struct.unpack("<Q", data[position:position + 8])
            event = event_pb2.Event()
            event.ParseFromString(data[position + 12:position + 12 + length])
            position += 12 + length + 4
            scalars.update({value.tag: value.simple_value for value in event.summary.value
                            if value.WhichOneof("value") == "simple_value"})
    return scalars


@pytest.fixture
def secret_token(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(secrets, "_declared", set())
    monkeypatch.setenv(TOKEN_VARIABLE, TOKEN)
    return TOKEN


def test_pipeline_run_holds_the_recipe_fingerprints_training_steps_and_evaluation_in_every_tracker(
        tmp_path: Path, secret_token: str) -> None:
    from mlflow import MlflowClient

    recipe = tiny_recipe(tmp_path / "run", **{"secrets": [TOKEN_VARIABLE],
                                              "tracking.report_to": ["mlflow", "wandb"],
                                              "stages.evaluate.report_to": ["tensorboard"],
                                              # a secret's value pasted where it does not belong
                                              "data.train": [{"path": f"builtin:sample_bank#{secret_token}"}]})
    run = RunRoot(recipe.run_root)
    fingerprints = {"questions": "a" * 64, "sft": "b" * 64, "evaluate": "c" * 64}
    tracking = Tracking(recipe, run, fingerprints)
    tracking.begin()
    env = tracking.worker_environment("sft", "b" * 64, recipe.trackers(recipe.stages.sft))
    tracking.training_finished("sft", recipe.trackers(recipe.stages.sft), LOG_HISTORY)
    tracking.evaluation(recipe.trackers(recipe.stages.evaluate), PROTOCOLS)
    run_id = tracking.mlflow_run_id
    tracking.close(failed=False)

    # The workers' environment: the run root's database, the experiment, the tags that nest their run.
    database = tmp_path / "run" / "tracking" / "mlflow.db"
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{database}" and env["MLFLOW_EXPERIMENT_NAME"] == "tiny"
    tags = json.loads(env["MLFLOW_TAGS"])
    assert tags["mlflow.parentRunId"] == run_id and tags["sphuatuo.fingerprint"] == "b" * 64
    assert (env["WANDB_MODE"], env["WANDB_RUN_GROUP"], env["WANDB_PROJECT"]) == ("offline", tracking.group, "tiny")
    assert not {"WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN"} & set(env)

    client = MlflowClient(f"sqlite:///{database}")
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.status == "FINISHED" and mlflow_run.info.run_name == "tiny"
    params = mlflow_run.data.params
    assert params["recipe.name"] == "tiny" and params["recipe.recipe"] == "self_play"
    assert {params[f"fingerprint.{stage}"] for stage in fingerprints} == {"a" * 64, "b" * 64, "c" * 64}
    assert params["recipe.stages.sft.learning_rate"] == "0.001"
    assert params["recipe.data.train.0.path"] == "builtin:sample_bank#***"
    assert all(secret_token not in value for value in params.values())
    assert mlflow_run.data.tags["sphuatuo.recipe_kind"] == "self_play"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "sft/loss")] == [(1, 2.5), (2, 2.0)]
    assert client.get_metric_history(run_id, "sft/train_runtime")[0].value == 3.2
    metrics = mlflow_run.data.metrics
    assert metrics["evaluate/sft/project/accuracy"] == 0.5 and metrics["evaluate/base/strict/accuracy"] == 0.0
    assert (metrics["evaluate/sft/strict/ci95_low"], metrics["evaluate/sft/strict/ci95_high"]) == (0.05, 0.7)
    artifacts = Path(tmp_path / "run" / "tracking" / "mlartifacts")
    recipe_file = next(artifacts.rglob("recipe.json"))
    assert secret_token not in recipe_file.read_text()
    table = json.loads(next(artifacts.rglob("evaluation.json")).read_text())
    assert table["columns"] == list(EVALUATION_COLUMNS) and len(table["data"]) == 4
    assert ["sft", "project", 4, 2, 0.5, 0.15, 0.85, 0.5, 1, 2] in table["data"]

    wandb = wandb_run(tmp_path / "run" / "tracking" / "wandb")
    assert wandb["name"] == "tiny" and wandb["group"] == tracking.group and wandb["job_type"] == "pipeline"
    assert {"sft/loss", "sft/step", "evaluate/sft/strict/ci95_high", "evaluation/_type"} <= wandb["history"]
    (table_file,) = (tmp_path / "run" / "tracking" / "wandb").glob("offline-run-*/files/media/table/evaluation_*.json")
    table = json.loads(table_file.read_text())
    assert table["columns"] == list(EVALUATION_COLUMNS) and ["base", "strict", 4, 0, 0.0, 0.0, 0.49, 0.0, 1, 2] \
        in table["data"]
    assert wandb["config"]["fingerprint"]["sft"] == "b" * 64 and wandb["config"]["recipe"]["name"] == "tiny"
    assert secret_token not in json.dumps(wandb["config"])

    # TensorBoard only where asked: for the evaluation.
    scalars = tensorboard_scalars(tmp_path / "run" / "evaluate" / "tensorboard")
    assert scalars["evaluate/base/project/accuracy"] == 0.25 and len(scalars) == 4 * 5


def test_tracking_settings_are_validated_without_echoing_credentials(tmp_path: Path) -> None:
    raw = raw_test_recipe("tiny", tmp_path, {"run_root": "s3://bucket/run", "stages.sft.report_to": ["mlflow"]})
    with pytest.raises(ValidationError, match="needs tracking.mlflow_uri"):
        Recipe.model_validate(raw)
    raw["tracking"] = {"mlflow_uri": "http://127.0.0.1:5000"}
    assert Recipe.model_validate(raw).trackers(Recipe.model_validate(raw).stages.sft) == ["mlflow"]

    raw["tracking"] = {"mlflow_uri": "https://admin:hunter2-secret@mlflow.example/"}
    with pytest.raises(ValidationError) as refused:
        Recipe.model_validate(raw)
    assert "hunter2-secret" not in str(refused.value) and "MLFLOW_TRACKING_TOKEN" in str(refused.value)

    recipe = tiny_recipe(tmp_path, **{"tracking.report_to": ["wandb"], "stages.dpo.report_to": ["tensorboard",
                                                                                                "wandb"]})
    assert recipe.trackers(recipe.stages.dpo) == ["wandb", "tensorboard"]
    assert recipe.trackers(recipe.stages.evaluate) == ["wandb"]


@pytest.fixture
def mlflow_server(tmp_path: Path) -> str:
    """A real MLflow tracking server on loopback (SQLite store, artifacts served over HTTP); stopped after the test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    folder = tmp_path / "mlflow-server"
    folder.mkdir()
    log = (folder / "server.log").open("w")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "artifacts")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("the MLflow server did not start:\n" + (folder / "server.log").read_text()[-3000:])
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
        log.close()


@pytest.mark.slow
def test_sft_and_evaluation_report_to_an_mlflow_server_and_wandb_offline(tmp_path: Path, ray_cluster,
                                                                         mlflow_server: str) -> None:
    """The done-when of trackers: an MLflow run of a pipeline holds the training metrics and the evaluation table.
    SFT trains on two Ray Train workers whose rank 0 logs over HTTP to the server and to W&B offline."""
    from mlflow import MlflowClient

    from sphuatuo.stages import evaluate, questions
    from sphuatuo.stages.huatuo_o1 import reasoning_search, sft

    released = REPO / "tests" / "fixtures" / "released" / "medical_o1_sft_sample.json"
    recipe = O1Recipe.model_validate(raw_test_recipe("tiny_o1", tmp_path / "run", {
        "stages.sft.data": str(released),
        "data.test": [{"path": str(REPO / "tests" / "fixtures" / "questions" / "o1_eval_sample.json"), "limit": 4}],
        "stages.evaluate.models": ["base", "sft"],
        "tracking": {"report_to": ["mlflow", "wandb"], "mlflow_uri": mlflow_server, "project": "trackers"}}))
    run = run_pipeline(recipe, stages=(questions, reasoning_search, sft, evaluate))
    manifest = json.loads(run.read_text("manifest.json"))["stages"]
    assert manifest["sft"]["status"] == "done" and manifest["evaluate"]["status"] == "done", manifest
    fingerprint = manifest["sft"]["fingerprint"]

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("trackers")
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"tiny_o1", "sft"}
    pipeline, stage = runs["tiny_o1"], runs["sft"]
    # The stage's own run, nested under the pipeline's, as its trainer logged it: every step's loss.
    assert stage.data.tags["mlflow.parentRunId"] == pipeline.info.run_id
    assert stage.data.tags["sphuatuo.fingerprint"] == fingerprint and stage.data.tags["sphuatuo.recipe"] == "tiny_o1"
    assert [m.step for m in client.get_metric_history(stage.info.run_id, "loss")] == [1, 2]
    assert stage.data.params["learning_rate"] == "0.001" and stage.info.status == "FINISHED"
    # The pipeline's run: the recipe and fingerprints, the stage's steps, the evaluation as metrics and a table.
    params = pipeline.data.params
    assert params["recipe.name"] == "tiny_o1" and params["recipe.recipe"] == "huatuo_o1"
    assert params["fingerprint.sft"] == fingerprint
    assert params["fingerprint.evaluate"] == manifest["evaluate"]["fingerprint"]
    assert len(client.get_metric_history(pipeline.info.run_id, "sft/loss")) == 2
    scores = manifest["evaluate"]["details"]["protocols"]["project"]["models"]
    for model in ("base", "sft"):
        assert pipeline.data.metrics[f"evaluate/{model}/project/accuracy"] == scores[model]["accuracy"]
        assert pipeline.data.metrics[f"evaluate/{model}/project/ci95_high"] == scores[model]["ci95"][1]
    table = json.loads(Path(client.download_artifacts(pipeline.info.run_id, "evaluation.json",
                                                      str(tmp_path))).read_text())
    assert [row[:3] for row in table["data"]] == [["base", "project", 4], ["sft", "project", 4]]
    assert pipeline.info.status == "FINISHED"

    # W&B offline: the stage's run files and the pipeline's, copied into the run root, in one group.
    worker = wandb_run(tmp_path / "run" / "sft" / "wandb")
    assert worker["name"] == "sft" and worker["job_type"] == "train" and "train/loss" in worker["history"]
    assert worker["config"]["sphuatuo"]["fingerprint"] == fingerprint
    driver = wandb_run(tmp_path / "run" / "tracking" / "wandb")
    assert driver["group"] == worker["group"] == pipeline.data.tags["sphuatuo.group"]
    assert {"sft/loss", "evaluate/sft/project/accuracy", "evaluation/_type"} <= driver["history"]
