"""`sphuatuo bench generate` runs every engine on the same prompts with the same engine arguments and prints
its ratio table, each line against the baseline of its own kind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def _bench(ray_head: dict[str, str], *flags: str) -> tuple[list[list[str]], list[str]]:
    """The table's rows (label, then its numbers) and the lines after its legend."""
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
    return rows, lines[header + len(rows) + 2:]


def test_bench_generate_runs_bare_vllm_and_ray_data_against_their_own_baselines(ray_head) -> None:
    # One workload (`fixed` differs from `long-tail` only in its sampling), one round and no hf back-end (its stages
    # are tested elsewhere). No three-pass lines: four more engine starts (one a Serve app), about 150 s here, for
    # passes through the same `_ray_pass` as the Ray Data line and engines kept up as tests/test_engine_services.py
    # runs them; their line and its baseline are checked without Ray in tests/test_bench_tables.py, and so are
    # `--rounds` (each line against its own round's bare line, the medians after the table): a second round here
    # costs about 60 s for the same passes again.
    rows, after = _bench(ray_head, "--no-hf", "--no-multi-pass", "--workloads", "long-tail")
    assert [row[0].split(" (")[0] for row in rows] == (["bare vLLM"] * 2 + ["vllm, engine per pass"] * 2
                                                       + ["vllm, engine kept up"] * 2
                                                       + ["bare vLLM again"] * 2)
    assert [row[1] for row in rows] == ["long-tail"] * 8
    assert "incl. import + engine start" in rows[0][0] and "engine ready" in rows[1][0]
    assert "incl. actor + engine start" in rows[2][0] and "s start-up)" in rows[3][0]
    assert "s engine start)" in rows[4][0] and "engine already up" in rows[5][0]
    assert "incl. import + engine start" in rows[6][0] and "engine ready" in rows[7][0]
    _, _, count, seconds, _, tokens_per_s, ratio = zip(*rows, strict=True)  # one round: no round column
    assert count == ("8",) * 8
    assert all(float(speed) > 0 for speed in tokens_per_s)
    # Each kind against the mean of the bare passes of its kind before and after it: whole passes (rows 0, 2, 4
    # against 0 and 6), steady states (1, 3, 5 against 1 and 7). The bare pass after the round is a baseline only.
    for bare, measured in ((0, (0, 2, 4)), (1, (1, 3, 5))):
        base = (float(tokens_per_s[bare]) + float(tokens_per_s[bare + 6])) / 2
        # The table prints tokens/s to 0.1 and ratios to 0.01 of the unrounded numbers: at the few tokens/s of a
        # whole pass here, the printed numbers' ratio may be several hundredths off, never outside these bounds.
        for i in measured:
            speed = float(tokens_per_s[i])
            assert (speed - 0.05) / (base + 0.05) - 0.005 <= float(ratio[i]) <= (speed + 0.05) / (base - 0.05) + 0.005
    assert ratio[6:] == ("-", "-")
    # The steady states leave the start-up out.
    assert all(float(seconds[i + 1]) < float(seconds[i]) for i in (0, 2, 4, 6))
    assert not any(line.startswith("median") for line in after)  # one round: no medians to give


