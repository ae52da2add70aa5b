"""Redaction: the values of the environment variables a recipe names as secrets never reach what sphuatuo
writes (the run log, the manifest, the report, the CLI's error messages) or logs.

A recipe lists them in `secrets`, and every `api_key_env` counts without being listed. Only names are kept
here; the values are read from this process's environment each time text is masked, so this module holds
no secret, and a value set after the names were declared is masked too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"
MIN_SECRET_LENGTH = 4
"""Shorter values are left alone: masking every "1" or "yes" would wreck the text and hide nothing worth hiding."""

_declared: set[str] = set()


def secret_names(recipe: Mapping[str, Any]) -> set[str]:
    """The variables a recipe names as secrets: its `secrets` and every `api_key_env`. Reads the recipe as a
    plain mapping (a Recipe's model_dump, the manifest's copy, or a file that failed validation), so it
    works before, without and after validation."""
    listed = recipe.get("secrets")
    names = {name for name in listed if isinstance(name, str)} if isinstance(listed, list) else set()

    def walk(node: Any) -> None:
        if isinstance(node, Mapping):
            if isinstance(node.get("api_key_env"), str):
                names.add(node["api_key_env"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(recipe)
    return names


def declare(names: Iterable[str]) -> None:
    """Mask these variables' values from now on in this process: in `redact` and `redact_data` without being
    named again, and in every record of the `sphuatuo` logger, whichever handler writes it."""
    _declared.update(names)
    logger = logging.getLogger("sphuatuo")
    if not any(isinstance(existing, RedactingFilter) for existing in logger.filters):
        logger.addFilter(RedactingFilter())


def _values(names: Iterable[str]) -> list[str]:
    values = {os.environ.get(name, "") for name in {*_declared, *names}}
    # Longest first, so a secret that contains another is masked whole.
    return sorted((value for value in values if len(value) >= MIN_SECRET_LENGTH), key=len, reverse=True)


def _mask(text: str, values: list[str]) -> str:
    for value in values:
        text = text.replace(value, MASK)
    return text


def redact(text: str, names: Iterable[str] = ()) -> str:
    """`text` with every value of the declared variables and of `names` replaced by `***`."""
    return _mask(text, _values(names))


def redact_data(data: Any, names: Iterable[str] = ()) -> Any:
    """JSON-like data (mappings, lists, strings) with every string, keys included, redacted. Masking before
    serialising finds a secret that JSON would have escaped (a quote or backslash in it)."""
    values = _values(names)

    def walk(node: Any) -> Any:
        if isinstance(node, str):
            return _mask(node, values)
        if isinstance(node, Mapping):
            return {walk(key): walk(value) for key, value in node.items()}
        if isinstance(node, list | tuple):
            return [walk(value) for value in node]
        return node

    return walk(data) if values else data


class RedactingFilter(logging.Filter):
    """Masks a record's message, traceback and stack in place, so every handler after it writes masked text."""

    def filter(self, record: logging.LogRecord) -> bool:
        values = _values(())
        if not values:
            return True
        record.msg, record.args = _mask(record.getMessage(), values), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = _mask(record.exc_text, values)
        if record.stack_info:
            record.stack_info = _mask(record.stack_info, values)
        return True
