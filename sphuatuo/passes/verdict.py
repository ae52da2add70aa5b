"""Verdicts: is a reply right? One pass serves the Self-Play judge (METHOD A.5) and the HuatuoGPT-o1
verifier (METHOD B.2); they differ only in what they read and how the LLM is asked (a `VerdictSpec`).

The recipe's `models.judge` picks who decides:
- `rule`: for an item with options, the option letters the reply names (or whose text it contains, see
  `sphuatuo.parsing.replies.extract_answer`) must equal the gold letter set;
- `llm`: the judge model reads the spec's prompt and answers with one token, decoding constrained to the
  spec's two words ("1"/"2" for the judge, "True"/"False" for the verifier). Where the words are not
  single tokens of its vocabulary and the spec allows it, it writes a few tokens that the spec's parser reads;
- `auto`: rule where an item has options, llm where it is open-ended.

A row whose reply is missing (None: it could not be parsed) is not judged. Rows gain `verdict` (True /
False / None when unreadable or not judged), `decided_by` ("rule", "llm:<model>" or "none") and
`verdict_raw` (the letters the rule found, or the judge's raw reply).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

from transformers import AutoTokenizer

from sphuatuo.data.questions import Question
from sphuatuo.engines import ComingPass, Request, start_ahead
from sphuatuo.local_models import resolve_model
from sphuatuo.parsing.o1 import parse_true_false
from sphuatuo.parsing.replies import JUDGE_VERDICT_WORDS, extract_answer, letters_text, parse_judge_verdict
from sphuatuo.passes import PassTarget, Row
from sphuatuo.passes.generation import generate_pass, missing_rows, parse_reply
from sphuatuo.prompts import Messages, get_prompt, options_block
from sphuatuo.recipe import EngineConfig, JudgeConfig, SamplingConfig
from sphuatuo.store.datasets import FolderRows


@dataclass(frozen=True)
class VerdictSpec:
    """What a verdict pass reads and how its LLM is asked."""

    prompt: str  # template name
    reply_column: str  # the text under judgement
    words: tuple[str, str]  # what the LLM answers for (right, wrong)
    parse: Callable[[str], bool | None]  # the LLM's raw reply -> verdict
    prompt_fields: Callable[[Row], dict[str, str]]  # the prompt's fields for a row
    free_text_fallback: bool = False  # words that are not single tokens: read a few free tokens instead of failing


def answer_judge(prompt: str) -> VerdictSpec:
    """The Self-Play judge: question, options, reference and the whole reply; "1" right, "2" wrong."""

    def fields(row: Row) -> dict[str, str]:
        question = Question.from_row(row)
        return {"question": question.question, "options_block": options_block(question),
                "reference": question.answer_text, "reply": row["generated_text"]}

    return VerdictSpec(prompt=prompt, reply_column="generated_text", words=JUDGE_VERDICT_WORDS,
                       parse=parse_judge_verdict, prompt_fields=fields)


def conclusion_verifier(prompt: str) -> VerdictSpec:
    """The HuatuoGPT-o1 verifier: the conclusion and the ground truth only, as in the paper; True or False."""
    return VerdictSpec(prompt=prompt, reply_column="conclusion", words=("True", "False"), parse=parse_true_false,
                       prompt_fields=lambda row: {"reply": row["conclusion"], "reference": row["ground_truth"]},
                       free_text_fallback=True)


@cache
def single_token_ids(model: str, words: tuple[str, str], trust_remote_code: bool) -> tuple[int, int] | None:
    """Token ids of the two words when each is one distinct token in the model's vocabulary, else None."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(model), trust_remote_code=trust_remote_code)
    encoded = [tokenizer.encode(word, add_special_tokens=False) for word in words]
    if any(len(ids) != 1 for ids in encoded) or encoded[0] == encoded[1]:
        return None
    return encoded[0][0], encoded[1][0]


def uses_rule(judge: JudgeConfig, question: Question) -> bool:
    return judge.kind == "rule" or (judge.kind == "auto" and question.is_multiple_choice)


def rule_verdict(question: Question, reply: str) -> dict[str, Any]:
    letters = extract_answer(reply, question.options, question.question)
    return {"verdict": letters == frozenset(question.answer), "decided_by": "rule",
            "verdict_raw": letters_text(letters)}


