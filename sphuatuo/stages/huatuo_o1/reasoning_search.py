"""Reasoning-path search with a verifier, then natural reasoning and a final response (METHOD B.2).

The generator (the recipe's teacher) answers each problem as a JSON chain of Inner Thinking steps, a
Final Conclusion and a Verification; the verifier (the recipe's judge) compares the last Final
Conclusion with the ground truth. Unverified items take strategy steps (`sphuatuo.stages.huatuo_o1.search` keeps the
books). Each round is one generation pass and one verification pass over the items still searching,
keyed by item, attempt and depth, so a re-run resumes where it stopped. The items never pass through the
driver: each carries its state (chain, trace) in its row, `round_<n>/items` holds round n's, and a task on one
of Ray's workers advances them into the next round's or into `finished`. A verified chain is rendered as
text (`### title` per step), rewritten into natural first-person thinking, and a final response is
written from it. Every item keeps its search trace: strategies, depth, verdicts, whether the label
was revealed.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from sphuatuo.data.released import verifiable_problems
from sphuatuo.engines import Request
from sphuatuo.parsing.o1 import (
    Parsed,
    chain_from_plain_text,
    last_conclusion,
    parse_chain,
    parse_natural_reasoning,
    previous_reasoning,
    render_chain,
)
from sphuatuo.passes import Row
from sphuatuo.passes.generation import REPLY_COLUMNS, generate_pass, token_totals
from sphuatuo.passes.verdict import VERDICT_COLUMNS, conclusion_verifier, verdict_pass
from sphuatuo.prompts import Messages, get_prompt
from sphuatuo.recipe import ReasoningSearchStage
from sphuatuo.stages import StageContext, StageSkipped, log
from sphuatuo.stages.huatuo_o1 import write_released
from sphuatuo.stages.huatuo_o1.search import INIT, LABEL, SearchPlan, SearchState, advance, solved_counts
from sphuatuo.store.datasets import FolderRows, light_step, on_worker, read_folder
from sphuatuo.store.run_root import RunRoot

NAME = "reasoning_search"
CONFIG = ("models.teacher", "models.judge", "stages.reasoning_search", "seed", "stages.sft.data")
READS = ("verifiable_problems",)
# What the passes add to an item's row (its reply and verdict): dropped when the item moves on.
ANSWERED_COLUMNS = frozenset((*REPLY_COLUMNS, "conclusion", *VERDICT_COLUMNS))


def step_messages(stage: ReasoningSearchStage, row: Row) -> Messages:
    if row["step"] == INIT:
        return get_prompt(stage.init_prompt).messages(question=row["problem"])
    reasoning = previous_reasoning(json.loads(row["chain"]))
    if row["step"] == LABEL:
        return get_prompt("huatuo_o1/search_label").messages(question=row["problem"], reasoning=reasoning,
                                                             label=row["ground_truth"])
    return get_prompt(f"huatuo_o1/search_{row['step']}").messages(question=row["problem"], reasoning=reasoning)


def read_chain(stage: ReasoningSearchStage, text: str) -> Parsed:
    """The reply's steps; with `plain_text_fallback`, a non-JSON reply as plain text (its error kept as a note)."""
    parsed = parse_chain(text)
    if parsed.error and stage.plain_text_fallback and (steps := chain_from_plain_text(text)):
        return Parsed(steps, f"read as plain text: {parsed.error}")
    return parsed


def read_natural(stage: ReasoningSearchStage, text: str) -> Parsed:
    parsed = parse_natural_reasoning(text)
    if parsed.error and stage.plain_text_fallback and text.strip():
        return Parsed(text.strip())
    return parsed


