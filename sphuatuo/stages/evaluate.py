"""Evaluation of the base, SFT and DPO students (every DPO model of an ablation) on the held-out
questions (METHOD A.6, B.5).

Greedy decoding by default, a token budget that fits the chain of thought (the original 450 cut it
short). Multiple-choice items are scored by option-letter set equality whatever the judge kind, open-ended
ones by the judge.
First-match and last-match accuracy are reported separately, and an empty or unparsable reply counts
as wrong and is counted. Every reply is also counted by what it did with the options
(`sphuatuo.parsing.replies.answer_commitment`): committed to an answer, restated the options, copied
the question back, held candidates open, or gave no answer; an open-ended reply counts as committed
when the judge could decide it.
"""

from __future__ import annotations

import math
from collections import defaultdict

from sphuatuo.data.questions import Question
from sphuatuo.parsing.replies import CATEGORIES, COMMITTED, NO_ANSWER, answer_commitment
from sphuatuo.passes import Row
from sphuatuo.passes.generation import count_tokens
from sphuatuo.recipe import JudgeConfig
from sphuatuo.stages import StageContext, StageSkipped, log
from sphuatuo.stages.self_play.student_answers import answer_questions
from sphuatuo.stages.training import model_of

NAME = "evaluate"
CONFIG = ("models.student", "models.judge", "stages.evaluate", "stages.preference_pairs.strategies")
READS = ("questions", "sft", "dpo", "rl")


def scoring_judge(judge: JudgeConfig) -> JudgeConfig:
    """Evaluation scores multiple-choice items by their option letters whatever the judge kind, so a benchmark
    number never depends on an LLM judge's reading of a letter; the LLM judge scores open-ended items only."""
    return judge.model_copy(update={"kind": "auto"}) if judge.kind == "llm" else judge


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of a proportion; sound at small n and near 0 or 1, unlike p ± 2σ."""
    if total == 0:
        return (0.0, 0.0)
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


def score(rows: list[Row]) -> dict:
    """Accuracy (the judge's verdict on the final answer), first-match accuracy, unparsable and
    truncated counts, how many replies committed to an answer and why the others did not (one key
    per `sphuatuo.parsing.replies.CATEGORIES`), and accuracy per source and per metadata field
    (CMExam: disease group, department, difficulty, …)."""
    first_correct = 0
    unparsable = 0
    commitments = dict.fromkeys(CATEGORIES, 0)
    # group ("source" or a metadata key) -> value -> [correct, total]
    groups: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for row in rows:
        question = Question.from_row(row)
        if question.is_multiple_choice:
            commitment = answer_commitment(row["generated_text"], question.options, question.question)
            first_correct += commitment.first == frozenset(question.answer)
            unparsable += not commitment.letters
            commitments[commitment.category] += 1
        else:
            first_correct += bool(row["verdict"])
            undecided = row["verdict"] is None or not row["generated_text"].strip()
            unparsable += undecided
            commitments[NO_ANSWER if undecided else COMMITTED] += 1
        for group, value in {"source": question.source or "unknown", **question.metadata}.items():
            groups[group][value][0] += bool(row["verdict"])
            groups[group][value][1] += 1
    correct = sum(1 for row in rows if row["verdict"])
    total = len(rows)
    return {
        "n": total,
        "correct": correct,
        "accuracy": correct / total if total else 0.0,
        "ci95": wilson_interval(correct, total),
        "first_match_accuracy": first_correct / total if total else 0.0,
        "unparsable": unparsable,
        # per reply, what it did with the options: committed, restated_options, copied_question,
        # candidates, no_answer (they add up to n)
        **commitments,
        "truncated": sum(1 for row in rows if row["truncated"]),
        "by": {
            group: {value: {"n": n, "accuracy": c / n, "ci95": wilson_interval(c, n)}
                    for value, (c, n) in sorted(values.items())}
            for group, values in sorted(groups.items())
        },
    }


def run(ctx: StageContext) -> None:
    stage = ctx.recipe.stages.evaluate
    questions = ctx.run.read_rows("questions", "test")
    ctx.record.rows_in = len(questions)
    if not questions:
        raise StageSkipped("no test questions (set data.test or data.test_fraction)")
    results = ctx.record.details.setdefault("models", {})
    all_rows: list[Row] = []
    for name in ctx.recipe.stages.evaluated_models():
        try:
            model = model_of(ctx, name)
        except StageSkipped as missing:
            ctx.note(f"not evaluating {name}: {missing}")
            continue
        log.info("evaluating %s (%s) on %d questions", name, model, len(questions))
        rows = answer_questions(ctx, questions, f"{NAME}/{name}", model, stage.prompt, stage.sampling,
                                judge=scoring_judge(ctx.recipe.models.judge))
        results[name] = score(rows)
        all_rows.extend(rows)
        ctx.note(f"{name}: accuracy {results[name]['accuracy']:.1%} on {len(rows)} questions")
    ctx.record.rows_out = len(all_rows)
    ctx.record.input_tokens, ctx.record.output_tokens = count_tokens(all_rows)
