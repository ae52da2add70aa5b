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

import random
from collections import Counter
from collections.abc import Callable

from sphuatuo.data.questions import Question
from sphuatuo.engines import Request
from sphuatuo.parsing.o1 import Parsed, parse_filter_verdict, parse_problem
from sphuatuo.parsing.replies import extract_answer
from sphuatuo.passes import Row
from sphuatuo.passes.generation import count_tokens, generate_pass
from sphuatuo.prompts import get_prompt, options_block
from sphuatuo.recipe import EngineConfig, VerifiableProblemsStage
from sphuatuo.stages import StageContext, StageSkipped

NAME = "verifiable_problems"
CONFIG = ("models.teacher", "stages.verifiable_problems", "seed", "stages.reasoning_search.data", "stages.sft.data",
          "stages.rl.data")
READS = ("questions",)


def question_messages(prompt_name: str, row: Row) -> list[dict[str, str]]:
    question = Question.from_row(row)
    return get_prompt(prompt_name).messages(question=question.question, options_block=options_block(question),
                                            answer=question.answer_text)


def ask_until_parsed(ctx: StageContext, rows: list[Row], folder: str, prompt_name: str,
                     parse: Callable[[str], Parsed]) -> dict[str, tuple[Parsed, str, int]]:
    """Ask the generator about each row until its reply parses, at most 1 + max_retries times.
    Returns per id: the parse result, the last reply and the number of tries."""
    stage = ctx.recipe.stages.verifiable_problems
    results: dict[str, tuple[Parsed, str, int]] = {}
    todo = rows
    for attempt in range(1 + stage.max_retries):
        if not todo:
            break
        seed = None if stage.sampling.seed is None else stage.sampling.seed + attempt
        request = Request.from_config(stage.sampling.model_copy(update={"seed": seed}))
        keyed = [{**row, "key": f"{row['id']}:{attempt}", "attempt": attempt,
                  "prompt_version": get_prompt(prompt_name).tag} for row in todo]
        generate_pass(ctx, keyed, f"{NAME}/{folder}", engine=ctx.recipe.models.teacher, request=request,
                      messages=lambda row: question_messages(prompt_name, row))
        replies = {row["key"]: row for row in ctx.run.read_rows(NAME, folder)}
        retry = []
        for row in todo:
            reply = replies[f"{row['id']}:{attempt}"]
            parsed = parse(reply["generated_text"])
            if reply["finish_reason"] == "length" and parsed.error:
                parsed = Parsed(None, f"{parsed.error} (reply cut at max_tokens)")
            results[row["id"]] = (parsed, reply["generated_text"], attempt + 1)
            if parsed.error:
                retry.append(row)
        todo = retry
    return results


def easy_for_small_models(ctx: StageContext, stage: VerifiableProblemsStage, rows: list[Row]) -> set[str]:
    """Ids of the multiple-choice items that every small model answers correctly (option letters)."""
    correct_by_all = {row["id"] for row in rows if row["options"] is not None and len(row["options"])}
    for index, engine in enumerate(stage.small_models):
        small_answers(ctx, stage, rows, index, engine)
        correct = {row["id"] for row in ctx.run.read_rows(NAME, f"small_{index}")
                   if extract_answer(row["generated_text"], Question.from_row(row).options)
                   == frozenset(Question.from_row(row).answer)}
        correct_by_all &= correct
    return correct_by_all


def small_answers(ctx: StageContext, stage: VerifiableProblemsStage, rows: list[Row], index: int,
                  engine: EngineConfig) -> None:
    prompt = get_prompt(stage.small_model_prompt)
    keyed = [{**row, "key": row["id"]} for row in rows]
    generate_pass(ctx, keyed, f"{NAME}/small_{index}", engine=engine,
                  request=Request.from_config(stage.small_model_sampling),
                  messages=lambda row: prompt.messages(question=row["question"],
                                                       options_block=options_block(Question.from_row(row))))


