"""Load exam questions from any file the recipes train and evaluate on, keeping the bad rows apart.

Public datasets are messy: a few rows in a large file have no answer, an answer letter that is not
an option, broken bytes, or the same question twice. A load never fails for such a row: it returns
the good rows as `Question`s and every bad one as a `Reject` saying where it is and what is wrong,
so one bad row costs one row, and the user can fix the file from the reject list. Only a problem
with the whole file (missing, not JSON at all, the wrong top-level shape, a CSV without the needed
columns, a format nobody can tell) raises `ValueError`.

Formats live in one registry (`BUILTIN_FORMATS`), each entry either a `ColumnMapping` (a file
described by its columns, see `sphuatuo.data.mapping`) or a `SpecialFormat` (a file that needs code):

- ``sphuatuo``: native, one `Question` object per record (exactly its fields); JSONL or the Parquet
  that `sphuatuo data convert` writes. Special: it checks the exact field set.
- ``cmexam``: CMExam CSV with columns Question, Options, Answer, Explanation (+ any others, kept in
  `metadata`), matched case-insensitively; Options holds one ``A text`` line per option. Special.
- ``huatuo_o1_eval``: the HuatuoGPT-o1 evaluation JSON, ``{source: [{question, options,
  answer_idx, answer}, ...], ...}``. Special container, items read by the ``medqa`` mapping.
- ``medqa``: ``{question, options, answer_idx, meta_info?}`` records. Mapping.
- ``medmcqa_original``: MedMCQA's released layout ``opa..opd`` + ``cop`` counted from 1. Mapping.
- ``medmcqa_hf``: the same layout as on the Hugging Face hub, ``cop`` counted from 0. Mapping.
- ``medmcqa``: rows of either ``medmcqa_original`` or MedQA style in one file. Special (per row).
- ``sp_conversations``: SP-Huatuo conversations JSON, a list of ``{id, conversations}`` whose
  assistant turn reads ``答案是：<answer>。这是一些相关的背景信息：<background>`` (open-ended). Special.

Every mapped file may be a JSON array, JSONL, CSV, Parquet or a `datasets` save_to_disk folder, local
or behind a pyarrow filesystem URI (`sphuatuo.data.files`). Text is decoded as UTF-8 record by record:
a record holding bytes that are not valid UTF-8 is rejected as "undecodable text (invalid UTF-8)".
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from sphuatuo.data import files
from sphuatuo.data.files import BadRecord, Record
from sphuatuo.data.mapping import ColumnMapping, parse_option_lines
from sphuatuo.data.questions import Question

RAW_LIMIT = 2000
"""Characters of the raw record kept in a `Reject` (enough to find and fix it, small enough to print)."""

SAMPLE_ROWS = 50
"""Records read to tell a file's format or to propose a mapping for it."""

# Invalid bytes decode to lone surrogates under "surrogateescape"; JSON "\udcxx" escapes give the same.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Reject:
    """A record that could not become a `Question`.

    `row` is the 1-based record number in the file: the line number for JSONL (blank lines count),
    the data row number for CSV (the header row is not counted; a quoted cell spanning several lines
    is still one row), the position in the file's item lists for JSON (counted across all lists, in
    file order), and the row of the table for Parquet and `datasets` folders.
    """

    file: str
    row: int
    id: str | None
    reason: str
    raw: str


@dataclass
class LoadResult:
    """The questions a file yielded and the records it could not."""

    questions: list[Question] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)


@dataclass(frozen=True)
class SpecialFormat:
    """A format that is not a plain column mapping: its container or its rows need code."""

    read: Callable[[str], Iterator[Record]]
    build: Callable[[Record, str], Question]


FormatEntry = ColumnMapping | SpecialFormat


class UnknownFormat(ValueError):
    """No registered format fits the file; `sample` holds its first records, to propose a mapping from."""

    def __init__(self, location: str, sample: list[Mapping[str, Any]]):
        self.sample = sample
        super().__init__(f"{location}: cannot tell the question format; name a format, one of "
                         f"{', '.join(BUILTIN_FORMATS)}, or a column mapping (`sphuatuo data check` proposes one)")


