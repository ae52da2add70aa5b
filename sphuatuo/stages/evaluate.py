"""Evaluation of the base, SFT and DPO students (every DPO model of an ablation) on the held-out
questions (METHOD A.6, B.5), under one or more named protocols (`PROTOCOLS`).

A protocol says how the model is asked (sampling, chat template or raw prompt) and how its reply is
scored. The project's own (`project`, `strict`) decode greedily by default with a token budget that fits
the chain of thought (the SP paper's 450 cut it short); the papers' (`sp_paper`, `o1_paper`) are there
so that a number here can be set beside the papers' tables. Each protocol is its own generation pass per
model: `evaluate/<model>` for `project`, `evaluate/<model>@<protocol>` for the others. The manifest keeps,
per protocol, its settings and each model's score (`details.protocols`); `details.models` holds the
first protocol's scores, which the report breaks down by source and category.

Multiple-choice items are scored by option-letter set equality whatever the judge kind, open-ended
ones by the judge. First-match and last-match accuracy are reported separately, and an empty or
unparsable reply counts as wrong and is counted. Every reply is also counted by what it did with the
options (`sphuatuo.parsing.replies.answer_commitment`): committed to an answer, restated the options,
copied the question back, held candidates open, or gave no answer; an open-ended reply counts as
committed when the judge could decide it.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa

from sphuatuo.data.questions import Question
from sphuatuo.engines import ComingPass, Request, start_ahead
from sphuatuo.parsing.replies import CATEGORIES, COMMITTED, NO_ANSWER, answer_commitment
from sphuatuo.passes import Row
from sphuatuo.passes.verdict import JudgedCounts
from sphuatuo.recipe import JudgeConfig, SamplingConfig
from sphuatuo.stages import StageContext, StageSkipped, log
from sphuatuo.stages.self_play.student_answers import answer_questions
from sphuatuo.stages.training import engine_model_of
from sphuatuo.store.datasets import FolderRows, light_step, on_worker, read_folder
from sphuatuo.store.run_root import RunRoot

NAME = "evaluate"
CONFIG = ("models.student", "models.judge", "stages.evaluate", "stages.preference_pairs.strategies")
READS = ("questions", "sft", "dpo", "rl")


Scoring = Literal["last", "strict", "either"]

# How each scoring rule reads a judged reply, as the report labels it.
SCORING = {
    "last": "right when its last answer statement is",
    "strict": "right when its last answer statement is and it was not cut at the token budget",
    "either": "right when its first or its last answer statement is",
}


@dataclass(frozen=True)
class Protocol:
    """A named way to evaluate: the sampling that replaces the stage's own (the fields given), the chat
    template or a raw prompt, and the scoring rule (`SCORING`)."""

    description: str
    sampling: dict[str, float | int] = field(default_factory=dict)
    chat_template: bool = True
    scoring: Scoring = "last"
    shuffle_options: bool = False

    def sampling_for(self, stage: SamplingConfig, max_tokens: int | None = None) -> SamplingConfig:
        """The stage's sampling with this protocol's fields, its budget at most `max_tokens` when given."""
        sampling = stage.model_copy(update=self.sampling)
        if max_tokens is not None and sampling.max_tokens > max_tokens:
            sampling = sampling.model_copy(update={"max_tokens": max_tokens})
        return sampling

    def settings(self, stage: SamplingConfig, max_tokens: int | None = None) -> dict[str, Any]:
        """What the manifest and the report say about a run of this protocol."""
        sampling = self.sampling_for(stage, max_tokens)
        return {"description": self.description, "temperature": sampling.temperature, "top_p": sampling.top_p,
                "max_tokens": sampling.max_tokens, "chat_template": self.chat_template,
                "scoring": SCORING[self.scoring], "shuffled_options": self.shuffle_options}


# The names are the recipe's `ProtocolName`; a test checks that both list the same.
PROTOCOLS: dict[str, Protocol] = {
    "project": Protocol("the project's: the stage's sampling, the prompt in the model's chat template; first and "
                        "last match reported apart; an empty or unparsable reply is wrong"),
    "strict": Protocol("the project's, greedy: as project, and a reply that commits to no answer is wrong, "
                       "including one cut at the token budget before its conclusion",
                       sampling={"temperature": 0.0, "top_p": 1.0}, scoring="strict"),
    "sp_paper": Protocol("the SP paper's test: temperature 0.7, top_p 0.9, 450 tokens, the prompt as raw text "
                         "without the chat template",
                         sampling={"temperature": 0.7, "top_p": 0.9, "max_tokens": 450}, chat_template=False),
    "o1_paper": Protocol("HuatuoGPT-o1's released scorer: temperature 0.5; a reply is right when its first or "
                         "its last match is (max of the two)", sampling={"temperature": 0.5}, scoring="either"),
    "shuffled": Protocol("the permutation check: as project, with each multiple-choice item's options in another "
                         "order (the gold letters follow their texts); an accuracy that is a property of the model "
                         "stays within project's interval", shuffle_options=True),
}


def shuffle_options(row: Row, seed: int) -> Row:
    """The item with its options' texts in another order under the same letters, the gold letters following
    their texts; the order is fixed by the seed and the item's id, so a re-run asks the same question."""
    question = Question.from_row(row)
    if not question.is_multiple_choice:
        return row
    letters = list(question.options)
    texts = [question.options[letter] for letter in letters]
    order = list(range(len(letters)))
    random.Random(f"{seed}:{question.id}").shuffle(order)
    options = {letter: texts[source] for letter, source in zip(letters, order)}
    moved = {letters[source]: letter for letter, source in zip(letters, order)}
    shuffled = question.model_copy(update={"options": options,
                                           "answer": tuple(sorted(moved[letter] for letter in question.answer))})
    return {**row, **shuffled.to_row()}


