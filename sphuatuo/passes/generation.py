"""One resumable generation pass: prompt rows, run them through an engine, write the replies to a dataset folder.

Keys already present in the folder are not generated again, so a pass interrupted by a crash loses at
most the batches in flight, and a finished pass costs nothing when re-run. A row the engine fails on is
tried again, up to the role's `max_attempts`; each failed attempt is kept in `<folder>_errors`. When
more than the role's `max_error_share` of the pass fails, the pass fails with the counts and the
commonest errors, and its failed rows stay out of the folder, so the next run tries them again (their
attempts numbered on from `<folder>_errors`). Only a pass within its share writes a row that never
succeeded, with `finish_reason` "error"; every run re-checks the share over the whole folder.

The replies never pass through the driver: as they stream out of the engines, Ray's workers write each batch
as one Parquet file named by a digest of its keys (a task Ray runs again writes the same file), and hand the
driver counts and the keys and messages of the rows the engine failed on.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
import ray.exceptions

from sphuatuo import engines
from sphuatuo.engines import GENERATION_COLUMNS, Request
from sphuatuo.parsing.replies import split_think_answer
from sphuatuo.passes import PassTarget, Row
from sphuatuo.prompts import PromptInput
from sphuatuo.recipe import EngineConfig
from sphuatuo.store.datasets import FolderRows, keep_keys, keys_in, light_step, on_worker
from sphuatuo.store.progress import RowProgress
from sphuatuo.store.run_root import RunRoot
from sphuatuo.store.runtime import LIGHT_CPUS

log = logging.getLogger("sphuatuo")


# What a generation pass adds to each of its rows: the engine's columns, the engine's error and the model.
REPLY_COLUMNS = (*GENERATION_COLUMNS, "engine_error", "model")


class PassFailed(RuntimeError):
    """More of a pass's rows failed in the engine than its role allows (`max_error_share`), or an engine replica
    died more often than its role allows (`max_restarts`)."""


def sample_key(question_id: str, sample: int, samples_per_question: int) -> str:
    """The key of the k-th sample of a question. One sample per question keeps the question id as its
    key, so single-sample runs resume as before."""
    return question_id if samples_per_question == 1 else f"{question_id}#{sample}"


def generate_pass(
    ctx: PassTarget,
    rows: FolderRows,
    folder: str,
    *,
    engine: EngineConfig,
    request: Request,
    messages: Callable[[Row], PromptInput],
    model: str | None = None,
) -> int:
    """Generate a reply for each row not yet in `folder`; return how many rows went through the engine now.

    `rows`: in the cluster (the driver never holds them); each needs a unique `key`. `messages` gives each row's
    chat, or a raw prompt string that the engine sends without the chat template (all rows of a pass the one or
    the other); it runs on Ray's workers, so it must pickle. Output rows are the input rows plus the engine's
    columns (see `sphuatuo.engines.GENERATION_COLUMNS`) and `model`; Ray's workers write them, the driver gets
    counts.
    """
    todo, todo_count = _todo(ctx, rows, folder)
    failed, generated = Failures(), 0
    if todo_count:
        failed, generated = _generate_with_retries(ctx, todo, todo_count, folder, engine, request, messages,
                                                   model or engine.model)
    # Error rows already in the folder count too (kept by an earlier run within a share since lowered, or
    # written by a version that kept them before failing), so a resumed pass never passes unchecked.
    kept = on_worker(_kept_errors, ctx.run, folder)
    _check_error_share(folder, failed.errors + kept, rows.count, engine)
    if failed.keys:  # kept, with finish_reason "error" and the engine's message
        on_worker(_keep_failed_rows, ctx.run, folder, failed.keys)
    return generated


@dataclass
class Failures:
    """The keys and engine messages of the rows a pass could not generate (the rows stay in `<folder>_errors`)."""

    keys: list[str] = field(default_factory=list)
    errors: list[str | None] = field(default_factory=list)


def _kept_errors(run: RunRoot, folder: str) -> list[str | None]:
    """The engine's message of each error row in `folder`."""
    return [row.get("engine_error") for row in run.read_rows(folder, where=[("finish_reason", "==", "error")])]


def _todo(ctx: PassTarget, rows: FolderRows, folder: str) -> tuple[ray.data.Dataset | None, int]:
    """The rows of the pass not yet in `folder`, as a Dataset (None when there are none), and how many."""
    # Only this pass writes its folder, so the keys there are some of its rows': the count needs no join.
    written = ctx.run.count_rows(folder)
    if not written:
        return rows.rows, rows.count
    log.info("%s: %d rows already written, %d to go", folder, written, rows.count - written)
    if written >= rows.count:
        return None, 0
    return keep_keys(rows.rows, keys_in(ctx.run, [(folder,)]), keep=False), rows.count - written


