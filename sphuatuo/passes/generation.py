"""One resumable generation pass: prompt rows, run them through an engine, append to a dataset folder.

Keys already present in the folder are not generated again, so a pass interrupted by a crash loses at
most the batches in flight, and a finished pass costs nothing when re-run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pyarrow.compute as pc
import ray.data

from sphuatuo import engines
from sphuatuo.engines import LIGHT_CPUS, Request
from sphuatuo.parsing.replies import split_think_answer
from sphuatuo.passes import PassTarget, Row
from sphuatuo.prompts import Messages
from sphuatuo.recipe import EngineConfig
from sphuatuo.store.progress import RowProgress

log = logging.getLogger("sphuatuo")


def sample_key(question_id: str, sample: int, samples_per_question: int) -> str:
    """The key of the k-th sample of a question. One sample per question keeps the question id as its
    key, so single-sample runs resume as before."""
    return question_id if samples_per_question == 1 else f"{question_id}#{sample}"


def missing_rows(ctx: PassTarget, rows: list[Row], folder: str, key: str = "key") -> list[Row]:
    done = set(ctx.run.read_column(key, folder))
    todo = [row for row in rows if row[key] not in done]
    if done:
        log.info("%s: %d rows already written, %d to go", folder, len(rows) - len(todo), len(todo))
    return todo


def generate_pass(
    ctx: PassTarget,
    rows: list[Row],
    folder: str,
    *,
    engine: EngineConfig,
    request: Request,
    messages: Callable[[Row], Messages],
    model: str | None = None,
) -> int:
    """Generate a reply for each row not yet in `folder`; return how many rows were written now.

    Each row needs a unique `key`. Output rows are the input rows plus the engine's columns
    (see `sphuatuo.engines.GENERATION_COLUMNS`) and `model`.
    """
    todo = missing_rows(ctx, rows, folder)
    if not todo:
        return 0
    model_name = model or engine.model
    ds = ray.data.from_items([{**row, "messages": messages(row)} for row in todo])
    ds = engines.generate(ds, engine, request, model=model_name)
    ds = ds.map(lambda row: _whole_reply(row, model_name), num_cpus=LIGHT_CPUS)
    progress = RowProgress(folder, total=len(todo))
    # The driver appends each batch as it streams out, so a crash loses only the batches in flight.
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        ctx.run.append_rows(batch, folder)
        progress.update(batch.num_rows, pc.sum(batch["num_generated_tokens"]).as_py() or 0)
    done = progress.close()
    passes = ctx.record.details.setdefault("throughput", {})
    passes[folder] = {"rows": done.rows, "seconds": round(done.seconds, 1), "rows_per_s": round(done.rows_per_s, 3),
                      "output_tokens_per_s": round(done.tokens_per_s, 1)}
    return len(todo)


def _whole_reply(row: Row, model_name: str) -> Row:
    """Drop the chat; when it ended with a prefilled assistant turn, keep that start in the reply, so
    `generated_text` is the whole assistant message."""
    last = row["messages"][-1]
    prefix = last["content"] if last["role"] == "assistant" else ""
    out = {key: value for key, value in row.items() if key != "messages"}
    return {**out, "generated_text": prefix + row["generated_text"], "model": model_name}


def count_tokens(rows: list[Row]) -> tuple[int, int]:
    return (
        sum(int(row.get("num_input_tokens") or 0) for row in rows),
        sum(int(row.get("num_generated_tokens") or 0) for row in rows),
    )


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
