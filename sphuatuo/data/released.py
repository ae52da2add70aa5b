"""The datasets the HuatuoGPT-o1 authors released, as stage inputs, so a run can start at the search, at SFT
or at RL instead of regenerating what they published.

- verifiable problems (medical-o1-verifiable-problem): "Open-ended Verifiable Question", "Ground-True Answer";
- SFT paths (medical-o1-reasoning-SFT): "Question", "Complex_CoT", "Response".

Any container `sphuatuo.data.files` reads (JSON array, JSONL, Parquet, a `datasets` folder). A record that
lacks a field or holds an empty one is rejected with its file, row and reason; the others are kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sphuatuo.data.files import file_kind, read_records
from sphuatuo.data.loaders import Reject
from sphuatuo.data.questions import Question

PROBLEM, GROUND_TRUTH = "Open-ended Verifiable Question", "Ground-True Answer"
QUESTION, COMPLEX_COT, RESPONSE = "Question", "Complex_CoT", "Response"

Row = dict[str, Any]


@dataclass
class Released:
    rows: list[Row] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)


def _read(location: str, columns: tuple[str, ...]) -> tuple[list[tuple[str, int, dict[str, str]]], list[Reject]]:
    kept, rejects = [], []
    for record in read_records(location, file_kind(location), id_column=None):
        if record.fields is None:
            rejects.append(Reject(location, record.row, record.id, record.problem, record.raw))
            continue
        missing = [column for column in columns if not str(record.fields.get(column) or "").strip()]
        if missing:
            rejects.append(Reject(location, record.row, record.id, f"missing or empty: {', '.join(missing)}",
                                  record.raw))
            continue
        kept.append((record.id or f"{location}:{record.row}", record.row,
                     {column: str(record.fields[column]).strip() for column in columns}))
    return kept, rejects


def verifiable_problems(location: str) -> Released:
    """Open-ended problems with a short ground truth: the rows the search and RL read."""
    kept, rejects = _read(location, (PROBLEM, GROUND_TRUTH))
    rows = [{**Question(id=qid, question=fields[PROBLEM], reference=fields[GROUND_TRUTH], source="released").to_row(),
             "problem": fields[PROBLEM], "ground_truth": fields[GROUND_TRUTH], "filter_verdict": None}
            for qid, _, fields in kept]
    return Released(rows, rejects)


def sft_paths(location: str) -> Released:
    """Question, complex chain of thought and response: the rows SFT trains on, as the search writes them."""
    kept, rejects = _read(location, (QUESTION, COMPLEX_COT, RESPONSE))
    rows = [{"id": qid, "problem": fields[QUESTION], "complex_cot": fields[COMPLEX_COT], "response": fields[RESPONSE],
             "generator": f"released:{location}", "label_revealed": False} for qid, _, fields in kept]
    return Released(rows, rejects)
