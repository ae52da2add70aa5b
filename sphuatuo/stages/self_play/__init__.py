"""The Self-Play recipe (METHOD A): teacher long CoT -> SFT -> student answers -> preference pairs -> DPO.

What its stages share is which judged reply may teach the student (`training_answer`).
"""

from __future__ import annotations

from sphuatuo.data.questions import Question
from sphuatuo.parsing.replies import NO_ANSWER_SECTION
from sphuatuo.passes import Row


def training_answer(row: Row, answer_from_thought: bool) -> str | None:
    """The formal answer an accepted reply contributes to SFT; None when it cannot be used.

    A reply must be judged correct and complete (not cut at the token budget) and have an <answer>
    section. With `answer_from_thought`, a multiple-choice reply whose thought ends in a verified
    answer but that stopped before writing <answer> gets the judged option(s) as its formal answer
    (small models often stop right after </think>).
    """
    if not row["verdict"] or row["truncated"]:
        return None
    if row["parse_error"] is None:
        return row["answer_text"]
    if answer_from_thought and row["parse_error"] == NO_ANSWER_SECTION and row["decided_by"] == "rule":
        return Question.from_row(row).answer_text  # the judge found exactly the gold letters in the thought
    return None
