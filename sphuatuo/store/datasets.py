"""A run-root folder as a Ray Dataset: its rows are read by Ray's workers, never by the driver.

Ray Data's own `read_parquet` lists the files in a task that asks for a whole CPU, and that task waits forever
beside engine replicas that hold every CPU of a small node. Here the driver lists the files and reads their
footers (for the row counts) and nothing else; each slice of a file is one block, read on a worker through
`RunRoot`, with its retries, as a light step (`light_step`).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from sphuatuo.store.run_root import RunRoot
from sphuatuo.store.runtime import LIGHT_CPUS

STEPS_AT_ONCE = 2

T = TypeVar("T")

Folder = tuple[str, ...]  # the parts of a dataset folder under the run root


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


def folder_columns(run: RunRoot, folders: Sequence[Folder], columns: list[str],
                   apply: Callable[[pa.Table], Any] | None = None) -> ray.ObjectRef:
    """A reference to `columns` of the rows of `folders` (or to `apply` of them), read on one of Ray's workers
    that reads only those columns: the driver never holds them."""
    return _column_applied.remote(run, list(folders), columns, apply)


def keys_in(run: RunRoot, folders: Sequence[Folder], column: str = "key") -> ray.ObjectRef:
    """A reference to the values of `column` in `folders`, read on a worker."""
    return folder_columns(run, folders, [column], lambda table: table.column(column).cast(pa.string()).combine_chunks())


def keep_keys(rows: ray.data.Dataset, keys: pa.Array | ray.ObjectRef, *, keep: bool,
              column: str = "key") -> ray.data.Dataset:
    """The rows whose `column` is in `keys` (`keep`), or those whose is not: a join executed by Ray's workers."""

    def select(batch: pa.Table) -> pa.Table:
        found = pc.is_in(batch[column], value_set=ray.get(keys) if isinstance(keys, ray.ObjectRef) else keys)
        return batch.filter(found if keep else pc.invert(found))

    return rows.map_batches(select, batch_format="pyarrow", **light_step())


def column_summary(run: RunRoot, folders: Sequence[Folder], columns: list[str],
                   summarise: Callable[[pa.Table], T]) -> T:
    """`summarise` of the rows of `folders`, run on one of Ray's workers that reads only `columns`: the driver
    gets the summary (counts), never the rows."""
    return ray.get(folder_columns(run, folders, columns, summarise))


@ray.remote(num_cpus=LIGHT_CPUS)
def _column_applied(run: RunRoot, folders: list[Folder], columns: list[str],
                    apply: Callable[[pa.Table], Any] | None) -> Any:
    tables = [run.read_parquet_file(file, columns) for parts in folders for file in run.parquet_files(*parts)]
    table = (pa.concat_tables(tables, promote_options="default") if tables
             else pa.table({column: pa.array([], pa.null()) for column in columns}))
    return table if apply is None else apply(table)


def on_worker(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` as a task on one of Ray's workers, for a step that needs a stage's rows whole (grouping them by
    question, say): the rows are read and used there, and only `fn`'s result (counts) comes back to the driver."""
    return ray.get(ray.remote(num_cpus=LIGHT_CPUS)(fn).remote(*args))


def near_driver(fn: Callable[..., T], *args: Any, locations: Iterable[str], credentials: str) -> T:
    """`fn(*args)`, a step that reads files a recipe names (`locations`), as a task on a worker of the driver's own
    node, run in the driver's working folder: a local path in a recipe means a file on the machine that ran
    `sphuatuo` (the head node under `ray job submit`), relative to where it ran, and that worker sees it as the
    driver does, while the rows stay off the driver, which gets `fn`'s result (counts). Object-store files under
    `storage.credentials: driver` are read by the driver itself: the nodes have no credentials of their own there,
    and the driver's are relayed only for the run root's filesystem."""
    if credentials == "driver" and any("://" in location for location in locations):
        return fn(*args)
    on_this_node = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    task = ray.remote(num_cpus=LIGHT_CPUS, scheduling_strategy=on_this_node)(_in_folder)
    return ray.get(task.remote(os.getcwd(), fn, *args))


def _in_folder(folder: str, fn: Callable[..., T], *args: Any) -> T:
    back = os.getcwd()  # a worker process runs later tasks too: leave it where it was
    os.chdir(folder)
    try:
        return fn(*args)
    finally:
        os.chdir(back)


def counts_row(**counts: int) -> pa.Table:
    """The one-row result of a step that writes its rows itself and hands on only how many (see `add_up`)."""
    return pa.table({name: [value] for name, value in counts.items()})


def add_up(counts: ray.data.Dataset) -> Counter[str]:
    """Run a dataset whose steps write their rows and return one row of counts per block (on Ray's workers);
    the driver adds the counts up."""
    totals: Counter[str] = Counter()
    for batch in counts.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in batch.to_pylist():
            totals.update(row)
    return totals
