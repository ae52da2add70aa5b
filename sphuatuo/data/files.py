"""Split a question file into records, whatever holds it: a JSON array, JSONL, CSV, Parquet, or a
Hugging Face `datasets` folder (written by `save_to_disk`, or a folder of Parquet files); on the local
disk or any filesystem pyarrow opens by URI (`s3://bucket/exam.parquet`, `gs://…`, `file:///…`).

Readers never judge content: each record carries its 1-based row number, its raw text (for the
reject list) and its fields, or the reason it could not be read at all. The loaders decide what a
record means. A record without an id of its own gets `<file namespace>:<row>` (see `file_namespace`), so
ids of two files never collide and an id says where its question sits.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any, Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

FileKind = Literal["json", "jsonl", "csv", "parquet", "hf_dataset"]
"""`json` and `jsonl` read the same way: a file whose text is one JSON array is an array of items,
anything else is read line by line, so a pretty-printed array never turns into one reject per line."""

_SUFFIX_KINDS: dict[str, FileKind] = {".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


@dataclass(frozen=True)
class Record:
    """One record as read from its container, before any checks on its content."""

    row: int
    raw: str
    id: str | None = None
    fields: Mapping[str, Any] | None = None
    problem: str = ""  # why the record could not be read at all (then `fields` is None)
    source: str | None = None  # the source the file names for this record, if any


class BadRecord(ValueError):
    """A record whose content cannot make a question; the message is the user-facing reason."""


def _filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    if "://" in location:
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), location


def _info(location: str) -> pafs.FileInfo:
    filesystem, path = _filesystem(location)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise ValueError(f"{location}: no such file")
    return info


def require(location: str) -> None:
    """Fail before reading anything, naming the file, when it is not there."""
    _info(location)


def file_kind(location: str) -> FileKind:
    """A folder is a `datasets` folder; otherwise the extension decides, and JSON is the default."""
    if _info(location).type == pafs.FileType.Directory:
        return "hf_dataset"
    return _SUFFIX_KINDS.get(PurePosixPath(location).suffix.lower(), "json")


def file_stem(location: str) -> str:
    """The file name without its extension: the default source name of the file's questions."""
    return PurePosixPath(location.rstrip("/")).stem or "questions"


def file_namespace(location: str) -> str:
    """The prefix of ids of records without one: the stem and a digest of the location as named, so
    `train/q.jsonl` and `test/q.jsonl` never share ids. The digest is of the name, not of a resolved path:
    it ignores what only spells the same name differently (`./`, `..`, a trailing `/`, `file://`, a URI's
    query of connection options) and does not depend on a machine's mounts or working folder, so a recipe's
    file gets the same ids on every read and every node, and rows keyed by them resume."""
    name = location.removeprefix("file://").rstrip("/")
    name = name.split("?", 1)[0] if "://" in name else posixpath.normpath(name)
    return f"{file_stem(name)}-{hashlib.sha256(name.encode()).hexdigest()[:6]}"


def read_text(location: str) -> str:
    """The file as text; invalid UTF-8 bytes survive as lone surrogates, so one bad record costs one row."""
    filesystem, path = _filesystem(location)
    with filesystem.open_input_stream(path) as stream:
        data = stream.read()
    return data.decode("utf-8", "surrogateescape").removeprefix("\ufeff")


def read_records(location: str, kind: FileKind, id_column: str | None = "id",
                 split: str | None = None) -> Iterator[Record]:
    """Every record of the file; `id_column` names the field holding a record's own id."""
    prefix = file_namespace(location)
    if kind in ("json", "jsonl"):
        if not _opens_with_array(location):
            return _jsonl_records(_text_lines(location), prefix, id_column)
        try:
            return json_records(read_text(location), prefix, id_column)
        except ValueError as error:
            raise ValueError(f"{location}: {error}") from error
    if kind == "csv":
        return csv_records(location, read_text(location), prefix, id_column)
    if kind == "parquet":
        return _table_records(_parquet_batches(location), prefix, id_column)
    if split:
        prefix = f"{prefix}/{split}"
    return _table_records(_arrow_folder_batches(location, split), prefix, id_column)


def json_records(text: str, prefix: str, id_column: str | None = "id") -> Iterator[Record]:
    """The items of a JSON array (rows are positions), or else one record per line (rows are line numbers)."""
    if text.lstrip().startswith("["):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as error:
            if error.msg != "Extra data":  # one array followed by more lines is JSONL after all
                raise ValueError(f"not valid JSON ({error})") from error
        else:
            return (json_item(row, item, f"{prefix}:{row}", id_column) for row, item in enumerate(document, 1))
    # Not splitlines(): it also splits at U+2028 and friends, which may sit inside a JSON string.
    return _jsonl_records(text.split("\n"), prefix, id_column)


def _opens_with_array(location: str) -> bool:
    """Whether the file's text starts (after white space) with `[`, judged from its first 64 KiB."""
    filesystem, path = _filesystem(location)
    with filesystem.open_input_stream(path) as stream:
        head = stream.read(1 << 16)
    return head.decode("utf-8", "surrogateescape").removeprefix("\ufeff").lstrip().startswith("[")


