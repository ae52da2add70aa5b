"""`sphuatuo data convert`: any question file a format or mapping reads, as the native JSONL or as a
Hugging Face `datasets` Parquet file, so a cleaned bank is loaded once and shared without its loader.

The rejects go beside the output (`OUT` with the suffix `.rejects.jsonl`), so nothing dropped is
silent; the Parquet file uses `QUESTION_SCHEMA` (options as a list of {letter, text}, metadata as
JSON text), which `datasets.Dataset.from_parquet` and `sphuatuo`'s own native format both read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pyarrow.parquet as pq

from sphuatuo.data.loaders import LoadResult, load_questions, resolve_source_path, write_rejects
from sphuatuo.data.mapping import ColumnMapping
from sphuatuo.data.questions import questions_table

OutputKind = Literal["jsonl", "parquet"]


def rejects_path(out: Path) -> Path:
    """Where the rejects of a conversion to `out` go."""
    return out.with_suffix(".rejects.jsonl")


def convert(src: str, out: Path, format: str | ColumnMapping | None = None,
            to: OutputKind | None = None) -> LoadResult:
    """Load `src` and write its questions to `out` (`to` defaults from the suffix: .parquet, else JSONL)."""
    result = load_questions(resolve_source_path(src), format=format)
    kind = to or ("parquet" if out.suffix.lower() in (".parquet", ".pq") else "jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    if kind == "parquet":
        pq.write_table(questions_table(result.questions), out)
    else:
        with out.open("w", encoding="utf-8") as handle:
            for question in result.questions:
                handle.write(json.dumps(question.model_dump(mode="json"), ensure_ascii=False) + "\n")
    write_rejects(result.rejects, rejects_path(out))
    return result