def verdict_request(judge: JudgeConfig, spec: VerdictSpec) -> Request:
    """Greedy and one token long where the constraint allows it: the judge's own token ids on local engines (no
    tokenizer is looked up for a hosted model), the server's choice, or the standard API's log-probabilities."""
    assert judge.engine is not None
    if judge.constraint == "token_ids":
        token_ids = single_token_ids(judge.engine.model, spec.words, judge.engine.trust_remote_code)
        if token_ids is None and not spec.free_text_fallback:
            raise ValueError(f"judge model {judge.engine.model}: {spec.words[0]!r} and {spec.words[1]!r} must each be "
                             "one token for the one-token judge")
        return Request.from_config(SamplingConfig(temperature=0.0, max_tokens=1 if token_ids else 8), token_ids)
    # A server's choice writes a whole word, however many tokens it is; log-probabilities need one token.
    max_tokens = 8 if judge.constraint == "choice" else 1
    return Request(temperature=0.0, top_p=1.0, max_tokens=max_tokens, verdict_words=spec.words,
                   verdict_via=judge.constraint)


def verdict_pass(target: PassTarget, rows: list[Row], folder: str, judge: JudgeConfig, spec: VerdictSpec) -> None:
    """Decide every row of `rows` (question columns, a `key` and the spec's reply column) not yet in `folder`,
    and write them there with their verdicts; the LLM's raw replies stay in `<folder>_raw`."""
    todo = missing_rows(target, rows, folder)
    if not todo:
        return
    decided, by_llm = [], []
    for row in todo:
        question = Question.from_row(row)
        if row[spec.reply_column] is None:
            decided.append({**row, "verdict": None, "decided_by": "none", "verdict_raw": ""})
        elif uses_rule(judge, question):
            decided.append({**row, **rule_verdict(question, row[spec.reply_column])})
        else:
            by_llm.append(row)
    if decided:
        target.run.append_rows(decided, folder)
    if not by_llm:
        return

    engine = judge.engine
    assert engine is not None  # the recipe validator guarantees it for kind llm/auto
    prompt = get_prompt(spec.prompt)
    # The judge sees only what its prompt needs; its own token counts stay out of the judged rows.
    inputs = [{"key": row["key"], **spec.prompt_fields(row)} for row in by_llm]
    raw_folder = folder + "_raw"
    generate_pass(target, inputs, raw_folder, engine=engine, request=verdict_request(judge, spec),
                  messages=lambda row: prompt.messages(**{name: row[name] for name in prompt.fields}))
    raw = {row["key"]: row["generated_text"] for row in target.run.read_rows(raw_folder)}
    judged = [{**row, "verdict": spec.parse(raw[row["key"]]), "decided_by": f"llm:{engine.model}",
               "verdict_raw": raw[row["key"]]} for row in by_llm]
    target.run.append_rows(judged, folder)


def generate_and_judge(
    target: PassTarget,
    rows: list[Row] | FolderRows,
    folder: str,
    *,
    judge: JudgeConfig,
    engine: EngineConfig,
    request: Request,
    messages: Callable[[Row], Messages],
    model: str | None = None,
) -> list[Row]:
    """Generate a `<think>/<answer>` reply per row into `<folder>_generated`, split it, judge it into
    `folder`; return all judged rows of `folder`."""
    generated, spec = f"{folder}_generated", answer_judge(judge.prompt)
    total = rows.count if isinstance(rows, FolderRows) else len(rows)
    if judge.kind == "llm" and judge.engine is not None and target.run.count_rows(generated) < total:
        # Every new reply goes to the LLM judge: its engine starts beside the generator's, not after the pass.
        start_ahead([ComingPass(engine, request, generated, model),
                     ComingPass(judge.engine, verdict_request(judge, spec), f"{folder}_raw")], target.engines)
    generate_pass(target, rows, generated, engine=engine, request=request, messages=messages, model=model)
    parsed = [parse_reply(row) for row in target.run.read_rows(generated)]
    verdict_pass(target, parsed, folder, judge, spec)
    return target.run.read_rows(folder)
