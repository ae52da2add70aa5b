"""The verifier of the HuatuoGPT-o1 search: does a conclusion match the ground truth? (METHOD B.2)

The recipe's `models.judge` picks who decides:
- `llm`: the judge model reads the `verify` prompt (conclusion and ground truth only, as in the paper)
  and says True or False. Decoding is constrained to the first token of each when both are single
  tokens in its vocabulary; otherwise it writes a few tokens that `parse_true_false` reads;
- `rule`: for problems made from a multiple-choice item, the option letters the conclusion names (or
  whose text it contains, see `sphuatuo.parsing.extract_answer`) must equal the gold letters;
- `auto`: rule where the problem still has its item's options, llm otherwise.

A row without a conclusion (its reply could not be parsed) is not verified and not sent to the judge.
Rows gain `verdict` (True / False / None when unreadable), `verified_by` and `verifier_raw`.
"""

from __future__ import annotations

from functools import cache

from transformers import AutoTokenizer

from sphuatuo.data.questions import Question
from sphuatuo.engines import Request
from sphuatuo.judge import uses_rule
from sphuatuo.local_models import resolve_model
from sphuatuo.o1_parsing import parse_true_false
from sphuatuo.parsing import extract_answer, letters_text
from sphuatuo.prompts import get_prompt
from sphuatuo.recipe import SamplingConfig
from sphuatuo.stages import StageContext
from sphuatuo.stages.generation import Row, generate_pass, missing_rows

VERDICT_WORDS = ("True", "False")


@cache
def true_false_token_ids(model: str) -> tuple[int, int] | None:
    """Token ids of "True" and "False" when each is one token in the model's vocabulary, else None."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model))
    encoded = [tokenizer.encode(word, add_special_tokens=False) for word in VERDICT_WORDS]
    if any(len(ids) != 1 for ids in encoded) or encoded[0] == encoded[1]:
        return None
    return encoded[0][0], encoded[1][0]


def rule_verdict(row: Row) -> dict[str, object]:
    question = Question.from_row(row)
    letters = extract_answer(row["conclusion"], question.options)
    return {"verdict": letters == frozenset(question.answer), "verified_by": "rule",
            "verifier_raw": letters_text(letters)}


def verify_pass(ctx: StageContext, rows: list[Row], folder: str, prompt_name: str) -> None:
    """Verify every row of `rows` not yet in `folder` (rows carry question columns, `key`, `conclusion`
    and `ground_truth`) and write them there with their verdicts."""
    judge = ctx.recipe.models.judge
    todo = missing_rows(ctx, rows, folder)
    if not todo:
        return
    decided, by_llm = [], []
    for row in todo:
        if row["conclusion"] is None:
            decided.append({**row, "verdict": None, "verified_by": "none", "verifier_raw": ""})
        elif uses_rule(judge, Question.from_row(row)):
            decided.append({**row, **rule_verdict(row)})
        else:
            by_llm.append(row)
    if decided:
        ctx.run.append_rows(decided, folder)
    if not by_llm:
        return

    engine = judge.engine
    assert engine is not None  # the recipe validator guarantees it for kind llm/auto
    prompt = get_prompt(prompt_name)
    token_ids = true_false_token_ids(engine.model)
    sampling = SamplingConfig(temperature=0.0, max_tokens=1 if token_ids else 8)
    raw_folder = folder + "_raw"
    inputs = [{"key": row["key"], "conclusion": row["conclusion"], "ground_truth": row["ground_truth"]}
              for row in by_llm]
    generate_pass(ctx, inputs, raw_folder, engine=engine, request=Request.from_config(sampling, token_ids),
                  messages=lambda row: prompt.messages(reply=row["conclusion"], reference=row["ground_truth"]))
    raw = {row["key"]: row["generated_text"] for row in ctx.run.read_rows(raw_folder)}
    judged = [{**row, "verdict": parse_true_false(raw[row["key"]]), "verified_by": f"llm:{engine.model}",
               "verifier_raw": raw[row["key"]]} for row in by_llm]
    ctx.run.append_rows(judged, folder)
