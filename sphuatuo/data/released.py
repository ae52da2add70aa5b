"""The datasets the HuatuoGPT-o1 authors released, as stage inputs, so a run can start at the search, at SFT
or at RL instead of regenerating what they published.

- verifiable problems (medical-o1-verifiable-problem): "Open-ended Verifiable Question", "Ground-True Answer";
- SFT paths (medical-o1-reasoning-SFT): "Question", "Complex_CoT", "Response".

Any container `sphuatuo.data.files` reads (JSON array, JSONL, Parquet, a `datasets` folder). A record that
lacks a field or holds an empty one is rejected with its file, row and reason; the others are kept.

An SFT file may say where its rows come from in a `source` column: the project's own examples in the o1 format
(`builtin:o1_format_examples`) say `project-written`; a file without the column counts as `released`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sphuatuo.data.files import file_kind, read_records
from sphuatuo.data.loaders import Reject, resolve_source_path
from sphuatuo.data.questions import Question

PROBLEM, GROUND_TRUTH = "Open-ended Verifiable Question", "Ground-True Answer"
QUESTION, COMPLEX_COT, RESPONSE = "Question", "Complex_CoT", "Response"
SOURCE = "source"

Row = dict[str, Any]


@dataclass
class Released:
    rows: list[Row] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)


def _read(location: str, columns: tuple[str, ...], optional: tuple[str, ...] = ()
          ) -> tuple[list[tuple[str, int, dict[str, str]]], list[Reject]]:
    kept, rejects = [], []
    path = resolve_source_path(location)
    for record in read_records(path, file_kind(path)):  # a record's own `id`, else `<file>:<row>`
        if record.fields is None:
            rejects.append(Reject(location, record.row, record.id, record.problem, record.raw))
            continue
        missing = [column for column in columns if not str(record.fields.get(column) or "").strip()]
        if missing:
            rejects.append(Reject(location, record.row, record.id, f"missing or empty: {', '.join(missing)}",
                                  record.raw))
            continue
        kept.append((record.id or f"{location}:{record.row}", record.row,
                     {column: value for column in (*columns, *optional)
                      if (value := str(record.fields.get(column) or "").strip())}))
    return kept, rejects


def verifiable_problems(location: str) -> Released:
    """Open-ended problems with a short ground truth: the rows the search and RL read."""
    kept, rejects = _read(location, (PROBLEM, GROUND_TRUTH))
    rows = [{**Question(id=qid, question=fields[PROBLEM], reference=fields[GROUND_TRUTH], source="released").to_row(),
             "problem": fields[PROBLEM], "ground_truth": fields[GROUND_TRUTH], "filter_verdict": None}
            for qid, _, fields in kept]
    return Released(rows, rejects)


def sft_paths(location: str) -> Released:
    """Question, complex chain of thought and response: the rows SFT trains on, as the search writes them, each
    with its `origin` (the file's `source` column, else `released`)."""
    kept, rejects = _read(location, (QUESTION, COMPLEX_COT, RESPONSE), optional=(SOURCE,))
    rows = []
    for qid, _, fields in kept:
        origin = fields.get(SOURCE, "released")
        rows.append({"id": qid, "problem": fields[QUESTION], "complex_cot": fields[COMPLEX_COT],
                     "response": fields[RESPONSE], "generator": f"{origin}:{location}", "label_revealed": False,
                     "origin": origin})
    return Released(rows, rejects)
