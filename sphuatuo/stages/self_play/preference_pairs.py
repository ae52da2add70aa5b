"""Preference pairs from the fine-tuned student's judged answers (METHOD A.3), by one or more strategies.

- `self_correction` (the paper's final method): for a wrong answer, the same fine-tuned student is
  shown its own flawed reply and the reference, and rewrites the whole trajectory;
- `answer_correction`: the student keeps its flawed reasoning and rewrites only the answer;
- `teacher_correction`: the teacher writes the corrected trajectory (the costlier baseline);
- `sampled`: a judged-correct and a judged-wrong sample of the same question (HuatuoGPT-o1's variant).

A correction counts only if the judge accepts it and it is complete, like a teacher answer (see
`self_play.training_answer`). Pair: chosen = the corrected (or correct) trajectory, rejected = the
wrong one, both under the student's test-time prompt; each pair keeps both trajectories' keys and
models. All strategies write into one dataset with a `strategy` column; DPO trains one model per strategy.
"""

from __future__ import annotations

import json
from collections import defaultdict
from functools import partial

from sphuatuo.data.questions import Question
from sphuatuo.engines import Request
from sphuatuo.parsing.replies import format_cot
from sphuatuo.passes import Row
from sphuatuo.passes.verdict import JudgedCounts, generate_and_judge
from sphuatuo.prompts import Messages, PromptTemplate, get_prompt, options_block
from sphuatuo.recipe import PairStrategy, PreferencePairsStage
from sphuatuo.stages import StageContext, StageSkipped
from sphuatuo.stages.self_play import training_answer
from sphuatuo.stages.training import engine_model_of
from sphuatuo.store.datasets import on_worker, read_folder
from sphuatuo.store.run_root import RunRoot

NAME = "preference_pairs"
CONFIG = ("models.student", "models.teacher", "models.judge", "stages.preference_pairs",
          "stages.student_answers.prompt")
READS = ("student_answers", "sft")

# The corrections the SFT student writes itself; `teacher_correction` is the teacher's, `sampled` writes none.
STUDENT_CORRECTIONS: tuple[PairStrategy, ...] = ("self_correction", "answer_correction")


def correction_messages(stage: PreferencePairsStage, strategy: PairStrategy, row: Row) -> Messages:
    question = Question.from_row(row)
    if strategy == "answer_correction":
        messages = get_prompt(stage.answer_prompt).messages(
            question=question.question, options_block=options_block(question), reference=question.answer_text)
        # Prefilled with the student's own thought: only the answer is written anew.
        return [*messages, {"role": "assistant", "content": f"<think>\n{row['flawed_think']}\n</think>\n<answer>\n"}]
    return get_prompt(stage.prompt).messages(
        question=question.question,
        options_block=options_block(question),
        flawed_reply=row["flawed_reply"],
        reference=question.answer_text,
    )


def correction_requests(stage: PreferencePairsStage, strategy: PairStrategy, wrong: list[Row]) -> list[Row]:
    """One request per wrong answer, keyed `<answer key>:<strategy>`."""
    prompt = stage.answer_prompt if strategy == "answer_correction" else stage.prompt
    meta = {"prompt_version": get_prompt(prompt).tag, "sampling": json.dumps(stage.sampling.model_dump()),
            "hinted": True, "strategy": strategy}
    question_columns = list(Question.model_fields)
    return [
        {**{c: row[c] for c in question_columns}, **meta, "key": f"{row['key']}:{strategy}",
         "original_key": row["key"], "flawed_reply": row["generated_text"], "flawed_think": row["think"],
         "original_model": row["model"]}
        for row in wrong
    ]


def pair_row(strategy: PairStrategy, prompt: PromptTemplate, chosen: Row, chosen_answer: str,
             rejected_text: str, rejected_key: str, rejected_model: str) -> Row:
    question = Question.from_row(chosen)
    return {
        "id": question.id,
        "strategy": strategy,
        "prompt": prompt.training_prompt(question=question.question, options_block=options_block(question)),
        "chosen": [{"role": "assistant", "content": format_cot(chosen["think"], chosen_answer)}],
        "rejected": [{"role": "assistant", "content": rejected_text}],
        "chosen_key": chosen["key"],
        "rejected_key": rejected_key,
        "chosen_model": chosen["model"],
        "rejected_model": rejected_model,
    }


def correction_pairs(strategy: PairStrategy, prompt: PromptTemplate, corrections: list[Row],
                     answer_from_thought: bool) -> list[Row]:
    """(verified correction, the wrong answer it corrects) for every usable correction."""
    pairs = []
    for row in corrections:
        answer = training_answer(row, answer_from_thought)
        if answer is not None:
            pairs.append(pair_row(strategy, prompt, row, answer, row["flawed_reply"], row["original_key"],
                                  row["original_model"]))
    return pairs


def sampled_pairs(prompt: PromptTemplate, answers: list[Row], answer_from_thought: bool) -> list[Row]:
    """Per question, each wrong sample with a usable correct one, in key order; when there are fewer
    correct samples than wrong ones, the correct ones are reused in turn."""
    correct: dict[str, list[tuple[Row, str]]] = defaultdict(list)
    wrong: dict[str, list[Row]] = defaultdict(list)
    for row in sorted(answers, key=lambda r: r["key"]):
        answer = training_answer(row, answer_from_thought)
        if answer is not None:
            correct[row["id"]].append((row, answer))
        elif is_wrong(row):
            wrong[row["id"]].append(row)
    pairs = []
    for qid, rejected in wrong.items():
        chosen = correct.get(qid, [])
        for index, row in enumerate(rejected if chosen else []):
            good, answer = chosen[index % len(chosen)]
            pairs.append(pair_row("sampled", prompt, good, answer, row["generated_text"], row["key"], row["model"]))
    return pairs


