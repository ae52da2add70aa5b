"""Describe a question file by its columns instead of writing a loader for it.

Anchor: LLaMA-Factory's `dataset_info.json`, where a new dataset is a few lines naming its columns.
A `ColumnMapping` says which column holds the question, the options (one column holding a mapping,
a list or `A. text` lines, or several columns in order), the answer and how to read it, and
optionally the id, explanation, reference (open-ended items) and metadata columns. Recipes use it
inline (`columns:`) or by name from a `datasets.yaml` beside the recipe; the built-in formats that
are plain mappings are entries of the same kind (`sphuatuo.data.loaders.BUILTIN_FORMATS`).

`propose_mapping` guesses a mapping from a sample of rows, for files no format recognises.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sphuatuo.data.files import BadRecord, FileKind, Record, json_type
from sphuatuo.data.questions import OPTION_LETTERS, Question, normalise_text

AnswerKind = Literal["letters", "index0", "index1", "option_text", "option_column"]

_OPTION_LINE = re.compile(r"^\s*([A-Za-z])\s*(?:[.、:：．]|\s)\s*(.*)$")
_SEPARATORS = re.compile(r"[\s,;|，、；]+")


class ColumnMapping(BaseModel):
    """Which column holds what; every name is a column (a key of a JSON object)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    question: str = Field(description="the question text")
    options: str | list[str] | None = Field(
        default=None, description="one column holding a mapping, a list or `A. text` lines; or several columns "
                                  "in option order (A, B, …), e.g. [opa, opb, opc, opd]; none for open-ended items")
    answer: str | None = Field(default=None, description="the column holding the correct option(s)")
    answer_kind: AnswerKind = Field(
        default="letters", description="letters: `B`, `BD`, `B,D` or a list; index0 / index1: option number "
                                       "counted from 0 or 1; option_text: the text of the correct option; "
                                       "option_column: the name of the option column (or mapping key), e.g. `opb`")
    reference: str | None = Field(default=None, description="the gold answer text (required for open-ended items)")
    id: str | None = Field(default=None, description="the item's id; without it ids are `<file stem>-<digest of "
                                                     "its path>:<row>`")
    explanation: str | None = None
    metadata: list[str] = Field(default_factory=list, description="columns kept in `metadata` (a column "
                                                                  "holding a mapping contributes its items)")
    file: FileKind | None = Field(default=None, description="the container; default: from the extension, "
                                                            "a folder being a datasets save_to_disk folder")
    split: str | None = Field(default=None, description="the split of a DatasetDict folder")

    @model_validator(mode="after")
    def _answerable(self) -> ColumnMapping:
        if self.options is not None:
            if self.answer is None:
                raise ValueError("options are mapped but no answer column is")
            if isinstance(self.options, list) and not 2 <= len(self.options) <= len(OPTION_LETTERS):
                raise ValueError(f"options lists {len(self.options)} columns; give 2 to 26, or one column")
        else:
            if self.reference is None:
                raise ValueError("without options (open-ended items) a reference column is needed")
            if self.answer is not None:
                raise ValueError("an answer column needs options to choose from")
        return self

    def required_columns(self) -> list[str]:
        """Columns every record must have (option columns may be blank: items with fewer options)."""
        needed = [self.question]
        if isinstance(self.options, str):
            needed.append(self.options)
        needed += [name for name in (self.answer, self.reference) if name]
        return needed

    def question_from(self, record: Record, source: str) -> Question:
        """Build the record's question; a record that cannot make one raises `BadRecord` saying why."""
        fields = record.fields or {}
        missing = [name for name in self.required_columns() if _blank(fields.get(name))]
        if missing:
            raise BadRecord(f"missing field(s): {', '.join(missing)}")
        options, letter_of = self._options(fields)
        answer = self._answer(fields[self.answer], options, letter_of) if self.answer else ()
        return Question(
            id=record.id or "",
            question=_text(fields[self.question], self.question),
            options=options,
            answer=answer,
            reference=_text(fields[self.reference], self.reference) if self.reference else "",
            explanation=_text(fields.get(self.explanation), self.explanation) if self.explanation else "",
            source=source,
            metadata=self._metadata(fields),
        )

    def _options(self, fields: Mapping[str, Any]) -> tuple[dict[str, str], dict[str, str]]:
        """{letter: text}, and each option's key (column name, mapping key or letter) to its letter, in
        option order, blank options included: index and option_column answers count and name them."""
        if self.options is None:
            return {}, {}
        if isinstance(self.options, list):
            letter_of = dict(zip(self.options, OPTION_LETTERS))
            texts = [fields.get(name) for name in self.options]
        else:
            value = fields[self.options]
            if isinstance(value, Mapping):
                keys = [str(key) for key in value]
                if all(len(key.strip()) == 1 and key.strip().upper() in OPTION_LETTERS for key in keys):
                    letter_of = {key: key.strip().upper() for key in keys}
                else:
                    letter_of = dict(zip(keys, OPTION_LETTERS))
                texts = list(value.values())
            elif isinstance(value, list):
                letter_of = dict(zip(OPTION_LETTERS, OPTION_LETTERS[: len(value)]))
                texts = value
            elif isinstance(value, str):
                options = parse_option_lines(value)
                return options, {letter: letter for letter in options}
            else:
                raise BadRecord(f"{self.options} must hold a mapping, a list or `A. text` lines, "
                                f"got {json_type(value)}")
        options = {letter: str(text) for letter, text in zip(letter_of.values(), texts) if not _blank(text)}
        return options, letter_of

    def _answer(self, value: Any, options: dict[str, str], letter_of: dict[str, str]) -> str | list[str]:
        name = self.answer
        if self.answer_kind == "letters":
            if isinstance(value, str) or (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                return value
            raise BadRecord(f"{name} must be option letter(s), got {value!r}")
        values = value if isinstance(value, list) else [value]
        if self.answer_kind in ("index0", "index1"):
            base = int(self.answer_kind[-1])
            names, count = list(letter_of), len(letter_of)
            letters = []
            for item in values:
                number = _integer(item)
                if number is None or not base <= number < base + count:
                    raise BadRecord(f"{name} must be an option number from {base} ({names[0]}) to "
                                    f"{base + count - 1} ({names[-1]}), got {item!r}")
                letters.append(letter_of[names[number - base]])
            return letters
        if self.answer_kind == "option_text":
            by_text = {normalise_text(text): letter for letter, text in options.items()}
            letters = [by_text.get(normalise_text(str(item))) for item in values]
            if None in letters:
                raise BadRecord(f"{name} {value!r} is not the text of any option")
            return [letter for letter in letters if letter]
        by_key = {key.strip().lower(): letter for key, letter in letter_of.items()}
        if isinstance(value, str):
            values = [part for part in _SEPARATORS.split(value) if part]
        letters = [by_key.get(str(item).strip().lower()) for item in values]
        if not values or None in letters:
            raise BadRecord(f"{name} {value!r} names no option column ({', '.join(letter_of)})")
        return [letter for letter in letters if letter]

    def _metadata(self, fields: Mapping[str, Any]) -> dict[str, str]:
        metadata = {}
        for name in self.metadata:
            value = fields.get(name)
            if isinstance(value, Mapping):
                metadata.update({str(k): _scalar(v) for k, v in value.items() if not _blank(v)})
            elif not _blank(value):
                metadata[name] = _scalar(value)
        return metadata


def parse_option_lines(text: str) -> dict[str, str]:
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
                raise BadRecord(f"option {letter} appears twice in Options")
            options[letter] = match.group(2)
        elif letter is None:
            raise BadRecord(f"Options does not start with an option letter: {line.strip()[:40]!r}")
        else:
            options[letter] = f"{options[letter]} {line.strip()}"
    return options


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _text(value: Any, name: str | None) -> str:
    if isinstance(value, (dict, list)):
        raise BadRecord(f"{name} must be text, got {json_type(value)}")
    return "" if value is None else str(value)


def _scalar(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False) if isinstance(value, (dict, list)) else str(value).strip()


def _integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value.strip())
    return None


