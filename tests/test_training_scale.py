"""Training at scale on the tiny model, for real: Ray Train + DeepSpeed ZeRO-3 over gloo with two
workers, checkpoints every N steps (keep the last K), a worker killed mid-run, the export served by
vLLM, and the run root in an S3-compatible object store on loopback.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import ray
from ray.util.state import list_actors
from test_stages import _accepted_teacher_rows, _pairs

from conftest import cluster_state, driver_credential_process, files_holding, moto_s3, revoke, tiny_recipe
from sphuatuo.stages import StageContext, questions
from sphuatuo.stages.self_play import dpo, sft
from sphuatuo.store import credentials
from sphuatuo.store.manifest import StageRecord
from sphuatuo.store.run_root import RunRoot

pytestmark = pytest.mark.slow

STEPS = 12  # 8 examples / (micro batch 1 x 2 workers) x 3 epochs
SCALE = {"data.train": [{"path": "builtin:sample_bank", "limit": 8}], "data.test_fraction": 0.0,
         "stages.sft.epochs": 3, "stages.sft.checkpoint_every_steps": 2, "stages.sft.keep_checkpoints": 2,
         "stages.sft.max_failures": 1, "stages.sft.global_batch_size": 2,
         "stages.sft.scaling": {"num_workers": 2, "zero_stage": 3}}


def _sft_inputs(recipe) -> StageContext:
    run = RunRoot(recipe.run_root)
    questions.run(StageContext(recipe=recipe, run=run, record=StageRecord()))
    run.write_rows(_accepted_teacher_rows(run), "teacher_cot", "first")
    return StageContext(recipe=recipe, run=run, record=StageRecord())


def _sample_order(run: RunRoot) -> list[dict]:
    return [json.loads(line) for line in run.read_text("sft", "sample_order.jsonl").splitlines()]


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory: pytest.TempPathFactory, ray_cluster) -> RunRoot:
    """One uninterrupted ZeRO-3 SFT run, reported to TensorBoard."""
    recipe = tiny_recipe(tmp_path_factory.mktemp("zero3") / "run",
                         **{**SCALE, "stages.sft.report_to": ["tensorboard"]})
    ctx = _sft_inputs(recipe)
    sft.run(ctx)
    assert ctx.record.details["zero_stage"] == 3 and ctx.record.details["steps"] == STEPS
    return ctx.run


def test_zero3_sft_checkpoints_logs_and_exports_a_model_vllm_serves(zero3_run: RunRoot) -> None:
    run = zero3_run
    log = json.loads(run.read_text("sft", "train_log.json"))
    steps = [entry for entry in log if "loss" in entry]
    assert [entry["step"] for entry in steps] == list(range(1, STEPS + 1))
    losses = [entry["loss"] for entry in steps]
    assert all(loss == loss and loss > 0 for loss in losses) and losses[-1] < losses[0]
    for entry in steps:
        assert entry["grad_norm"] > 0 and "learning_rate" in entry and entry["tokens_per_second_per_worker"] > 0
        assert "mfu" not in entry  # only on GPUs, whose peak is known

    # ZeRO-3 partitioned init: the model was built sharded, each rank holding about half of its parameters.
    init = json.loads(run.read_text("sft", "model_init.json"))
    assert init["world_size"] == 2 and init["zero_stage"] == 3
    assert init["parameters_on_rank_0"] == pytest.approx(init["model_parameters"] / 2, rel=0.02)

    order = _sample_order(run)
    assert [step["step"] for step in order] == list(range(1, STEPS + 1))
    consumed = [example for step in order for worker in step["ids"] for example in worker]
    examples = [row["id"] for row in run.read_rows("sft", "data")]
    assert sorted(consumed) == sorted(examples * 3)  # every example once per epoch

    # Every 2 steps, the last 2 kept, in the run root where every node sees them.
    checkpoints = sorted(p for p in Path(run.fs_path("checkpoints", "sft")).glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2
    assert sorted(p.name for p in (checkpoints[-1] / "checkpoint").glob("global_step*")) == [f"global_step{STEPS}"]
    assert list(Path(run.fs_path("sft", "tensorboard")).rglob("events.out.tfevents.*"))

    model = run.fs_path("sft", "model")
    assert sorted(p.name for p in Path(model).glob("*.safetensors")) == ["model.safetensors"]
    assert Path(model, "tokenizer.json").exists() and Path(model, "chat_template.jinja").exists()
    import ray.data

    from sphuatuo import engines
    from sphuatuo.engines import Request
    from sphuatuo.engines.serving import EngineServices
    from sphuatuo.recipe import EngineConfig, SamplingConfig

    engine = EngineConfig(backend="vllm", model=model, max_model_len=512, batch_size=2)
    request = Request.from_config(SamplingConfig(temperature=0.0, max_tokens=8))
    prompts = [{"key": 0, "messages": [{"role": "user", "content": "Which vitamin deficiency causes scurvy?"}]}]
    services = EngineServices()  # the engine a run keeps up (the engine of a pass has its own tests)
    try:
        rows = engines.generate(ray.data.from_items(prompts), engine, request, services=services).take_all()
    finally:
        services.close()
    assert len(rows) == 1 and rows[0]["num_generated_tokens"] > 0 and rows[0]["generated_text"]


def _latest_checkpoint(storage: Path) -> list[dict] | None:
    """The sample order in the last checkpoint Ray Train registered under `storage`; None before the first."""
    try:
        snapshot = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
        latest = snapshot["latest_checkpoint_result"]["checkpoint_dir_name"]
        return json.loads((storage / latest / "checkpoint" / "sample_order.json").read_text())
    except (OSError, ValueError, KeyError, TypeError):  # not written yet, or being written
        return None


def _kill_a_worker_after_the_first_checkpoint(storage: Path) -> dict[str, int]:
    """SIGKILL one worker of the group once Ray Train has registered its first checkpoint (the pids of
    the group are in that checkpoint's sample order); the pid and the checkpoint's step."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        time.sleep(0.1)
        order = _latest_checkpoint(storage)
        if order is None:
            continue
        pid = order[-1]["worker_pids"][-1]
        workers = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
        assert pid in [actor.pid for actor in workers], "the group ended before a worker could be killed"
        os.kill(pid, signal.SIGKILL)
        return {"pid": pid, "at_step": order[-1]["step"]}
    raise AssertionError("no checkpoint registered in 4 minutes")


# A driver of its own for one SFT stage, as `sphuatuo run` is one: the test kills it, then runs the stage again.
SFT_DRIVER = """
import sys
from sphuatuo.recipe import Recipe
from sphuatuo.stages import StageContext
from sphuatuo.stages.self_play import sft
from sphuatuo.store.manifest import StageRecord
from sphuatuo.store.run_root import RunRoot
from sphuatuo.store.runtime import connect_ray

recipe = Recipe.model_validate_json(open(sys.argv[1]).read())
connect_ray(sys.argv[2])
sft.run(StageContext(recipe=recipe, run=RunRoot(recipe.run_root), record=StageRecord()))
"""


def test_a_killed_worker_then_a_killed_driver_each_resume_from_the_last_checkpoint_in_the_same_sample_order(
        tmp_path: Path, ray_head, zero3_run: RunRoot) -> None:
    """One SFT run loses a worker (Ray Train restarts the group from the last checkpoint), then its driver (the next
    driver resumes from the last checkpoint the replacement group registered): every step trained once, in the
    uninterrupted run's sample order."""
    recipe = tiny_recipe(tmp_path / "run", **SCALE)
    ctx = _sft_inputs(recipe)
    (tmp_path / "recipe.json").write_text(recipe.model_dump_json())
    storage = Path(ctx.run.fs_path("checkpoints", "sft"))
    driver = subprocess.Popen([sys.executable, "-c", SFT_DRIVER, str(tmp_path / "recipe.json"), ray_head["address"]],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    killed = _kill_a_worker_after_the_first_checkpoint(storage)

    def replacement_checkpointed() -> bool:
        order = _latest_checkpoint(storage)
        return order is not None and killed["pid"] not in order[-1]["worker_pids"]

    deadline = time.monotonic() + 300
    while not replacement_checkpointed():
        assert driver.poll() is None, "the driver ended before it could be killed"
        assert time.monotonic() < deadline, "the replacement group registered no checkpoint in 5 minutes"
        time.sleep(0.1)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    assert not ctx.run.exists("sft", "model", "model.safetensors"), "the kill should land mid-training"

    sft.run(ctx)  # the next driver
    order = _sample_order(ctx.run)
    assert [step["step"] for step in order] == list(range(1, STEPS + 1))  # no step trained twice, none skipped
    # Three worker groups in turn: the first (with the killed worker) up to its checkpoint, its replacement up to
    # the driver's death, then the next driver's.
    groups = list(dict.fromkeys(frozenset(step["worker_pids"]) for step in order))
    assert len(groups) == 3 and killed["pid"] in groups[0] and killed["at_step"] < STEPS
    assert all(first.isdisjoint(later) for i, first in enumerate(groups) for later in groups[i + 1:])
    assert [step["ids"] for step in order] == [step["ids"] for step in _sample_order(zero3_run)]
    log = json.loads(ctx.run.read_text("sft", "train_log.json"))
    assert [entry["step"] for entry in log if "loss" in entry] == list(range(1, STEPS + 1))
    assert ctx.run.exists("sft", "model", "model.safetensors")


@pytest.fixture
def s3_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """moto's S3-compatible server on loopback with one bucket, checking signatures, and two keys; this driver's
    provider chain hands out the first (`driver_credential_process`), the session's Ray nodes have none."""
    with moto_s3("sphuatuo", access_keys=2) as (endpoint, keys, _):
        current = driver_credential_process(tmp_path, endpoint, keys[0], monkeypatch)
        yield {"bucket": "sphuatuo", "endpoint": endpoint, "keys": keys, "current": current}


def test_an_object_store_run_root_holds_checkpoints_and_exports_and_dpo_resumes_from_it(
        s3_server: dict[str, Any], ray_cluster, tiny_model: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    bucket, endpoint, (first, second) = s3_server["bucket"], s3_server["endpoint"], s3_server["keys"]
    recipe = tiny_recipe(f"s3://{bucket}/run", **{
        "data.train": [{"path": "builtin:sample_bank", "limit": 4}], "data.test_fraction": 0.0,
        "stages.dpo.checkpoint_every_steps": 1, "stages.dpo.scaling": {"num_workers": 2, "zero_stage": 3},
        "stages.dpo.epochs": 2,  # 4 steps: 3 after the first checkpoint, each checkpointed, then the export
        "storage.credentials": "driver"})  # the session's Ray nodes have no key the server accepts
    run = RunRoot(recipe.run_root)
    with credentials.shared_filesystem(run, recipe.storage.credentials) as filesystem:  # its worker signs as the driver
        questions.run(StageContext(recipe=recipe, run=RunRoot(run.uri, filesystem), record=StageRecord()))
    # The SFT export in the bucket that DPO starts from: the tiny model (SFT into a bucket runs in the S3 shape test).
    run.replace_dir(tiny_model, "sft", "model")
    run.write_rows(_pairs(run), "preference_pairs", "pairs")

    # Mid-DPO, once its first checkpoint is in the bucket, the driver's chain renews the key, as a session token
    # is renewed before it expires; once the driver has published it, the first key is revoked, as an expired
    # token is refused.
    monkeypatch.setattr(credentials, "PUBLISH_EVERY_S", 0.2)
    monkeypatch.setattr(credentials, "CHECK_EVERY_S", 0.2)
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=second["AccessKeyId"],
                      aws_secret_access_key=second["SecretAccessKey"])
    revoked: dict[str, float] = {}

    def renew_then_revoke() -> None:
        deadline = time.monotonic() + 600
        while not any(o["Key"].startswith("run/checkpoints/dpo") and "/checkpoint_" in o["Key"] for o in
                      s3.list_objects_v2(Bucket=bucket, Prefix="run/checkpoints/").get("Contents", [])):
            if time.monotonic() > deadline:
                return
            time.sleep(0.2)
        s3_server["current"].write_text(json.dumps(second))
        (relay,) = list_actors(filters=[("class_name", "=", "CredentialRelay"), ("state", "=", "ALIVE")])
        while ray.get(ray.get_actor(relay.name).newer.remote(1)) is None:  # the driver's thread publishes
            time.sleep(0.1)
        time.sleep(1)  # each process takes the new set up within 0.2 s of its next use of the filesystem
        revoke(endpoint, first, signed_by=second)
        revoked["at"] = math.ceil(time.time())  # S3 times are whole seconds: from here on, surely after
        time.sleep(revoked["at"] - time.time())

    renewer = threading.Thread(target=renew_then_revoke, daemon=True)
    renewer.start()
    dpo_ctx = StageContext(recipe=recipe, run=run, record=StageRecord())
    with credentials.shared_filesystem(run, "driver") as filesystem:  # as a pipeline run hands stages the run root
        dpo.run(dataclasses.replace(dpo_ctx, run=RunRoot(run.uri, filesystem)))  # ZeRO-3, from the bucket's SFT
    renewer.join(timeout=60)
    assert revoked, "the first DPO checkpoint never reached the bucket"
    assert dpo_ctx.record.details["runs"]["dpo"]["start_model"] == f"s3://{bucket}/run/sft/model"
    # The last checkpoint and the export were written after the first key was revoked: the Ray Train workers
    # that started with it signed with the renewed one.
    latest = max((o for o in s3.list_objects_v2(Bucket=bucket, Prefix="run/checkpoints/dpo")["Contents"]
                  if o["Key"].endswith("/trainer_state.json")), key=lambda o: o["LastModified"])
    exported = s3.head_object(Bucket=bucket, Key="run/dpo/model/model.safetensors")
    assert latest["LastModified"].timestamp() >= revoked["at"] and exported["LastModified"].timestamp() >= revoked["at"]

    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket)["Contents"]]
    assert "run/dpo/model/model.safetensors" in keys and "run/dpo/model/tokenizer.json" in keys
    checkpoints = {k.split("/")[3] for k in keys if k.startswith("run/checkpoints/dpo/checkpoint_")
                   and k.endswith("/trainer_state.json")}
    assert len(checkpoints) == 1  # every step, the last one kept
    # The keys reached the workers through the relay only: not the bucket, the Ray logs or Ray's state.
    for key in (first, second):
        secret = key["SecretAccessKey"]
        for name in keys:
            assert secret.encode() not in s3.get_object(Bucket=bucket, Key=name)["Body"].read(), name
        assert files_holding(secret, ray_cluster["temp_dir"]) == [] and secret not in cluster_state()
    log = json.loads(run.read_text("dpo", "train_log.json"))
    steps = [entry for entry in log if "loss" in entry]
    assert len(steps) == 4 and all(0 <= entry["rewards/accuracies"] <= 1 and "rewards/margins" in entry
                                   for entry in steps)
    first_order = [json.loads(line) for line in run.read_text("dpo", "sample_order.jsonl").splitlines()]
    assert [step["step"] for step in first_order] == [1, 2, 3, 4]

    # A second launch finds the finished run's checkpoint in the bucket and trains no step again
    # (a retrained step would carry the new workers' pids).
    with credentials.shared_filesystem(run, "driver") as filesystem:
        dpo.run(StageContext(recipe=recipe, run=RunRoot(run.uri, filesystem), record=StageRecord()))
    assert [json.loads(line) for line in run.read_text("dpo", "sample_order.jsonl").splitlines()] == first_order


