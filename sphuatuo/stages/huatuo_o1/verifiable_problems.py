"""Verifiable problems from a multiple-choice bank (METHOD B.1).

Optionally, items that every one of a list of small models answers correctly are dropped first. The
generator then filters each item (Pass / Too Simple / Ambiguous Answer / Not Reformulatable: only Pass
goes on) and rewrites it as an open-ended question with a short ground-truth answer, as JSON with two
keys. Items with several correct options are dropped without asking, as in the paper (there is no
single ground truth). An unreadable reply is asked again, with a new seed, at most `max_retries` times.
Items that do not make it go to `verifiable_problems/rejects` with their reason and the last reply.
Open-ended items of the bank are verifiable already and pass through as they are. The problems are
split between the reasoning search (`search`) and RL (`rl`).
"""

from __future__ import annotations

import json
import random
from collections import Counter
from typing import Any

import pyarrow as pa

from sphuatuo.data.questions import Question
from sphuatuo.engines import Request
from sphuatuo.parsing.o1 import Parsed, parse_filter_verdict, parse_problem
from sphuatuo.parsing.replies import extract_answer
from sphuatuo.passes import Row
from sphuatuo.passes.generation import REPLY_COLUMNS, generate_pass, token_totals
from sphuatuo.prompts import get_prompt, options_block
from sphuatuo.recipe import EngineConfig, VerifiableProblemsStage
from sphuatuo.stages import StageContext, StageSkipped
from sphuatuo.store.datasets import FolderRows, light_step, on_worker, read_folder
from sphuatuo.store.run_root import RunRoot

NAME = "verifiable_problems"
CONFIG = ("models.teacher", "stages.verifiable_problems", "seed", "stages.reasoning_search.data", "stages.sft.data",
          "stages.rl.data")
READS = ("questions",)
PARSERS = {"filter": parse_filter_verdict, "rewrite": parse_problem}
# What asking adds to an item's row (its key, the reply), and what its outcome adds: dropped when it moves on.
ASKED_COLUMNS = frozenset((*REPLY_COLUMNS, "key", "attempt", "prompt_version"))
OUTCOME_COLUMNS = frozenset(("value", "parse_error", "reply", "tries"))


def question_messages(prompt_name: str, row: Row) -> list[dict[str, str]]:
    question = Question.from_row(row)
    return get_prompt(prompt_name).messages(question=question.question, options_block=options_block(question),
                                            answer=question.answer_text)


def _keyed(batch: pa.Table, attempt: int, prompt_version: str) -> pa.Table:
    rows = [{**row, "key": f"{row['id']}:{attempt}", "attempt": attempt, "prompt_version": prompt_version}
            for row in batch.to_pylist()]
    return pa.Table.from_pylist(rows) if rows else batch.slice(0, 0)


def ask_until_parsed(ctx: StageContext, step: str, prompt_name: str, count: int) -> None:
    """Ask the generator about each row of `<step>/todo_0` until its reply parses, at most 1 + max_retries times
    (a new seed each time): try t reads `<step>/todo_<t>` and writes `<step>/try_<t>`; each row's outcome (the
    parse result, the last reply, the tries) goes to `<step>/outcomes`. The rows stay on Ray's workers."""
    stage = ctx.recipe.stages.verifiable_problems
    teacher, prompt = ctx.recipe.models.teacher, get_prompt(prompt_name)
    for attempt in range(1 + stage.max_retries):
        if not count:
            break
        seed = None if stage.sampling.seed is None else stage.sampling.seed + attempt
        request = Request.from_config(stage.sampling.model_copy(update={"seed": seed}))
        todo = read_folder(ctx.run, NAME, step, f"todo_{attempt}", rows_per_block=teacher.batch_size)
        keyed = todo.rows.map_batches(_keyed, fn_kwargs={"attempt": attempt, "prompt_version": prompt.tag},
                                      batch_format="pyarrow", **light_step())
        generate_pass(ctx, FolderRows(keyed, todo.count), f"{NAME}/{step}/try_{attempt}", engine=teacher,
                      request=request, messages=lambda row: question_messages(prompt_name, row))
        count = on_worker(_parse_try, ctx.run, step, attempt, attempt == stage.max_retries)


