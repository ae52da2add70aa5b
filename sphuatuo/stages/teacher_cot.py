"""Teacher long chain-of-thought (METHOD A.1).

For each training question the teacher writes `<think>…</think><answer>…</answer>`. The gold answer is
not shown (unlike the original script, whose one-shot example leaked it) unless the recipe sets
`reveal_reference`. Every answer is judged against the reference, and only accepted, complete answers
go on to SFT: rejection sampling. With `retry_with_reference`, rejected questions are asked once more
with the reference shown, and those rows are marked `hinted`.
"""

from __future__ import annotations

import json

from sphuatuo.data.questions import Question
from sphuatuo.engines import Request
from sphuatuo.judge import generate_and_judge
from sphuatuo.parsing import NO_ANSWER_SECTION
from sphuatuo.prompts import get_prompt, options_block
from sphuatuo.stages import StageContext, StageSkipped
from sphuatuo.stages.generation import Row, count_tokens

NAME = "teacher_cot"


def teacher_messages(ctx: StageContext, row: Row) -> list[dict[str, str]]:
    stage = ctx.recipe.stages.teacher_cot
    question = Question.from_row(row)
    hint = get_prompt("self_play/reference_hint").render_user(reference=question.answer_text) if row["hinted"] else ""
    return get_prompt(stage.prompt).messages(
        question=question.question, options_block=options_block(question), reference_hint=hint
    )


def run(ctx: StageContext) -> None:
    stage = ctx.recipe.stages.teacher_cot
    teacher = ctx.recipe.models.teacher
    questions = ctx.run.read_rows("questions", "train")
    ctx.record.rows_in = len(questions)
    if not questions:
        raise StageSkipped("no training questions (the questions stage wrote zero valid rows)")

    prompt = get_prompt(stage.prompt)
    request = Request.from_config(stage.sampling)
    meta = {"prompt_version": prompt.tag, "sampling": json.dumps(stage.sampling.model_dump())}
    first = [{**q, **meta, "key": sample_key(q["id"], k, stage.samples_per_question), "sample": k,
              "hinted": stage.reveal_reference}
             for q in questions for k in range(stage.samples_per_question)]
    generate_and_judge(ctx, first, f"{NAME}/first", engine=teacher, request=request,
                       messages=lambda row: teacher_messages(ctx, row))

    def usable(row: Row) -> bool:
        return training_answer(row, stage.answer_from_thought) is not None

    if stage.retry_with_reference and not stage.reveal_reference:
        judged = ctx.run.read_rows(NAME, "first")
        accepted_ids = {row["id"] for row in judged if usable(row)}
        retry = [{**row, "key": f"{row['id']}:hinted", "hinted": True} for row in first
                 if row["id"] not in accepted_ids and row["sample"] == 0]
        ctx.note(f"{len(retry)} rejected questions asked again with the reference shown (hinted)")
        generate_and_judge(ctx, retry, f"{NAME}/hinted", engine=teacher, request=request,
                           messages=lambda row: teacher_messages(ctx, row))

    rows = ctx.run.read_rows(NAME, "first") + ctx.run.read_rows(NAME, "hinted")
    accepted = {row["id"] for row in rows if usable(row)}
    ctx.record.rows_out = len(accepted)
    ctx.record.rows_failed = sum(1 for row in rows if row["parse_error"])
    ctx.record.input_tokens, ctx.record.output_tokens = count_tokens(rows)
    ctx.record.details.update(
        samples=len(rows),
        samples_per_question=stage.samples_per_question,
        accepted_unhinted=sum(1 for row in rows if usable(row) and not row["hinted"]),
        accepted_hinted=sum(1 for row in rows if usable(row) and row["hinted"]),
        truncated=sum(1 for row in rows if row["truncated"]),
    )
    ctx.note(f"{len(accepted)} of {len(questions)} questions have an accepted teacher answer")


def sample_key(question_id: str, sample: int, samples_per_question: int) -> str:
    """One sample per question keeps the question id as its key, so single-sample runs resume as before."""
    return question_id if samples_per_question == 1 else f"{question_id}#{sample}"


def training_answer(row: Row, answer_from_thought: bool) -> str | None:
    """The formal answer an accepted reply contributes to SFT; None when it cannot be used.

    A reply must be judged correct and complete (not cut at the token budget) and have an <answer>
    section. With `answer_from_thought`, a multiple-choice reply whose thought ends in a verified
    answer but that stopped before writing <answer> gets the judged option(s) as its formal answer
    (small models often stop right after </think>).
    """
    if not row["judge_verdict"] or row["truncated"]:
        return None
    if row["parse_error"] is None:
        return row["answer_text"]
    if answer_from_thought and row["parse_error"] == NO_ANSWER_SECTION and row["judged_by"] == "rule":
        return Question.from_row(row).answer_text  # the judge found exactly the gold letters in the thought
    return None
