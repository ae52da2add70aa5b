"""Overlong training examples: counted against the trainer's chat template, dropped by default, cut from the
left on request so the answer stays, and reported as a histogram."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from sphuatuo.commands.report import _lengths
from sphuatuo.parsing.replies import format_cot
from sphuatuo.store.run_root import RunRoot
from sphuatuo.train.lengths import example_length, fit_to_length, histogram


@pytest.fixture(scope="module")
def tokenizer(tiny_model: str):
    return AutoTokenizer.from_pretrained(tiny_model)


def _example(qid: str, thought_words: int) -> dict:
    return {"id": qid, "prompt": [{"role": "user", "content": "Which vitamin prevents scurvy? A. C B. D"}],
            "completion": [{"role": "assistant", "content": format_cot("think " * thought_words, "A. vitamin C")}]}


def test_overlong_examples_are_dropped_and_counted(tokenizer) -> None:
    rows = [_example("short", 5), _example("long", 400)]
    assert example_length(tokenizer, rows[0], ["completion"]) < 128 < example_length(tokenizer, rows[1], ["completion"])
    kept, report = fit_to_length(tokenizer, rows, ["completion"], 128, "drop")
    assert [row["id"] for row in kept] == ["short"]
    assert (report["examples"], report["overlong"], report["dropped"], report["truncated"]) == (2, 1, 1, 0)
    assert sum(report["histogram"].values()) == 2 and report["longest"] > 128


def test_truncate_left_keeps_the_prompt_and_the_answer(tokenizer) -> None:
    kept, report = fit_to_length(tokenizer, [_example("long", 400)], ["completion"], 128, "truncate_left")
    assert report["truncated"] == 1 and report["dropped"] == 0
    (row,) = kept
    assert row["prompt"] == _example("long", 400)["prompt"]
    assert row["completion"][0]["content"].endswith("</answer>")
    assert example_length(tokenizer, row, ["completion"]) <= 128


def test_dpo_pairs_are_measured_by_their_longer_side(tokenizer) -> None:
    pair = {**_example("p", 5), "chosen": _example("c", 5)["completion"], "rejected": _example("r", 400)["completion"]}
    kept, report = fit_to_length(tokenizer, [pair], ["chosen", "rejected"], 128, "drop")
    assert kept == [] and report["overlong"] == 1


def test_histogram_bins_are_shares_of_the_budget() -> None:
    assert histogram([10, 100, 101, 300, 500], 100) == {"<= 25": 1, "<= 50": 0, "<= 75": 0, "<= 100": 1,
                                                        "<= 150": 1, "<= 200": 0, "> 200": 2}


def test_the_report_shows_the_histogram(tmp_path: Path) -> None:
    run = RunRoot(str(tmp_path))
    report = {"max_length": 100, "overlong_policy": "drop", "examples": 5, "overlong": 3, "dropped": 3,
              "truncated": 0, "longest": 500, "histogram": histogram([10, 100, 101, 300, 500], 100)}
    run.write_text(json.dumps(report), "sft", "lengths.json")
    text = "\n".join(_lengths(run, "sft"))
    assert "3 of 5 overlong, 3 dropped" in text and "| <= 25 | <= 50 |" in text
    assert "| 1 | 0 | 0 | 1 | 1 | 0 | 2 |" in text
