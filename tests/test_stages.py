"""Each stage on the tiny model through real Ray: vLLM via ray.data.llm, transformers actor pools,
Ray Train + DeepSpeed ZeRO-2 with TRL's SFT and DPO trainers.

The tiny model is random, so its answers are gibberish and a judge never accepts its chains of
thought; the training stages therefore get their inputs written by `_accepted_teacher_rows` /
`_pairs` below — real text built from the sample bank's explanations — and are then run for real.
The stages after SFT start from the tiny model copied to `sft/model` (one Ray Train run less; the SFT
stage's own test trains and exports one).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import cluster_rows, rows_only_on_workers, tiny_recipe
from sphuatuo.commands.report import write_report
from sphuatuo.data.questions import Question
from sphuatuo.engines.serving import EngineServices
from sphuatuo.parsing.replies import format_cot
from sphuatuo.pipeline import run_pipeline
from sphuatuo.prompts import get_prompt
from sphuatuo.stages import StageContext, StageFailed, StageSkipped, questions
from sphuatuo.stages.self_play import dpo, preference_pairs, sft, student_answers, teacher_cot
from sphuatuo.store.manifest import StageRecord, load_manifest, save_manifest
from sphuatuo.store.run_root import RunRoot

pytestmark = pytest.mark.slow

FIXTURES = Path(__file__).parent / "fixtures" / "questions"


def _context(recipe, engines: EngineServices | None = None) -> StageContext:
    return StageContext(recipe=recipe, run=RunRoot(recipe.run_root), record=StageRecord(), engines=engines)


def _accepted_teacher_rows(run: RunRoot) -> list[dict]:
    """What a good teacher would have produced: the bank's explanation as thought, the gold letters."""
    rows = []
    for q in run.read_rows("questions", "train"):
        question = Question.from_row(q)
        answer = ", ".join(question.answer)
        text = format_cot(question.explanation, f"{answer}. {question.answer_text}")
        rows.append({**q, "key": q["id"], "prompt_version": get_prompt("self_play/teacher_cot").tag, "sampling": "{}",
                     "hinted": False, "generated_text": text, "think": question.explanation,
                     "answer_text": f"{answer}. {question.answer_text}", "parse_error": None, "truncated": False,
                     "finish_reason": "stop", "num_input_tokens": 10, "num_generated_tokens": 20,
                     "verdict": True, "decided_by": "rule", "verdict_raw": answer, "model": "teacher"})
    return rows


