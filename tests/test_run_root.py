"""The run root never loses rows to a read error: unreadable files are retried, then named, never deleted.

Real Parquet files on the local filesystem; the object-store cases wrap it in a fake that fails the
first N reads, as a flaky S3 or NFS server would.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

import sphuatuo.store.run_root as run_root_module
from sphuatuo.store.run_root import RunRoot, RunRootReadError

ROWS = [{"key": "q1", "text": "a"}, {"key": "q2", "text": "b"}]


class FlakyFilesystemFake(pafs.FileSystemHandler):
    """A local filesystem whose next `fail["list"]` folder listings and `fail["open"]` file opens raise
    OSError, like an object store that drops connections for a few seconds. Counts the calls and
    records every delete it is asked for."""

    def __init__(self) -> None:
        self.local = pafs.LocalFileSystem()
        self.fail = {"list": 0, "open": 0}
        self.calls = {"list": 0, "open": 0}
        self.deleted: list[str] = []

    def _read(self, kind: str) -> None:
        self.calls[kind] += 1
        if self.fail[kind] > 0:
            self.fail[kind] -= 1
            raise OSError(f"connection reset (fake {kind} failure)")

    def get_type_name(self) -> str:
        return "flaky-fake"

    def equals(self, other: pafs.FileSystemHandler) -> bool:
        return other is self

    def normalize_path(self, path: str) -> str:
        return path

    def get_file_info(self, paths: list[str]) -> list[pafs.FileInfo]:
        return self.local.get_file_info(paths)

    def get_file_info_selector(self, selector: pafs.FileSelector) -> list[pafs.FileInfo]:
        self._read("list")
        return self.local.get_file_info(selector)

    def create_dir(self, path: str, recursive: bool) -> None:
        self.local.create_dir(path, recursive=recursive)

    def delete_dir(self, path: str) -> None:
        self.deleted.append(path)
        self.local.delete_dir(path)

    def delete_dir_contents(self, path: str, missing_dir_ok: bool = False) -> None:
        self.deleted.append(path)
        self.local.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self) -> None:
        raise AssertionError("never")

    def delete_file(self, path: str) -> None:
        self.deleted.append(path)
        self.local.delete_file(path)

    def move(self, src: str, dest: str) -> None:
        self.local.move(src, dest)

    def copy_file(self, src: str, dest: str) -> None:
        self.local.copy_file(src, dest)

    def open_input_stream(self, path: str):
        self._read("open")
        return self.local.open_input_stream(path)

    def open_input_file(self, path: str):
        self._read("open")
        return self.local.open_input_file(path)

    def open_output_stream(self, path: str, metadata: dict | None = None):
        return self.local.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path: str, metadata: dict | None = None):
        return self.local.open_append_stream(path, metadata=metadata)


def _flaky_run(root: Path, **retries: float) -> tuple[RunRoot, FlakyFilesystemFake]:
    RunRoot(str(root)).write_rows(ROWS, "stage", "rows")  # written through the plain local filesystem
    fake = FlakyFilesystemFake()
    return RunRoot(str(root), pafs.PyFileSystem(fake), **retries), fake


def _corrupt_file(run: RunRoot) -> Path:
    """A complete-looking name over a Parquet file cut in half (as a disk error or a foreign tool leaves)."""
    [good] = run.parquet_files("stage", "rows")
    bad = Path(good).with_name("part-corrupt.parquet")
    data = Path(good).read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    return bad


def test_corrupt_parquet_file_fails_the_read_naming_it_and_is_kept(tmp_path: Path) -> None:
    run = RunRoot(str(tmp_path), read_attempts=2, read_backoff_s=0)
    run.write_rows(ROWS, "stage", "rows")
    bad = _corrupt_file(run)

    with pytest.raises(RunRootReadError, match=r"part-corrupt\.parquet \(tried 2 times\): ArrowInvalid"):
        run.read_rows("stage", "rows")
    with pytest.raises(RunRootReadError, match=r"part-corrupt\.parquet"):
        run.read_column("key", "stage", "rows")
    assert bad.exists()
    assert str(bad) in run.parquet_files("stage", "rows")  # still listed: the stage fails, it does not shrink


def test_unfinished_tmp_files_are_ignored_and_left_alone(tmp_path: Path) -> None:
    run = RunRoot(str(tmp_path))
    run.write_rows(ROWS, "stage", "rows")
    [good] = run.parquet_files("stage", "rows")
    unfinished = Path(good).with_name("part-crashed.parquet.0123abcd.tmp")
    unfinished.write_bytes(b"PAR1 half a file")

    assert run.read_rows("stage", "rows") == ROWS
    assert run.parquet_files("stage", "rows") == [good]
    assert unfinished.exists()


def test_writes_leave_only_complete_files(tmp_path: Path) -> None:
    run = RunRoot(str(tmp_path))
    run.write_rows(ROWS, "stage", "small")
    run.write_rows(ROWS[:1], "stage", "small")  # replaced whole
    run.put_rows(pa.Table.from_pylist(ROWS), "stage", "rows")
    run.write_text("{}", "manifest.json")

    assert run.read_rows("stage", "small") == ROWS[:1]
    assert not list(tmp_path.rglob("*.tmp"))


def test_rows_put_again_by_a_retried_task_replace_their_file_instead_of_adding_a_copy(tmp_path: Path) -> None:
    import pyarrow as pa

    run = RunRoot(str(tmp_path))
    rows = pa.Table.from_pylist([{**row, "key": f"k{i}"} for i, row in enumerate(ROWS)])
    run.put_rows(rows, "stage", "rows")
    run.put_rows(rows, "stage", "rows")  # the same task run again after a crash
    run.put_rows(rows.slice(0, 1), "stage", "rows")  # other rows: a file of their own
    assert len(run.parquet_files("stage", "rows")) == 2
    assert sorted(row["key"] for row in run.read_rows("stage", "rows")) == ["k0", "k0", "k1"]


def test_missing_dataset_folder_reads_as_empty(tmp_path: Path) -> None:
    run = RunRoot(str(tmp_path))
    assert run.parquet_files("stage", "none") == []
    assert run.read_rows("stage", "none") == []


def test_read_rides_out_two_failures_with_flaky_filesystem_fake(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(run_root_module.time, "sleep", sleeps.append)
    run, fake = _flaky_run(tmp_path, read_attempts=4, read_backoff_s=0.01)

    fake.fail["list"] = 2
    with caplog.at_level(logging.WARNING, logger="sphuatuo"):
        assert run.read_rows("stage", "rows") == ROWS
    assert sleeps == [0.01, 0.02]  # exponential backoff
    assert [r.message.split("; ")[-1] for r in caplog.records] == ["try 2 of 4 in 0.0s", "try 3 of 4 in 0.0s"]

    fake.fail["open"] = 2
    assert run.read_column("key", "stage", "rows") == ["q1", "q2"]
    assert fake.fail["open"] == 0 and sleeps == [0.01, 0.02, 0.01, 0.02]  # the file's read, retried twice
    assert fake.deleted == []


def test_read_fails_naming_the_file_after_every_retry_with_flaky_filesystem_fake(tmp_path: Path) -> None:
    run, fake = _flaky_run(tmp_path, read_attempts=3, read_backoff_s=0)
    run.write_text("{}", "manifest.json")
    [file] = run.parquet_files("stage", "rows")
    fake.fail["open"] = 100

    with pytest.raises(RunRootReadError, match=rf"{file} \(tried 3 times\): OSError: connection reset"):
        run.read_rows("stage", "rows")
    with pytest.raises(RunRootReadError, match=r"manifest\.json \(tried 3 times\)"):
        run.read_text("manifest.json")
    assert fake.calls["open"] == 6
    assert fake.deleted == []
    assert Path(file).exists()


def test_missing_text_file_is_not_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run_root_module.time, "sleep", lambda s: pytest.fail("a missing file was retried"))
    with pytest.raises(FileNotFoundError):
        RunRoot(str(tmp_path)).read_text("manifest.json")