def _generate_with_retries(ctx: PassTarget, todo: ray.data.Dataset, todo_count: int, folder: str,
                           engine: EngineConfig, request: Request, messages: Callable[[Row], PromptInput],
                           model_name: str) -> tuple[Failures, int]:
    """Generate `todo` into `folder`, each row tried up to `max_attempts` times; return the rows that never
    succeeded and how many rows went through the engine. Every failed attempt goes to `<folder>_errors`,
    numbered after those of earlier runs."""
    earlier = dict(Counter(ctx.run.read_column("key", f"{folder}_errors")))
    progress = RowProgress(folder, total=todo_count)
    pending, failed = todo, Failures()
    for attempt in range(1, engine.max_attempts + 1):
        failed = _generate_once(ctx, pending, folder, engine, request, messages, model_name, progress,
                                Attempt(attempt, earlier))
        if not failed.keys:
            break
        if attempt < engine.max_attempts:
            log.warning("%s: %d rows failed in the engine (attempt %d of %d); trying them again", folder,
                        len(failed.keys), attempt, engine.max_attempts)
            pending = keep_keys(todo, pa.array(failed.keys, pa.string()), keep=True)
    progress.update(len(failed.keys))
    done = progress.close()
    passes = ctx.record.details.setdefault("throughput", {})
    passes[folder] = {"rows": done.rows, "seconds": round(done.seconds, 1), "rows_per_s": round(done.rows_per_s, 3),
                      "output_tokens_per_s": round(done.tokens_per_s, 1), "engine_errors": len(failed.keys)}
    return failed, done.rows


@dataclass(frozen=True)
class Attempt:
    """Which trip through the engine this is, and how many failed attempts each key had in earlier runs."""

    number: int
    earlier: dict[str, int]


def _engine_input(row: Row, prompt: PromptInput) -> Row:
    return {**row, "prompt": prompt} if isinstance(prompt, str) else {**row, "messages": prompt}


def _engine_inputs(batch: pa.Table, messages: Callable[[Row], PromptInput], folder: str) -> pa.Table:
    items = [_engine_input(row, messages(row)) for row in batch.to_pylist()]
    if len({"prompt" in item for item in items}) > 1:
        raise ValueError(f"{folder}: a pass sends chats or raw prompts, not both")
    return pa.Table.from_pylist(items)


def _write_replies(batch: pa.Table, run: RunRoot, folder: str, attempt: Attempt) -> pa.Table:
    """On one of Ray's workers: write the rows the engine answered to `folder` and the rows it failed on,
    numbered, to `<folder>_errors`; hand on only counts and the failed rows' keys and messages."""
    written, tokens, keys, errors = 0, 0, [], []
    if batch.num_rows:
        error = pc.equal(batch["finish_reason"], "error")
        ok, failed = batch.filter(pc.invert(error)), batch.filter(error)
        if ok.num_rows:
            run.put_rows(ok, folder)
            written, tokens = ok.num_rows, pc.sum(ok["num_generated_tokens"]).as_py() or 0
        keys = failed.column("key").to_pylist()
        if keys:  # (the hf back-end never fails a row, and has no `engine_error` column)
            errors = failed.column("engine_error").to_pylist()
            numbers = [attempt.earlier.get(key, 0) + attempt.number for key in keys]
            run.put_rows(failed.append_column("attempt", pa.array(numbers)), f"{folder}_errors",
                         tag=" ".join(map(str, numbers)))
    return pa.table({"written": [written], "output_tokens": [tokens],
                     "failed_keys": pa.array([keys], pa.list_(pa.string())),
                     "failed_errors": pa.array([errors], pa.list_(pa.string()))})


def _keep_failed_rows(run: RunRoot, folder: str, keys: list[str]) -> None:
    """Write the last failed attempt of each of `keys` from `<folder>_errors` to `folder`, as its final row."""
    attempts = run.read_rows(f"{folder}_errors", where=[("key", "in", keys)])
    last = {row["key"]: row for row in sorted(attempts, key=lambda row: row["attempt"])}
    run.put_rows(pa.Table.from_pylist([{k: v for k, v in row.items() if k != "attempt"} for row in last.values()]),
                 folder)