def _text_lines(location: str) -> Iterator[str]:
    """The file's lines (split at "\n" only), read a MiB at a time: a JSONL file of any size in bounded memory."""
    filesystem, path = _filesystem(location)
    with filesystem.open_input_stream(path) as stream:
        rest, first = b"", True
        while chunk := stream.read(1 << 20):
            *lines, rest = (rest + chunk).split(b"\n")
            for line in lines:
                text = line.decode("utf-8", "surrogateescape")
                yield text.removeprefix("\ufeff") if first else text
                first = False
        if rest:
            yield rest.decode("utf-8", "surrogateescape").removeprefix("\ufeff" if first else "")


def _jsonl_records(lines: Iterable[str], prefix: str, id_column: str | None) -> Iterator[Record]:
    for row, line in enumerate(lines, start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        fallback_id = f"{prefix}:{row}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as error:
            yield Record(row, line, fallback_id, problem=f"malformed JSON: {error.msg} at column {error.colno}")
            continue
        if not isinstance(value, dict):
            yield Record(row, line, fallback_id, problem=f"expected a JSON object, got {json_type(value)}")
            continue
        yield Record(row, line, explicit_id(value, id_column) or fallback_id, value)


def json_item(row: int, item: Any, fallback_id: str, id_column: str | None = "id",
              source: str | None = None) -> Record:
    """One item of a JSON document as a record (rejected unless it is an object)."""
    raw = json.dumps(item, ensure_ascii=False)
    if not isinstance(item, dict):
        return Record(row, raw, fallback_id, problem=f"expected a JSON object, got {json_type(item)}")
    return Record(row, raw, explicit_id(item, id_column) or fallback_id, item, source=source)


def csv_records(location: str, text: str, prefix: str, id_column: str | None = "id",
                rename: Mapping[str, str] | None = None) -> Iterator[Record]:
    """Data rows keyed by the header (renamed through `rename`, matched case-insensitively); blank rows skipped.

    Rows are data row numbers: the header is not counted, a quoted cell spanning lines is one row.
    """
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{location}: empty CSV file, expected a header row")
        lowered = {key.lower(): value for key, value in (rename or {}).items()}
        columns = [lowered.get(name.strip().lower(), name.strip()) for name in header]
        for row, cells in enumerate(reader, start=1):
            if not any(cell.strip() for cell in cells):
                continue
            raw = io.StringIO()
            csv.writer(raw, lineterminator="").writerow(cells)
            fields = dict(zip(columns, cells))
            record_id = explicit_id(fields, id_column) or f"{prefix}:{row}"
            if len(cells) > len(columns):
                problem = f"{len(cells)} cells but the header has {len(columns)} columns (an unquoted comma?)"
                yield Record(row, raw.getvalue(), record_id, problem=problem)
                continue
            yield Record(row, raw.getvalue(), record_id, fields)
    except csv.Error as error:
        raise ValueError(f"{location}: unreadable CSV near line {reader.line_num} ({error})") from error


def _parquet_batches(location: str) -> Iterator[pa.RecordBatch]:
    filesystem, path = _filesystem(location)
    with filesystem.open_input_file(path) as handle:
        yield from pq.ParquetFile(handle).iter_batches()


def _arrow_folder_batches(location: str, split: str | None) -> Iterator[pa.RecordBatch]:
    """The Arrow files of a `save_to_disk` folder, read with pyarrow alone (no `datasets` needed), or the
    Parquet files of a folder such as a hub dataset snapshot (`data/train-00000-of-00001.parquet`)."""
    filesystem, path = _filesystem(location)
    path = path.rstrip("/")

    def read_json(name: str) -> Any:
        with filesystem.open_input_stream(f"{path}/{name}") as stream:
            return json.loads(stream.read())

    names = {info.base_name for info in filesystem.get_file_info(pafs.FileSelector(path))}
    if "dataset_dict.json" in names:
        splits = read_json("dataset_dict.json")["splits"]
        if split is None and len(splits) == 1:
            split = splits[0]
        if split not in splits:
            raise ValueError(f"{location}: a DatasetDict with splits {', '.join(splits)}; name one with `split:`")
        path = f"{path}/{split}"
        names = {info.base_name for info in filesystem.get_file_info(pafs.FileSelector(path))}
    if "state.json" in names:
        for data_file in read_json("state.json")["_data_files"]:
            with filesystem.open_input_stream(f"{path}/{data_file['filename']}") as stream:
                yield from pa.ipc.open_stream(stream)
        return
    parquet = sorted(info.path for info in filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
                     if info.path.endswith(".parquet"))
    if split:
        parquet = [name for name in parquet if split in PurePosixPath(name).relative_to(path).parent.parts
                   or PurePosixPath(name).name.startswith(f"{split}-")]
    if not parquet:
        raise ValueError(f"{location}: a folder, but neither a datasets save_to_disk folder (no state.json) nor "
                         f"one holding Parquet files{f' of split {split}' if split else ''}")
    for name in parquet:
        with filesystem.open_input_file(name) as handle:
            yield from pq.ParquetFile(handle).iter_batches()


def _table_records(batches: Iterator[pa.RecordBatch], prefix: str, id_column: str | None) -> Iterator[Record]:
    row = 0
    for batch in batches:
        for fields in batch.to_pylist():
            row += 1
            raw = json.dumps(fields, ensure_ascii=False, default=str)
            yield Record(row, raw, explicit_id(fields, id_column) or f"{prefix}:{row}", fields)


def json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def explicit_id(fields: Mapping[str, Any], key: str | None) -> str | None:
    value = fields.get(key) if key else None
    if value is None:
        return None
    return str(value).strip() or None
