"""Load the question banks, validate every row, and split train / test.

Invalid rows never stop the load: they go to `questions/rejects.jsonl` with file, row and reason.
The load fails only when the rejected share passes `data.max_error_share`.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict

from sphuatuo.data.loaders import LoadResult, load_questions, resolve_source_path
from sphuatuo.data.questions import questions_table
from sphuatuo.recipe import QuestionSource
from sphuatuo.stages import StageContext, StageFailed

NAME = "questions"
CONFIG = ("data", "seed")
READS = ()
def load_sources(sources: list[QuestionSource]) -> LoadResult:
    questions, rejects = [], []
    for source in sources:
        result = load_questions(resolve_source_path(source.path), format=source.format)
        questions.extend(result.questions[: source.limit] if source.limit else result.questions)
        rejects.extend(result.rejects)
    return LoadResult(questions=questions, rejects=rejects)


def run(ctx: StageContext) -> None:
    data = ctx.recipe.data
    train = load_sources(data.train)
    test = load_sources(data.test)
    train_questions, test_questions = train.questions, test.questions
    if not data.test and data.test_fraction:
        shuffled = sorted(train_questions, key=lambda q: q.id)
        random.Random(ctx.recipe.seed).shuffle(shuffled)
        held_out = round(len(shuffled) * data.test_fraction)
        test_questions, train_questions = shuffled[:held_out], shuffled[held_out:]
    test_ids = {q.id for q in test_questions}
    overlap = [q.id for q in train_questions if q.id in test_ids]
    if overlap:
        raise StageFailed(f"{len(overlap)} question ids are in both train and test, e.g. {overlap[:3]}")

    rejects = train.rejects + test.rejects
    total = len(train.questions) + len(test.questions) + len(rejects)
    ctx.record.rows_in = total
    ctx.record.rows_out = len(train_questions) + len(test_questions)
    ctx.record.rows_rejected = len(rejects)
    ctx.record.details.update(train=len(train_questions), test=len(test_questions))
    ctx.run.write_text("".join(json.dumps(asdict(r), ensure_ascii=False) + "\n" for r in rejects),
                       NAME, "rejects.jsonl")
    for reject in rejects[:20]:
        ctx.note(f"rejected {reject.file} row {reject.row}: {reject.reason}")
    if total and len(rejects) / total > data.max_error_share:
        raise StageFailed(f"{len(rejects)} of {total} rows rejected, more than data.max_error_share="
                          f"{data.max_error_share}; see {ctx.run.join(NAME, 'rejects.jsonl')}")
    ctx.run.write_rows(questions_table(train_questions), NAME, "train")
    ctx.run.write_rows(questions_table(test_questions), NAME, "test")
