"""The Self-Play recipe (METHOD A): teacher long CoT -> SFT -> student answers -> preference pairs -> DPO.

What its stages share is which judged reply may teach the student (`training_answer`).
"""

from __future__ import annotations

from sphuatuo.data.questions import Question
from sphuatuo.parsing.replies import NO_ANSWER_SECTION
from sphuatuo.passes import Row

# The columns `accepted` reads.
ACCEPTANCE_COLUMNS = ["verdict", "truncated", "parse_error", "decided_by"]


def accepted(row: Row, answer_from_thought: bool) -> bool:
    """Whether a judged reply may teach the student.

    A reply must be judged correct and complete (not cut at the token budget) and have an <answer>
    section. With `answer_from_thought`, a multiple-choice reply whose thought ends in a verified
    answer but that stopped before writing <answer> is accepted too, when the rule judge found exactly
    the gold letters in the thought (small models often stop right after </think>).
    """
    if not row["verdict"] or row["truncated"]:
        return False
    return row["parse_error"] is None or (answer_from_thought and row["parse_error"] == NO_ANSWER_SECTION
                                          and row["decided_by"] == "rule")


def training_answer(row: Row, answer_from_thought: bool) -> str | None:
    """The formal answer an accepted reply contributes to SFT (its own, or the judged option(s) for a reply
    accepted from its thought); None when it cannot be used."""
    if not accepted(row, answer_from_thought):
        return None
    return row["answer_text"] if row["parse_error"] is None else Question.from_row(row).answer_text
