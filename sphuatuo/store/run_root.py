"""The run root: where every stage reads its inputs and writes its one output dataset.

Storage goes through pyarrow filesystems, so the same run root can be a local folder, an NFS mount
shared by all nodes, or an `s3://` / `gs://` prefix.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from sphuatuo.recipe import CREDENTIALS_ADVICE, uri_credentials


class RunRoot:
    """A run's storage. `uri` is what Ray and pyarrow are given; `path` is its filesystem path."""

    def __init__(self, location: str, filesystem: pafs.FileSystem | None = None):
        """`filesystem`: one already built for `location` (e.g. handed to a Ray worker with its options)."""
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
        self.fs.create_dir(self.path, recursive=True)

    def join(self, *parts: str) -> str:
        """A location inside the run, in the form `uri` has (a plain path for local runs)."""
        return "/".join([self.uri.rstrip("/"), *parts])

    def fs_path(self, *parts: str) -> str:
        return "/".join([self.path.rstrip("/"), *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.fs_path(*parts)).type != pafs.FileType.NotFound

    def write_text(self, text: str, *parts: str) -> None:
        """Write atomically where the filesystem allows (rename on local disk; object stores are atomic)."""
        target = self.fs_path(*parts)
        self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
        tmp = target + ".tmp" if isinstance(self.fs, pafs.LocalFileSystem) else target
        with self.fs.open_output_stream(tmp) as out:
            out.write(text.encode("utf-8"))
        if tmp != target:
            self.fs.move(tmp, target)

    def read_text(self, *parts: str) -> str:
        with self.fs.open_input_stream(self.fs_path(*parts)) as f:
            return f.read().decode("utf-8")

    def parquet_files(self, *parts: str) -> list[str]:
        """Readable Parquet files under a dataset folder; a file cut short by a crash is removed."""
        folder = self.fs_path(*parts)
        if self.fs.get_file_info(folder).type != pafs.FileType.Directory:
            return []
        files = []
        for info in self.fs.get_file_info(pafs.FileSelector(folder)):
            if not info.path.endswith(".parquet"):
                continue
            try:
                pq.read_metadata(info.path, filesystem=self.fs)
            except Exception:  # noqa: BLE001 - any unreadable file is a partial write from a crash
                self.fs.delete_file(info.path)
                continue
            files.append(info.path)
        return sorted(files)

    def read_column(self, column: str, *parts: str) -> list[Any]:
        values: list[Any] = []
        for file in self.parquet_files(*parts):
            values.extend(pq.read_table(file, columns=[column], filesystem=self.fs).column(column).to_pylist())
        return values

    def write_rows(self, rows: list[dict[str, Any]] | pa.Table, *parts: str) -> None:
        """Write a small dataset as one Parquet file `<parts>/part-0.parquet` (replacing it)."""
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
        self.fs.create_dir(self.fs_path(*parts), recursive=True)
        pq.write_table(table, self.fs_path(*parts, "part-0.parquet"), filesystem=self.fs)

    def append_rows(self, rows: list[dict[str, Any]] | pa.Table, *parts: str) -> None:
        """Add one Parquet file to a dataset folder, written whole or not at all (a crash mid-write
        leaves a `.tmp` that readers ignore)."""
        table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
        self.fs.create_dir(self.fs_path(*parts), recursive=True)
        target = self.fs_path(*parts, f"part-{uuid.uuid4().hex}.parquet")
        tmp = target + ".tmp" if isinstance(self.fs, pafs.LocalFileSystem) else target
        pq.write_table(table, tmp, filesystem=self.fs)
        if tmp != target:
            self.fs.move(tmp, target)

    def read_rows(self, *parts: str) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        for file in self.parquet_files(*parts):
            rows.extend(pq.read_table(file, filesystem=self.fs).to_pylist())
        return rows
