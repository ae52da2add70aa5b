"""Load the question banks, validate every row, and split train / test.

Invalid rows never stop the load: they go to `questions/rejects.jsonl` with file, row and reason; so
does a question repeated within or across the files of a split. The load fails when the rejected
share passes `data.max_error_share`, and when one question (same id, or same stem and options) is in
both train and test, since every test score would then be inflated.

The files are read, and the splits written, by a task on a worker of the driver's node (where a recipe's local
paths are valid): the driver learns counts and the first rejects, never the questions.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from sphuatuo.data.loaders import Reject, SeenQuestions, iter_questions, rejects_jsonl, resolve_source_path
from sphuatuo.data.questions import Question, questions_table
from sphuatuo.recipe import DataConfig, QuestionSource
from sphuatuo.stages import StageContext, StageFailed
from sphuatuo.store.datasets import near_driver
from sphuatuo.store.run_root import RunRoot

NAME = "questions"
CONFIG = ("data", "seed")
READS = ()

PART_ROWS = 5_000
"""Questions per Parquet file of a split: the stage holds one such piece at a time, whatever the bank's size."""


class SplitWriter:
    """A split's questions, written as they are loaded in pieces of `part_rows` under fixed names
    (`part-00000.parquet`, `part-00001.parquet`, …), so a re-run of the stage replaces its files and never adds rows."""

    def __init__(self, run: RunRoot, split: str, part_rows: int = PART_ROWS):
        self.run, self.split, self.part_rows = run, split, part_rows
        self.pending: list[Question] = []
        self.parts = 0

    def add(self, question: Question) -> None:
        self.pending.append(question)
        if len(self.pending) == self.part_rows:
            self._flush()

    def _flush(self) -> None:
        self.run.write_rows(questions_table(self.pending), NAME, self.split, part=self.parts)
        self.parts += 1
        self.pending = []

    def close(self) -> None:
        if self.pending or not self.parts:  # an empty split still gets its (empty) file
            self._flush()


def load_split(sources: list[QuestionSource], writer: SplitWriter, seen: SeenQuestions, rejects: list[Reject],
               train: SeenQuestions | None = None) -> list[str]:
    """Stream every source's questions (each cut to its `limit`; its rejects all counted) into `writer`,
    remembering them in `seen`. A question already loaded from an earlier source is rejected as its duplicate.
    For a test split, `train` holds the training questions: each test question also in train (same id, or same
    normalised stem and options) is left out and returned, naming both places."""
    shared = []
    for source in sources:
        kept = 0
        for item in iter_questions(resolve_source_path(source.path), format=source.columns or source.format,
                                   source=source.source):
            if isinstance(item, Reject):
                rejects.append(item)
                continue
            if source.limit and kept == source.limit:
                continue
            kept += 1
            duplicate = seen.duplicate(item)
            twin = None if duplicate or train is None else train.earlier(item.question)
            if duplicate:
                rejects.append(item.rejected(duplicate))
            elif twin is not None:
                shared.append(f"train {twin[0]} row {twin[1]} (id {twin[2]}) = "
                              f"test {item.file} row {item.row} (id {item.question.id})")
            else:
                writer.add(item.question)
    writer.close()
    return shared


def hold_out(run: RunRoot, test_ids: set[str]) -> None:
    """Move the held-out questions from the train split's files to the test split's, one piece at a time (a
    piece keeps its number in both, so doing it again after a crash gives the same files)."""
    held_ids = pa.array(sorted(test_ids), pa.string())
    for part, file in enumerate(run.parquet_files(NAME, "train")):  # SplitWriter's pieces, in order
        table = run.read_parquet_file(file)
        held = pc.is_in(table["id"], value_set=held_ids)
        run.write_rows(table.filter(held), NAME, "test", part=part)
        run.write_rows(table.filter(pc.invert(held)), NAME, "train", part=part)


@dataclass(frozen=True)
class LoadedBank:
    """What the driver learns of a load: counts, and the few rows it names in its log."""

    train: int
    test: int
    rejected: int
    first_rejects: tuple[Reject, ...]
    shared: tuple[str, ...]  # train = test pairs, the first three
    shared_count: int


def load_bank(run: RunRoot, data: DataConfig, seed: int, part_rows: int) -> LoadedBank:
    """Load the train and test sources into `questions/train` and `questions/test` (with the rejects), holding out
    `data.test_fraction` of train when no test source is named, unless a question is in both (the stage then fails).
    Runs where the files are (`near_driver`)."""
    rejects: list[Reject] = []
    train, test = SeenQuestions(), SeenQuestions()
    load_split(data.train, SplitWriter(run, "train", part_rows), train, rejects)
    shared = load_split(data.test, SplitWriter(run, "test", part_rows), test, rejects, train=train)
    train_count, test_count = len(train.by_id), len(test.by_id)
    if not shared and not data.test and data.test_fraction:
        shuffled = sorted(train.by_id)
        random.Random(seed).shuffle(shuffled)
        held_out = shuffled[:round(len(shuffled) * data.test_fraction)]
        hold_out(run, set(held_out))
        train_count, test_count = train_count - len(held_out), len(held_out)
    run.write_text(rejects_jsonl(rejects), NAME, "rejects.jsonl")
    return LoadedBank(train_count, test_count, len(rejects), tuple(rejects[:20]), tuple(shared[:3]), len(shared))


def run(ctx: StageContext) -> None:
    data = ctx.recipe.data
    bank = near_driver(load_bank, ctx.run, data, ctx.recipe.seed, PART_ROWS,
                       locations=[source.path for source in (*data.train, *data.test)],
                       credentials=ctx.recipe.storage.credentials)
    if bank.shared_count:
        raise StageFailed(f"{bank.shared_count} question(s) in both train and test: " + "; ".join(bank.shared))
    total = bank.train + bank.test + bank.rejected
    ctx.record.rows_in = total
    ctx.record.rows_out = bank.train + bank.test
    ctx.record.rows_rejected = bank.rejected
    ctx.record.details.update(train=bank.train, test=bank.test)
    for reject in bank.first_rejects:
        ctx.note(f"rejected {reject.file} row {reject.row}: {reject.reason}")
    if total and bank.rejected / total > data.max_error_share:
        raise StageFailed(f"{bank.rejected} of {total} rows rejected, more than data.max_error_share="
                          f"{data.max_error_share}; see {ctx.run.join(NAME, 'rejects.jsonl')}")