def _generate_once(ctx: PassTarget, rows: ray.data.Dataset, folder: str, engine: EngineConfig, request: Request,
                   messages: Callable[[Row], PromptInput], model_name: str, progress: RowProgress,
                   attempt: Attempt) -> Failures:
    """One trip of `rows` through the engine: Ray's workers write the replies batch by batch as they stream out
    (a crash loses only the batches in flight) and the driver adds up their counts; the keys and messages of the
    rows the engine failed on are returned."""
    ds = rows.map_batches(_engine_inputs, fn_kwargs={"messages": messages, "folder": folder},
                          batch_format="pyarrow", **light_step())
    ds = engines.generate(ds, engine, request, model=model_name, services=ctx.engines, folder=folder)
    ds = ds.map(lambda row: _whole_reply(row, model_name), num_cpus=LIGHT_CPUS)  # fuses into the engine's postprocess
    ds = ds.map_batches(_write_replies, fn_kwargs={"run": ctx.run, "folder": folder, "attempt": attempt},
                        batch_size=None, batch_format="pyarrow", num_cpus=LIGHT_CPUS)
    failed = Failures()
    try:
        for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for counts in batch.to_pylist():
                progress.update(counts["written"], counts["output_tokens"])
                failed.keys += counts["failed_keys"]
                failed.errors += counts["failed_errors"]
    except ray.exceptions.RayError as err:
        reason = _replica_death(err)
        if reason is None:
            raise
        raise PassFailed(
            f"{folder}: an engine replica of {model_name} died after {engine.max_restarts} restarts (max_restarts); "
            f"the {progress.rows} rows written are kept and a re-run generates the rest. Ray: {reason[:500]}"
        ) from err
    return failed


def _replica_death(err: ray.exceptions.RayError) -> str | None:
    """Ray's reason, when `err` is the death of an engine replica: raised as is by a replica of the pass (Ray
    Data's processor), or inside the task that sent a batch to a kept engine's replica, where only the error's
    text survives Ray Data's wrapping (its `UserCodeException` arrives without a cause)."""
    text = str(err)
    if not isinstance(err, ray.exceptions.ActorDiedError) and "ray.exceptions.ActorDiedError" not in text:
        return None
    return next((line.strip() for line in text.splitlines() if "exit detail" in line), text.splitlines()[0])


def _check_error_share(folder: str, errors: list[str | None], total: int, engine: EngineConfig) -> None:
    """`errors`: the engine's message for each row of the pass that ended in an error."""
    if not errors or len(errors) / total <= engine.max_error_share:
        return
    common = Counter(str(message)[:200] for message in errors).most_common(3)
    raise PassFailed(
        f"{folder}: {len(errors)} of {total} rows failed in the engine after {engine.max_attempts} attempts "
        f"({len(errors) / total:.0%}, more than max_error_share {engine.max_error_share:.0%}); commonest: "
        + "; ".join(f"{count} x {message}" for message, count in common)
        + f" (every attempt is in {folder}_errors)")


def _whole_reply(row: Row, model_name: str) -> Row:
    """Drop the chat (or raw prompt); when the chat ended with a prefilled assistant turn, keep that start in
    the reply, so `generated_text` is the whole assistant message."""
    last = row["messages"][-1] if "messages" in row else {"role": "user"}
    prefix = last["content"] if last["role"] == "assistant" else ""
    out = {key: value for key, value in row.items() if key not in ("messages", "prompt")}
    return {**out, "generated_text": prefix + row["generated_text"], "model": model_name}


def token_totals(run: RunRoot, folders: list[tuple[str, ...]]) -> tuple[int, int]:
    """The input and output tokens of the passes that wrote `folders` (read where this runs: on a worker)."""
    tables = [run.read_parquet_file(file, ["num_input_tokens", "num_generated_tokens"])
              for parts in folders for file in run.parquet_files(*parts)]
    return (sum(pc.sum(table["num_input_tokens"]).as_py() or 0 for table in tables),
            sum(pc.sum(table["num_generated_tokens"]).as_py() or 0 for table in tables))


def parse_reply(row: Row) -> Row:
    """Split the reply into thought and answer; a reply cut at the token budget is never complete, and
    a row the engine failed on keeps the engine's message."""
    parsed = split_think_answer(row["generated_text"])
    truncated = row["finish_reason"] == "length"
    parse_error = parsed.parse_error
    if truncated:
        parse_error = "truncated at max_tokens"
    elif row["finish_reason"] == "error":
        parse_error = f"engine error: {row.get('engine_error')}"
    return {**row, "think": parsed.think, "answer_text": parsed.answer, "truncated": truncated,
            "parse_error": parse_error}