SAMPLE_BANK = "builtin:sample_bank"
O1_FORMAT_EXAMPLES = "builtin:o1_format_examples"
# The data files the package ships, by the names recipes give them.
BUILTIN_FILES = {SAMPLE_BANK: "sample_bank.jsonl", O1_FORMAT_EXAMPLES: "o1_format_examples.jsonl"}


def resolve_source_path(path: str) -> str:
    """A data file's path; `builtin:sample_bank` (the question bank) and `builtin:o1_format_examples` (the
    project-written SFT examples in the HuatuoGPT-o1 format) are files the package ships."""
    if path in BUILTIN_FILES:
        return str(resources.files("sphuatuo.data").joinpath(BUILTIN_FILES[path]))
    return path


@dataclass(frozen=True)
class Loaded:
    """A question and where it was read: its file and 1-based record number (see `Reject.row`)."""

    question: Question
    file: str
    row: int

    def rejected(self, reason: str) -> Reject:
        """This question turned away after it loaded (a duplicate of one in another file), with its row."""
        raw = json.dumps(self.question.to_row(), ensure_ascii=False)[:RAW_LIMIT]
        return Reject(self.file, self.row, self.question.id, reason, raw)


class SeenQuestions:
    """The questions kept so far, by id and by content (a digest of the normalised stem and options), each
    with the file, row and id where it was first seen: enough to name the first of two duplicates while
    holding a few dozen bytes per question, not the question."""

    def __init__(self) -> None:
        self.by_id: dict[str, tuple[str, int]] = {}
        self.by_content: dict[bytes, tuple[str, int, str]] = {}

    @staticmethod
    def digest(question: Question) -> bytes:
        return hashlib.blake2b(question.content_key().encode("utf-8"), digest_size=16).digest()

    def earlier(self, question: Question, digest: bytes | None = None) -> tuple[str, int, str] | None:
        """Where an earlier question with this id or this content (`digest`, computed when not given) was
        seen: (file, row, id)."""
        if question.id in self.by_id:
            return (*self.by_id[question.id], question.id)
        return self.by_content.get(digest or self.digest(question))

    def duplicate(self, loaded: Loaded) -> str | None:
        """Why `loaded` repeats a question seen before (None when it is new, which is then remembered)."""
        digest = self.digest(loaded.question)  # normalising the text is the costly part: once per question
        earlier = self.earlier(loaded.question, digest)
        if earlier is None:
            self.by_id[loaded.question.id] = (loaded.file, loaded.row)
            self.by_content[digest] = (loaded.file, loaded.row, loaded.question.id)
            return None
        file, row, _ = earlier
        if loaded.question.id in self.by_id:
            place = f"at row {row}" if file == loaded.file else f"in {file} row {row}"
            return f"duplicate id {loaded.question.id!r} (first seen {place})"
        return f"duplicate of {file} row {row}"


def iter_questions(path: str | Path, format: str | ColumnMapping | None = None,
                   source: str | None = None) -> Iterator[Loaded | Reject]:
    """Each record of `path` in file order, as a `Loaded` question or a `Reject`, one record at a time (the
    rules are `load_questions`'s): a file of any size is read in bounded memory."""
    location = str(path)
    files.require(location)
    name = None
    if isinstance(format, ColumnMapping):
        entry: FormatEntry = format
    else:
        name = format or _detect_format(location)
        if name not in BUILTIN_FORMATS:
            raise ValueError(f"{location}: unknown format {name!r}; expected one of {', '.join(BUILTIN_FORMATS)}")
        entry = BUILTIN_FORMATS[name]
    fallback_source = source or name or files.file_stem(location)
    if isinstance(entry, ColumnMapping):
        records, build = _mapped_records(location, entry), entry.question_from
    else:
        records, build = entry.read(location), entry.build

    def reject(record: Record, reason: str) -> Reject:
        raw = _LONE_SURROGATE.sub("\ufffd", record.raw)
        if len(raw) > RAW_LIMIT:
            raw = raw[:RAW_LIMIT] + "…"
        return Reject(location, record.row, record.id, reason, raw)

    seen = SeenQuestions()
    for record in records:
        if record.fields is None:
            yield reject(record, record.problem)
            continue
        if _LONE_SURROGATE.search(json.dumps(record.fields, ensure_ascii=False, default=str)):
            yield reject(record, "undecodable text (invalid UTF-8)")
            continue
        try:
            loaded = Loaded(build(record, record.source or fallback_source), location, record.row)
        except ValidationError as error:
            yield reject(record, _explain(error))
            continue
        except BadRecord as error:
            yield reject(record, str(error))
            continue
        duplicate = seen.duplicate(loaded)
        yield loaded if duplicate is None else reject(record, duplicate)


