"""The project's reply corpus (tests/fixtures/replies.jsonl): replies in the styles small models
write, Chinese and English, each with the letters it commits to and what kind of reply it is.

Each line: id, lang (en/zh), style (label, lone_letter, option_text, restated_list, copied_question,
candidates, refusal, hedge, truncated, ...), question, options, reply, expected (sorted letters; empty
when the reply answers nothing) and commitment (one of `CATEGORIES`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from sphuatuo.parsing.replies import CATEGORIES, COMMITTED, answer_commitment, extract_answer

CORPUS = Path(__file__).parent / "fixtures" / "replies.jsonl"
ENTRIES = [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize("entry", [pytest.param(e, id=e["id"]) for e in ENTRIES])
def test_reply_corpus(entry: dict) -> None:
    commitment = answer_commitment(entry["reply"], entry["options"], entry["question"])
    assert sorted(commitment.letters) == entry["expected"]
    assert commitment.category == entry["commitment"]
    assert extract_answer(entry["reply"], entry["options"], entry["question"]) == commitment.letters


def test_reply_corpus_is_broad() -> None:
    ids = [entry["id"] for entry in ENTRIES]
    assert len(ENTRIES) >= 150 and len(set(ids)) == len(ids)
    assert {entry["commitment"] for entry in ENTRIES} == set(CATEGORIES)
    assert Counter(entry["lang"] for entry in ENTRIES)["zh"] >= 40
    assert sum(len(entry["expected"]) > 1 for entry in ENTRIES) >= 10
    for entry in ENTRIES:
        assert set(entry["expected"]) <= set(entry["options"])
        assert bool(entry["expected"]) == (entry["commitment"] == COMMITTED)
    styles = Counter(entry["style"] for entry in ENTRIES)
    for style in ("restated_list", "restated_truncated", "copied_question", "candidates", "refusal", "hedge",
                  "truncated", "option_text", "lone_letter", "multi"):
        assert styles[style] >= 3, style


def test_a_restated_list_is_no_answer_whatever_the_option_order() -> None:
    """The bug this corpus guards: a weak model's restated list read as its first or last option, so its
    accuracy followed the option order. Reversed and rotated lists must be no answer too."""
    options = {"A": "Hypertension", "B": "Diabetes mellitus", "C": "Asthma", "D": "Gout", "E": "Anemia"}
    texts = list(options.values())
    for shift in range(len(texts)):
        rotated = texts[shift:] + texts[:shift]
        shuffled = dict(zip(options, rotated))
        listing = "\n".join(f"{letter}. {text}" for letter, text in shuffled.items())
        for reply in (listing, "The correct answer is:\n" + listing):
            assert answer_commitment(reply, shuffled).category == "restated_options"
            assert extract_answer(reply, shuffled) == frozenset()
