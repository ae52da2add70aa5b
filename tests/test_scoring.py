"""Evaluation arithmetic: accuracy, first vs last match, unparsable replies, what replies did with the options
(committed, restated, copied, candidates, none), intervals, breakdowns, and the report's evaluation table."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import cluster_rows
from sphuatuo.commands.evaluate import summary
from sphuatuo.commands.report import write_report
from sphuatuo.data.questions import Question
from sphuatuo.parsing.replies import CATEGORIES
from sphuatuo.stages.evaluate import score, wilson_interval
from sphuatuo.store.manifest import Manifest, StageRecord, save_manifest
from sphuatuo.store.run_root import RunRoot


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


@pytest.mark.slow
def test_multiple_choice_items_are_scored_by_their_letters_even_under_an_llm_judge(tmp_path, ray_cluster) -> None:
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
    # No engine is started: every item has options, so the letters decide (on Ray's workers).
    verdict_pass(target, cluster_rows(rows), "judged", scoring_judge(llm), answer_judge("self_play/judge"))
    judged = {row["key"]: row for row in target.run.read_rows("judged")}
    assert (judged["k0"]["verdict"], judged["k1"]["verdict"]) == (True, False)
    assert {row["decided_by"] for row in judged.values()} == {"rule"}


FIVE = {"A": "Hypertension", "B": "Diabetes mellitus", "C": "Asthma", "D": "Gout", "E": "Anemia"}
STEM = "A 52-year-old man has had polyuria and weight loss for three months. What is the most likely diagnosis?"


def _five_row(reply: str, verdict: bool) -> dict:
    question = Question(id=f"f{abs(hash(reply)) % 10**6}", question=STEM, options=FIVE, answer=["E"], source="bank")
    return {**question.to_row(), "generated_text": reply, "verdict": verdict, "truncated": False}


def test_score_counts_what_each_reply_did_with_the_options() -> None:
    rows = [
        _five_row("The answer is E.", True),
        _five_row("答案：Ｂ", False),
        # restated lists: the whole list, a list after "The correct answer is:", a truncated one
        _five_row("A. Hypertension\nB. Diabetes mellitus\nC. Asthma\nD. Gout\nE. Anemia", False),
        _five_row("The correct answer is:\nA) Hypertension B) Diabetes mellitus C) Asthma D) Gout E) Anemia", False),
        _five_row("The correct answer is:\nA. Hypertension\nB. Diabe", False),
        _five_row(STEM, False),  # the question copied back
        _five_row("It could be A, D or E.", False),  # candidates
        _five_row("I'm sorry, I cannot give medical advice.", False),  # refusal
    ]
    result = score(rows)
    assert result["n"] == 8
    assert (result["committed"], result["restated_options"], result["copied_question"], result["candidates"],
            result["no_answer"]) == (2, 3, 1, 1, 1)
    assert result["unparsable"] == 6
    assert sum(result[category] for category in CATEGORIES) == result["n"]


def test_score_counts_open_ended_replies_as_committed_when_judged() -> None:
    question = Question(id="open", question="What lowers blood glucose?", reference="insulin")
    rows = [{**question.to_row(), "generated_text": "Insulin.", "verdict": True, "truncated": False},
            {**question.to_row(), "generated_text": "", "verdict": None, "truncated": True}]
    result = score(rows)
    assert result["committed"] == 1 and result["no_answer"] == 1 and result["unparsable"] == 1


def test_report_shows_the_committed_column(tmp_path: Path) -> None:
    run = RunRoot(str(tmp_path / "run"))
    rows = [_five_row("The answer is E.", True), _five_row("Answer: b", False),
            _five_row("A. Hypertension\nB. Diabetes mellitus\nC. Asthma\nD. Gout\nE. Anemia", False),
            _five_row("答案可能是A或E", False)]
    evaluation = StageRecord(status="done", details={"models": {"base": score(rows)}})
    save_manifest(run, Manifest(recipe={"name": "hand-made", "models": {"student": {"model": "tiny"}}},
                                versions={"python": "3"}, created_at="today", stages={"evaluate": evaluation}))
    report = Path(write_report(run)).read_text()
    header = next(line for line in report.splitlines() if line.startswith("| model |"))
    assert "| committed |" in header
    row = next(line for line in report.splitlines() if line.startswith("| base |"))
    assert "| 2 (50.0%) | 1 / 0 / 1 / 0 |" in row
    assert "| 25.0% |" in row
    assert "committed 2, restated options 1, copied question 0, candidates 1, no answer 0;" in summary(run)