def _parse_try(run: RunRoot, step: str, attempt: int, last: bool) -> int:
    """On a worker: parse try `attempt` of `step`; a row whose reply parses (or whose last try this was) has its
    outcome, the others are asked again. Returns how many."""
    parse = PARSERS[step]
    outcomes, again = [], []
    for row in run.read_rows(NAME, step, f"try_{attempt}"):
        parsed = parse(row["generated_text"])
        if row["finish_reason"] == "length" and parsed.error:
            parsed = Parsed(None, f"{parsed.error} (reply cut at max_tokens)")
        question = {key: value for key, value in row.items() if key not in ASKED_COLUMNS}
        if parsed.error and not last:
            again.append(question)
        else:
            outcomes.append({**question, "value": json.dumps(parsed.value, ensure_ascii=False),
                             "parse_error": parsed.error, "reply": row["generated_text"], "tries": attempt + 1})
    if outcomes:
        run.write_rows(outcomes, NAME, step, "outcomes", part=attempt)
    if again:
        run.write_rows(again, NAME, step, f"todo_{attempt + 1}")
    return len(again)


def _reject(row: Row, step: str, reason: str, reply: str = "") -> Row:
    return {"id": row["id"], "step": step, "reason": reason, "reply": reply}


def _unreadable(outcome: Row, step: str) -> Row:
    return _reject(outcome, step, f"unreadable after {outcome['tries']} tries: {outcome['parse_error']}",
                   outcome["reply"])


def _answered_right(reply: Row) -> bool:
    question = Question.from_row(reply)
    return extract_answer(reply["generated_text"], question.options) == frozenset(question.answer)


def _triage(run: RunRoot, small_models: int, filtering: bool) -> dict[str, int]:
    """On a worker: drop the items every small model answers correctly and those with several answers; open-ended
    items are problems as they are; the multiple-choice ones go to the filter (or straight to the rewrite)."""
    questions = run.read_rows("questions", "train")
    easy = {row["id"] for row in questions if row["options"] is not None and len(row["options"])} if small_models \
        else set()
    for index in range(small_models):
        easy &= {row["id"] for row in run.read_rows(NAME, f"small_{index}") if _answered_right(row)}
    rejects = [_reject(row, "small_models", f"answered correctly by all {small_models} small models")
               for row in questions if row["id"] in easy]
    multiple_choice, open_ended = [], []
    for row in questions:
        if row["id"] in easy:
            continue
        question = Question.from_row(row)
        if len(question.answer) > 1:  # the paper drops items with several answers: no single ground truth
            rejects.append(_reject(row, "several_answers", f"{len(question.answer)} correct options"))
        elif question.is_multiple_choice:
            multiple_choice.append(row)
        else:
            open_ended.append({**row, "problem": row["question"], "ground_truth": row["reference"],
                               "filter_verdict": None})
    run.write_rows(rejects, NAME, "rejects", part=0)
    run.write_rows(open_ended, NAME, "open_ended")
    if multiple_choice:
        run.write_rows(multiple_choice, NAME, "filter" if filtering else "rewrite", "todo_0")
    return {"easy": len(easy), "multiple_choice": len(multiple_choice), "open_ended": len(open_ended)}


def _filtered(run: RunRoot) -> Counter[str]:
    """On a worker: the items the filter passed go to the rewrite; the others are rejected with the reply."""
    verdicts: Counter[str] = Counter()
    passed, rejects = [], []
    for row in run.read_rows(NAME, "filter", "outcomes"):
        verdict = json.loads(row["value"])
        verdicts[verdict or "unreadable"] += 1
        if row["parse_error"]:
            rejects.append(_unreadable(row, "filter"))
        elif verdict != "Pass":
            rejects.append(_reject(row, "filter", verdict, row["reply"]))
        else:
            passed.append({key: value for key, value in row.items() if key not in OUTCOME_COLUMNS})
    run.write_rows(rejects, NAME, "rejects", part=1)
    if passed:
        run.write_rows(passed, NAME, "rewrite", "todo_0")
    return verdicts