def run(ctx: StageContext) -> None:
    stages = ctx.recipe.stages
    if (stages.reasoning_search.data or stages.sft.data) and stages.rl.data:
        raise StageSkipped("the search (or SFT) and RL start from released files (stages.*.data): no problems to "
                           "build")
    stage = stages.verifiable_problems
    questions = ctx.run.read_rows("questions", "train")
    ctx.record.rows_in = len(questions)
    if not questions:
        raise StageSkipped("no training questions (the questions stage wrote zero valid rows)")
    rejects: list[Row] = []

    def reject(row: Row, step: str, reason: str, reply: str = "") -> None:
        rejects.append({"id": row["id"], "step": step, "reason": reason, "reply": reply})

    easy = easy_for_small_models(ctx, stage, questions) if stage.small_models else set()
    for row in questions:
        if row["id"] in easy:
            reject(row, "small_models", f"answered correctly by all {len(stage.small_models)} small models")
    candidates = [row for row in questions if row["id"] not in easy]
    multiple_choice = []
    for row in candidates:
        question = Question.from_row(row)
        if len(question.answer) > 1:  # the paper drops items with several answers: no single ground truth
            reject(row, "several_answers", f"{len(question.answer)} correct options")
        elif question.is_multiple_choice:
            multiple_choice.append(row)
    problems = [{**row, "problem": row["question"], "ground_truth": row["reference"], "filter_verdict": None}
                for row in candidates if not Question.from_row(row).is_multiple_choice]
    open_ended = len(problems)

    verdicts: Counter[str] = Counter()
    passed = multiple_choice
    if stage.filter:
        filtered = ask_until_parsed(ctx, multiple_choice, "filter", stage.filter_prompt, parse_filter_verdict)
        passed = []
        for row in multiple_choice:
            parsed, reply, tries = filtered[row["id"]]
            verdicts[parsed.value or "unreadable"] += 1
            if parsed.error:
                reject(row, "filter", f"unreadable after {tries} tries: {parsed.error}", reply)
            elif parsed.value != "Pass":
                reject(row, "filter", parsed.value, reply)
            else:
                passed.append(row)

    rewritten = ask_until_parsed(ctx, passed, "rewrite", stage.rewrite_prompt, parse_problem)
    tries: Counter[int] = Counter()
    for row in passed:
        parsed, reply, count = rewritten[row["id"]]
        tries[count] += 1
        if parsed.error:
            reject(row, "rewrite", f"unreadable after {count} tries: {parsed.error}", reply)
            continue
        problem, ground_truth = parsed.value
        problems.append({**row, "problem": problem, "ground_truth": ground_truth,
                         "filter_verdict": "Pass" if stage.filter else None})

    problems.sort(key=lambda row: row["id"])
    shuffled = problems[:]
    random.Random(ctx.recipe.seed).shuffle(shuffled)
    rl_ids = {row["id"] for row in shuffled[: round(len(shuffled) * stage.rl_share)]}
    generator = {"generator": ctx.recipe.models.teacher.model,
                 "prompt_version": get_prompt(stage.rewrite_prompt).tag}
    ctx.run.write_rows([{**row, **generator} for row in problems if row["id"] not in rl_ids], NAME, "search")
    ctx.run.write_rows([{**row, **generator} for row in problems if row["id"] in rl_ids], NAME, "rl")
    ctx.run.write_rows(rejects, NAME, "rejects")

    generated = [row for folder in ("filter", "rewrite") for row in ctx.run.read_rows(NAME, folder)]
    ctx.record.input_tokens, ctx.record.output_tokens = count_tokens(generated)
    ctx.record.rows_out = len(problems)
    ctx.record.rows_rejected = len(rejects)
    ctx.record.details.update(
        easy_for_small_models=len(easy), filter_verdicts=dict(verdicts),
        rewrite_tries={str(k): v for k, v in sorted(tries.items())},
        rejected_by_step=dict(Counter(r["step"] for r in rejects)),
        open_ended_kept=open_ended, search=len(problems) - len(rl_ids), rl=len(rl_ids),
    )
    ctx.note(f"{len(problems)} verifiable problems from {len(questions)} items ({len(rejects)} rejected): "
             f"{len(problems) - len(rl_ids)} for the search, {len(rl_ids)} for RL")
    for row in rejects[:10]:
        ctx.note(f"rejected {row['id']} at {row['step']}: {row['reason']}")
    if not problems:
        ctx.note("no problems: the later stages have nothing to search or train on")
