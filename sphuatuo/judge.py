"""Grading replies against the reference.

Two judges, and the recipe picks (`models.judge.kind`):
- `llm` (METHOD A.5): the judge model, with its chat template, sees question, reference and reply and
  answers with exactly one token, decoding constrained to "1" (correct) and "2" (wrong);
- `rule`: for multiple-choice items, the option letters the reply gives (sphuatuo.parsing) must equal
  the gold letter set;
- `auto`: rule where an item has options, llm where it is open-ended.

Rows gain `judge_verdict` (True / False, None when the judge's output could not be read), `judged_by`
and `judge_raw`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

from transformers import AutoTokenizer

from sphuatuo.data.questions import Question
from sphuatuo.engines import Request
from sphuatuo.local_models import resolve_model
from sphuatuo.parsing import extract_answer, letters_text, parse_judge_verdict
from sphuatuo.prompts import Messages, get_prompt, options_block
from sphuatuo.recipe import EngineConfig, JudgeConfig, SamplingConfig
from sphuatuo.stages import StageContext
from sphuatuo.stages.generation import Row, generate_pass, missing_rows, parse_reply

VERDICT_TOKENS = ("1", "2")


@cache
def verdict_token_ids(model: str) -> tuple[int, int]:
    """Token ids of "1" and "2" in the judge's vocabulary; each must be a single token."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    ids = []
    for text in VERDICT_TOKENS:
        encoded = tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) != 1:
            raise ValueError(f"judge model {model}: {text!r} is {len(encoded)} tokens; the one-token judge needs 1")
        ids.append(encoded[0])
    return ids[0], ids[1]


def rule_verdict(question: Question, reply: str) -> dict[str, Any]:
    letters = extract_answer(reply, question.options)
    return {
        "judge_verdict": letters == frozenset(question.answer),
        "judged_by": "rule",
        "judge_raw": letters_text(letters),
    }


def uses_rule(judge: JudgeConfig, question: Question) -> bool:
    return judge.kind == "rule" or (judge.kind == "auto" and question.is_multiple_choice)


def judge_pass(ctx: StageContext, rows: list[Row], folder: str, *, reply_column: str = "generated_text") -> None:
    """Judge every row of `rows` (which carry question columns, a `key` and `reply_column`) not yet
    in `folder`, and write them there with their verdicts."""
    judge = ctx.recipe.models.judge
    todo = missing_rows(ctx, rows, folder)
    if not todo:
        return
    by_rule, by_llm = [], []
    for row in todo:
        question = Question.from_row(row)
        if uses_rule(judge, question):
            by_rule.append({**row, **rule_verdict(question, row[reply_column] or "")})
        else:
            by_llm.append(row)
    if by_rule:
        ctx.run.append_rows(by_rule, folder)
    if not by_llm:
        return

    engine = judge.engine
    assert engine is not None  # the recipe validator guarantees it for kind llm/auto
    prompt = get_prompt(judge.prompt)

    def messages(row: Row) -> list[dict[str, str]]:
        question = Question.from_row(row)
        return prompt.messages(
            question=question.question,
            options_block=options_block(question),
            reference=question.answer_text,
            reply=row["reply"],
        )

    request = Request.from_config(SamplingConfig(temperature=0.0, max_tokens=1), verdict_token_ids(engine.model))
    # The judge sees only what it needs; its own token counts stay out of the judged rows.
    judge_inputs = [
        {"key": row["key"], **Question.from_row(row).to_row(), "reply": row[reply_column] or ""} for row in by_llm
    ]
    raw_folder = folder + "_raw"
    generate_pass(ctx, judge_inputs, raw_folder, engine=engine, request=request, messages=messages)
    raw_verdicts = {row["key"]: row["generated_text"] for row in ctx.run.read_rows(raw_folder)}
    judged = [
        {
            **row,
            "judge_verdict": parse_judge_verdict(raw_verdicts[row["key"]]),
            "judged_by": f"llm:{engine.model}",
            "judge_raw": raw_verdicts[row["key"]],
        }
        for row in by_llm
    ]
    ctx.run.append_rows(judged, folder)


def generate_and_judge(
    ctx: StageContext,
    rows: list[Row],
    folder: str,
    *,
    engine: EngineConfig,
    request: Request,
    messages: Callable[[Row], Messages],
    model: str | None = None,
) -> list[Row]:
    """Generate a `<think>/<answer>` reply per row into `<folder>_generated`, split it, judge it into
    `folder`; return all judged rows of `folder`."""
    generated = f"{folder}_generated"
    generate_pass(ctx, rows, generated, engine=engine, request=request, messages=messages, model=model)
    judge_pass(ctx, [parse_reply(row) for row in ctx.run.read_rows(generated)], folder)
    return ctx.run.read_rows(folder)
