"""Load exam questions from the formats the recipes train and evaluate on, keeping the bad rows apart.

Public datasets are messy: a few rows in a large file have no answer, an answer letter that is not
an option, or broken bytes. A load never fails for such a row: it returns the good rows as
`Question`s and every bad one as a `Reject` saying where it is and what is wrong, so one bad row
costs one row, and the user can fix the file from the reject list. Only a problem with the whole
file (missing, not JSON at all, the wrong top-level shape, a CSV without the needed columns) raises
`ValueError`.

Formats (`FORMATS`):

- ``sphuatuo``: native JSONL, one `Question` object per line (exactly its fields).
- ``cmexam``: CMExam CSV with columns Question, Options, Answer, Explanation (+ any others, kept in
  `metadata`); Options holds one ``A text`` line per option.
- ``huatuo_o1_eval``: the HuatuoGPT-o1 evaluation JSON, ``{source: [{question, options,
  answer_idx, answer}, ...], ...}``.
- ``medqa``: MedQA JSONL, ``{question, options, answer_idx, answer, meta_info?}`` per line.
- ``medmcqa``: MedMCQA JSONL, either like MedQA or the original ``opa..opd`` + ``cop`` (1-based).
- ``sp_conversations``: SP-Huatuo conversations JSON, a list of ``{id, conversations}`` whose
  assistant turn reads ``答案是：<answer>。这是一些相关的背景信息：<background>`` (open-ended items).

Text is decoded as UTF-8 record by record: a record holding bytes that are not valid UTF-8 is
rejected as "undecodable text (invalid UTF-8)" while the rest of the file loads.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sphuatuo.data.questions import Question

RAW_LIMIT = 2000
"""Characters of the raw record kept in a `Reject` (enough to find and fix it, small enough to print)."""

# Invalid bytes decode to lone surrogates under "surrogateescape"; JSON "\udcxx" escapes give the same.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Reject:
    """A record that could not become a `Question`.

    `row` is the 1-based record number in the file: the line number for JSONL (blank lines count),
    the data row number for CSV (the header row is not counted; a quoted cell spanning several lines
    is still one row), and the position in the file's item lists for JSON (counted across all
    lists, in file order).
    """

    file: str
    row: int
    id: str | None
    reason: str
    raw: str


@dataclass
class LoadResult:
    """The questions a file yielded, and the records it could not."""

    questions: list[Question] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)


@dataclass(frozen=True)
class _Record:
    """One record as read from its container, before any checks on its content."""

    row: int
    raw: str
    id: str | None = None
    fields: Mapping[str, Any] | None = None
    problem: str = ""  # why the record could not be read at all (then `fields` is None)
    source: str | None = None  # the source the file names for this record, if any


class _BadRecord(ValueError):
    """A record whose content cannot make a question; the message is the user-facing reason."""


SAMPLE_BANK = "builtin:sample_bank"


def resolve_source_path(path: str) -> str:
    """A question file's path; `builtin:sample_bank` is the bank the package ships."""
    if path == SAMPLE_BANK:
        return str(resources.files("sphuatuo.data").joinpath("sample_bank.jsonl"))
    return path


def load_questions(path: str | Path, format: str | None = None, source: str | None = None) -> LoadResult:
    """Read every question in `path`, rejecting bad records instead of failing on them.

    `format` is one of `FORMATS`, or None to detect it from the extension and the content:

    - ``.csv``: cmexam.
    - ``.jsonl``: the first line that is a JSON object decides: ``opa``/``cop``/``subject_name``
      keys mean medmcqa; otherwise ``answer_idx`` means medqa (MedQA-style MedMCQA rows load the
      same way); only `Question` field names, including ``id`` and ``question``, mean sphuatuo.
    - ``.json``: an object whose values are all lists means huatuo_o1_eval; a list whose first
      item has ``conversations`` means sp_conversations.
    - anything else raises ValueError naming the file; pass `format` then.

    `source` names the source of records whose file does not name one (the keys of a
    HuatuoGPT-o1 eval file and a native item's own `source` win); it defaults to the format name.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    text = path.read_bytes().decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    format = format or _detect_format(path, text)
    if format not in _FORMATS:
        raise ValueError(f"{path}: unknown format {format!r}; expected one of {', '.join(FORMATS)}")
    read, build = _FORMATS[format]
    fallback_source = source or format

    result = LoadResult()
    first_row_of: dict[str, int] = {}

    def reject(record: _Record, reason: str) -> None:
        raw = _LONE_SURROGATE.sub("\ufffd", record.raw)
        if len(raw) > RAW_LIMIT:
            raw = raw[:RAW_LIMIT] + "…"
        result.rejects.append(Reject(str(path), record.row, record.id, reason, raw))

    for record in read(path, text):
        if record.fields is None:
            reject(record, record.problem)
            continue
        if _LONE_SURROGATE.search(json.dumps(record.fields, ensure_ascii=False)):
            reject(record, "undecodable text (invalid UTF-8)")
            continue
        try:
            question = build(record, record.source or fallback_source)
        except ValidationError as error:
            reject(record, _explain(error))
            continue
        except _BadRecord as error:
            reject(record, str(error))
            continue
        if question.id in first_row_of:
            reject(record, f"duplicate id {question.id!r} (first seen at row {first_row_of[question.id]})")
            continue
        first_row_of[question.id] = record.row
        result.questions.append(question)
    return result


def write_rejects(rejects: Sequence[Reject], path: str | Path) -> None:
    """Write rejects as JSONL (one object per reject) so they can be reviewed, fixed and reloaded."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for item in rejects:
            out.write(json.dumps(asdict(item), ensure_ascii=False) + "\n")


