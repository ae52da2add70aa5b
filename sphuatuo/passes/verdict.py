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

import logging
from collections.abc import Callable
from dataclasses import astuple, dataclass
from functools import cache
from typing import Any, ClassVar

import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data

from sphuatuo.data.questions import Question
from sphuatuo.engines import ComingPass, Request, start_ahead
from sphuatuo.local_models import resolve_model
from sphuatuo.parsing.o1 import parse_true_false
from sphuatuo.parsing.replies import JUDGE_VERDICT_WORDS, extract_answer, letters_text, parse_judge_verdict
from sphuatuo.passes import PassTarget, Row
from sphuatuo.passes.generation import generate_pass, parse_reply
from sphuatuo.prompts import Messages, get_prompt, options_block
from sphuatuo.recipe import EngineConfig, JudgeConfig, SamplingConfig
from sphuatuo.store.datasets import (
    FolderRows,
    add_up,
    column_summary,
    counts_row,
    folder_columns,
    keep_keys,
    keys_in,
    light_step,
    read_folder,
)
from sphuatuo.store.run_root import RunRoot

log = logging.getLogger("sphuatuo")
# What a verdict pass adds to each of its rows.
VERDICT_COLUMNS = ("verdict", "decided_by", "verdict_raw")


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
    # Imported here, on the driver: the row-wise tasks that load this module (the rule split, the LLM's verdicts)
    # never need a tokenizer, and transformers with torch takes a fresh task worker 5-6 s to import.
    from transformers import AutoTokenizer

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


@dataclass(frozen=True)
class JudgedCounts:
    """What a judged folder holds, counted on a worker: the driver's whole view of a judged pass."""

    rows: int = 0
    right: int = 0  # judged right; the rest were judged wrong or could not be judged
    parse_errors: int = 0
    truncated: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    COLUMNS: ClassVar[list[str]] = ["verdict", "parse_error", "truncated", "num_input_tokens", "num_generated_tokens"]

    @classmethod
    def of(cls, table: pa.Table) -> JudgedCounts:
        verdicts = table["verdict"].cast(pa.bool_())
        return cls(rows=table.num_rows,
                   right=pc.sum(pc.equal(verdicts, True)).as_py() or 0,
                   parse_errors=pc.sum(pc.is_valid(table["parse_error"])).as_py() or 0,
                   truncated=pc.sum(table["truncated"].cast(pa.bool_())).as_py() or 0,
                   input_tokens=pc.sum(table["num_input_tokens"].cast(pa.int64())).as_py() or 0,
                   output_tokens=pc.sum(table["num_generated_tokens"].cast(pa.int64())).as_py() or 0)

    def __add__(self, other: JudgedCounts) -> JudgedCounts:
        return JudgedCounts(*(mine + theirs for mine, theirs in zip(astuple(self), astuple(other), strict=True)))

    @classmethod
    def of_folder(cls, run: RunRoot, folder: str) -> JudgedCounts:
        return column_summary(run, [(folder,)], cls.COLUMNS, cls.of)


def _decide_by_rule(batch: pa.Table, run: RunRoot, folder: str, judge: JudgeConfig, spec: VerdictSpec) -> pa.Table:
    """On a worker: write the rows that the option letters (or a missing reply) decide to `folder`, and those
    the LLM must decide to `<folder>_pending`."""
    decided, by_llm = [], []
    for row in batch.to_pylist():
        question = Question.from_row(row)
        if row[spec.reply_column] is None:
            decided.append({**row, "verdict": None, "decided_by": "none", "verdict_raw": ""})
        elif uses_rule(judge, question):
            decided.append({**row, **rule_verdict(question, row[spec.reply_column])})
        else:
            by_llm.append(row)
    if decided:
        run.put_rows(pa.Table.from_pylist(decided), folder)
    if by_llm:
        run.put_rows(pa.Table.from_pylist(by_llm), f"{folder}_pending")
    return counts_row(by_rule=len(decided), for_llm=len(by_llm))


def _judge_prompt_fields(batch: pa.Table, spec: VerdictSpec) -> pa.Table:
    # The judge sees only what its prompt needs; its own token counts stay out of the judged rows.
    return pa.Table.from_pylist([{"key": row["key"], **spec.prompt_fields(row)} for row in batch.to_pylist()])


