"""`sphuatuo bench generate` runs every engine on the same prompts with the same engine arguments and prints
its ratio table, each line against the baseline of its own kind."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def _bench(ray_head: dict[str, str], *flags: str) -> list[list[str]]:
    result = subprocess.run(
        [sys.executable, "-m", "sphuatuo.cli", "bench", "generate", "--model", "builtin:tiny", "--prompts", "8",
         "--max-tokens", "8", "--dtype", "float32", "--batch-size", "8", "--cpu-threads", "1", *flags],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, "RAY_ADDRESS": ray_head["address"]},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()  # vLLM's own log lines come first
    header = next(i for i, line in enumerate(lines) if line.startswith("engine ") and line.endswith("vs base"))
    assert lines[header - 1] == ("every engine: dtype float32, max_num_seqs 256, max_num_batched_tokens 4096, "
                                 "enforce_eager True, prefix caching True, compute threads 1")
    rows = []
    for line in lines[header + 1:]:
        if line.startswith("vs base:"):
            break
        label, numbers = line[:58].strip(), line[58:].split()
        rows.append([label, *numbers])
    return rows


def test_bench_generate_fixed_workload_every_engine_and_three_passes(ray_head) -> None:
    rows = _bench(ray_head, "--workloads", "fixed")
    assert [row[0].split(" (")[0] for row in rows] == ["bare vLLM"] * 2 + ["vllm via Ray Data"] * 2 + [
        "hf via Ray Data"] * 2 + ["3 passes"] * 2
    assert "engines per pass" in rows[6][0] and "one engine kept up" in rows[7][0]
    workload, count, seconds, _, tokens_per_s, ratio = zip(*[row[1:] for row in rows], strict=True)
    assert set(workload) == {"fixed"}
    assert count == ("8",) * 6 + ("24",) * 2  # three passes of 8 rows
    assert all(float(speed) > 0 for speed in tokens_per_s)
    # Each kind against its own baseline: bare whole pass, bare steady state, engines per pass.
    assert ratio[0] == ratio[1] == ratio[6] == "1.00"
    assert float(seconds[3]) < float(seconds[2])  # the steady state leaves the start-up out


def test_bench_generate_long_tail_workload(ray_head) -> None:
    rows = _bench(ray_head, "--workloads", "long-tail", "--no-hf", "--no-multi-pass")
    assert [row[0].split(" (")[0] for row in rows] == ["bare vLLM"] * 2 + ["vllm via Ray Data"] * 2
    assert {row[1] for row in rows} == {"long-tail"}
    assert all(row[2] == "8" and float(row[5]) > 0 for row in rows)