def protocol_label(name: str, settings: dict[str, Any]) -> str:
    """`sp_paper (T 0.7, top_p 0.9, 450 tokens, raw prompt)`: a protocol and the settings it ran with (as
    `Protocol.settings` records them)."""
    template = "chat template" if settings["chat_template"] else "raw prompt"
    shuffled = ", options shuffled" if settings.get("shuffled_options") else ""
    return (f"{name} (T {settings['temperature']:g}, top_p {settings['top_p']:g}, {settings['max_tokens']} tokens, "
            f"{template}{shuffled})")


def permutation_check(protocols: dict[str, Any]) -> list[str]:
    """Per model: does its accuracy with the options shuffled stay within the 95% interval of its accuracy as
    asked (`project`)? A weak model whose number moves with option order was scored on an artefact."""
    if "project" not in protocols or "shuffled" not in protocols:
        return []
    lines = []
    for model, asked in protocols["project"]["models"].items():
        shuffled = protocols["shuffled"]["models"].get(model)
        if shuffled is None:
            continue
        low, high = asked["ci95"]
        verdict = "holds" if low <= shuffled["accuracy"] <= high else "FAILS: the accuracy depends on option order"
        lines.append(f"{model}: {asked['accuracy']:.1%} as asked ({low:.1%}–{high:.1%}), {shuffled['accuracy']:.1%} "
                     f"with the options shuffled: {verdict}")
    return lines


def protocol_folder(model: str, protocol: str) -> str:
    """Where a model's answers under a protocol go; `project` keeps the folder it always had."""
    return f"{NAME}/{model}" if protocol == "project" else f"{NAME}/{model}@{protocol}"


def scoring_judge(judge: JudgeConfig) -> JudgeConfig:
    """Evaluation scores multiple-choice items by their option letters whatever the judge kind, so a benchmark
    number never depends on an LLM judge's reading of a letter; the LLM judge scores open-ended items only."""
    return judge.model_copy(update={"kind": "auto"}) if judge.kind == "llm" else judge


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% confidence interval of a proportion; sound at small n and near 0 or 1, unlike p ± 2σ."""
    if total == 0:
        return (0.0, 0.0)
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return (max(0.0, centre - half), min(1.0, centre + half))


def is_correct(row: Row, scoring: Scoring = "last", first: frozenset[str] | None = None) -> bool:
    """Whether a judged reply counts as right under a scoring rule; `first`: the letters of a
    multiple-choice reply's first answer statement (`either` counts it too)."""
    if scoring == "strict" and row["truncated"]:
        return False
    if scoring == "either" and first is not None and first == frozenset(Question.from_row(row).answer):
        return True
    return bool(row["verdict"])


