"""Reasoning-path search with a verifier, then natural reasoning and a final response (METHOD B.2).

The generator (the recipe's teacher) answers each problem as a JSON chain of Inner Thinking steps, a
Final Conclusion and a Verification; the verifier (the recipe's judge) compares the last Final
Conclusion with the ground truth. Unverified items take strategy steps (`sphuatuo.stages.huatuo_o1.search` keeps the
books). Each round is one generation pass and one verification pass over the items still searching,
keyed by item, attempt and depth, so a re-run resumes where it stopped. A verified chain is rendered as
text (`### title` per step), rewritten into natural first-person thinking, and a final response is
written from it. Every item keeps its search trace: strategies, depth, verdicts, whether the label
was revealed.
"""

from __future__ import annotations

import json
from collections import Counter

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
from sphuatuo.passes.generation import count_tokens, generate_pass
from sphuatuo.passes.verdict import conclusion_verifier, verdict_pass
from sphuatuo.prompts import Messages, get_prompt
from sphuatuo.recipe import ReasoningSearchStage
from sphuatuo.stages import StageContext, StageSkipped, log
from sphuatuo.stages.huatuo_o1 import released_rows
from sphuatuo.stages.huatuo_o1.search import INIT, LABEL, SearchPlan, SearchState, advance, solved_counts

NAME = "reasoning_search"
CONFIG = ("models.teacher", "models.judge", "stages.reasoning_search", "seed", "stages.sft.data")
READS = ("verifiable_problems",)


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


def search(ctx: StageContext, problems: list[Row]) -> list[SearchState]:
    """Run search rounds until no item is searching; return every item's final state."""
    stage = ctx.recipe.stages.reasoning_search
    plan = SearchPlan(max_depth=stage.max_depth, max_attempts=stage.max_attempts, reveal_label=stage.reveal_label,
                      strategies=tuple(stage.strategies), seed=ctx.recipe.seed)
    by_id = {row["id"]: row for row in problems}
    states = {row["id"]: SearchState(id=row["id"]) for row in problems}
    request = Request.from_config(stage.sampling)
    rounds = 0
    while active := [state for state in states.values() if state.status == "searching"]:
        rounds += 1
        log.info("%s: round %d, %d items searching", NAME, rounds, len(active))
        rows = [{**by_id[s.id], "key": s.key, "step": s.step, "attempt": s.attempt, "depth": s.depth,
                 "chain": json.dumps(list(s.chain), ensure_ascii=False)} for s in active]
        generate_pass(ctx, rows, f"{NAME}/steps", engine=ctx.recipe.models.teacher, request=request,
                      messages=lambda row: step_messages(stage, row))
        keys = {s.key for s in active}
        replies = {row["key"]: row for row in ctx.run.read_rows(NAME, "steps") if row["key"] in keys}
        parsed = {key: read_chain(stage, reply["generated_text"]) for key, reply in replies.items()}
        verdict_pass(ctx, [{**by_id[s.id], "key": s.key,
                            "conclusion": last_conclusion(parsed[s.key].value) if parsed[s.key].value else None}
                           for s in active], f"{NAME}/verdicts", ctx.recipe.models.judge,
                     conclusion_verifier(stage.verifier_prompt))
        verdicts = {row["key"]: row["verdict"] for row in ctx.run.read_rows(NAME, "verdicts") if row["key"] in keys}
        for s in active:
            states[s.id] = advance(plan, s, parsed[s.key].value, verdicts[s.key], parsed[s.key].error)
    ctx.record.details["rounds"] = rounds
    return list(states.values())


