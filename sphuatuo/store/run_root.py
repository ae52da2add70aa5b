"""The run root: where every stage reads its inputs and writes its one output dataset.

Storage goes through pyarrow filesystems, so the same run root can be a local folder, an NFS mount
shared by all nodes, or an `s3://` / `gs://` prefix.

Every file is written whole or not at all (a `.tmp` renamed into place on local disk and NFS, one
whole-object PUT on object stores), so a file named `*.parquet` is complete and readers never guess.
A read that fails is retried with backoff, then raises naming the file: a flaky store or NFS mount
never costs rows, and nothing here deletes a file it did not just write.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sphuatuo.recipe import CREDENTIALS_ADVICE, uri_credentials

log = logging.getLogger("sphuatuo")

T = TypeVar("T")

# Tries of one read, and the first wait between them (doubled after each failed try): rides out a few
# seconds of a flaky object store or NFS server, then fails instead of hanging a stage.
READ_ATTEMPTS = 4
READ_BACKOFF_S = 0.5


class RunRootReadError(OSError):
    """A file of the run root that stayed unreadable after every retry; it is left where it is."""


class RunRoot:
    """A run's storage. `uri` is what Ray and pyarrow are given; `path` is its filesystem path."""

    def __init__(self, location: str, filesystem: pafs.FileSystem | None = None, *,
                 read_attempts: int = READ_ATTEMPTS, read_backoff_s: float = READ_BACKOFF_S):
        """`filesystem`: one already built for `location` (e.g. handed to a Ray worker with its options).
        `read_attempts` / `read_backoff_s`: retries of each read (tests make them short)."""
        problem = uri_credentials(location)
        if problem:  # a run root given on the command line, which no recipe validated
            raise ValueError("run root: " + CREDENTIALS_ADVICE.format(problem=problem))
        if "://" not in location:
            location = os.path.abspath(os.path.expanduser(location))
        if filesystem is None:
            self.fs, self.path = pafs.FileSystem.from_uri(location)
        else:
            self.fs, self.path = filesystem, location.split("://", 1)[-1]
        self.uri = location
        self.read_attempts = read_attempts
        self.read_backoff_s = read_backoff_s
        self.fs.create_dir(self.path, recursive=True)

    def join(self, *parts: str) -> str:
        """A location inside the run, in the form `uri` has (a plain path for local runs)."""
        return "/".join([self.uri.rstrip("/"), *parts])

    def fs_path(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.fs_path(*parts)).type != pafs.FileType.NotFound

    def _staging(self, target: str) -> str:
        """Where to write `target` so that it appears whole: a unique `.tmp` beside it on local disk and
        NFS (renamed into place after), the target itself on object stores (a PUT is atomic)."""
        if isinstance(self.fs, pafs.LocalFileSystem):
            return f"{target}.{uuid.uuid4().hex[:8]}.tmp"
        return target

    def write_text(self, text: str, *parts: str) -> None:
        """Write atomically where the filesystem allows (rename on local disk; object stores are atomic)."""
        target = self.fs_path(*parts)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        tmp = self._staging(target)
        with self.fs.open_output_stream(tmp) as out:
            out.write(text.encode("utf-8"))
        if tmp != target:
            self.fs.move(tmp, target)

    def move(self, source: str, *target: str) -> None:
        """Move a file or folder inside the run (a rename on local disk; copy, then remove the source, on object
        stores, which have no directory rename)."""
        source_path, target_path = self.fs_path(source), self.fs_path(*target)
        self.fs.create_dir(target_path.rsplit("/", 1)[0], recursive=True)
        if isinstance(self.fs, pafs.LocalFileSystem):
            self.fs.move(source_path, target_path)
            return
        pafs.copy_files(source_path, target_path, source_filesystem=self.fs, destination_filesystem=self.fs)
        self.fs.delete_dir(source_path)

    def replace_dir(self, local: str, *parts: str) -> None:
        """Copy the local folder `local` to `<parts>`, replacing whatever was there."""
        destination = self.fs_path(*parts)
        if self.exists(*parts):
            self.fs.delete_dir(destination)
        self.fs.create_dir(destination, recursive=True)
        pafs.copy_files(local, destination, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def _read(self, path: str, read: Callable[[], T]) -> T:
        """`read()`, retried with exponential backoff; then a RunRootReadError naming `path`. A file that
        is not there is not retried: FileNotFoundError at once."""
        attempt = 1
        while True:
            try:
                return read()
            except FileNotFoundError:
                raise
            except (OSError, pa.ArrowException) as err:
                if attempt >= self.read_attempts:
                    raise RunRootReadError(f"cannot read {path} (tried {attempt} times): "
                                           f"{type(err).__name__}: {err}") from err
                delay = self.read_backoff_s * 2 ** (attempt - 1)
                log.warning("reading %s failed (%s: %s); try %d of %d in %.1fs", path, type(err).__name__, err,
                            attempt + 1, self.read_attempts, delay)
                time.sleep(delay)
                attempt += 1

    def read_text(self, *parts: str) -> str:
        path = self.fs_path(*parts)

        def read() -> str:
            with self.fs.open_input_stream(path) as f:
                return f.read().decode("utf-8")

        return self._read(path, read)

    def parquet_files(self, *parts: str) -> list[str]:
        """The Parquet files of a dataset folder, sorted. Only complete files carry the `.parquet` name
        (writes in flight or cut short end in `.tmp`), so nothing is opened, judged or removed here."""
        folder = self.fs_path(*parts)
        infos = self._read(folder, lambda: self.fs.get_file_info(pafs.FileSelector(folder, allow_not_found=True)))
        return sorted(info.path for info in infos
                      if info.type == pafs.FileType.File and info.path.endswith(".parquet"))

    def read_parquet_file(self, file: str, columns: list[str] | None = None, filters: list | None = None) -> pa.Table:
        """One Parquet file of the run (a path from `parquet_files`), read with retries."""
        return self._read(file, lambda: pq.read_table(file, columns=columns, filters=filters, filesystem=self.fs))

    def file_row_counts(self, *parts: str) -> dict[str, int]:
        """Each Parquet file of a dataset folder with its row count, from the files' footers (no row is read)."""
        return {file: self._read(file, lambda file=file: pq.read_metadata(file, filesystem=self.fs)).num_rows
                for file in self.parquet_files(*parts)}

    def count_rows(self, *parts: str) -> int:
        return sum(self.file_row_counts(*parts).values())

    def read_column(self, column: str, *parts: str) -> list[Any]:
        values: list[Any] = []
        for file in self.parquet_files(*parts):
            values.extend(self.read_parquet_file(file, [column]).column(column).to_pylist())
        return values

    def _write_parquet(self, table: pa.Table, *parts: str) -> None:
        target = self.fs_path(*parts)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        tmp = self._staging(target)
        pq.write_table(table, tmp, filesystem=self.fs)
        if tmp != target:
            self.fs.move(tmp, target)

    def write_rows(self, rows: list[dict[str, Any]] | pa.Table, *parts: str, part: int = 0) -> None:
        """Write a small dataset, or the `part`-th piece of a larger one, as one Parquet file
        `<parts>/part-<5 digits of part>.parquet`, replacing it whole: writing the same piece again never adds rows."""
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
        self._write_parquet(table, *parts, f"part-{part:05d}.parquet")

    def put_rows(self, table: pa.Table, *parts: str, key: str = "key", tag: str = "") -> None:
        """Add rows written by one of Ray's workers as one Parquet file named by a digest of their keys (and `tag`,
        for a folder that holds several rows of a key), replacing it whole: a task that Ray runs again after a
        crash writes the same file, never a second copy of its rows."""
        names = "\n".join([*([tag] if tag else []), *map(str, table.column(key).to_pylist())])
        digest = hashlib.sha256(names.encode("utf-8")).hexdigest()
        self._write_parquet(table, *parts, f"part-{digest[:32]}.parquet")

    def read_rows(self, *parts: str, where: list[tuple[str, str, Any]] | None = None) -> list[dict[str, Any]]:
        """The rows of a dataset folder; `where` (pyarrow filters, e.g. `[("finish_reason", "==", "error")]`)
        keeps only the matching ones, so a few rows are found without holding the rest."""
        rows: list[dict[str, Any]] = []
        for file in self.parquet_files(*parts):
            rows.extend(self.read_parquet_file(file, filters=where).to_pylist())
        return rows