def score(rows: list[Row], scoring: Scoring = "last") -> dict:
    """Accuracy under the scoring rule (`SCORING`; the judge's verdict on the final answer for `last`),
    first-match accuracy, unparsable and truncated counts, how many replies committed to an answer and
    why the others did not (one key per `sphuatuo.parsing.replies.CATEGORIES`), and accuracy per source
    and per metadata field (CMExam: disease group, department, difficulty, …)."""
    correct = first_correct = unparsable = 0
    commitments = dict.fromkeys(CATEGORIES, 0)
    # group ("source" or a metadata key) -> value -> [correct, total]
    groups: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(lambda: [0, 0]))
    for row in rows:
        question = Question.from_row(row)
        first: frozenset[str] | None = None
        if question.is_multiple_choice:
            commitment = answer_commitment(row["generated_text"], question.options, question.question)
            first = commitment.first
            first_correct += first == frozenset(question.answer) and not (scoring == "strict" and row["truncated"])
            unparsable += not commitment.letters
            commitments[commitment.category] += 1
        else:
            first_correct += is_correct(row, scoring)
            undecided = row["verdict"] is None or not row["generated_text"].strip()
            unparsable += undecided
            commitments[NO_ANSWER if undecided else COMMITTED] += 1
        right = is_correct(row, scoring, first)
        correct += right
        for group, value in {"source": question.source or "unknown", **question.metadata}.items():
            groups[group][value][0] += right
            groups[group][value][1] += 1
    total = len(rows)
    return {
        "n": total,
        "correct": correct,
        "accuracy": correct / total if total else 0.0,
        "ci95": wilson_interval(correct, total),
        "first_match_accuracy": first_correct / total if total else 0.0,
        "unparsable": unparsable,
        # per reply, what it did with the options: committed, restated_options, copied_question,
        # candidates, no_answer (they add up to n)
        **commitments,
        "truncated": sum(1 for row in rows if row["truncated"]),
        "by": {
            group: {value: {"n": n, "accuracy": c / n, "ci95": wilson_interval(c, n)}
                    for value, (c, n) in sorted(values.items())}
            for group, values in sorted(groups.items())
        },
    }


def _shuffled_batch(questions: pa.Table, seed: int) -> pa.Table:
    return pa.Table.from_pylist([shuffle_options(row, seed) for row in questions.to_pylist()])


def score_folder(run: RunRoot, folder: str, scoring: Scoring) -> dict[str, Any]:
    """`score` of a judged folder, on one of Ray's workers (see `on_worker`)."""
    return score(run.read_rows(folder), scoring)


def run(ctx: StageContext) -> None:
    stage = ctx.recipe.stages.evaluate
    questions = read_folder(ctx.run, "questions", "test", rows_per_block=ctx.recipe.models.student.batch_size)
    ctx.record.rows_in = questions.count
    if not questions.count:
        raise StageSkipped("no test questions (set data.test or data.test_fraction)")
    shuffled = FolderRows(questions.rows.map_batches(_shuffled_batch, fn_kwargs={"seed": ctx.recipe.seed},
                                                     batch_format="pyarrow", **light_step()), questions.count)
    results = ctx.record.details.setdefault("models", {})
    by_protocol = ctx.record.details.setdefault("protocols", {})
    for name in stage.protocols:
        by_protocol.setdefault(name, {"settings": PROTOCOLS[name].settings(stage.sampling, stage.max_protocol_tokens),
                                     "models": {}})
    judge = scoring_judge(ctx.recipe.models.judge)
    models: dict[str, str] = {}
    for name in ctx.recipe.stages.evaluated_models():
        try:
            models[name] = engine_model_of(ctx, name)
        except StageSkipped as missing:
            ctx.note(f"not evaluating {name}: {missing}")
    first = Request.from_config(PROTOCOLS[stage.protocols[0]].sampling_for(stage.sampling, stage.max_protocol_tokens))
    coming = [ComingPass(ctx.recipe.models.student, first, protocol_folder(name, stage.protocols[0]), model)
              for name, model in models.items()]
    answered = JudgedCounts()
    for index, (name, model) in enumerate(models.items()):
        # The engines of the models still to evaluate start side by side, as many as fit, not one per model.
        start_ahead(coming[index:], ctx.engines)
        for protocol_name in stage.protocols:
            protocol = PROTOCOLS[protocol_name]
            log.info("evaluating %s (%s) on %d questions under protocol %s", name, model, questions.count,
                     protocol_name)
            folder = protocol_folder(name, protocol_name)
            answered += answer_questions(ctx, shuffled if protocol.shuffle_options else questions, folder, model,
                                         stage.prompt, protocol.sampling_for(stage.sampling, stage.max_protocol_tokens),
                                         judge=judge, chat_template=protocol.chat_template)
            result = by_protocol[protocol_name]["models"][name] = on_worker(score_folder, ctx.run, folder,
                                                                              protocol.scoring)
            if protocol_name == stage.protocols[0]:
                results[name] = result
            ctx.note(f"{name} ({protocol_name}): accuracy {result['accuracy']:.1%} on {result['n']} questions")
    ctx.record.rows_out = answered.rows
    ctx.record.input_tokens, ctx.record.output_tokens = answered.input_tokens, answered.output_tokens
    if ctx.tracking is not None:
        ctx.tracking.evaluation(ctx.recipe.trackers(stage), by_protocol)