# ---------------------------------------------------------------------------------------------
# Proposing a mapping for a file no format recognises.

_QUESTION_NAMES = ("question", "stem", "query", "prompt", "problem", "input", "text", "题目", "问题", "题干")
_OPTION_NAMES = ("options", "choices", "candidates", "opts", "option", "选项")
_ANSWER_NAMES = ("answer", "answer_idx", "answer_key", "cop", "label", "correct", "correct_answer",
                 "correct_option", "gold", "target", "答案")
_ID_NAMES = ("id", "qid", "question_id", "_id", "uid", "idx", "index")
_EXPLANATION_NAMES = ("explanation", "exp", "rationale", "analysis", "explain", "解析", "分析")
_REFERENCE_NAMES = ("reference", "answer", "response", "output", "gold", "答案")
_SERIES = re.compile(r"^(?P<prefix>.*?)(?P<tag>[a-zA-Z]|\d)$")


def propose_mapping(rows: Sequence[Mapping[str, Any]]) -> ColumnMapping | None:
    """Guess question, options, answer, id and explanation columns by name, then by content.

    A proposal to check, not a verdict: printed by `sphuatuo data check` for the user to edit.
    """
    if not rows:
        return None
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lowered = {column.lower(): column for column in columns}

    def named(candidates: Sequence[str], taken: set[str]) -> str | None:
        return next((lowered[name] for name in candidates if name in lowered and lowered[name] not in taken), None)

    options = named(_OPTION_NAMES, set()) or _option_series(columns)
    taken = set(options if isinstance(options, list) else [options] if options else [])
    question = named(_QUESTION_NAMES, taken) or _longest_text_column(rows, columns, taken)
    if question is None:
        return None
    taken.add(question)
    fields: dict[str, Any] = {"question": question}
    if options:
        answer = named(_ANSWER_NAMES, taken)
        if answer is None:
            return None
        fields.update(options=options, answer=answer, answer_kind=_answer_kind(rows, options, answer))
        taken.add(answer)
    else:
        reference = named(_REFERENCE_NAMES, taken)
        if reference is None:
            return None
        fields["reference"] = reference
        taken.add(reference)
    for key, candidates in (("id", _ID_NAMES), ("explanation", _EXPLANATION_NAMES)):
        column = named(candidates, taken)
        if column:
            fields[key] = column
            taken.add(column)
    metadata = [column for column in columns if column not in taken]
    if metadata:
        fields["metadata"] = metadata
    return ColumnMapping(**fields)


