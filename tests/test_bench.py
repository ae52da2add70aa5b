"""`sphuatuo bench generate` runs all three engines on the same prompts and prints its ratio table."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_bench_generate_prints_a_table_of_ratios_against_bare_vllm(ray_head) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sphuatuo.cli", "bench", "generate", "--model", "builtin:tiny", "--prompts", "8",
         "--max-tokens", "8", "--dtype", "float32", "--batch-size", "8"],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": ray_head["address"]},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()  # vLLM's own log lines come first
    header = next(i for i, line in enumerate(lines) if line.startswith("engine ") and line.endswith("vs bare"))
    rows = lines[header + 1: header + 7]
    assert [row.split("(")[0].strip() for row in rows] == ["bare vLLM"] * 2 + ["vllm via Ray Data"] * 2 + [
        "hf via Ray Data"] * 2
    assert rows[0].split()[-1] == "1.00"
    for row in rows:
        fields = row.split()
        assert fields[-5] == "8" and float(fields[-2]) > 0  # rows, output tokens/s
    assert "start-up)" in rows[3] and float(rows[3].split()[-4]) < float(rows[2].split()[-4])  # seconds
