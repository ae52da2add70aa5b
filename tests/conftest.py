"""Shared fixtures: one real Ray cluster for the whole session, and the project's own tiny model.

The cluster is a real head started with `ray start --head` on loopback, so the tests that submit jobs
and the tests that drive stages in-process share it (never two Ray clusters on one machine).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sphuatuo.recipe import Recipe
from sphuatuo.store.runtime import apply_cpu_environment

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")

apply_cpu_environment()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A local Ray head on 127.0.0.1 with the job server; stopped at the end of the session."""
    port, dashboard_port = _free_port(), _free_port()
    temp_dir = tmp_path_factory.mktemp("ray")
    # Job drivers inherit the head's environment: put this venv's `sphuatuo` first on their PATH.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
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

    if not ray.is_initialized():
        ray.init(address=ray_head["address"], log_to_driver=False)
    return ray_head


@pytest.fixture(scope="session")
def tiny_model() -> str:
    from sphuatuo.local_models import resolve_model

    return resolve_model("builtin:tiny")


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