def test_bench_train_lines_share_one_global_batch_and_give_the_steady_state(ray_head) -> None:
    # Without DeepSpeed: one Ray Train line fewer, and no process imports DeepSpeed (about 30 s here). Its lines run
    # the same launchers with a DeepSpeed config: Ray Train under ZeRO as every training stage runs it, torchrun
    # under ZeRO-3 in `bench gpu` below; their table and summary are checked in tests/test_bench_tables.py.
    result = subprocess.run(
        [sys.executable, "-m", "sphuatuo.cli", "bench", "train", "--model", "builtin:tiny", "--examples", "12",
         "--workers", "2", "--zero-stage", "0", "--max-length", "1024", "--warmup-steps", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=1200, env={**os.environ, "RAY_ADDRESS": ray_head["address"]},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("trainer "))
    print("\n".join(lines[header:]))  # the measurement, for `pytest -s`
    rows = [(line[:46].strip(), line[46:].split()) for line in lines[header + 1: header + 6]]
    assert [label for label, _ in rows] == ["bare TRL SFTTrainer (1 process, no DeepSpeed)",
                                            "torchrun, no DeepSpeed, 1 worker",
                                            "Ray Train, no DeepSpeed, 1 worker",
                                            "torchrun + DDP, 2 workers",
                                            "Ray Train + DDP, 2 workers"]
    workers, batch, steps, tokens = (column for column in zip(*[fields[:4] for _, fields in rows], strict=True))
    assert workers == ("1", "1", "1", "2", "2") and set(batch) == {"2"} and set(steps) == {"6"}
    assert len(set(tokens)) == 1
    assert rows[0][1][-2:] == ["1.00", "1.00"]  # the bare line is every ratio's baseline
    assert all(float(fields[-3]) > 0 for _, fields in rows)  # steady tokens/s per worker
    assert [line.split(": ")[0] for line in lines[header + 6:]] == [
        "Ray cost alone (Ray Train, 1 worker, no DeepSpeed, vs bare TRL, steady)",
        "Ray cost at 1 worker (Ray Train vs torchrun, steady)", "Ray cost at 2 workers (Ray Train vs torchrun, steady)",
        "distribution without Ray (2 torchrun workers vs 1, per worker, steady)"]


def test_bench_scale_runs_the_stages_in_a_fresh_driver_and_prints_its_line(ray_head) -> None:
    # One size: each size starts its own driver and engine (about 75 s here); the ratios between sizes and the
    # target line are the formatting's, checked without Ray in test_bench_tables.py.
    result = subprocess.run(
        [sys.executable, "-m", "sphuatuo.cli", "bench", "scale", "--questions", "50", "--batch-size", "16"],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "RAY_ADDRESS": ray_head["address"]},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()  # the driver's own output went to stderr
    assert lines[0].startswith("every size: questions stage + one teacher pass, generated (builtin:tiny on vLLM, "
                               "1-token replies) and judged (rule)")
    assert lines[1].split() == ["questions", "rows", "seconds", "rows/s", "peak", "RSS", "MiB", "RSS", "vs", "base",
                                "rows/s", "vs", "base"]
    row = lines[2].split()
    assert row[:2] == ["50", "50"]  # every question's reply written and judged
    assert float(row[3]) > 0 and float(row[4]) > 0 and row[5:] == ["1.00", "1.00"]
    assert lines[3].startswith("target: driver peak RSS at 50 questions within 1.2x of that at 50: ")


def test_bench_gpu_trains_and_generates_a_random_qwen2_shape_on_cpu_at_toy_size(tmp_path) -> None:
    # The GPU path (bf16, NCCL, MFU against the GPU's peak) runs only on a GPU machine (README: measured on an H200);
    # here the same command runs the toy shape: the SFT trainer under torchrun and ZeRO-3 on packed rows, then
    # transformers' generate, and its record.
    record = tmp_path / "gpu.json"
    result = subprocess.run(
        [sys.executable, "-m", "sphuatuo.cli", "bench", "gpu", "--shapes", "toy", "--max-length", "128",
         "--micro-batch", "2", "--steps", "4", "--warmup-steps", "1", "--batches", "1", "2", "--prompt-tokens", "8",
         "--new-tokens", "8", "--record", str(record)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("device: CPU"))
    assert lines[header].endswith("gradient checkpointing on, Liger kernels off")
    measured = json.loads(record.read_text())
    (trainer,) = measured["trainers"]
    # Qwen's vocabulary (tied embedding) and two layers of width 64: q, k, v with biases, o, the MLP, two norms.
    layer = (64 * 64 + 64) + 2 * (64 * 32 + 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert trainer["parameters"] == 151_936 * 64 + 2 * layer + 64
    assert trainer["steps"] == 4 and trainer["tokens_per_step"] == 256
    assert trainer["steady_tokens_per_s"] > 0 and trainer["mfu"] is None  # no peak to divide by off GPU
    assert [(line["batch"], line["new_tokens"]) for line in measured["generations"]] == [(1, 8), (2, 8)]
    assert all(line["tokens_per_s"] > 0 for line in measured["generations"])
    single = lines[-2].split()
    assert single[:3] == ["toy", "1", "8"] and single[4] == "1.00"  # batch 1 is the generation lines' baseline
