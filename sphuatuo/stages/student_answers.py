"""The fine-tuned student answers the training questions, and each answer is judged (METHOD A.3).

Its wrong answers are the raw material of the preference pairs; with `samples_per_question` > 1
each question is answered several times (the `sampled` pair strategy needs a right and a wrong one).
"""

from __future__ import annotations

import json

from sphuatuo.data.questions import Question
from sphuatuo.engines import Request
from sphuatuo.judge import generate_and_judge
from sphuatuo.prompts import Messages, get_prompt, options_block
from sphuatuo.recipe import SamplingConfig
from sphuatuo.stages import StageContext, StageSkipped
from sphuatuo.stages.generation import Row, count_tokens
from sphuatuo.stages.training import model_of

NAME = "student_answers"


def student_messages(prompt_name: str, row: Row) -> Messages:
    question = Question.from_row(row)
    return get_prompt(prompt_name).messages(question=question.question, options_block=options_block(question))


def sample_key(question_id: str, sample: int) -> str:
    return question_id if sample == 0 else f"{question_id}#{sample}"


def answer_questions(ctx: StageContext, questions: list[Row], folder: str, model: str, prompt_name: str,
                     sampling: SamplingConfig, samples: int = 1) -> list[Row]:
    """`samples` judged answers per question from `model` (the student engine), in `folder`.

    One pass per sample, the i-th seeded with seed + i: a per-request seed would give every sample of
    a prompt the same text.
    """
    for sample in range(samples):
        seeded = sampling if sampling.seed is None else sampling.model_copy(update={"seed": sampling.seed + sample})
        meta = {"prompt_version": get_prompt(prompt_name).tag, "sampling": json.dumps(seeded.model_dump()),
                "sample": sample, "hinted": False}
        rows = [{**q, **meta, "key": sample_key(q["id"], sample)} for q in questions]
        generate_and_judge(ctx, rows, folder, engine=ctx.recipe.models.student,
                           request=Request.from_config(seeded), model=model,
                           messages=lambda row: student_messages(prompt_name, row))
    return ctx.run.read_rows(folder)


def run(ctx: StageContext) -> None:
    stage = ctx.recipe.stages.student_answers
    questions = ctx.run.read_rows("questions", "train")
    ctx.record.rows_in = len(questions)
    if not questions:
        raise StageSkipped("no training questions")
    rows = answer_questions(ctx, questions, f"{NAME}/judged", model_of(ctx, "sft"), stage.prompt, stage.sampling,
                            stage.samples_per_question)
    ctx.record.rows_out = len(rows)
    ctx.record.rows_failed = sum(1 for row in rows if row["parse_error"])
    ctx.record.input_tokens, ctx.record.output_tokens = count_tokens(rows)
    wrong = sum(1 for row in rows if not row["judge_verdict"])
    ctx.record.details.update(correct=len(rows) - wrong, wrong=wrong)
    ctx.note(f"the SFT student answered {len(rows) - wrong} of {len(rows)} samples of {len(questions)} training "
             "questions correctly")
