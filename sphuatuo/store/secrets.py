"""Redaction: the values of the environment variables a recipe names as secrets never reach what sphuatuo
writes (the run log, the manifest, the report, the CLI's error messages) or logs, in the driver and in every
Ray worker of its job.

A recipe lists them in `secrets`, and every `api_key_env` counts without being listed; every `api_key_file`
counts too (its content is the secret). Only names and paths are declared: the values are read from this
process's environment and those files each time text is masked, so a value set after the names were declared
is masked too. The one value this module keeps is one a process was handed by no variable or file (an API key
fetched from the object store by the request actor that uses it, see `hold`).

Ray workers mask the same: `worker_runtime_env` is the job's runtime environment that sphuatuo joins or starts
Ray with. It carries the declared names and file paths (never a value) and a setup hook that declares them in
every worker process of the job, which reads the values from its own environment and files, as the secrets
themselves reach it (set on every node, a mounted secret file).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

MASK = "***"
MIN_SECRET_LENGTH = 4
"""Shorter values are left alone: masking every "1" or "yes" would wreck the text and hide nothing worth hiding."""

NAMES_VARIABLE = "SPHUATUO_SECRET_NAMES"
FILES_VARIABLE = "SPHUATUO_SECRET_FILES"
"""In a worker's environment (set by `worker_runtime_env`): the declared names, comma-separated, and files,
separated by os.pathsep."""

_declared: set[str] = set()
_files: set[str] = set()
_held: set[str] = set()


def _walk(node: Any, key: str, found: set[str]) -> set[str]:
    """Every string value of a `key` field anywhere in a recipe mapping."""
    if isinstance(node, Mapping):
        if isinstance(node.get(key), str):
            found.add(node[key])
        for value in node.values():
            _walk(value, key, found)
    elif isinstance(node, list):
        for value in node:
            _walk(value, key, found)
    return found


def secret_names(recipe: Mapping[str, Any]) -> set[str]:
    """The variables a recipe names as secrets: its `secrets` and every `api_key_env`. Reads the recipe as a
    plain mapping (a Recipe's model_dump, the manifest's copy, or a file that failed validation), so it
    works before, without and after validation."""
    listed = recipe.get("secrets")
    names = {name for name in listed if isinstance(name, str)} if isinstance(listed, list) else set()
    return _walk(recipe, "api_key_env", names)


def secret_files(recipe: Mapping[str, Any]) -> set[str]:
    """The files a recipe names as holding secrets: every `api_key_file`."""
    return _walk(recipe, "api_key_file", set())


def declare(names: Iterable[str], files: Iterable[str] = ()) -> None:
    """Mask these variables' values and these files' contents from now on in this process: in `redact` and
    `redact_data` without being named again, and in every record of the `sphuatuo` logger, whichever handler
    writes it."""
    _declared.update(names)
    _files.update(files)
    logger = logging.getLogger("sphuatuo")
    if not any(isinstance(existing, RedactingFilter) for existing in logger.filters):
        logger.addFilter(RedactingFilter())


def declare_recipe(recipe: Mapping[str, Any]) -> None:
    """`declare` a recipe's secret variables and files (a Recipe's model_dump or a file that failed validation)."""
    declare(secret_names(recipe), secret_files(recipe))


def hold(value: str) -> None:
    """Mask `value` in this process from now on: a secret that reached it through neither a variable nor a file
    (the API key a request actor fetched from the object store). Kept in this process's memory only."""
    _held.add(value)
    declare(())


def worker_runtime_env() -> dict[str, Any] | None:
    """The Ray runtime environment that makes every worker process of the job mask what this process declared
    (None when nothing is): the names and file paths, never a value, and `setup_worker` as the setup hook."""
    if not _declared and not _files:
        return None
    return {"worker_process_setup_hook": f"{__name__}.setup_worker",
            "env_vars": {NAMES_VARIABLE: ",".join(sorted(_declared)),
                         FILES_VARIABLE: os.pathsep.join(sorted(_files))}}


def setup_worker() -> None:
    """Ray's `worker_process_setup_hook` in every worker of a sphuatuo job: declare the names and files the
    driver declared, so the worker's `sphuatuo` logger masks their values as read on its node."""
    declare([name for name in os.environ.get(NAMES_VARIABLE, "").split(",") if name],
            [path for path in os.environ.get(FILES_VARIABLE, "").split(os.pathsep) if path])
    for handler in logging.getLogger().handlers:  # other libraries' lines in this worker too, as the CLI does
        if not any(isinstance(existing, RedactingFilter) for existing in handler.filters):
            handler.addFilter(RedactingFilter())


def _file_content(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except (OSError, UnicodeDecodeError):  # not on this node, or not for this process to read
        return ""


def _values(names: Iterable[str]) -> list[str]:
    values = {os.environ.get(name, "") for name in {*_declared, *names}}
    values.update(_file_content(path) for path in _files)
    values.update(_held)
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
