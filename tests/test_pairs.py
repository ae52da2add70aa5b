"""Which trajectories pair with which, and the recipe's limits: the pair-building logic without Ray."""

from __future__ import annotations

import pytest

from conftest import REPO, tiny_recipe
from sphuatuo.data.questions import Question
from sphuatuo.parsing.replies import format_cot
from sphuatuo.prompts import get_prompt
from sphuatuo.recipe import RecipeError, load_recipe
from sphuatuo.stages.self_play.preference_pairs import correction_pairs, limit_pairs, sampled_pairs, to_correct

PROMPT = get_prompt("self_play/student_answer")
OPTIONS = {"A": "Vitamin A", "B": "Vitamin B12", "C": "Vitamin C", "D": "Vitamin D"}


def _answer(qid: str, sample: int, letter: str, *, truncated: bool = False) -> dict:
    """A judged student sample (rule judge) answering `letter`; the gold answer is C."""
    text = format_cot(f"thinking {qid}/{sample}", letter)
    return {**Question(id=qid, question=f"Question {qid}?", options=OPTIONS, answer=["C"]).to_row(),
            "key": f"{qid}#{sample}", "model": "sft", "generated_text": text,
            "think": f"thinking {qid}/{sample}", "answer_text": letter, "truncated": truncated,
            "parse_error": "truncated at max_tokens" if truncated else None,
            "verdict": letter == "C", "decided_by": "rule"}


def _correction(wrong: dict, strategy: str, letter: str) -> dict:
    fixed = _answer(wrong["id"], 0, letter)
    return {**fixed, "key": f"{wrong['key']}:{strategy}", "model": "corrector", "original_key": wrong["key"],
            "flawed_reply": wrong["generated_text"], "original_model": wrong["model"]}


def test_sampled_pairs_each_wrong_sample_with_a_correct_one_of_the_same_question() -> None:
    answers = [
        _answer("q1", 0, "A"), _answer("q1", 1, "C"), _answer("q1", 2, "B"),  # one right, two wrong
        _answer("q2", 0, "A"), _answer("q2", 1, "B"),                        # no right sample: no pair
        _answer("q3", 0, "C"), _answer("q3", 1, "C", truncated=True),         # cut off: neither chosen nor rejected
        _answer("q4", 0, "C"), _answer("q4", 1, "C"), _answer("q4", 2, "D"),  # two right, one wrong
    ]
    pairs = sampled_pairs(PROMPT, answers, answer_from_thought=False)
    assert [(p["id"], p["chosen_key"], p["rejected_key"]) for p in pairs] == [
        ("q1", "q1#1", "q1#0"), ("q1", "q1#1", "q1#2"), ("q4", "q4#0", "q4#2")]
    first = pairs[0]
    assert first["strategy"] == "sampled" and first["chosen_model"] == first["rejected_model"] == "sft"
    assert first["chosen"] == [{"role": "assistant", "content": format_cot("thinking q1/1", "C")}]
    assert first["rejected"] == [{"role": "assistant", "content": answers[0]["generated_text"]}]
    assert first["prompt"][-1] == {"role": "user", "content": "Question q1?\n" + "\n".join(
        f"{k}. {v}" for k, v in OPTIONS.items())}


def test_a_correction_pairs_only_when_the_judge_accepts_it() -> None:
    wrong = [_answer("q1", 0, "A"), _answer("q2", 0, "B"), _answer("q2", 1, "D")]
    corrections = [_correction(wrong[0], "teacher_correction", "C"), _correction(wrong[1], "teacher_correction", "D"),
                   _correction(wrong[2], "teacher_correction", "C")]
    pairs = correction_pairs("teacher_correction", PROMPT, corrections, answer_from_thought=False)
    assert [(p["id"], p["chosen_key"], p["rejected_key"]) for p in pairs] == [
        ("q1", "q1#0:teacher_correction", "q1#0"), ("q2", "q2#1:teacher_correction", "q2#1")]
    assert all(p["chosen_model"] == "corrector" and p["rejected_model"] == "sft" for p in pairs)
    assert pairs[1]["rejected"][0]["content"] == wrong[2]["generated_text"]


def test_only_as_many_wrong_answers_per_question_are_corrected_as_can_become_pairs() -> None:
    wrong = [_answer("q2", 0, "A"), _answer("q1", 2, "B"), _answer("q1", 0, "A"), _answer("q1", 1, "D")]
    assert [r["key"] for r in to_correct(wrong, 1)] == ["q1#0", "q2#0"]
    assert [r["key"] for r in to_correct(wrong, 2)] == ["q1#0", "q1#1", "q2#0"]


def test_limits_per_question_then_in_all_spread_over_questions() -> None:
    def pair(qid: str, n: int) -> dict:
        return {"id": qid, "chosen_key": f"{qid}:c", "rejected_key": f"{qid}#{n}"}

    pairs = [pair("q2", 1), pair("q1", 2), pair("q1", 1), pair("q2", 2), pair("q1", 3), pair("q3", 1)]
    assert [(p["id"], p["rejected_key"]) for p in limit_pairs(pairs, 2, None)] == [
        ("q1", "q1#1"), ("q2", "q2#1"), ("q3", "q3#1"), ("q1", "q1#2"), ("q2", "q2#2")]
    assert [p["rejected_key"] for p in limit_pairs(pairs, 1, None)] == ["q1#1", "q2#1", "q3#1"]
    assert [p["rejected_key"] for p in limit_pairs(pairs, 3, 4)] == ["q1#1", "q2#1", "q3#1", "q1#2"]


def test_one_dpo_model_per_strategy_and_recipe_checks(tmp_path) -> None:
    assert tiny_recipe(tmp_path).stages.dpo_models() == {"dpo": "self_correction"}
    ablation = tiny_recipe(tmp_path, **{"stages.preference_pairs.strategies": ["self_correction", "sampled"],
                                        "stages.student_answers.samples_per_question": 2})
    assert ablation.stages.dpo_models() == {"dpo_self_correction": "self_correction", "dpo_sampled": "sampled"}

    singular = tiny_recipe(tmp_path, **{"stages.preference_pairs": {"strategy": "teacher_correction"}})
    assert singular.stages.preference_pairs.strategies == ["teacher_correction"]
    with pytest.raises(ValueError, match="'sampled' needs stages.student_answers.samples_per_question >= 2"):
        tiny_recipe(tmp_path, **{"stages.preference_pairs.strategies": ["sampled"]})
    with pytest.raises(ValueError, match="lists one twice"):
        tiny_recipe(tmp_path, **{"stages.preference_pairs.strategies": ["sampled", "sampled"]})
    with pytest.raises(RecipeError, match="stages.preference_pairs.strategies.0: Input should be"):
        load_recipe(REPO / "pipelines" / "demo.yaml", ["stages.preference_pairs.strategies=[thought_correction]"])
