"""Prompt templates are data: versioned, with named fields, rendered into chat messages."""

from __future__ import annotations

import pytest

from sphuatuo.data.questions import Question
from sphuatuo.prompts import get_prompt, options_block


def test_teacher_prompt_has_one_shot_example_and_starts_the_reply_inside_think() -> None:
    prompt = get_prompt("self_play/teacher_cot")
    messages = prompt.messages(question="Q?", options_block="A. x\nB. y", reference_hint="")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    assert "<answer>" in messages[2]["content"] and messages[3]["content"] == "Q?\nA. x\nB. y"
    assert messages[-1]["content"] == "<think>\n"
    assert prompt.tag == f"self_play/teacher_cot@v{prompt.version}"


def test_training_prompt_is_the_generation_prompt_without_the_reply_prefix() -> None:
    prompt = get_prompt("self_play/student_answer")
    values = {"question": "Q?", "options_block": "A. x"}
    assert prompt.training_prompt(**values) == prompt.messages(**values)[:-1]
    assert prompt.training_prompt(**values)[-1]["role"] == "user"


def test_missing_or_unexpected_fields_are_refused_with_the_prompt_named() -> None:
    prompt = get_prompt("self_play/judge")
    with pytest.raises(ValueError, match=r"self_play/judge@v1: missing fields \['reply'\]"):
        prompt.messages(question="q", options_block="", reference="A")
    with pytest.raises(ValueError, match=r"unexpected fields \['extra'\]"):
        prompt.messages(question="q", options_block="", reference="A", reply="r", extra="x")


def test_unknown_prompt_names() -> None:
    with pytest.raises(ValueError, match="unknown prompt family 'nope'"):
        get_prompt("nope/x")
    with pytest.raises(ValueError, match="has no template 'missing'"):
        get_prompt("self_play/missing")


def test_options_block_lists_options_in_letter_order() -> None:
    question = Question(id="q1", question="Which?", options={"B": "two", "A": "one"}, answer=["B"])
    assert options_block(question) == "A. one\nB. two"
    assert question.reference == "B. two"