def load_questions(path: str | Path, format: str | ColumnMapping | None = None,
                   source: str | None = None) -> LoadResult:
    """Read every question in `path`, rejecting bad records instead of failing on them.

    `format` is a name in `BUILTIN_FORMATS`, a `ColumnMapping`, or None to detect it from the
    container and the first record's keys:

    - a JSON object whose values are all lists: huatuo_o1_eval; a JSON list whose first item has
      ``conversations``: sp_conversations; a CSV with Question, Options and Answer columns: cmexam.
    - otherwise the first record: a ``cop`` key, or ``subject_name`` with ``answer_idx``, means medmcqa
      (medmcqa_hf when the sampled ``cop`` values run 0-3 and include 0); ``answer_idx`` means medqa;
      only `Question` field names, including ``id`` and ``question``, mean sphuatuo.
    - anything else raises `UnknownFormat` naming the file.

    A record repeating an earlier one's id, or its question (same normalised stem and options), is
    rejected naming the first. `source` names the source of records whose file does not name one (the
    keys of a HuatuoGPT-o1 eval file and a native item's own `source` win); it defaults to the format
    name, or the file stem for an unnamed mapping.
    """
    result = LoadResult()
    for item in iter_questions(path, format, source):
        if isinstance(item, Reject):
            result.rejects.append(item)
        else:
            result.questions.append(item.question)
    return result


def sample_records(path: str | Path) -> list[Mapping[str, Any]]:
    """The fields of the file's first readable records, as a format detector or a person would look at them."""
    sample = []
    for record in _records_by_extension(str(path)):
        if record.fields is not None:
            sample.append(record.fields)
            if len(sample) == SAMPLE_ROWS:
                break
    return sample


def rejects_jsonl(rejects: Iterable[Reject]) -> str:
    """Rejects as JSONL text, one object per reject, so they can be reviewed, fixed and reloaded."""
    return "".join(json.dumps(asdict(item), ensure_ascii=False) + "\n" for item in rejects)