def summarize(result: LoadResult) -> str:
    """A short human report of a load: counts, kinds and sources of the questions, then each reject."""
    questions = result.questions
    multiple_choice = sum(q.is_multiple_choice for q in questions)
    lines = [
        f"{len(questions)} valid, {len(result.rejects)} rejected",
        f"{multiple_choice} multiple-choice, {len(questions) - multiple_choice} open-ended",
    ]
    sources = Counter(q.source for q in questions)
    if sources:
        lines.append("sources: " + ", ".join(f"{name} {count}" for name, count in sorted(sources.items())))
    for item in result.rejects:
        where = f"row {item.row}" if item.id is None else f"row {item.row} (id {item.id})"
        lines.append(f"{where}: {item.reason}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Containers: split a file into records, each with its row number and raw text.


def _jsonl_records(text: str, id_prefix: str | None) -> Iterator[_Record]:
    """One record per non-blank line; `id_prefix` makes `<prefix>-<line>` ids for lines without one."""
    # Not splitlines(): it also splits at U+2028 and friends, which may sit inside a JSON string.
    for row, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        fallback_id = f"{id_prefix}-{row}" if id_prefix else None
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            yield _Record(row, line, fallback_id, problem=f"malformed JSON: {error.msg} at column {error.colno}")
            continue
        if not isinstance(value, dict):
            yield _Record(row, line, fallback_id, problem=f"expected a JSON object, got {_json_type(value)}")
            continue
        yield _Record(row, line, _explicit_id(value, "id") or fallback_id, value)


def _json_document(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error


def _json_item(row: int, item: Any, fallback_id: str, source: str | None = None) -> _Record:
    raw = json.dumps(item, ensure_ascii=False)
    if not isinstance(item, dict):
        return _Record(row, raw, fallback_id, problem=f"expected a JSON object, got {_json_type(item)}")
    return _Record(row, raw, _explicit_id(item, "id") or fallback_id, item, source=source)


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _explicit_id(fields: Mapping[str, Any], key: str) -> str | None:
    value = fields.get(key)
    if value is None:
        return None
    return str(value).strip() or None


def _require(fields: Mapping[str, Any], *names: str) -> None:
    missing = [name for name in names if fields.get(name) is None]
    if missing:
        raise _BadRecord(f"missing field(s): {', '.join(missing)}")


def _explain(error: ValidationError) -> str:
    """Turn pydantic's error list into one sentence a user can act on."""
    parts = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        if item["type"] == "missing":
            parts.append(f"missing field(s): {where}")
        elif item["type"] == "extra_forbidden":
            parts.append(f"unexpected field {where!r}")
        elif item["type"] == "value_error":
            parts.append(str(item["ctx"]["error"]))
        else:
            parts.append(f"{where}: {item['msg']}")
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------
# Native JSONL.


def _native_records(path: Path, text: str) -> Iterator[_Record]:
    return _jsonl_records(text, id_prefix=None)


def _from_native(record: _Record, source: str) -> Question:
    fields = dict(record.fields or {})
    if "answer" in fields:
        _answer_letters(fields["answer"], "answer")
    if not fields.get("source"):
        fields["source"] = source
    return Question.model_validate(fields)


# ---------------------------------------------------------------------------------------------
# CMExam CSV.

# Column names matched case-insensitively; every other column goes to `metadata` under its own name.
_CMEXAM_COLUMNS = {name.lower(): name for name in ("Question", "Options", "Answer", "Explanation", "id")}
_CMEXAM_REQUIRED = ("Question", "Options", "Answer")
_OPTION_LINE = re.compile(r"^\s*([A-Za-z])\s*(?:[.、:：．]|\s)\s*(.*)$")


def _cmexam_records(path: Path, text: str) -> Iterator[_Record]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty CSV file, expected a header row")
        columns = [_CMEXAM_COLUMNS.get(name.strip().lower(), name.strip()) for name in header]
        missing = [name for name in _CMEXAM_REQUIRED if name not in columns]
        if missing:
            raise ValueError(f"{path}: CSV header lacks column(s) {', '.join(missing)}; it has {', '.join(header)}")
        for row, cells in enumerate(reader, start=1):
            if not any(cell.strip() for cell in cells):
                continue
            raw = io.StringIO()
            csv.writer(raw, lineterminator="").writerow(cells)
            fields = dict(zip(columns, cells))
            fallback_id = _explicit_id(fields, "id") or f"cmexam-{row}"
            if len(cells) > len(columns):
                problem = f"{len(cells)} cells but the header has {len(columns)} columns (an unquoted comma?)"
                yield _Record(row, raw.getvalue(), fallback_id, problem=problem)
                continue
            yield _Record(row, raw.getvalue(), fallback_id, fields)
    except csv.Error as error:
        raise ValueError(f"{path}: unreadable CSV near line {reader.line_num} ({error})") from error


def _from_cmexam(record: _Record, source: str) -> Question:
    fields = record.fields or {}
    _require(fields, *_CMEXAM_REQUIRED)
    known = set(_CMEXAM_COLUMNS.values())
    metadata = {key: value.strip() for key, value in fields.items() if key and key not in known and value.strip()}
    return Question(
        id=record.id or "",
        question=fields["Question"],
        options=_parse_option_lines(fields["Options"]),
        answer=fields["Answer"],
        explanation=fields.get("Explanation", "").strip(),
        source=source,
        metadata=metadata,
    )


def _parse_option_lines(text: str) -> dict[str, str]:
    """`A text` lines to {letter: text}; a line without a letter continues the option above it."""
    options: dict[str, str] = {}
    letter = None
    for line in text.splitlines():
        if not line.strip():
            continue
        match = _OPTION_LINE.match(line)
        if match:
            letter = match.group(1).upper()
            if letter in options:
                raise _BadRecord(f"option {letter} appears twice in Options")
            options[letter] = match.group(2)
        elif letter is None:
            raise _BadRecord(f"Options does not start with an option letter: {line.strip()[:40]!r}")
        else:
            options[letter] = f"{options[letter]} {line.strip()}"
    return options


# ---------------------------------------------------------------------------------------------
# MedQA / MedMCQA JSONL and the HuatuoGPT-o1 eval JSON (which holds MedQA-style items).


def _medqa_records(path: Path, text: str) -> Iterator[_Record]:
    return _jsonl_records(text, id_prefix="medqa")


def _medmcqa_records(path: Path, text: str) -> Iterator[_Record]:
    return _jsonl_records(text, id_prefix="medmcqa")


def _o1_eval_records(path: Path, text: str) -> Iterator[_Record]:
    """Items of every source list, in file order; ids are `<source>-<1-based index in its list>`."""
    document = _json_document(path, text)
    if not isinstance(document, dict):
        raise ValueError(
            f"{path}: expected a JSON object mapping source names to item lists, got {_json_type(document)}"
        )
    bad = [name for name, items in document.items() if not isinstance(items, list)]
    if bad:
        raise ValueError(f"{path}: the value of {', '.join(map(repr, bad))} is not a list of items")
    row = 0
    for name, items in document.items():
        for index, item in enumerate(items, start=1):
            row += 1
            yield _json_item(row, item, f"{name}-{index}", source=name)


def _from_medqa(record: _Record, source: str) -> Question:
    fields = record.fields or {}
    _require(fields, "question", "options", "answer_idx")
    meta_info = fields.get("meta_info")
    if isinstance(meta_info, dict):
        metadata = {str(key): str(value) for key, value in meta_info.items() if value is not None}
    elif meta_info in (None, ""):
        metadata = {}
    else:
        metadata = {"meta_info": str(meta_info)}
    return Question(
        id=record.id or "",
        question=fields["question"],
        options=_option_map(fields["options"]),
        answer=_answer_letters(fields["answer_idx"], "answer_idx"),
        explanation=fields.get("explanation") or "",
        source=source,
        metadata=metadata,
    )


_MEDMCQA_OPTIONS = {"A": "opa", "B": "opb", "C": "opc", "D": "opd"}
_MEDMCQA_METADATA = ("subject_name", "topic_name", "choice_type")


def _from_medmcqa(record: _Record, source: str) -> Question:
    """Original MedMCQA rows (`opa`..`opd`, `cop` 1-based: 1 = opa) or MedQA-style rows."""
    fields = record.fields or {}
    if "options" in fields:
        _require(fields, "question", "options", "answer_idx")
        options, answer = _option_map(fields["options"]), _answer_letters(fields["answer_idx"], "answer_idx")
    else:
        _require(fields, "question", *_MEDMCQA_OPTIONS.values(), "cop")
        options = {letter: fields[key] for letter, key in _MEDMCQA_OPTIONS.items()}
        cop = fields["cop"]
        if isinstance(cop, bool) or not isinstance(cop, int) or not 1 <= cop <= len(options):
            raise _BadRecord(f"cop must be an option number from 1 (opa) to {len(options)} (opd), got {cop!r}")
        answer = (tuple(_MEDMCQA_OPTIONS)[cop - 1],)
    return Question(
        id=record.id or "",
        question=fields["question"],
        options=options,
        answer=answer,
        explanation=fields.get("exp") or fields.get("explanation") or "",
        source=source,
        metadata={key: str(fields[key]) for key in _MEDMCQA_METADATA if fields.get(key) not in (None, "")},
    )


def _option_map(options: Any) -> dict[str, Any]:
    if not isinstance(options, dict):
        raise _BadRecord(f"options must be an object mapping letters to text, got {_json_type(options)}")
    return options


def _answer_letters(value: Any, name: str) -> str | list[str]:
    """Let only letter strings through: `Question` would crash with a TypeError on a bare number."""
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return value
    raise _BadRecord(f"{name} must be option letter(s), got {value!r}")


# ---------------------------------------------------------------------------------------------
# SP-Huatuo conversations JSON (open-ended).

_USER_ROLES = {"user", "human"}
_ASSISTANT_ROLES = {"assistant", "gpt"}
_SP_ANSWER = re.compile(
    r"^\s*答案是[：:]\s*(?P<answer>.*?)[。.]?\s*这是一些相关的背景信息[：:]\s*(?P<background>.*?)\s*$", re.S
)


def _sp_records(path: Path, text: str) -> Iterator[_Record]:
    document = _json_document(path, text)
    if not isinstance(document, list):
        raise ValueError(f"{path}: expected a JSON list of conversations, got {_json_type(document)}")
    for row, item in enumerate(document, start=1):
        yield _json_item(row, item, f"sp_conversations-{row}")


def _from_conversation(record: _Record, source: str) -> Question:
    """The first user turn is the question; the assistant turn after it holds answer and background."""
    fields = record.fields or {}
    _require(fields, "conversations")
    turns = fields["conversations"]
    if not isinstance(turns, list) or not all(isinstance(turn, dict) for turn in turns):
        raise _BadRecord("conversations must be a list of {from, value} objects")
    roles = [str(turn.get("from", "")).lower() for turn in turns]
    asked = next((i for i, role in enumerate(roles) if role in _USER_ROLES), None)
    if asked is None:
        raise _BadRecord("conversations has no user turn")
    replied = next((i for i in range(asked + 1, len(turns)) if roles[i] in _ASSISTANT_ROLES), None)
    if replied is None:
        raise _BadRecord("conversations has no assistant turn after the user turn")
    if not isinstance(turns[asked].get("value"), str) or not isinstance(turns[replied].get("value"), str):
        raise _BadRecord("a conversation turn has no text in its value field")
    reply = turns[replied]["value"]
    match = _SP_ANSWER.match(reply)
    reference, explanation = (match["answer"], match["background"]) if match else (reply.strip(), "")
    return Question(
        id=record.id or "",
        question=turns[asked]["value"],
        reference=reference.strip(),
        explanation=explanation,
        source=source,
    )


# ---------------------------------------------------------------------------------------------
# Format table and detection.

_FORMATS: dict[str, tuple[Callable[[Path, str], Iterator[_Record]], Callable[[_Record, str], Question]]] = {
    "sphuatuo": (_native_records, _from_native),
    "cmexam": (_cmexam_records, _from_cmexam),
    "huatuo_o1_eval": (_o1_eval_records, _from_medqa),
    "medqa": (_medqa_records, _from_medqa),
    "medmcqa": (_medmcqa_records, _from_medmcqa),
    "sp_conversations": (_sp_records, _from_conversation),
}
FORMATS: tuple[str, ...] = tuple(_FORMATS)

_QUESTION_FIELDS = frozenset(Question.model_fields)


def _detect_format(path: Path, text: str) -> str:
    """Tell the format from the extension, then from the first readable record (rules: `load_questions`)."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return "cmexam"
    if suffix == ".jsonl":
        for line in text.split("\n"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                keys = set(value)
                if keys & {"opa", "cop", "subject_name"}:
                    return "medmcqa"
                if "answer_idx" in keys:
                    return "medqa"
                if {"id", "question"} <= keys <= _QUESTION_FIELDS:
                    return "sphuatuo"
                break
    elif suffix == ".json":
        document = _json_document(path, text)
        if isinstance(document, dict) and document and all(isinstance(v, list) for v in document.values()):
            return "huatuo_o1_eval"
        if isinstance(document, list) and document and isinstance(document[0], dict) and "conversations" in document[0]:
            return "sp_conversations"
    raise ValueError(f"{path}: cannot tell the question format; pass format= one of {', '.join(FORMATS)}")