def write_up(ctx: StageContext, solved: list[tuple[Row, SearchState]]) -> tuple[list[Row], list[Row]]:
    """Natural reasoning and final response for each solved chain; returns (paths, failures)."""
    stage = ctx.recipe.stages.reasoning_search
    teacher, request = ctx.recipe.models.teacher, Request.from_config(stage.sampling)
    natural_prompt, response_prompt = get_prompt(stage.natural_prompt), get_prompt(stage.response_prompt)
    rows = [{**row, "key": row["id"], "thought_process": render_chain(list(state.chain))} for row, state in solved]
    generate_pass(ctx, rows, f"{NAME}/natural", engine=teacher, request=request,
                  messages=lambda row: natural_prompt.messages(thought_process=row["thought_process"],
                                                               question=row["problem"]))
    natural = {row["key"]: read_natural(stage, row["generated_text"]) for row in ctx.run.read_rows(NAME, "natural")}
    failures = [{"id": row["id"], "reason": f"natural reasoning: {natural[row['id']].error}"}
                for row, _ in solved if natural[row["id"]].error]
    written = [(row, state) for row, state in solved if not natural[row["id"]].error]
    rows = [{**row, "key": row["id"], "complex_cot": natural[row["id"]].value} for row, _ in written]
    generate_pass(ctx, rows, f"{NAME}/response", engine=teacher, request=request,
                  messages=lambda row: response_prompt.messages(thinking=row["complex_cot"], question=row["problem"]))
    responses = {row["key"]: row for row in ctx.run.read_rows(NAME, "response")}
    paths = []
    for row, state in written:
        reply = responses[row["id"]]
        if reply["finish_reason"] == "length" or not reply["generated_text"].strip():
            failures.append({"id": row["id"], "reason": "final response empty or cut at max_tokens"})
            continue
        paths.append({
            **{key: row[key] for key in ("id", "question", "options", "answer", "source", "problem", "ground_truth")},
            "complex_cot": natural[row["id"]].value,
            "response": reply["generated_text"].strip(),
            "strategies": [entry["step"] for entry in state.trace],
            "verdicts": [entry["verdict"] for entry in state.trace],
            "attempts": state.attempt + 1,
            "solved_at": state.solved_at,
            "label_revealed": state.label_revealed,
            "trace": json.dumps(list(state.trace)),
            "generator": teacher.model,
        })
    return paths, failures


def run(ctx: StageContext) -> None:
    stage = ctx.recipe.stages.reasoning_search
    if ctx.recipe.stages.sft.data:
        raise StageSkipped(f"SFT starts from the released paths in {ctx.recipe.stages.sft.data} (stages.sft.data)")
    problems = (released_rows(ctx, NAME, stage.data, verifiable_problems) if stage.data
                else ctx.run.read_rows("verifiable_problems", "search"))[: stage.max_problems]
    ctx.record.rows_in = len(problems)
    if not problems:
        raise StageSkipped("no verifiable problems for the search (verifiable_problems/search is empty)")
    states = search(ctx, problems)
    by_id = {row["id"]: row for row in problems}
    solved = [(by_id[s.id], s) for s in states if s.status == "solved"]
    paths, failures = write_up(ctx, solved) if solved else ([], [])
    failures += [{"id": s.id, "reason": s.reason} for s in states if s.status == "failed"]
    traces = {s.id: json.dumps(list(s.trace)) for s in states}
    ctx.run.write_rows(paths, NAME, "paths")
    ctx.run.write_rows([{**f, "trace": traces[f["id"]]} for f in failures], NAME, "failed")

    steps = ctx.run.read_rows(NAME, "steps")
    ctx.record.input_tokens, ctx.record.output_tokens = count_tokens(steps)
    ctx.record.rows_out = len(paths)
    ctx.record.rows_failed = len(failures)
    strategies = Counter(entry["step"] for s in states for entry in s.trace)
    ctx.record.details.update(
        solved_at_depth=solved_counts(states), searched=len(states), solved=len(solved), written=len(paths),
        label_revealed=sum(1 for s in states if s.label_revealed), steps=len(steps),
        unparsable_steps=sum(1 for s in states for entry in s.trace
                             if entry["parse_error"] and not entry["parse_error"].startswith("read as plain text")),
        plain_text_steps=sum(1 for s in states for entry in s.trace
                             if (entry["parse_error"] or "").startswith("read as plain text")),
        strategies=dict(sorted(strategies.items())),
    )
    ctx.note(f"{len(solved)} of {len(states)} problems verified (by depth: {solved_counts(states)}), "
             f"{len(paths)} written up")