def mapping_yaml(mapping: ColumnMapping) -> str:
    """The mapping as YAML that `--columns FILE`, a recipe's `columns:` or a datasets.yaml entry takes."""
    return yaml.safe_dump(mapping.model_dump(exclude_defaults=True), sort_keys=False, allow_unicode=True,
                          default_flow_style=None)


def _option_series(columns: Sequence[str]) -> list[str] | None:
    """The longest run of columns sharing a prefix and ending a, b, c… / A, B, C… / 1, 2, 3… / 0, 1, 2…"""
    groups: dict[str, list[tuple[str, str]]] = {}
    for column in columns:
        match = _SERIES.match(column)
        if match:
            groups.setdefault(match["prefix"], []).append((match["tag"], column))
    best: list[str] = []
    for members in groups.values():
        tags = {tag.lower(): column for tag, column in members}
        for start in ("a", "0", "1"):
            run = []
            tag = start
            while tag in tags:
                run.append(tags[tag])
                tag = chr(ord(tag) + 1)
            if len(run) > len(best):
                best = run
    return best if len(best) >= 2 else None


def _longest_text_column(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], taken: set[str]) -> str | None:
    lengths = {column: sum(len(row[column]) for row in rows if isinstance(row.get(column), str))
               for column in columns if column not in taken}
    best = max(lengths, key=lengths.__getitem__, default=None)
    return best if best is not None and lengths[best] > 0 else None


def _answer_kind(rows: Sequence[Mapping[str, Any]], options: str | list[str], answer: str) -> AnswerKind:
    """How the answer column reads, by what most of its values look like (a few bad rows do not sway it)."""
    values = [row.get(answer) for row in rows if not _blank(row.get(answer))]

    def mostly(matches: Any) -> bool:
        return bool(values) and sum(1 for value in values if matches(value)) >= 0.8 * len(values)

    if isinstance(options, list):
        keys = {name.lower() for name in options}
        if mostly(lambda v: isinstance(v, str) and v.strip().lower() in keys):
            return "option_column"
    numbers = [_integer(v) for v in values]
    if mostly(lambda v: _integer(v) is not None):
        count = len(options) if isinstance(options, list) else None
        return "index1" if 0 not in numbers and count in numbers else "index0"
    texts = set()
    for row in rows:
        if isinstance(options, list):
            texts |= {normalise_text(str(row.get(name))) for name in options if not _blank(row.get(name))}
        elif isinstance(row.get(options), Mapping):
            texts |= {normalise_text(str(text)) for text in row[options].values()}
        elif isinstance(row.get(options), list):
            texts |= {normalise_text(str(text)) for text in row[options]}
    if mostly(lambda v: isinstance(v, str) and normalise_text(v) in texts):
        return "option_text"
    return "letters"


def read_mappings(path: str | Path) -> dict[str, ColumnMapping]:
    """The named mappings of a datasets.yaml (`name: {question: …, options: …}` entries); ValueError lists
    every problem with its entry and field."""
    entries = _read_yaml(path)
    mappings, problems = {}, []
    for name, entry in entries.items():
        try:
            mappings[str(name)] = ColumnMapping.model_validate(entry)
        except ValidationError as error:
            problems += [f"{path}: {name}.{'.'.join(map(str, e['loc'])) or '(entry)'}: {e['msg']}"
                         for e in error.errors()]
    if problems:
        raise ValueError("\n".join(problems))
    return mappings


def read_mapping(path: str | Path) -> ColumnMapping:
    """One mapping from a YAML file, as `data check` proposes it and `--columns FILE` takes it."""
    try:
        return ColumnMapping.model_validate(_read_yaml(path))
    except ValidationError as error:
        raise ValueError("\n".join(f"{path}: {'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}"
                                   for e in error.errors())) from None


def _read_yaml(path: str | Path) -> dict[str, Any]:
    try:
        document = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a mapping of fields at the top level")
    return document