def test_questions_stage_keeps_good_rows_and_lists_rejects(tmp_path: Path, ray_cluster,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The question file is read on a worker (the driver may not open it) and its bad rows are kept apart."""
    recipe = tiny_recipe(tmp_path / "run", **{"data.train": [{"path": str(FIXTURES / "broken_native.jsonl")}],
                                              "data.test_fraction": 0.0, "data.max_error_share": 0.8})
    ctx = _context(recipe)
    with rows_only_on_workers(monkeypatch):
        questions.run(ctx)
    rejects = [json.loads(line) for line in ctx.run.read_text("questions", "rejects.jsonl").splitlines()]
    assert ctx.record.rows_rejected == len(rejects) > 0
    assert ctx.record.rows_out == len(ctx.run.read_rows("questions", "train")) > 0
    assert all(r["reason"] and r["row"] >= 1 and r["file"].endswith("broken_native.jsonl") for r in rejects)

    strict = tiny_recipe(tmp_path / "strict", **{"data.train": [{"path": str(FIXTURES / "broken_native.jsonl")}],
                                                 "data.max_error_share": 0.5})
    with pytest.raises(StageFailed, match=r"rows rejected, more than data.max_error_share=0.5"):
        questions.run(_context(strict))


def test_teacher_cot_on_vllm_with_the_llm_judge_resumes_without_regenerating(tmp_path: Path,
                                                                            kept_engines: EngineServices) -> None:
    recipe = tiny_recipe(tmp_path / "run", **{"data.train": [{"path": "builtin:sample_bank", "limit": 4}],
                                              "data.test_fraction": 0.0,
                                              "stages.teacher_cot.retry_with_reference": False})
    questions.run(_context(recipe))
    ctx = _context(recipe, kept_engines)
    teacher_cot.run(ctx)
    rows = ctx.run.read_rows("teacher_cot", "first")
    assert sorted(r["id"] for r in rows) == sorted(q["id"] for q in ctx.run.read_rows("questions", "train"))
    for row in rows:
        assert row["decided_by"] == "llm:builtin:tiny" and row["verdict_raw"] in ("1", "2")
        assert row["verdict"] is (row["verdict_raw"] == "1")
        assert row["prompt_version"] == get_prompt("self_play/teacher_cot").tag and row["model"] == "builtin:tiny"
        assert row["num_input_tokens"] > 0 and 0 < row["num_generated_tokens"] <= 32
        # The budget is 32 tokens and the random model never stops: every reply is flagged truncated.
        assert row["truncated"] and row["parse_error"] == "truncated at max_tokens"
    assert ctx.record.input_tokens > 0 and ctx.record.rows_out == 0

    files_before = {folder: ctx.run.parquet_files("teacher_cot", folder) for folder in ("first_generated", "first")}
    teacher_cot.run(_context(recipe, kept_engines))
    assert {folder: ctx.run.parquet_files("teacher_cot", folder) for folder in files_before} == files_before


def test_teacher_cot_on_hf_draws_n_samples_and_retries_rejected_questions_hinted(tmp_path: Path,
                                                                                  ray_cluster) -> None:
    recipe = tiny_recipe(tmp_path / "run", **{"data.train": [{"path": "builtin:sample_bank", "limit": 3}],
                                              "data.test_fraction": 0.0,
                                              "models.teacher.backend": "hf",
                                              "models.judge.kind": "rule",
                                              "stages.teacher_cot.samples_per_question": 2})
    questions.run(_context(recipe))
    ctx = _context(recipe)
    teacher_cot.run(ctx)
    first = ctx.run.read_rows("teacher_cot", "first")
    hinted = ctx.run.read_rows("teacher_cot", "hinted")
    ids = sorted(q["id"] for q in ctx.run.read_rows("questions", "train"))
    assert sorted(r["key"] for r in first) == sorted(f"{i}#{k}" for i in ids for k in (0, 1))
    assert sorted((r["id"], r["sample"]) for r in first) == sorted((i, k) for i in ids for k in (0, 1))
    assert all(r["decided_by"] == "rule" and r["verdict"] is False for r in first)
    # One hinted retry per rejected question, not per rejected sample.
    assert sorted(r["key"] for r in hinted) == sorted(f"{i}:hinted" for i in ids)
    assert all(r["hinted"] for r in hinted) and not any(r["hinted"] for r in first)
    assert ctx.record.details["samples"] == 9 and ctx.record.details["samples_per_question"] == 2
    passes = ctx.record.details["throughput"]
    assert passes["teacher_cot/first_generated"]["rows"] == 6 and passes["teacher_cot/hinted_generated"]["rows"] == 3
    assert all(p["output_tokens_per_s"] > 0 for p in passes.values())


def test_sft_stage_trains_on_two_workers_and_exports_a_model(tmp_path: Path, ray_cluster) -> None:
    # Plain DDP, which runs without the search for unused parameters: a parameter left out of a step would fail it
    # here. DeepSpeed trains two workers elsewhere: SFT under ZeRO-2 (LoRA) in the Self-Play shape run and under
    # ZeRO-3 in tests/test_training_scale.py, every weight under ZeRO-2 in the o1 end-to-end run's RLOO.
    recipe = tiny_recipe(tmp_path / "run", **{"data.train": [{"path": "builtin:sample_bank", "limit": 8}],
                                              "data.test_fraction": 0.0, "stages.sft.scaling.zero_stage": 0})
    questions.run(_context(recipe))
    run = RunRoot(recipe.run_root)
    teacher = _accepted_teacher_rows(run)
    run.write_rows([{**r, "hinted": True, "key": r["key"] + ":hinted"} for r in teacher[:2]], "teacher_cot", "hinted")
    run.write_rows(teacher[2:], "teacher_cot", "first")
    ctx = _context(recipe)
    sft.run(ctx)

    examples = run.read_rows("sft", "data")
    assert len(examples) == 8 and sum(e["hinted"] for e in examples) == 2
    example = examples[0]
    assert [m["role"] for m in example["prompt"]] == ["system", "user"]
    assert "<think>" in example["completion"][0]["content"] and "teacher_cot" not in example["prompt"][1]["content"]
    log = json.loads(run.read_text("sft", "train_log.json"))
    losses = [entry["loss"] for entry in log if "loss" in entry]
    assert len(losses) == 4  # 8 examples, micro batch 1 x 2 workers, 1 epoch
    assert all(loss == loss and loss > 0 for loss in losses)  # finite
    assert losses[-1] < losses[0]
    assert run.exists("sft", "model", "model.safetensors") and run.exists("sft", "model", "tokenizer.json")
    assert ctx.record.details["zero_stage"] == 0 and ctx.record.details["steps"] == 4


STRATEGIES = ["self_correction", "answer_correction", "teacher_correction", "sampled"]


def test_student_samples_every_pair_strategy_and_one_dpo_trains_per_strategy(tmp_path: Path,
                                                                            kept_engines: EngineServices,
                                                                            tiny_model: str) -> None:
    # An ablation of all four pair strategies. The rule judge: only answers with the right option letters count.
    recipe = tiny_recipe(tmp_path / "run", **{"data.train": [{"path": "builtin:sample_bank", "limit": 8}],
                                              "data.test_fraction": 0.25, "models.judge.kind": "rule",
                                              "models.teacher.backend": "hf",
                                              "stages.student_answers.samples_per_question": 2,
                                              "stages.preference_pairs.strategies": STRATEGIES,
                                              # DeepSpeed's DPO runs in the shape tests; here one worker each
                                              "stages.dpo.scaling": {"num_workers": 1, "zero_stage": 0}})
    run = RunRoot(recipe.run_root)
    questions.run(_context(recipe))
    # The SFT model the stages below start from: the tiny model itself (the SFT stage has its own test).
    run.replace_dir(tiny_model, "sft", "model")

    answers = _context(recipe, kept_engines)
    student_answers.run(answers)
    rows = run.read_rows("student_answers", "judged")
    ids = [q["id"] for q in run.read_rows("questions", "train")]
    assert sorted((r["key"], r["sample"]) for r in rows) == sorted((f"{i}#{k}", k) for i in ids for k in (0, 1))
    assert all(r["model"].endswith("sft/model") for r in rows)
    wrong = sum(1 for r in rows if not r["verdict"])
    assert answers.record.details["wrong"] == wrong and answers.record.details["correct"] == 12 - wrong

    # The random student never answers right; give each question a right and a wrong sample, as a
    # real student would, so that `sampled` has pairs and the corrections have wrong answers to fix.
    run.fs.delete_dir_contents(run.fs_path("student_answers", "judged"))
    run.write_rows(_judged_samples(run), "student_answers", "judged")
    pairs_ctx = _context(recipe, kept_engines)
    preference_pairs.run(pairs_ctx)
    counts = pairs_ctx.record.details["strategies"]
    pairs = run.read_rows("preference_pairs", "pairs")
    assert list(counts) == STRATEGIES
    for strategy, c in counts.items():
        found = [p for p in pairs if p["strategy"] == strategy]
        assert c["wrong"] == 6 and c["paired"] == len(found) <= c["verified"]
        assert all(p["rejected_key"] == f"{p['id']}#0" and p["chosen"] != p["rejected"] for p in found)
        if strategy == "sampled":
            assert c["corrected"] is None and c["verified"] == c["paired"] == 6
            assert all(p["chosen_key"] == f"{p['id']}#1" and p["chosen_model"] == "sft" for p in found)
            continue
        corrections = run.read_rows("preference_pairs", strategy)
        assert c["corrected"] == len(corrections) == 6
        assert sorted(r["key"] for r in corrections) == sorted(f"{qid}#0:{strategy}" for qid in ids)
        corrector = "builtin:tiny" if strategy == "teacher_correction" else run.join("sft", "model")
        assert all(r["model"] == corrector and r["original_key"] == f"{r['id']}#0" for r in corrections)
        if strategy == "answer_correction":  # the student's own thought, prefilled; only the answer is new
            assert all(r["generated_text"].startswith("<think>\nNot sure.\n</think>\n<answer>\n")
                       for r in corrections)

    # The random corrections are never verified: add gold self-correction pairs, so two DPO models train.
    run.write_rows(pairs + _pairs(run), "preference_pairs", "pairs")
    kept_engines.release_all()  # as a run does before training
    dpo_ctx = _context(recipe)
    dpo.run(dpo_ctx)
    runs = dpo_ctx.record.details["runs"]
    assert list(runs) == [f"dpo_{s}" for s in STRATEGIES]
    trained = [name for name, r in runs.items() if r["status"] == "done"]
    assert {"dpo_self_correction", "dpo_sampled"} <= set(trained)
    for name in trained:
        log = json.loads(run.read_text(name, "train_log.json"))
        assert any("rewards/margins" in entry for entry in log)
        assert run.exists(name, "model", "model.safetensors") and runs[name]["start_model"].endswith("sft/model")

    manifest = load_manifest(run, recipe)
    manifest.stages.update(preference_pairs=pairs_ctx.record, dpo=dpo_ctx.record)
    save_manifest(run, manifest)
    report = Path(write_report(run)).read_text()
    assert "| sampled | 6 | – | 6 | 6 | dpo_sampled (done, trained on 6 pairs) |" in report
    assert "![DPO reward margin](dpo_reward_margins.png)" in report and run.exists("dpo_reward_margins.png")


def _judged_samples(run: RunRoot) -> list[dict]:
    """Per training question: sample 0 wrong (another letter), sample 1 right (the bank's reasoning)."""
    rows = []
    for gold in _accepted_teacher_rows(run):
        question = Question.from_row(gold)
        letter = next(letter for letter in question.options if letter not in question.answer)
        wrong_text = format_cot("Not sure.", letter)
        rows.append({**gold, "key": f"{gold['id']}#0", "sample": 0, "model": "sft", "generated_text": wrong_text,
                     "think": "Not sure.", "answer_text": letter, "verdict": False, "verdict_raw": letter})
        rows.append({**gold, "key": f"{gold['id']}#1", "sample": 1, "model": "sft"})
    return rows


def _pairs(run: RunRoot) -> list[dict]:
    pairs = []
    for q in run.read_rows("questions", "train"):
        question = Question.from_row(q)
        wrong = next(letter for letter in question.options if letter not in question.answer)
        pairs.append({
            "id": question.id, "strategy": "self_correction",
            "prompt": [{"role": "user", "content": question.question}],
            "chosen": [{"role": "assistant", "content": format_cot(question.explanation, ", ".join(question.answer))}],
            "rejected": [{"role": "assistant", "content": format_cot("I am not sure.", wrong)}],
            "chosen_key": f"{question.id}:gold", "rejected_key": f"{question.id}#0", "chosen_model": "bank",
            "rejected_model": "sft",
        })
    return pairs


def test_a_stage_with_zero_rows_is_skipped_with_its_reason(tmp_path: Path, ray_cluster) -> None:
    recipe = tiny_recipe(tmp_path / "run", **{"data.train": [{"path": "builtin:sample_bank", "limit": 2}],
                                              "data.test_fraction": 0.0,
                                              "models.judge.kind": "rule",
                                              "stages.teacher_cot.retry_with_reference": False,
                                              "models.teacher.backend": "hf"})
    run = run_pipeline(recipe)
    manifest = json.loads(run.read_text("manifest.json"))["stages"]
    assert manifest["teacher_cot"]["status"] == "done" and manifest["teacher_cot"]["rows_out"] == 0
    assert manifest["sft"]["status"] == "skipped"
    assert "zero training examples" in manifest["sft"]["error"]
    assert manifest["evaluate"]["status"] == "skipped" and "no test questions" in manifest["evaluate"]["error"]
    report = run.read_text("report.md") if run.exists("report.md") else Path(write_report(run)).read_text()
    assert "zero training examples for sft" in report

    with pytest.raises(StageSkipped, match="no sft model"):
        student_answers.run(_context(recipe))


def test_eval_command_scores_a_model_directory_on_a_question_file(tmp_path: Path, ray_cluster,
                                                                 tiny_model: str) -> None:
    from sphuatuo.commands.evaluate import evaluation_recipe, run_evaluation, summary

    recipe = evaluation_recipe(tiny_model, str(FIXTURES / "o1_eval_sample.json"), data_format=None,
                               run_root=str(tmp_path / "eval"), backend="hf", max_tokens=8, judge_model=None,
                               prompt="huatuo_o1/eval_strict")
    run = run_evaluation(recipe)
    stages = json.loads(run.read_text("manifest.json"))["stages"]
    assert list(stages) == ["questions", "evaluate"]
    result = stages["evaluate"]["details"]["models"]["base"]
    assert result["n"] == stages["questions"]["details"]["test"] > 0
    # The HuatuoGPT-o1 eval file is a dict of source -> items: accuracy is reported per source.
    sources = {q["source"] for q in run.read_rows("questions", "test")}
    assert len(sources) > 1 and set(result["by"]["source"]) == sources
    assert sum(cell["n"] for cell in result["by"]["source"].values()) == result["n"]
    answers = run.read_rows("evaluate", "base")
    assert {row["prompt_version"] for row in answers} == {get_prompt("huatuo_o1/eval_strict").tag}
    assert summary(run).startswith(f"{tiny_model}: accuracy ")
    run_log = run.read_text("run.log")
    assert "stage evaluate: done in" in run_log and "output tok/s" in run_log


def test_a_prompt_too_long_for_the_engine_is_retried_kept_with_its_error_and_counted(
        tmp_path: Path, kept_engines: EngineServices) -> None:
    from sphuatuo.engines import Request
    from sphuatuo.passes.generation import PassFailed, generate_pass, parse_reply
    from sphuatuo.recipe import EngineConfig

    recipe = tiny_recipe(tmp_path / "run", **{"models.teacher.max_model_len": 128, "models.teacher.max_attempts": 2,
                                              "models.teacher.max_error_share": 0.25})
    ctx = _context(recipe, kept_engines)
    rows = [{"key": f"q{i}", "text": "what is scurvy?"} for i in range(3)]
    rows = cluster_rows([*rows, {"key": "long", "text": "scurvy " * 400}])

    def probe(engine: EngineConfig) -> int:
        return generate_pass(ctx, rows, "probe", engine=engine, request=Request(temperature=0.0, top_p=1.0,
                                                                                max_tokens=4),
                             messages=lambda row: [{"role": "user", "content": row["text"]}])

    # Past the role's max_error_share the pass fails, with the counts and the commonest error, and its failed
    # row stays out of the folder.
    strict = recipe.models.teacher.model_copy(update={"max_attempts": 1, "max_error_share": 0.1})
    with pytest.raises(PassFailed, match=r"probe: 1 of 4 rows failed in the engine after 1 attempts \(25%, more "
                                         r"than max_error_share 10%\); commonest: 1 x .*128"):
        probe(strict)
    assert sorted(ctx.run.read_column("key", "probe")) == ["q0", "q1", "q2"]

    # Resubmitted within the share: the failed row alone is sent again, retried in the pass (its attempts numbered
    # on from the first run's), and kept with its error; the pass counts it.
    assert probe(recipe.models.teacher) == 1
    out = {row["key"]: parse_reply(row) for row in ctx.run.read_rows("probe")}
    assert sorted(out) == ["long", "q0", "q1", "q2"] and len(ctx.run.read_rows("probe")) == 4
    assert out["long"]["finish_reason"] == "error" and out["long"]["generated_text"] == ""
    assert out["long"]["parse_error"].startswith("engine error: ") and "128" in out["long"]["parse_error"]
    for key in ("q0", "q1", "q2"):
        assert out[key]["engine_error"] is None and out[key]["num_generated_tokens"] > 0
    attempts = ctx.run.read_rows("probe_errors")
    assert sorted((row["key"], row["attempt"]) for row in attempts) == [("long", 1), ("long", 2), ("long", 3)]
    assert ctx.record.details["throughput"]["probe"]["engine_errors"] == 1
    # One engine for both passes and the retries: an engine error leaves it serving.
    assert len(kept_engines.take_log()["starts"]) == 1
