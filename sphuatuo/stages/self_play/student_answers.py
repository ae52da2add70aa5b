"""The fine-tuned student answers the training questions, and each answer is judged (METHOD A.3).

Its wrong answers are the raw material of the preference pairs; with `samples_per_question` > 1
each question is answered several times (the `sampled` pair strategy needs a right and a wrong one).
"""

from __future__ import annotations

import json

import pyarrow as pa

from sphuatuo.data.questions import Question
from sphuatuo.engines import Request
from sphuatuo.passes import Row
from sphuatuo.passes.generation import sample_key
from sphuatuo.passes.verdict import JudgedCounts, generate_and_judge
from sphuatuo.prompts import PromptInput, get_prompt, options_block
from sphuatuo.recipe import JudgeConfig, SamplingConfig
from sphuatuo.stages import StageContext, StageSkipped
from sphuatuo.stages.training import engine_model_of
from sphuatuo.store.datasets import FolderRows, light_step, read_folder

NAME = "student_answers"
CONFIG = ("models.student", "models.judge", "stages.student_answers")
READS = ("questions", "sft")


def student_prompt(prompt_name: str, row: Row, chat_template: bool = True) -> PromptInput:
    """The question as a chat, or as raw text for a model prompted without its chat template."""
    question = Question.from_row(row)
    template = get_prompt(prompt_name)
    fields = {"question": question.question, "options_block": options_block(question)}
    return template.messages(**fields) if chat_template else template.raw_prompt(**fields)


def _asked_batch(questions: pa.Table, meta: Row, samples: int) -> pa.Table:
    return pa.Table.from_pylist([{**q, **meta, "key": sample_key(q["id"], k, samples), "sample": k}
                                 for q in questions.to_pylist() for k in range(samples)])


def answer_questions(ctx: StageContext, questions: FolderRows, folder: str, model: str, prompt_name: str,
                     sampling: SamplingConfig, samples: int = 1, judge: JudgeConfig | None = None,
                     chat_template: bool = True) -> JudgedCounts:
    """`samples` judged answers per question from `model` (the student engine), in `folder`; the k-th
    sample of a question is seeded seed + k (see `engines.row_seed`); the questions stay in the cluster.
    `judge`: default the recipe's. `chat_template` False: the prompt is sent as raw text (an evaluation
    protocol's choice)."""
    meta = {"prompt_version": get_prompt(prompt_name).tag, "sampling": json.dumps(sampling.model_dump()),
            "hinted": False, "chat_template": chat_template}
    rows = FolderRows(questions.rows.map_batches(_asked_batch, fn_kwargs={"meta": meta, "samples": samples},
                                                 batch_format="pyarrow", **light_step()),
                      questions.count * samples)
    return generate_and_judge(ctx, rows, folder, judge=judge or ctx.recipe.models.judge,
                              engine=ctx.recipe.models.student,
                              request=Request.from_config(sampling), model=model,
                              messages=lambda row: student_prompt(prompt_name, row, chat_template))


def run(ctx: StageContext) -> None:
    stage = ctx.recipe.stages.student_answers
    student = ctx.recipe.models.student
    questions = read_folder(ctx.run, "questions", "train",
                            rows_per_block=max(1, student.batch_size // stage.samples_per_question))
    ctx.record.rows_in = questions.count
    if not questions.count:
        raise StageSkipped("no training questions")
    counts = answer_questions(ctx, questions, f"{NAME}/judged", engine_model_of(ctx, "sft"), stage.prompt,
                              stage.sampling, stage.samples_per_question)
    ctx.record.rows_out = counts.rows
    ctx.record.rows_failed = counts.parse_errors
    ctx.record.input_tokens, ctx.record.output_tokens = counts.input_tokens, counts.output_tokens
    wrong = counts.rows - counts.right
    ctx.record.details.update(correct=counts.right, wrong=wrong)
    ctx.note(f"the SFT student answered {counts.right} of {counts.rows} samples of {questions.count} training "
             "questions correctly")