def test_nodes_without_credentials_get_a_local_copy_of_a_bucket_model_for_their_engines(
        s3_server: dict[str, Any], ray_cluster, tiny_model: str) -> None:
    """vLLM fetches an s3:// model with each node's own chain; the session's nodes have none, so with
    `storage.credentials: driver` every node gets a local copy through the relayed filesystem."""
    import pyarrow.fs as pafs

    run = RunRoot(f"s3://{s3_server['bucket']}/engine-model")
    pafs.copy_files(tiny_model, run.fs_path("sft", "model"), destination_filesystem=run.fs)
    location = run.join("sft", "model")
    local = credentials.engine_model_path(run, location, "driver")
    assert not local.startswith("s3://") and sorted(os.listdir(local)) == sorted(os.listdir(tiny_model))
    assert credentials.engine_model_path(run, location, "driver") == local  # the same files: the copy is reused
    assert credentials.engine_model_path(run, location, "node") == location  # nodes that sign for themselves
    # A model written again (other files) is copied again, to another place.
    run.write_text("{}", "sft", "model", "extra.json")
    again = credentials.engine_model_path(run, location, "driver")
    assert again not in (local, location)
    # The pipeline's stages see the run root through the relayed filesystem: the same copy, not the bucket.
    with credentials.shared_filesystem(run, "driver") as relayed:
        assert credentials.engine_model_path(RunRoot(run.uri, relayed), location, "driver") == again
