"""Self-collaborative correction into preference pairs (METHOD A.3, the paper's final method).

For every training question the fine-tuned student got wrong, the same student is shown its own
flawed reply and the reference, and writes a corrected trajectory. A correction counts only if the
judge accepts it (and, like a teacher answer, is complete; see `teacher_cot.training_answer`).
Pair: chosen = the corrected trajectory, rejected = the original wrong reply, both
under the student's test-time prompt.
"""

from __future__ import annotations

import json

from sphuatuo.data.questions import Question
from sphuatuo.engines import Request
from sphuatuo.judge import generate_and_judge
from sphuatuo.prompts import Messages, get_prompt, options_block
from sphuatuo.stages import StageContext, StageSkipped
from sphuatuo.stages.generation import Row, count_tokens
from sphuatuo.stages.sft import format_cot
from sphuatuo.stages.teacher_cot import training_answer
from sphuatuo.stages.training import model_of

NAME = "preference_pairs"


def correction_messages(prompt_name: str, row: Row) -> Messages:
    question = Question.from_row(row)
    return get_prompt(prompt_name).messages(
        question=question.question,
        options_block=options_block(question),
        flawed_reply=row["flawed_reply"],
        reference=question.answer_text,
    )


def run(ctx: StageContext) -> None:
    stage = ctx.recipe.stages.preference_pairs
    answers = ctx.run.read_rows("student_answers", "judged")
    ctx.record.rows_in = len(answers)
    if not answers:
        raise StageSkipped("no student answers to correct (the student_answers stage wrote none)")
    wrong = [row for row in answers if not row["judge_verdict"] and row["generated_text"].strip()]
    if not wrong:
        raise StageSkipped("the SFT student answered no training question wrongly: nothing to correct")

    question_columns = list(Question.model_fields)
    meta = {"prompt_version": get_prompt(stage.prompt).tag, "sampling": json.dumps(stage.sampling.model_dump()),
            "hinted": True}
    requests = [
        {**{c: row[c] for c in question_columns}, **meta, "key": row["id"], "original_key": row["key"],
         "flawed_reply": row["generated_text"], "original_model": row["model"]}
        for row in wrong
    ]
    corrections = generate_and_judge(
        ctx, requests, f"{NAME}/corrections", engine=ctx.recipe.models.student,
        request=Request.from_config(stage.sampling), model=model_of(ctx, "sft"),
        messages=lambda row: correction_messages(stage.prompt, row),
    )

    student_prompt = get_prompt(ctx.recipe.stages.student_answers.prompt)
    pairs = []
    for row in sorted(corrections, key=lambda r: r["key"]):
        answer = training_answer(row, stage.answer_from_thought)
        if answer is None:
            continue
        pairs.append({
            "id": row["id"],
            "strategy": stage.strategy,
            "prompt": student_prompt.training_prompt(question=row["question"],
                                                     options_block=options_block(Question.from_row(row))),
            "chosen": [{"role": "assistant", "content": format_cot(row["think"], answer)}],
            "rejected": [{"role": "assistant", "content": row["flawed_reply"]}],
            "chosen_key": row["key"],
            "rejected_key": row["original_key"],
            "chosen_model": row["model"],
            "rejected_model": row["original_model"],
        })
    if stage.max_pairs is not None:
        pairs = pairs[: stage.max_pairs]
    ctx.run.write_rows(pairs, NAME, "pairs")
    ctx.record.rows_out = len(pairs)
    ctx.record.rows_failed = sum(1 for row in corrections if row["parse_error"])
    ctx.record.input_tokens, ctx.record.output_tokens = count_tokens(corrections)
    verified = sum(1 for row in corrections if row["judge_verdict"])
    ctx.record.details.update(strategy=stage.strategy, wrong=len(wrong), corrected=len(corrections),
                              verified=verified, paired=len(pairs))
    ctx.note(f"{len(wrong)} wrong answers, {len(corrections)} corrections written, {verified} verified, "
             f"{len(pairs)} pairs")