def _decide_by_llm(batch: pa.Table, run: RunRoot, folder: str, replies: ray.ObjectRef, spec: VerdictSpec,
                   judge_model: str) -> pa.Table:
    """On a worker: the LLM's raw reply to each row becomes its verdict, written to `folder`."""
    raw = ray.get(replies)
    texts = pc.take(raw["generated_text"], pc.index_in(batch["key"], raw["key"])).to_pylist()
    judged = [{**row, "verdict": spec.parse(text), "decided_by": f"llm:{judge_model}", "verdict_raw": text}
              for row, text in zip(batch.to_pylist(), texts, strict=True) if text is not None]
    if judged:
        run.put_rows(pa.Table.from_pylist(judged), folder)
    return counts_row(by_llm=len(judged))


def _rows_to_decide(target: PassTarget, rows: FolderRows, folder: str) -> ray.data.Dataset | None:
    """The rows in neither `folder` (decided) nor `<folder>_pending` (waiting for the LLM)."""
    if target.run.count_rows(folder) >= rows.count:  # a pass's own folder holds only its rows' keys
        return None
    return keep_keys(rows.rows, keys_in(target.run, [(folder,), (f"{folder}_pending",)]), keep=False)


def verdict_pass(target: PassTarget, rows: FolderRows, folder: str, judge: JudgeConfig,
                 spec: VerdictSpec) -> None:
    """Decide every row of `rows` (question columns, a `key` and the spec's reply column) not yet in `folder`,
    and write them there with their verdicts; the rows stay on Ray's workers. Rows for the LLM wait in
    `<folder>_pending` while it answers, and its raw replies stay in `<folder>_raw`, so a pass cut short
    resumes where it stopped."""
    run = target.run
    undecided = _rows_to_decide(target, rows, folder)
    if undecided is not None:
        split = add_up(undecided.map_batches(_decide_by_rule, fn_kwargs={"run": run, "folder": folder,
                                                                          "judge": judge, "spec": spec},
                                             batch_format="pyarrow", **light_step()))
        log.info("%s: %d rows decided by their option letters, %d for the LLM judge", folder, split["by_rule"],
                 split["for_llm"])
    pending = f"{folder}_pending"
    if not run.count_rows(pending):
        return

    engine = judge.engine
    assert engine is not None  # the recipe validator guarantees it for kind llm/auto
    prompt = get_prompt(spec.prompt)
    raw_folder = folder + "_raw"
    asked = read_folder(run, pending, rows_per_block=engine.batch_size)
    inputs = asked.rows.map_batches(_judge_prompt_fields, fn_kwargs={"spec": spec}, batch_format="pyarrow",
                                    **light_step())
    generate_pass(target, FolderRows(inputs, asked.count), raw_folder, engine=engine,
                  request=verdict_request(judge, spec),
                  messages=lambda row: prompt.messages(**{name: row[name] for name in prompt.fields}))
    waiting = keep_keys(read_folder(run, pending, rows_per_block=engine.batch_size).rows,
                        keys_in(run, [(folder,)]), keep=False)
    replies = folder_columns(run, [(raw_folder,)], ["key", "generated_text"])
    judged = add_up(waiting.map_batches(_decide_by_llm, fn_kwargs={"run": run, "folder": folder, "replies": replies,
                                                                   "spec": spec, "judge_model": engine.model},
                                        batch_format="pyarrow", **light_step()))
    log.info("%s: %d rows decided by %s", folder, judged["by_llm"], engine.model)


def _parsed_replies(batch: pa.Table) -> pa.Table:
    return pa.Table.from_pylist([parse_reply(row) for row in batch.to_pylist()])


def generate_and_judge(
    target: PassTarget,
    rows: FolderRows,
    folder: str,
    *,
    judge: JudgeConfig,
    engine: EngineConfig,
    request: Request,
    messages: Callable[[Row], Messages],
    model: str | None = None,
) -> JudgedCounts:
    """Generate a `<think>/<answer>` reply per row into `<folder>_generated`, split it, judge it into
    `folder`; return the counts of `folder` (its rows stay in the cluster)."""
    generated, spec = f"{folder}_generated", answer_judge(judge.prompt)
    if judge.kind == "llm" and judge.engine is not None and target.run.count_rows(generated) < rows.count:
        # Every new reply goes to the LLM judge: its engine starts beside the generator's, not after the pass.
        start_ahead([ComingPass(engine, request, generated, model),
                     ComingPass(judge.engine, verdict_request(judge, spec), f"{folder}_raw")], target.engines)
    generate_pass(target, rows, generated, engine=engine, request=request, messages=messages, model=model)
    replies = read_folder(target.run, generated, rows_per_block=engine.batch_size)
    parsed = replies.rows.map_batches(_parsed_replies, batch_format="pyarrow", **light_step())
    verdict_pass(target, FolderRows(parsed, replies.count), folder, judge, spec)
    return JudgedCounts.of_folder(target.run, folder)
