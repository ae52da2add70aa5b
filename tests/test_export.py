"""Exports load in `datasets` and follow LLaMA-Factory's documented sharegpt / ranking layout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from datasets import load_dataset

from sphuatuo.store.run_root import RunRoot

SYSTEM = {"role": "system", "content": "You are a medical expert."}


def _run_with_training_data(root: Path) -> RunRoot:
    run = RunRoot(str(root))
    run.write_rows([
        {"id": f"q{i}", "prompt": [SYSTEM, {"role": "user", "content": f"Question {i}?"}],
         "completion": [{"role": "assistant", "content": f"<think>\nreason {i}\n</think>\n<answer>\nB\n</answer>"}]}
        for i in range(3)
    ], "sft", "data")
    run.write_rows([
        {"id": "q1", "prompt": [SYSTEM, {"role": "user", "content": "Question 1?"}],
         "chosen": [{"role": "assistant", "content": "<think>\nright\n</think>\n<answer>\nB\n</answer>"}],
         "rejected": [{"role": "assistant", "content": "<think>\nwrong\n</think>\n<answer>\nA\n</answer>"}],
         "strategy": "self_correction"},
        {"id": "q2", "prompt": [SYSTEM, {"role": "user", "content": "Question 2?"}],
         "chosen": [{"role": "assistant", "content": "<think>\nright\n</think>\n<answer>\nC\n</answer>"}],
         "rejected": [{"role": "assistant", "content": "<think>\nwrong\n</think>\n<answer>\nD\n</answer>"}],
         "strategy": "sampled"},
    ], "preference_pairs", "pairs")
    return run


def test_export_command_writes_llamafactory_and_hf_formats(tmp_path: Path) -> None:
    _run_with_training_data(tmp_path / "run")
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "sphuatuo.cli", "export", str(tmp_path / "run"), "--out", str(out)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr

    info = json.loads((out / "llamafactory" / "dataset_info.json").read_text())
    assert info["sphuatuo_sft"] == {"file_name": "sphuatuo_sft.json", "formatting": "sharegpt",
                                    "columns": {"messages": "conversations", "system": "system"}}
    # Every strategy's pairs in one dataset, and one dataset per strategy for an ablation.
    assert set(info) == {"sphuatuo_sft", "sphuatuo_dpo", "sphuatuo_dpo_sampled", "sphuatuo_dpo_self_correction"}
    for name in ("sphuatuo_dpo", "sphuatuo_dpo_sampled", "sphuatuo_dpo_self_correction"):
        assert info[name] == {"file_name": f"{name}.json", "formatting": "sharegpt", "ranking": True,
                              "columns": {"messages": "conversations", "chosen": "chosen",
                                          "rejected": "rejected", "system": "system"}}
    sampled = load_dataset("json", data_files=str(out / "llamafactory" / "sphuatuo_dpo_sampled.json"), split="train")
    assert sampled["id"] == ["q2"] and sampled["strategy"] == ["sampled"]

    sft = load_dataset("json", data_files=str(out / "llamafactory" / "sphuatuo_sft.json"), split="train")
    assert len(sft) == 3 and sft[0]["system"] == SYSTEM["content"]
    assert [turn["from"] for turn in sft[0]["conversations"]] == ["human", "gpt"]
    assert sft[0]["conversations"][1]["value"].startswith("<think>")

    dpo = load_dataset("json", data_files=str(out / "llamafactory" / "sphuatuo_dpo.json"), split="train")
    assert sorted(dpo["strategy"]) == ["sampled", "self_correction"]
    assert [t["from"] for t in dpo[0]["conversations"]] == ["human"]
    assert dpo[0]["chosen"]["from"] == dpo[0]["rejected"]["from"] == "gpt"
    assert "right" in dpo[0]["chosen"]["value"] and "wrong" in dpo[0]["rejected"]["value"]

    hf_sft = load_dataset("parquet", data_files=str(out / "hf" / "sft.parquet"), split="train")
    assert [m["role"] for m in hf_sft[0]["messages"]] == ["system", "user", "assistant"]
    hf_dpo = load_dataset("parquet", data_files=str(out / "hf" / "dpo.parquet"), split="train")
    assert set(hf_dpo.column_names) == {"id", "strategy", "prompt", "chosen", "rejected"} and len(hf_dpo) == 2
    assert hf_dpo[0]["chosen"][0]["role"] == "assistant"


def test_export_of_a_run_without_training_data_is_refused(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "sphuatuo.cli", "export", str(tmp_path / "empty"),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 2 and "no SFT examples or preference pairs" in result.stderr
