"""Exports of a run's training data in the formats other trainers read.

- LLaMA-Factory: sharegpt JSON for SFT and ranking sharegpt JSON for DPO, with the matching
  `dataset_info.json` entries (`--dataset sphuatuo_sft` / `sphuatuo_dpo`, and `sphuatuo_dpo_<strategy>`
  per pair strategy when a run built several);
- Hugging Face `datasets` Parquet: `messages` for SFT, `prompt`/`chosen`/`rejected` (conversational)
  for DPO (plus `strategy`), which TRL's trainers take as they are.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from sphuatuo.store.run_root import RunRoot

SHAREGPT_ROLES = {"user": "human", "assistant": "gpt"}


def _sharegpt(messages: list[dict[str, str]]) -> tuple[str, list[dict[str, str]]]:
    """(system prompt, turns) in sharegpt form; the system message becomes LLaMA-Factory's system column."""
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [{"from": SHAREGPT_ROLES[m["role"]], "value": m["content"]} for m in messages if m["role"] != "system"]
    return system, turns


def _plain(messages: Any) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def export_run(run: RunRoot, out_dir: Path) -> dict[str, Path]:
    """Write whatever training data the run has (SFT examples, preference pairs); return the files."""
    sft = run.read_rows("sft", "data")
    pairs = run.read_rows("preference_pairs", "pairs")
    if not sft and not pairs:
        raise ValueError(f"{run.uri} has no SFT examples or preference pairs to export")
    llamafactory, hf = out_dir / "llamafactory", out_dir / "hf"
    llamafactory.mkdir(parents=True, exist_ok=True)
    hf.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    dataset_info: dict[str, Any] = {}

    if sft:
        records = []
        for row in sft:
            system, turns = _sharegpt(_plain(row["prompt"]) + _plain(row["completion"]))
            records.append({"id": row["id"], "system": system, "conversations": turns})
        written["llamafactory_sft"] = _write_json(llamafactory / "sphuatuo_sft.json", records)
        dataset_info["sphuatuo_sft"] = {"file_name": "sphuatuo_sft.json", "formatting": "sharegpt",
                                        "columns": {"messages": "conversations", "system": "system"}}
        written["hf_sft"] = _write_parquet(hf / "sft.parquet", [
            {"id": row["id"], "messages": _plain(row["prompt"]) + _plain(row["completion"])} for row in sft])

    if pairs:
        records = []
        for row in pairs:
            system, turns = _sharegpt(_plain(row["prompt"]))
            records.append({
                "id": row["id"], "strategy": row["strategy"], "system": system, "conversations": turns,
                "chosen": _sharegpt(_plain(row["chosen"]))[1][0],
                "rejected": _sharegpt(_plain(row["rejected"]))[1][0],
            })
        # All strategies in one dataset, and with several (an ablation) one more per strategy.
        strategies = sorted({row["strategy"] for row in pairs})
        subsets = {"sphuatuo_dpo": records}
        if len(strategies) > 1:
            subsets |= {f"sphuatuo_dpo_{s}": [r for r in records if r["strategy"] == s] for s in strategies}
        for dataset, subset in subsets.items():
            written[f"llamafactory_{dataset.removeprefix('sphuatuo_')}"] = _write_json(
                llamafactory / f"{dataset}.json", subset)
            dataset_info[dataset] = {"file_name": f"{dataset}.json", "formatting": "sharegpt", "ranking": True,
                                     "columns": {"messages": "conversations", "chosen": "chosen",
                                                 "rejected": "rejected", "system": "system"}}
        written["hf_dpo"] = _write_parquet(hf / "dpo.parquet", [
            {"id": row["id"], "strategy": row["strategy"], "prompt": _plain(row["prompt"]),
             "chosen": _plain(row["chosen"]), "rejected": _plain(row["rejected"])} for row in pairs])

    written["dataset_info"] = _write_json(llamafactory / "dataset_info.json", dataset_info)
    return written


def _write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path
