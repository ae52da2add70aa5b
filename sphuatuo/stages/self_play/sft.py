"""SFT of the student on the teacher's accepted chains of thought (METHOD A.2).

One example per question: its accepted teacher answer (an unhinted one when both exist), prompted
exactly as the student is prompted at test time, so train and test share one chat format.
"""

from __future__ import annotations

from functools import partial

from sphuatuo.data.questions import Question
from sphuatuo.parsing.replies import format_cot
from sphuatuo.passes import Row
from sphuatuo.prompts import get_prompt, options_block
from sphuatuo.stages import StageContext
from sphuatuo.stages.self_play import training_answer
from sphuatuo.stages.training import model_of, train_stage
from sphuatuo.store.run_root import RunRoot
from sphuatuo.train.sft import sft_worker

NAME = "sft"
CONFIG = ("models.student.model", "stages.sft", "stages.student_answers.prompt",
          "stages.teacher_cot.answer_from_thought")
READS = ("teacher_cot",)


def sft_examples(prompt_name: str, answer_from_thought: bool, teacher_rows: list[Row]) -> list[Row]:
    prompt = get_prompt(prompt_name)
    best: dict[str, Row] = {}
    for row in teacher_rows:
        answer = training_answer(row, answer_from_thought)
        if answer is None:
            continue
        if row["id"] not in best or (best[row["id"]]["hinted"] and not row["hinted"]):
            best[row["id"]] = {**row, "answer_text": answer}
    examples = []
    for qid, row in sorted(best.items()):
        question = Question.from_row(row)
        examples.append({
            "id": qid,
            "prompt": prompt.training_prompt(question=question.question, options_block=options_block(question)),
            "completion": [{"role": "assistant", "content": format_cot(row["think"], row["answer_text"])}],
            "teacher_model": row["model"],
            "teacher_prompt_version": row["prompt_version"],
            "hinted": row["hinted"],
        })
    return examples


def examples_of_run(prompt_name: str, answer_from_thought: bool, run: RunRoot) -> list[Row]:
    """The SFT set from the teacher's judged answers, made on one of Ray's workers (see `train_stage`)."""
    return sft_examples(prompt_name, answer_from_thought,
                        run.read_rows("teacher_cot", "first") + run.read_rows("teacher_cot", "hinted"))


def run(ctx: StageContext) -> None:
    ctx.record.rows_in = ctx.run.count_rows("teacher_cot", "first") + ctx.run.count_rows("teacher_cot", "hinted")
    examples = partial(examples_of_run, ctx.recipe.stages.student_answers.prompt,
                       ctx.recipe.stages.teacher_cot.answer_from_thought)
    train_stage(ctx, NAME, ctx.recipe.stages.sft, examples, sft_worker, model_of(ctx, "base"))
