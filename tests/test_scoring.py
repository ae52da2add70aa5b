"""Evaluation arithmetic: accuracy, first vs last match, unparsable replies, intervals, breakdowns."""

from __future__ import annotations

import pytest

from sphuatuo.data.questions import Question
from sphuatuo.stages.evaluate import score, wilson_interval


def _row(reply: str, verdict: bool, answer: str = "B", **metadata: str) -> dict:
    question = Question(id=f"q{abs(hash(reply)) % 10**6}", question="Which?", options={"A": "a", "B": "b", "C": "c"},
                        answer=[answer], source="bank", metadata=metadata)
    return {**question.to_row(), "generated_text": reply, "verdict": verdict, "truncated": False}


def test_wilson_interval_known_values() -> None:
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 0.0)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0


def test_score_counts_first_and_last_matches_unparsable_and_breakdowns() -> None:
    rows = [
        _row("The answer is A. Wait, no: the answer is B.", True, difficulty="easy"),  # last B right, first A wrong
        _row("<answer>B</answer>", True, difficulty="hard"),
        _row("", False, difficulty="hard"),  # empty reply: wrong and unparsable
        _row("I cannot tell.", False, difficulty="hard"),
    ]
    result = score(rows)
    assert result["n"] == 4 and result["correct"] == 2 and result["accuracy"] == 0.5
    assert result["first_match_accuracy"] == 0.25
    assert result["unparsable"] == 2
    assert result["by"]["source"]["bank"]["n"] == 4
    assert result["by"]["difficulty"]["easy"]["accuracy"] == 1.0
    assert result["by"]["difficulty"]["hard"]["accuracy"] == pytest.approx(1 / 3)
    low, high = result["ci95"]
    assert low < 0.5 < high


def test_multiple_choice_items_are_scored_by_their_letters_even_under_an_llm_judge(tmp_path) -> None:
    from sphuatuo.passes.verdict import answer_judge, verdict_pass
    from sphuatuo.recipe import EngineConfig, JudgeConfig
    from sphuatuo.stages import StageContext
    from sphuatuo.stages.evaluate import scoring_judge
    from sphuatuo.store.manifest import StageRecord
    from sphuatuo.store.run_root import RunRoot

    llm = JudgeConfig(kind="llm", engine=EngineConfig(model="builtin:tiny"))
    assert scoring_judge(llm).kind == "auto" and scoring_judge(JudgeConfig(kind="rule")).kind == "rule"
    rows = [{**_row(reply, False), "key": f"k{i}"} for i, reply in enumerate(["The answer is B.", "Answer: C"])]
    target = StageContext(recipe=None, run=RunRoot(str(tmp_path)), record=StageRecord())  # type: ignore[arg-type]
    # No engine is started: every item has options, so the letters decide.
    verdict_pass(target, rows, "judged", scoring_judge(llm), answer_judge("self_play/judge"))
    judged = {row["key"]: row for row in target.run.read_rows("judged")}
    assert (judged["k0"]["verdict"], judged["k1"]["verdict"]) == (True, False)
    assert {row["decided_by"] for row in judged.values()} == {"rule"}