def limit_pairs(pairs: list[Row], pairs_per_question: int, max_pairs: int | None) -> list[Row]:
    """At most `pairs_per_question` pairs per question (in key order), then at most `max_pairs` in all,
    taking every question's first pair before any question's second, so a cap spreads over questions."""
    by_question: dict[str, list[Row]] = defaultdict(list)
    for pair in sorted(pairs, key=lambda p: (p["id"], p["rejected_key"], p["chosen_key"])):
        by_question[pair["id"]].append(pair)
    ranked = sorted(((rank, qid), pair) for qid, rows in by_question.items()
                    for rank, pair in enumerate(rows[:pairs_per_question]))
    return [pair for _, pair in ranked][:max_pairs]


def to_correct(wrong: list[Row], pairs_per_question: int) -> list[Row]:
    """The first `pairs_per_question` wrong answers of each question (in key order): corrections
    beyond what can become pairs would only cost generation."""
    taken: dict[str, int] = defaultdict(int)
    chosen = []
    for row in sorted(wrong, key=lambda r: r["key"]):
        if taken[row["id"]] < pairs_per_question:
            taken[row["id"]] += 1
            chosen.append(row)
    return chosen


def is_wrong(row: Row) -> bool:
    """Judged wrong (not merely unreadable to the judge), with a reply to show."""
    return row["verdict"] is False and bool(row["generated_text"].strip())


def survey_answers(run: RunRoot, stage: PreferencePairsStage) -> dict[str, int]:
    """On a worker: count the student's judged answers and the wrong ones, and write each correcting strategy's
    requests to `<strategy>_requests` (the first `pairs_per_question` wrong answers of each question)."""
    answers = run.read_rows("student_answers", "judged")
    wrong = sorted((row for row in answers if is_wrong(row)), key=lambda r: r["key"])
    for strategy in stage.strategies:
        if strategy != "sampled" and wrong:
            run.write_rows(correction_requests(stage, strategy, to_correct(wrong, stage.pairs_per_question)),
                           NAME, f"{strategy}_requests")
    return {"answers": len(answers), "wrong": len(wrong)}


def write_pairs(run: RunRoot, stage: PreferencePairsStage, prompt_name: str) -> dict[str, dict[str, int | None]]:
    """On a worker: every strategy's pairs from the judged answers and corrections, written to `pairs`; returns the
    counts per strategy."""
    answers = run.read_rows("student_answers", "judged")
    wrong = sum(1 for row in answers if is_wrong(row))
    prompt = get_prompt(prompt_name)
    counts: dict[str, dict[str, int | None]] = {}
    pairs: list[Row] = []
    for strategy in stage.strategies:
        if strategy == "sampled":
            found = sampled_pairs(prompt, answers, stage.answer_from_thought)
            verified = sum(1 for row in answers if training_answer(row, stage.answer_from_thought) is not None)
            corrected = None
        else:
            corrections = run.read_rows(NAME, strategy)
            found = correction_pairs(strategy, prompt, corrections, stage.answer_from_thought)
            verified, corrected = len(found), len(corrections)
        kept = limit_pairs(found, stage.pairs_per_question, stage.max_pairs)
        pairs += kept
        counts[strategy] = {"wrong": wrong, "corrected": corrected, "verified": verified, "paired": len(kept)}
    run.write_rows(pairs, NAME, "pairs")
    return counts


def run(ctx: StageContext) -> None:
    stage = ctx.recipe.stages.preference_pairs
    found = on_worker(survey_answers, ctx.run, stage)
    ctx.record.rows_in = found["answers"]
    if not found["answers"]:
        raise StageSkipped("no student answers to correct (the student_answers stage wrote none)")
    if not found["wrong"]:
        raise StageSkipped("the SFT student answered no training question wrongly: nothing to pair")

    # Resolved once for every strategy the student corrects in: under driver credentials on an object store,
    # resolving copies the model to each node.
    student_corrects = set(stage.strategies) & set(STUDENT_CORRECTIONS)
    sft_model = engine_model_of(ctx, "sft") if student_corrects else None
    generated = JudgedCounts()
    for strategy in stage.strategies:
        if strategy == "sampled":
            continue
        teacher = strategy not in STUDENT_CORRECTIONS
        engine = ctx.recipe.models.teacher if teacher else ctx.recipe.models.student
        requests = read_folder(ctx.run, NAME, f"{strategy}_requests", rows_per_block=engine.batch_size)
        generated += generate_and_judge(
            ctx, requests, f"{NAME}/{strategy}", judge=ctx.recipe.models.judge, engine=engine,
            request=Request.from_config(stage.sampling), model=None if teacher else sft_model,
            messages=partial(correction_messages, stage, strategy),
        )

    counts = on_worker(write_pairs, ctx.run, stage, ctx.recipe.stages.student_answers.prompt)
    for strategy, made in counts.items():
        what = (f"{made['verified']} usable correct samples" if made["corrected"] is None
                else f"{made['corrected']} corrections written, {made['verified']} verified")
        ctx.note(f"{strategy}: {made['wrong']} wrong answers, {what}, {made['paired']} pairs")
    ctx.record.rows_out = sum(made["paired"] or 0 for made in counts.values())
    ctx.record.rows_failed = generated.parse_errors
    ctx.record.input_tokens, ctx.record.output_tokens = generated.input_tokens, generated.output_tokens
    ctx.record.details.update(strategies=counts)
