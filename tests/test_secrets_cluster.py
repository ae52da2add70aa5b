"""Secrets on a real Ray cluster (the session's head): the driver's object-store credentials reach long-lived
Ray processes without travelling with them and are renewed there when the driver's chain renews them; the
`sphuatuo` logger of every worker process of a sphuatuo job masks the recipe's secrets, whichever way they
reached that process."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import ray

from conftest import (
    NODE_SECRET,
    NODE_SECRET_VARIABLE,
    REPO,
    cluster_state,
    driver_credential_process,
    files_holding,
    moto_s3,
    revoke,
)
from sphuatuo.store.credentials import shared_filesystem
from sphuatuo.store.run_root import RunRoot

pytestmark = pytest.mark.slow


@ray.remote(num_cpus=0)
class Writer:
    """One process holding one filesystem object for its whole life, as a Ray Train worker holds the run's."""

    def __init__(self, filesystem: pafs.FileSystem):
        self.filesystem = filesystem

    def write(self, path: str) -> int:
        with self.filesystem.open_output_stream(path) as out:
            out.write(b"written by a Ray worker")
        return self.filesystem.handler.version


def _signed_write(endpoint: str, key: dict[str, str], path: str) -> None:
    s3 = pafs.S3FileSystem(access_key=key["AccessKeyId"], secret_key=key["SecretAccessKey"],
                           endpoint_override=endpoint, region="us-east-1")
    with s3.open_output_stream(path) as out:
        out.write(b"x")


def test_driver_credentials_reach_workers_through_a_relay_and_are_renewed_there(
        tmp_path: Path, ray_cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    with moto_s3("sphuatuo", access_keys=2) as (endpoint, (first, second), _):
        current = driver_credential_process(tmp_path, endpoint, first, monkeypatch)
        run = RunRoot("s3://sphuatuo/run")

        with shared_filesystem(run, "driver", publish_every_s=0.2, check_every_s=0.2) as filesystem:
            shipped = pickle.dumps(filesystem)
            assert first["SecretAccessKey"].encode() not in shipped and first["AccessKeyId"].encode() not in shipped
            writer = Writer.remote(filesystem)
            assert ray.get(writer.write.remote("sphuatuo/run/before.txt")) == 1

            # The driver's chain renews: the tool now prints the second key, and the first one is revoked.
            current.write_text(json.dumps(second))
            revoke(endpoint, first, signed_by=second)
            with pytest.raises(OSError, match="INVALID_ACCESS_KEY_ID"):  # a key frozen at launch is refused now
                _signed_write(endpoint, first, "sphuatuo/run/frozen.txt")
            relay = ray.get_actor(filesystem.handler.relay, namespace=filesystem.handler.namespace)
            deadline = time.monotonic() + 60
            while ray.get(relay.newer.remote(1)) is None:  # the driver's thread publishes the renewed set
                assert time.monotonic() < deadline, "the driver never published the renewed credentials"
                time.sleep(0.1)
            time.sleep(0.3)  # past the worker's check interval

            # The same worker, with the filesystem object it got at the start, writes with the renewed key.
            assert ray.get(writer.write.remote("sphuatuo/run/after.txt")) == 2
            assert run.read_text("after.txt") == "written by a Ray worker"
        with pytest.raises(ValueError):  # the relay ends with the block
            ray.get_actor(filesystem.handler.relay, namespace=filesystem.handler.namespace)

    state = cluster_state()
    for key in (first, second):
        assert files_holding(key["SecretAccessKey"], ray_cluster["temp_dir"]) == []
        assert key["SecretAccessKey"] not in state


def test_a_local_or_node_signed_run_root_is_handed_over_as_it_is(tmp_path: Path) -> None:
    run = RunRoot(str(tmp_path / "run"))
    with shared_filesystem(run, "driver") as filesystem:
        assert filesystem is run.fs


DRIVER = """
import logging, os, sys

import ray
import ray.data

from sphuatuo.engines.openai import ChatSession
from sphuatuo.store.runtime import connect_ray
from sphuatuo.store.secrets import declare_recipe

node_variable, driver_variable, key_file = sys.argv[1:]
# What `sphuatuo run` does: declare the recipe's secrets, then join the cluster.
declare_recipe({"secrets": [node_variable], "models": {"teacher": {"api_key_env": driver_variable},
                                                       "judge": {"engine": {"api_key_file": key_file}}}})
connect_ray()
log = logging.getLogger("sphuatuo")


def log_what_this_worker_sees(where):
    log.warning("secret-check %s: node %s, file %s", where, os.environ[node_variable], open(key_file).read().strip())
    return where


@ray.remote(num_cpus=0)
def task():
    return log_what_this_worker_sees("task")


@ray.remote(num_cpus=0, runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})  # as engine actors have
class Actor:
    def check(self, session):
        log.warning("secret-check chat: key %s", session.api_key())  # the key from the driver, by the object store
        return log_what_this_worker_sees("actor")


session = ChatSession(driver_variable, None, ray.put(os.environ[driver_variable]), 5.0)
print(ray.get(task.remote()), ray.get(Actor.remote().check.remote(session)),
      ray.data.from_items([{"i": 0}]).map(lambda row: {"where": log_what_this_worker_sees("data")}).take_all())
"""


def test_worker_logs_mask_the_recipe_secrets_however_they_reached_the_worker(tmp_path: Path, ray_cluster) -> None:
    driver_variable, driver_key = "SPHUATUO_TEST_DRIVER_KEY", "sk-driver-" + os.urandom(8).hex()
    key_file = tmp_path / "api-key"
    key_file.write_text("sk-file-" + os.urandom(8).hex() + "\n")
    file_key = key_file.read_text().strip()
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(DRIVER), NODE_SECRET_VARIABLE, driver_variable, str(key_file)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "RAY_ADDRESS": ray_cluster["address"], driver_variable: driver_key})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "task actor [{'where': 'data'}]" in result.stdout

    logs = Path(ray_cluster["temp_dir"])
    masked = {line.split("secret-check ", 1)[1] for path in logs.rglob("worker-*") if path.is_file()
              for line in path.read_text(errors="replace").splitlines() if "secret-check " in line}
    assert masked >= {"task: node ***, file ***", "actor: node ***, file ***", "data: node ***, file ***",
                      "chat: key ***"}
    state = cluster_state()
    for value in (NODE_SECRET, driver_key, file_key):
        assert files_holding(value, logs) == []
        assert value not in result.stdout + result.stderr and value not in state