def search(ctx: StageContext, count: int) -> SearchCounts:
    """Run search rounds over `reasoning_search/round_0/items` until no item is searching; every finished item's
    state goes to `reasoning_search/finished`. The rows stay on Ray's workers: each round is a generation pass
    and a verification pass over that round's items, and one worker task advances them into the next round's."""
    stage = ctx.recipe.stages.reasoning_search
    plan = SearchPlan(max_depth=stage.max_depth, max_attempts=stage.max_attempts, reveal_label=stage.reveal_label,
                      strategies=tuple(stage.strategies), seed=ctx.recipe.seed)
    request, teacher, judge = Request.from_config(stage.sampling), ctx.recipe.models.teacher, ctx.recipe.models.judge
    counts, searching = SearchCounts(), count
    while searching:
        here = round_folder(counts.rounds)
        log.info("%s: round %d, %d items searching", NAME, counts.rounds + 1, searching)
        items = read_folder(ctx.run, NAME, here, "items", rows_per_block=teacher.batch_size)
        generate_pass(ctx, items, f"{NAME}/{here}/steps", engine=teacher, request=request,
                      messages=lambda row: step_messages(stage, row))
        replies = read_folder(ctx.run, NAME, here, "steps", rows_per_block=teacher.batch_size)
        conclusions = replies.rows.map_batches(_with_conclusions, fn_kwargs={"stage": stage}, batch_format="pyarrow",
                                               **light_step())
        verdict_pass(ctx, FolderRows(conclusions, replies.count), f"{NAME}/{here}/verdicts", judge,
                     conclusion_verifier(stage.verifier_prompt))
        searching, solved = on_worker(_advance, ctx.run, plan, stage, counts.rounds)
        counts.rounds, counts.solved = counts.rounds + 1, counts.solved + solved
    return counts


def round_folder(number: int) -> str:
    return f"round_{number}"


@dataclass
class SearchCounts:
    rounds: int = 0
    solved: int = 0


def _start(run: RunRoot, problems: tuple[str, ...], max_problems: int | None) -> int:
    """On a worker: every problem (the first `max_problems`) starts at the initial reasoning, as round 0's items."""
    rows = run.read_rows(*problems)[:max_problems]
    if rows:
        run.write_rows([{**row, **SearchState(id=row["id"]).columns()} for row in rows], NAME, round_folder(0),
                       "items")
    return len(rows)


def _with_conclusions(batch: pa.Table, stage: ReasoningSearchStage) -> pa.Table:
    """The verifier's input: each reply's last Final Conclusion (None when the reply has no chain)."""
    rows = []
    for row in batch.to_pylist():
        steps = read_chain(stage, row["generated_text"]).value
        rows.append({**row, "conclusion": last_conclusion(steps) if steps else None})
    return pa.Table.from_pylist(rows)


def _advance(run: RunRoot, plan: SearchPlan, stage: ReasoningSearchStage, number: int) -> tuple[int, int]:
    """On a worker: advance each verified item of round `number`; the ones still searching are the next round's
    items, the finished ones go to `finished` (one file per round, so doing it again writes the same files).
    Returns how many are still searching and how many were solved."""
    searching, finished = [], []
    for row in run.read_rows(NAME, round_folder(number), "verdicts"):
        parsed = read_chain(stage, row["generated_text"])
        state = advance(plan, SearchState.of_row(row), parsed.value, row["verdict"], parsed.error)
        problem = {key: value for key, value in row.items() if key not in ANSWERED_COLUMNS}
        (searching if state.status == "searching" else finished).append({**problem, **state.columns()})
    if searching:
        run.write_rows(searching, NAME, round_folder(number + 1), "items")
    if finished:
        run.write_rows(finished, NAME, "finished", part=number)
    return len(searching), sum(row["status"] == "solved" for row in finished)


def _natural_requests(batch: pa.Table) -> pa.Table:
    """The solved items, each with its verified chain rendered as text."""
    rows = [{**row, "key": row["id"], "thought_process": render_chain(json.loads(row["chain"]))}
            for row in batch.to_pylist() if row["status"] == "solved"]
    return pa.Table.from_pylist(rows) if rows else batch.slice(0, 0)


def _response_requests(run: RunRoot, stage: ReasoningSearchStage) -> int:
    """On a worker: the solved items whose natural reasoning was read, for the final response; the others fail."""
    requests, failures = [], []
    for row in run.read_rows(NAME, "natural"):
        natural = read_natural(stage, row["generated_text"])
        if natural.error:
            failures.append({"id": row["id"], "reason": f"natural reasoning: {natural.error}", "trace": row["trace"]})
        else:
            item = {key: value for key, value in row.items() if key not in ANSWERED_COLUMNS}
            requests.append({**item, "complex_cot": natural.value})
    if requests:
        run.write_rows(requests, NAME, "response_requests")
    run.write_rows(failures, NAME, "failed", part=1)
    return len(requests)


