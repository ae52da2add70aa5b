"""A run-root folder as a Ray Dataset: its rows are read by Ray's workers, never by the driver.

Ray Data's own `read_parquet` lists the files in a task that asks for a whole CPU, and that task waits forever
beside engine replicas that hold every CPU of a small node. Here the driver lists the files and reads their
footers (for the row counts) and nothing else; each slice of a file is one block, read on a worker through
`RunRoot`, with its retries, as a light step (`light_step`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray.data

from sphuatuo.store.run_root import RunRoot
from sphuatuo.store.runtime import LIGHT_CPUS

STEPS_AT_ONCE = 2


def light_step() -> dict[str, Any]:
    """Ray Data arguments of a row-wise step that feeds an engine (reading, sampling, joining, building prompts): a
    sliver of a CPU, and two tasks at a time. Each concurrent task is a worker process of its own; left unbounded,
    twenty of them on a 2-core node crowd the engine off its cores (measured: `bench scale` at 5,000 questions took
    212 s with every step unbounded, 62 s bounded). A step takes milliseconds per block, so two keep any engine fed."""
    return {"num_cpus": LIGHT_CPUS, "compute": ray.data.TaskPoolStrategy(size=STEPS_AT_ONCE)}


@dataclass(frozen=True)
class FolderRows:
    """Rows that live in the cluster, with their count (known without reading them)."""

    rows: ray.data.Dataset
    count: int


def _read_slices(batch: pa.Table, run: RunRoot) -> pa.Table:
    tables = [run.read_parquet_file(piece["file"]).slice(piece["offset"], piece["length"])
              for piece in batch.to_pylist()]
    return pa.concat_tables(tables, promote_options="default")


def read_folder(run: RunRoot, *parts: str, rows_per_block: int) -> FolderRows:
    """The rows of a dataset folder in blocks of at most `rows_per_block` rows, read lazily on Ray's workers
    (`run` travels to them: on an object store it must be signed there, see
    `sphuatuo.store.credentials.shared_filesystem`). A block is what a stage step hands on at once, so a pass
    that writes as rows stream out should read blocks no larger than its engine's batches."""
    slices = [{"file": file, "offset": offset, "length": min(rows_per_block, rows - offset)}
              for file, rows in run.file_row_counts(*parts).items() for offset in range(0, rows, rows_per_block)]
    listing = ray.data.from_items(slices, override_num_blocks=max(1, len(slices)))
    rows = listing.map_batches(_read_slices, fn_kwargs={"run": run}, batch_size=1, batch_format="pyarrow",
                               **light_step())
    return FolderRows(rows, sum(slice["length"] for slice in slices))
