"""Teacher long chain-of-thought (METHOD A.1).

For each training question the teacher writes `<think>…</think><answer>…</answer>`. The gold answer is
not shown (unlike the original script, whose one-shot example leaked it) unless the recipe sets
`reveal_reference`. Every answer is judged against the reference, and only accepted, complete answers
go on to SFT: rejection sampling. With `retry_with_reference`, rejected questions are asked once more
with the reference shown, and those rows are marked `hinted`.
"""

from __future__ import annotations

import json
from functools import partial

import pyarrow as pa

from sphuatuo.data.questions import Question
from sphuatuo.engines import Request
from sphuatuo.passes import Row
from sphuatuo.passes.generation import sample_key
from sphuatuo.passes.verdict import generate_and_judge
from sphuatuo.prompts import get_prompt, options_block
from sphuatuo.recipe import EngineConfig, TeacherCotStage
from sphuatuo.stages import StageContext, StageSkipped
from sphuatuo.stages.self_play import ACCEPTANCE_COLUMNS, accepted
from sphuatuo.store.datasets import (
    FolderRows,
    column_summary,
    folder_columns,
    keep_keys,
    light_step,
    on_worker,
    read_folder,
)
from sphuatuo.store.run_root import RunRoot

NAME = "teacher_cot"
CONFIG = ("models.teacher", "models.judge", "stages.teacher_cot")
READS = ("questions",)


def teacher_messages(stage: TeacherCotStage, row: Row) -> list[dict[str, str]]:
    question = Question.from_row(row)
    hint = get_prompt(stage.hint_prompt).render_user(reference=question.answer_text) if row["hinted"] else ""
    return get_prompt(stage.prompt).messages(
        question=question.question, options_block=options_block(question), reference_hint=hint
    )


def sample_rows(questions: list[Row], stage: TeacherCotStage) -> list[Row]:
    """Each question `samples_per_question` times, keyed, with the prompt version and sampling that made it."""
    meta = {"prompt_version": get_prompt(stage.prompt).tag, "sampling": json.dumps(stage.sampling.model_dump())}
    return [{**q, **meta, "key": sample_key(q["id"], k, stage.samples_per_question), "sample": k,
             "hinted": stage.reveal_reference}
            for q in questions for k in range(stage.samples_per_question)]


def _sample_batch(questions: pa.Table, stage: TeacherCotStage) -> pa.Table:
    return pa.Table.from_pylist(sample_rows(questions.to_pylist(), stage))


def _hinted_batch(questions: pa.Table, stage: TeacherCotStage) -> pa.Table:
    return pa.Table.from_pylist([{**row, "key": f"{row['id']}:hinted", "hinted": True}
                                 for row in sample_rows(questions.to_pylist(), stage) if row["sample"] == 0])


def first_pass_rows(run: RunRoot, stage: TeacherCotStage, teacher: EngineConfig) -> FolderRows:
    """The first pass's rows, made on Ray's workers from the training questions: the driver never holds them.
    Blocks of one engine batch's questions keep a crash's loss to the batches in flight."""
    rows_per_block = max(1, teacher.batch_size // stage.samples_per_question)
    questions = read_folder(run, "questions", "train", rows_per_block=rows_per_block)
    rows = questions.rows.map_batches(_sample_batch, fn_kwargs={"stage": stage}, batch_format="pyarrow",
                                      **light_step())
    return FolderRows(rows, questions.count * stage.samples_per_question)


def hinted_pass_rows(run: RunRoot, stage: TeacherCotStage, teacher: EngineConfig) -> FolderRows:
    """The retry's rows: each question with no accepted answer in the first pass, once, with the reference shown.
    The accepted ids are found on a worker, and the questions filtered by Ray's workers."""
    first, columns = [(NAME, "first")], ["id", *ACCEPTANCE_COLUMNS]
    from_thought = stage.answer_from_thought
    accepted_ids = folder_columns(run, first, columns, partial(_accepted_ids, answer_from_thought=from_thought))
    accepted_count = on_worker(lambda ids: len(ids), accepted_ids)  # the task gets the array the reference names
    questions = read_folder(run, "questions", "train", rows_per_block=teacher.batch_size)
    rejected = keep_keys(questions.rows, accepted_ids, keep=False, column="id")
    rows = rejected.map_batches(_hinted_batch, fn_kwargs={"stage": stage}, batch_format="pyarrow", **light_step())
    return FolderRows(rows, questions.count - accepted_count)


def _accepted_ids(table: pa.Table, answer_from_thought: bool) -> pa.Array:
    return pa.array(sorted({row["id"] for row in table.to_pylist() if accepted(row, answer_from_thought)}), pa.string())


def _acceptance_counts(table: pa.Table, answer_from_thought: bool) -> dict[str, int]:
    rows = [row for row in table.to_pylist() if accepted(row, answer_from_thought)]
    return {"questions": len({row["id"] for row in rows}),
            "unhinted": sum(1 for row in rows if not row["hinted"]),
            "hinted": sum(1 for row in rows if row["hinted"])}


def run(ctx: StageContext) -> None:
    stage = ctx.recipe.stages.teacher_cot
    teacher, judge = ctx.recipe.models.teacher, ctx.recipe.models.judge
    ctx.record.rows_in = ctx.run.count_rows("questions", "train")
    if not ctx.record.rows_in:
        raise StageSkipped("no training questions (the questions stage wrote zero valid rows)")

    request = Request.from_config(stage.sampling)
    counts = generate_and_judge(ctx, first_pass_rows(ctx.run, stage, teacher), f"{NAME}/first", judge=judge,
                                engine=teacher, request=request, messages=partial(teacher_messages, stage))
    if stage.retry_with_reference and not stage.reveal_reference:
        retry = hinted_pass_rows(ctx.run, stage, teacher)
        ctx.note(f"{retry.count} rejected questions asked again with the reference shown (hinted)")
        counts += generate_and_judge(ctx, retry, f"{NAME}/hinted", judge=judge, engine=teacher, request=request,
                                     messages=partial(teacher_messages, stage))

    acceptance = column_summary(ctx.run, [(NAME, "first"), (NAME, "hinted")], ["id", "hinted", *ACCEPTANCE_COLUMNS],
                                partial(_acceptance_counts, answer_from_thought=stage.answer_from_thought))
    ctx.record.rows_out = acceptance["questions"]
    ctx.record.rows_failed = counts.parse_errors
    ctx.record.input_tokens, ctx.record.output_tokens = counts.input_tokens, counts.output_tokens
    ctx.record.details.update(
        samples=counts.rows,
        samples_per_question=stage.samples_per_question,
        accepted_unhinted=acceptance["unhinted"],
        accepted_hinted=acceptance["hinted"],
        truncated=counts.truncated,
    )
    ctx.note(f"{acceptance['questions']} of {ctx.record.rows_in} questions have an accepted teacher answer")