def write_rejects(rejects: Sequence[Reject], path: str | Path) -> None:
    """Write rejects as JSONL (`rejects_jsonl`) to a local file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(rejects_jsonl(rejects), encoding="utf-8")


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


def _mapped_records(location: str, mapping: ColumnMapping) -> Iterator[Record]:
    """Records for a mapping; a table (CSV, Parquet, datasets folder) lacking a needed column fails whole,
    rather than as one "missing field" reject per row."""
    kind = mapping.file or files.file_kind(location)
    checked = kind not in ("csv", "parquet", "hf_dataset")
    for record in files.read_records(location, kind, id_column=mapping.id, split=mapping.split):
        if not checked and record.fields is not None:
            missing = [name for name in mapping.required_columns() if name not in record.fields]
            if missing:
                raise ValueError(f"{location}: no column(s) {', '.join(missing)}; it has "
                                 f"{', '.join(record.fields)}")
            checked = True
        yield record


def _require(fields: Mapping[str, Any], *names: str) -> None:
    missing = [name for name in names if fields.get(name) is None]
    if missing:
        raise BadRecord(f"missing field(s): {', '.join(missing)}")


# ---------------------------------------------------------------------------------------------
# Native records (JSONL, or the Parquet `sphuatuo data convert` writes), and any file read by its extension.


def _records_by_extension(location: str) -> Iterator[Record]:
    return files.read_records(location, files.file_kind(location))


def _from_native(record: Record, source: str) -> Question:
    fields = dict(record.fields or {})
    if isinstance(fields.get("options"), list):  # Parquet rows: a list of {letter, text}, metadata as JSON
        fields["options"] = {str(o["letter"]): str(o["text"]) for o in fields["options"]}
    if isinstance(fields.get("metadata"), str):
        try:
            fields["metadata"] = json.loads(fields["metadata"] or "{}")
        except json.JSONDecodeError as error:
            raise BadRecord(f"metadata is text but not a JSON object ({error.msg})") from None
    if "answer" in fields:
        _answer_letters(fields["answer"], "answer")
    if not fields.get("source"):
        fields["source"] = source
    return Question.model_validate(fields)


def _answer_letters(value: Any, name: str) -> str | list[str]:
    """Let only letter strings through: `Question` would crash with a TypeError on a bare number."""
    if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        return value
    raise BadRecord(f"{name} must be option letter(s), got {value!r}")


# ---------------------------------------------------------------------------------------------
# CMExam CSV: columns matched case-insensitively, every other column kept in `metadata`.

_CMEXAM_COLUMNS = {name.lower(): name for name in ("Question", "Options", "Answer", "Explanation", "id")}
_CMEXAM_REQUIRED = ("Question", "Options", "Answer")


def _cmexam_header(location: str, text: str) -> list[str]:
    header = next(csv.reader(io.StringIO(text, newline="")), None)
    if header is None:
        raise ValueError(f"{location}: empty CSV file, expected a header row")
    return header


def _cmexam_records(location: str) -> Iterator[Record]:
    text = files.read_text(location)
    header = _cmexam_header(location, text)
    columns = {_CMEXAM_COLUMNS.get(name.strip().lower()) for name in header}
    missing = [name for name in _CMEXAM_REQUIRED if name not in columns]
    if missing:
        raise ValueError(f"{location}: CSV header lacks column(s) {', '.join(missing)}; it has {', '.join(header)}")
    return files.csv_records(location, text, files.file_namespace(location), rename=_CMEXAM_COLUMNS)


def _from_cmexam(record: Record, source: str) -> Question:
    fields = record.fields or {}
    _require(fields, *_CMEXAM_REQUIRED)
    known = set(_CMEXAM_COLUMNS.values())
    metadata = {key: value.strip() for key, value in fields.items() if key and key not in known and value.strip()}
    return Question(
        id=record.id or "",
        question=fields["Question"],
        options=parse_option_lines(fields["Options"]),
        answer=fields["Answer"],
        explanation=fields.get("Explanation", "").strip(),
        source=source,
        metadata=metadata,
    )


# ---------------------------------------------------------------------------------------------
# MedQA / MedMCQA and the HuatuoGPT-o1 eval JSON (which holds MedQA-style items).

MEDQA = ColumnMapping(question="question", options="options", answer="answer_idx", explanation="explanation",
                      metadata=["meta_info"], id="id")
_MEDMCQA_COLUMNS: dict[str, Any] = dict(question="question", options=["opa", "opb", "opc", "opd"], answer="cop",
                                        explanation="exp", metadata=["subject_name", "topic_name", "choice_type"],
                                        id="id")
MEDMCQA_ORIGINAL = ColumnMapping(**_MEDMCQA_COLUMNS, answer_kind="index1")
MEDMCQA_HF = ColumnMapping(**_MEDMCQA_COLUMNS, answer_kind="index0")
_MEDMCQA_MEDQA_STYLE = MEDQA.model_copy(update={"explanation": "exp", "metadata": _MEDMCQA_COLUMNS["metadata"]})


def _o1_eval_records(location: str) -> Iterator[Record]:
    """Items of every source list, in file order, rows counted across the lists."""
    document = _json_document(location)
    if not isinstance(document, dict):
        raise ValueError(
            f"{location}: expected a JSON object mapping source names to item lists, got {files.json_type(document)}"
        )
    bad = [name for name, items in document.items() if not isinstance(items, list)]
    if bad:
        raise ValueError(f"{location}: the value of {', '.join(map(repr, bad))} is not a list of items")
    prefix = files.file_namespace(location)
    row = 0
    for name, items in document.items():
        for item in items:
            row += 1
            yield files.json_item(row, item, f"{prefix}:{row}", source=name)


def _from_medmcqa(record: Record, source: str) -> Question:
    """Original MedMCQA rows (`opa`..`opd`, `cop` 1-based: 1 = opa) or MedQA-style rows."""
    mapping = _MEDMCQA_MEDQA_STYLE if "options" in (record.fields or {}) else MEDMCQA_ORIGINAL
    return mapping.question_from(record, source)


def _json_document(location: str) -> Any:
    try:
        return json.loads(files.read_text(location))
    except json.JSONDecodeError as error:
        raise ValueError(f"{location}: not valid JSON ({error})") from error


# ---------------------------------------------------------------------------------------------
# SP-Huatuo conversations JSON (open-ended).

_USER_ROLES = {"user", "human"}
_ASSISTANT_ROLES = {"assistant", "gpt"}
_SP_ANSWER = re.compile(
    r"^\s*答案是[：:]\s*(?P<answer>.*?)[。.]?\s*这是一些相关的背景信息[：:]\s*(?P<background>.*?)\s*$", re.S
)


def _sp_records(location: str) -> Iterator[Record]:
    document = _json_document(location)
    if not isinstance(document, list):
        raise ValueError(f"{location}: expected a JSON list of conversations, got {files.json_type(document)}")
    prefix = files.file_namespace(location)
    for row, item in enumerate(document, start=1):
        yield files.json_item(row, item, f"{prefix}:{row}")


def _from_conversation(record: Record, source: str) -> Question:
    """The first user turn is the question; the assistant turn after it holds answer and background."""
    fields = record.fields or {}
    _require(fields, "conversations")
    turns = fields["conversations"]
    if not isinstance(turns, list) or not all(isinstance(turn, dict) for turn in turns):
        raise BadRecord("conversations must be a list of {from, value} objects")
    roles = [str(turn.get("from", "")).lower() for turn in turns]
    asked = next((i for i, role in enumerate(roles) if role in _USER_ROLES), None)
    if asked is None:
        raise BadRecord("conversations has no user turn")
    replied = next((i for i in range(asked + 1, len(turns)) if roles[i] in _ASSISTANT_ROLES), None)
    if replied is None:
        raise BadRecord("conversations has no assistant turn after the user turn")
    if not isinstance(turns[asked].get("value"), str) or not isinstance(turns[replied].get("value"), str):
        raise BadRecord("a conversation turn has no text in its value field")
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
# The registry and detection.


BUILTIN_FORMATS: dict[str, FormatEntry] = {
    "sphuatuo": SpecialFormat(_records_by_extension, _from_native),
    "cmexam": SpecialFormat(_cmexam_records, _from_cmexam),
    "huatuo_o1_eval": SpecialFormat(_o1_eval_records, MEDQA.question_from),
    "medqa": MEDQA,
    "medmcqa": SpecialFormat(_records_by_extension, _from_medmcqa),
    "medmcqa_original": MEDMCQA_ORIGINAL,
    "medmcqa_hf": MEDMCQA_HF,
    "sp_conversations": SpecialFormat(_sp_records, _from_conversation),
}
FORMATS: tuple[str, ...] = tuple(BUILTIN_FORMATS)

_QUESTION_FIELDS = frozenset(Question.model_fields)


def _detect_format(location: str) -> str:
    """Tell the format from the container, then from the first records (rules: `load_questions`)."""
    kind = files.file_kind(location)
    if kind == "csv":
        header = {name.strip().lower() for name in _cmexam_header(location, files.read_text(location))}
        if {"question", "options", "answer"} <= header:
            return "cmexam"
    elif kind == "json":
        text = files.read_text(location).lstrip()
        if text.startswith("{"):
            try:
                document = json.loads(text)
            except json.JSONDecodeError:
                document = None
            if isinstance(document, dict) and document and all(isinstance(v, list) for v in document.values()):
                return "huatuo_o1_eval"
        elif text.startswith("["):
            try:
                document = json.loads(text)
            except json.JSONDecodeError:
                document = None
            if isinstance(document, list) and document and isinstance(document[0], dict) \
                    and "conversations" in document[0]:
                return "sp_conversations"
    sample = sample_records(location)
    if sample:
        keys = set(sample[0])
        if "cop" in keys or {"subject_name", "answer_idx"} <= keys:
            cops = [row.get("cop") for row in sample if "options" not in row]
            zero_based = len(cops) == len(sample) and 0 in cops and all(c in (0, 1, 2, 3) for c in cops)
            return "medmcqa_hf" if zero_based else "medmcqa"
        if "answer_idx" in keys:
            return "medqa"
        if {"id", "question"} <= keys <= _QUESTION_FIELDS:
            return "sphuatuo"
    raise UnknownFormat(location, sample)


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


