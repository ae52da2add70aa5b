"""An object store that stops answering for a few seconds in the middle of a generation stage: nothing in the
bucket is deleted, and the stage either rides the outage out or fails naming the object it could not write; the
re-run then finishes with every key written exactly once. A real S3-compatible server on loopback (moto) is
stopped and continued with signals, as a store that hangs, not one that refuses."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from conftest import moto_s3, tiny_recipe
from sphuatuo.stages import StageContext, questions
from sphuatuo.stages.self_play import teacher_cot
from sphuatuo.store.credentials import shared_filesystem
from sphuatuo.store.manifest import StageRecord
from sphuatuo.store.run_root import RunRoot

pytestmark = pytest.mark.slow

BUCKET, OUTAGE_S = "outage", 6
GENERATED = "run/teacher_cot/first_generated/"


def _objects(s3) -> set[str]:
    return {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
            for o in page.get("Contents", [])}


def _run_stage(stage, recipe) -> StageContext:
    """The stage as the pipeline runs it: Ray's workers (which read and write its rows) sign with this driver's
    keys."""
    run = RunRoot(recipe.run_root)
    with shared_filesystem(run, recipe.storage.credentials) as filesystem:
        ctx = StageContext(recipe=recipe, run=RunRoot(run.uri, filesystem), record=StageRecord())
        stage.run(ctx)
    return ctx


def test_an_object_store_outage_mid_stage_deletes_nothing_and_the_rerun_writes_every_key_once(
        tmp_path: Path, ray_cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    with moto_s3(BUCKET) as (endpoint, _, server):
        for name, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_DEFAULT_REGION": "us-east-1",
                            "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test"}.items():
            monkeypatch.setenv(name, value)
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                          aws_secret_access_key="test")
        # One row per batch and long replies: the teacher pass writes a file every fraction of a second or so.
        recipe = tiny_recipe(f"s3://{BUCKET}/run", **{"data.train": [{"path": "builtin:sample_bank", "limit": 24}],
                                                      "data.test_fraction": 0.0, "models.teacher.backend": "hf",
                                                      "models.teacher.batch_size": 1, "models.judge.kind": "rule",
                                                      "stages.teacher_cot.retry_with_reference": False,
                                                      "stages.teacher_cot.sampling.max_tokens": 128,
                                                      # the session's Ray nodes have none of this driver's keys
                                                      "storage.credentials": "driver"})
        _run_stage(questions, recipe)
        before: dict[str, set[str]] = {}

        def outage() -> None:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline:
                objects = _objects(s3)
                if sum(key.startswith(GENERATED) for key in objects) >= 2:
                    before["objects"] = objects
                    server.send_signal(signal.SIGSTOP)
                    time.sleep(OUTAGE_S)
                    server.send_signal(signal.SIGCONT)
                    return
                time.sleep(0.1)

        stopper = threading.Thread(target=outage, daemon=True)
        stopper.start()
        try:
            _run_stage(teacher_cot, recipe)
        except OSError as error:  # not ridden out: the error names what it could not write
            assert BUCKET in str(error) and "run/teacher_cot" in str(error), error
        stopper.join(timeout=OUTAGE_S + 5)
        assert "objects" in before, "the store was never stopped mid-stage"
        assert sum(key.startswith(GENERATED) for key in before["objects"]) < 24, "the outage came after the pass"

        ctx = _run_stage(teacher_cot, recipe)
        assert before["objects"] <= _objects(s3), "objects written before the outage are gone"
        ids = ctx.run.read_column("id", "questions", "train")
        assert Counter(ctx.run.read_column("key", "teacher_cot", "first_generated")) == Counter(ids)
        assert Counter(row["key"] for row in ctx.run.read_rows("teacher_cot", "first")) == Counter(ids)