def _write_problems(run: RunRoot, stage: VerifiableProblemsStage, seed: int, generator: Row) -> dict[str, Any]:
    """On a worker: the rewritten problems and the open-ended ones, split between the search and RL."""
    problems = run.read_rows(NAME, "open_ended")
    rejects, tries = [], Counter()
    for row in run.read_rows(NAME, "rewrite", "outcomes"):
        tries[str(row["tries"])] += 1
        if row["parse_error"]:
            rejects.append(_unreadable(row, "rewrite"))
            continue
        problem, ground_truth = json.loads(row["value"])
        question = {key: value for key, value in row.items() if key not in OUTCOME_COLUMNS}
        problems.append({**question, "problem": problem, "ground_truth": ground_truth,
                         "filter_verdict": "Pass" if stage.filter else None})
    run.write_rows(rejects, NAME, "rejects", part=2)
    problems.sort(key=lambda row: row["id"])
    shuffled = problems[:]
    random.Random(seed).shuffle(shuffled)
    rl_ids = {row["id"] for row in shuffled[: round(len(shuffled) * stage.rl_share)]}
    run.write_rows([{**row, **generator} for row in problems if row["id"] not in rl_ids], NAME, "search")
    run.write_rows([{**row, **generator} for row in problems if row["id"] in rl_ids], NAME, "rl")
    all_rejects = run.read_rows(NAME, "rejects")
    return {"problems": len(problems), "rl": len(rl_ids), "rewrite_tries": dict(sorted(tries.items())),
            "rejects": len(all_rejects), "rejected_by_step": dict(Counter(r["step"] for r in all_rejects)),
            "first_rejects": all_rejects[:10]}


def small_answers(ctx: StageContext, stage: VerifiableProblemsStage, index: int, engine: EngineConfig) -> None:
    prompt = get_prompt(stage.small_model_prompt)
    questions = read_folder(ctx.run, "questions", "train", rows_per_block=engine.batch_size)
    keyed = questions.rows.map_batches(lambda batch: batch.append_column("key", batch["id"]), batch_format="pyarrow",
                                       **light_step())
    generate_pass(ctx, FolderRows(keyed, questions.count), f"{NAME}/small_{index}", engine=engine,
                  request=Request.from_config(stage.small_model_sampling),
                  messages=lambda row: prompt.messages(question=row["question"],
                                                       options_block=options_block(Question.from_row(row))))


def run(ctx: StageContext) -> None:
    stages = ctx.recipe.stages
    if (stages.reasoning_search.data or stages.sft.data) and stages.rl.data:
        raise StageSkipped("the search (or SFT) and RL start from released files (stages.*.data): no problems to "
                           "build")
    stage = stages.verifiable_problems
    count = ctx.record.rows_in = ctx.run.count_rows("questions", "train")
    if not count:
        raise StageSkipped("no training questions (the questions stage wrote zero valid rows)")
    for index, engine in enumerate(stage.small_models):
        small_answers(ctx, stage, index, engine)
    triage = on_worker(_triage, ctx.run, len(stage.small_models), stage.filter)
    verdicts: Counter[str] = Counter()
    to_rewrite = triage["multiple_choice"]
    if stage.filter:
        ask_until_parsed(ctx, "filter", stage.filter_prompt, to_rewrite)
        verdicts = on_worker(_filtered, ctx.run)
        to_rewrite = verdicts["Pass"]
    ask_until_parsed(ctx, "rewrite", stage.rewrite_prompt, to_rewrite)
    generator = {"generator": ctx.recipe.models.teacher.model, "prompt_version": get_prompt(stage.rewrite_prompt).tag}
    written = on_worker(_write_problems, ctx.run, stage, ctx.recipe.seed, generator)

    ctx.record.input_tokens, ctx.record.output_tokens = on_worker(token_totals, ctx.run, [
        (NAME, step, f"try_{attempt}") for step in ("filter", "rewrite") for attempt in range(1 + stage.max_retries)])
    problems, rl_count = written["problems"], written["rl"]
    ctx.record.rows_out = problems
    ctx.record.rows_rejected = written["rejects"]
    ctx.record.details.update(
        easy_for_small_models=triage["easy"], filter_verdicts=dict(verdicts), rewrite_tries=written["rewrite_tries"],
        rejected_by_step=written["rejected_by_step"], open_ended_kept=triage["open_ended"],
        search=problems - rl_count, rl=rl_count,
    )
    ctx.note(f"{problems} verifiable problems from {count} items ({written['rejects']} rejected): "
             f"{problems - rl_count} for the search, {rl_count} for RL")
    for row in written["first_rejects"]:
        ctx.note(f"rejected {row['id']} at {row['step']}: {row['reason']}")
    if not problems:
        ctx.note("no problems: the later stages have nothing to search or train on")