def _write_paths(run: RunRoot, generator: str) -> int:
    """On a worker: the written-up paths, and every item that failed (search, natural reasoning or response)."""
    paths = []
    failures = [{"id": row["id"], "reason": row["reason"], "trace": row["trace"]}
                for row in run.read_rows(NAME, "finished") if row["status"] == "failed"]
    for row in run.read_rows(NAME, "response"):
        if row["finish_reason"] == "length" or not row["generated_text"].strip():
            failures.append({"id": row["id"], "reason": "final response empty or cut at max_tokens",
                             "trace": row["trace"]})
            continue
        state = SearchState.of_row(row)
        paths.append({
            **{key: row[key] for key in ("id", "question", "options", "answer", "source", "problem", "ground_truth")},
            "complex_cot": row["complex_cot"],
            "response": row["generated_text"].strip(),
            "strategies": [entry["step"] for entry in state.trace],
            "verdicts": [entry["verdict"] for entry in state.trace],
            "attempts": state.attempt + 1,
            "solved_at": state.solved_at,
            "label_revealed": state.label_revealed,
            "trace": row["trace"],
            "generator": generator,
        })
    run.write_rows(paths, NAME, "paths")
    run.write_rows(failures, NAME, "failed", part=0)
    return len(paths)


def write_up(ctx: StageContext, solved: int) -> None:
    """Natural reasoning and a final response for each solved chain, into `paths`; what fails into `failed`."""
    stage = ctx.recipe.stages.reasoning_search
    teacher, request = ctx.recipe.models.teacher, Request.from_config(stage.sampling)
    natural_prompt, response_prompt = get_prompt(stage.natural_prompt), get_prompt(stage.response_prompt)
    if not solved:
        return
    finished = read_folder(ctx.run, NAME, "finished", rows_per_block=teacher.batch_size)
    requests = finished.rows.map_batches(_natural_requests, batch_format="pyarrow", **light_step())
    generate_pass(ctx, FolderRows(requests, solved), f"{NAME}/natural", engine=teacher, request=request,
                  messages=lambda row: natural_prompt.messages(thought_process=row["thought_process"],
                                                               question=row["problem"]))
    if on_worker(_response_requests, ctx.run, stage):
        generate_pass(ctx, read_folder(ctx.run, NAME, "response_requests", rows_per_block=teacher.batch_size),
                      f"{NAME}/response", engine=teacher, request=request,
                      messages=lambda row: response_prompt.messages(thinking=row["complex_cot"],
                                                                    question=row["problem"]))


def _summary(run: RunRoot) -> dict[str, Any]:
    """On a worker: the manifest's details from every finished item's trace."""
    states = [SearchState.of_row(row) for row in run.read_rows(NAME, "finished")]
    entries = [entry for state in states for entry in state.trace]
    plain = [entry for entry in entries if (entry["parse_error"] or "").startswith("read as plain text")]
    return {
        "solved_at_depth": solved_counts(states), "searched": len(states),
        "label_revealed": sum(1 for s in states if s.label_revealed), "steps": len(entries),
        "unparsable_steps": sum(1 for entry in entries if entry["parse_error"]) - len(plain),
        "plain_text_steps": len(plain),
        "strategies": dict(sorted(Counter(entry["step"] for entry in entries).items())),
    }


def run(ctx: StageContext) -> None:
    stage = ctx.recipe.stages.reasoning_search
    if ctx.recipe.stages.sft.data:
        raise StageSkipped(f"SFT starts from the released paths in {ctx.recipe.stages.sft.data} (stages.sft.data)")
    if stage.data:
        write_released(ctx, NAME, stage.data, verifiable_problems)
    problems = (NAME, "released") if stage.data else ("verifiable_problems", "search")
    count = ctx.record.rows_in = on_worker(_start, ctx.run, problems, stage.max_problems)
    if not count:
        raise StageSkipped("no verifiable problems for the search (verifiable_problems/search is empty)")
    counts = search(ctx, count)
    write_up(ctx, counts.solved)
    written = ctx.record.rows_out = on_worker(_write_paths, ctx.run, ctx.recipe.models.teacher.model)
    ctx.record.rows_failed = ctx.run.count_rows(NAME, "failed")
    summary = on_worker(_summary, ctx.run)
    ctx.record.input_tokens, ctx.record.output_tokens = on_worker(
        token_totals, ctx.run, [(NAME, round_folder(number), "steps") for number in range(counts.rounds)])
    ctx.record.details.update(rounds=counts.rounds, solved=counts.solved, written=written, **summary)
    ctx.note(f"{counts.solved} of {count} problems verified (by depth: {summary['solved_at_depth']}), "
             f"{written} written up")
