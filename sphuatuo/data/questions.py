"""The one question schema every loader produces and every stage reads.

A question is multiple-choice when it has options (then `answer` holds the correct letters, one or
more) and open-ended otherwise (then `reference` holds the gold answer text). `reference` is always
filled, so a judge can compare any reply with it.
"""

from __future__ import annotations

import json
import unicodedata
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


class Question(BaseModel):
    """One exam item, normalised from any supported source format."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str = Field(min_length=1)
    question: str
    options: dict[str, str] = Field(default_factory=dict)
    answer: tuple[str, ...] = ()
    reference: str = ""
    explanation: str = ""
    source: str = ""
    metadata: dict[str, str] = Field(default_factory=dict)

    @field_validator("question")
    @classmethod
    def _question_not_empty(cls, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError("question text is empty")
        return value

    @field_validator("options")
    @classmethod
    def _options_are_letters(cls, value: dict[str, str]) -> dict[str, str]:
        cleaned = {}
        for letter, text in value.items():
            letter = letter.strip().upper()
            if len(letter) != 1 or letter not in OPTION_LETTERS:
                raise ValueError(f"option key {letter!r} is not a single letter A-Z")
            if not str(text).strip():
                raise ValueError(f"option {letter} has no text")
            cleaned[letter] = str(text).strip()
        return dict(sorted(cleaned.items()))

    @field_validator("answer", mode="before")
    @classmethod
    def _answer_letters(cls, value: Any) -> tuple[str, ...]:
        if isinstance(value, str):
            value = [ch for ch in value.upper() if ch in OPTION_LETTERS]
        if not isinstance(value, (list, tuple, set, frozenset)) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"answer must be option letter(s), got {value!r}")
        return tuple(sorted({str(letter).strip().upper() for letter in value}))

    @model_validator(mode="after")
    def _answer_matches_options(self) -> Question:
        if self.options:
            if len(self.options) < 2:
                raise ValueError(f"only {len(self.options)} option(s); a multiple-choice item needs at least 2")
            if not self.answer:
                raise ValueError("no answer letter given")
            unknown = [letter for letter in self.answer if letter not in self.options]
            if unknown:
                raise ValueError(
                    f"answer letter(s) {', '.join(unknown)} not among the options {', '.join(self.options)}"
                )
            if not self.reference:
                object.__setattr__(self, "reference", self.answer_text)
        else:
            if self.answer:
                raise ValueError("answer letters given but the item has no options")
            if not self.reference.strip():
                raise ValueError("open-ended item has no reference answer")
        return self

    @property
    def is_multiple_choice(self) -> bool:
        return bool(self.options)

    @property
    def answer_text(self) -> str:
        """The correct options as `B. text` lines (multiple-choice) or the reference (open-ended)."""
        if not self.options:
            return self.reference
        return "; ".join(f"{letter}. {self.options[letter]}" for letter in self.answer)

    def content_key(self) -> str:
        """What makes two items the same question whatever their ids: the stem and the option texts,
        compared after Unicode (NFKC), case and whitespace normalisation, options in any order."""
        texts = sorted(normalise_text(text) for text in self.options.values())
        return json.dumps([normalise_text(self.question), texts], ensure_ascii=False)

    def to_row(self) -> dict[str, Any]:
        """A flat row for Parquet / Ray Data (see QUESTION_SCHEMA)."""
        return {
            "id": self.id,
            "question": self.question,
            "options": [{"letter": k, "text": v} for k, v in self.options.items()],
            "answer": list(self.answer),
            "reference": self.reference,
            "explanation": self.explanation,
            "source": self.source,
            "metadata": json.dumps(self.metadata, ensure_ascii=False, sort_keys=True),
        }

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Question:
        """Inverse of `to_row`; tolerant of the numpy arrays Ray Data hands out for list columns."""
        raw_options = row.get("options")
        options = {str(o["letter"]): str(o["text"]) for o in (raw_options if raw_options is not None else [])}
        metadata = row.get("metadata") or "{}"
        return cls(
            id=str(row["id"]),
            question=str(row["question"]),
            options=options,
            answer=[str(a) for a in (row.get("answer") if row.get("answer") is not None else [])],
            reference=str(row.get("reference") or ""),
            explanation=str(row.get("explanation") or ""),
            source=str(row.get("source") or ""),
            metadata=json.loads(metadata) if isinstance(metadata, str) else dict(metadata),
        )


def normalise_text(text: str) -> str:
    """Text as compared for sameness: Unicode NFKC, case-folded, runs of whitespace as one space."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


# Explicit, so that files with only open-ended items (empty option lists) share one schema with the rest.
QUESTION_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("question", pa.string()),
        ("options", pa.list_(pa.struct([("letter", pa.string()), ("text", pa.string())]))),
        ("answer", pa.list_(pa.string())),
        ("reference", pa.string()),
        ("explanation", pa.string()),
        ("source", pa.string()),
        ("metadata", pa.string()),
    ]
)


def questions_table(questions: list[Question]) -> pa.Table:
    return pa.Table.from_pylist([q.to_row() for q in questions], schema=QUESTION_SCHEMA)
