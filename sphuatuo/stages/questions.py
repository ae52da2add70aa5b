"""Load the question banks, validate every row, and split train / test.

Invalid rows never stop the load: they go to `questions/rejects.jsonl` with file, row and reason; so
does a question repeated within or across the files of a split. The load fails when the rejected
share passes `data.max_error_share`, and when one question (same id, or same stem and options) is in
both train and test, since every test score would then be inflated.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict

from sphuatuo.data.loaders import LoadResult, load_questions, merge_loads, resolve_source_path
from sphuatuo.data.questions import questions_table
from sphuatuo.recipe import QuestionSource
from sphuatuo.stages import StageContext, StageFailed

NAME = "questions"
CONFIG = ("data", "seed")
READS = ()


def load_sources(sources: list[QuestionSource]) -> LoadResult:
    """Every source's questions (each cut to its `limit`), a question already loaded from an earlier
    source rejected as its duplicate."""
    results = []
    for source in sources:
        result = load_questions(resolve_source_path(source.path), format=source.columns or source.format,
                                source=source.source)
        if source.limit:
            result.questions = result.questions[: source.limit]
        results.append(result)
    return merge_loads(results)


def shared_questions(train: LoadResult, test: LoadResult) -> list[str]:
    """Each test question also in train (same id, or same normalised stem and options), naming both places."""
    train_ids = {q.id: q for q in train.questions}
    train_content = {q.content_key(): q for q in train.questions}
    shared = []
    for question in test.questions:
        twin = train_ids.get(question.id) or train_content.get(question.content_key())
        if twin is not None:
            (train_file, train_row), (test_file, test_row) = train.origins[twin.id], test.origins[question.id]
            shared.append(f"train {train_file} row {train_row} (id {twin.id}) = "
                          f"test {test_file} row {test_row} (id {question.id})")
    return shared


def run(ctx: StageContext) -> None:
    data = ctx.recipe.data
    train = load_sources(data.train)
    test = load_sources(data.test)
    shared = shared_questions(train, test)
    if shared:
        raise StageFailed(f"{len(shared)} question(s) in both train and test: " + "; ".join(shared[:3]))
    train_questions, test_questions = train.questions, test.questions
    if not data.test and data.test_fraction:
        shuffled = sorted(train_questions, key=lambda q: q.id)
        random.Random(ctx.recipe.seed).shuffle(shuffled)
        held_out = round(len(shuffled) * data.test_fraction)
        test_questions, train_questions = shuffled[:held_out], shuffled[held_out:]

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
