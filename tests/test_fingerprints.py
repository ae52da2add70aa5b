"""Content-addressed stages: a stage's fingerprint moves with what it reads and nothing else; a run says what
changed, moves stale output aside instead of deleting it, and `gc` removes only what no stage refers to."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import tiny_recipe
from sphuatuo.cli import main
from sphuatuo.commands.evaluate import default_run_root
from sphuatuo.commands.status import collect_garbage, stage_statuses, unreferenced_outputs
from sphuatuo.pipeline import plan_stages, recipe_stages, stage_fingerprint, stale_reasons, supersede
from sphuatuo.recipe import Recipe
from sphuatuo.store.fingerprint import Fingerprint, changes
from sphuatuo.store.manifest import StageRecord, load_manifest, save_manifest
from sphuatuo.store.run_root import RunRoot


def _fingerprints(recipe: Recipe) -> dict[str, Fingerprint]:
    upstream: dict[str, str] = {}
    prints = {}
    for stage in recipe_stages(type(recipe)):
        prints[stage.NAME] = stage_fingerprint(recipe, stage, upstream)
        upstream[stage.NAME] = prints[stage.NAME].digest
    return prints


def _changed(before: Recipe, after: Recipe) -> set[str]:
    old, new = _fingerprints(before), _fingerprints(after)
    return {name for name in old if old[name].digest != new[name].digest}


def test_another_teacher_reruns_the_teacher_and_everything_downstream_of_it(tmp_path: Path) -> None:
    base = tiny_recipe(tmp_path)
    other = tiny_recipe(tmp_path, **{"models.teacher.model": "builtin:smollm2-135m-instruct"})
    assert _changed(base, other) == {"teacher_cot", "sft", "student_answers", "preference_pairs", "dpo", "evaluate"}
    old, new = _fingerprints(base)["teacher_cot"], _fingerprints(other)["teacher_cot"]
    assert "models.teacher.model: builtin:tiny -> builtin:smollm2-135m-instruct" in changes(old.components,
                                                                                            new.components)


def test_each_stage_moves_only_with_what_it_reads(tmp_path: Path) -> None:
    base = tiny_recipe(tmp_path)

    def changed(**fields: object) -> set[str]:
        return _changed(base, tiny_recipe(tmp_path, **fields))

    # The student is not the teacher: teacher answers are reused when only the student changes.
    assert changed(**{"models.student.model": "builtin:smollm2-135m-instruct"}) == {
        "sft", "student_answers", "preference_pairs", "dpo", "evaluate"}
    assert changed(**{"stages.dpo.learning_rate": 1e-6}) == {"dpo", "evaluate"}
    assert changed(**{"stages.evaluate.sampling.max_tokens": 99}) == {"evaluate"}
    assert changed(**{"data.test_fraction": 0.5}) == set(_fingerprints(base))
    # Placement and speed knobs change no output.
    assert changed(**{"models.teacher.replicas": 2, "models.teacher.batch_size": 3,
                      "stages.sft.keep_checkpoints": 5, "ray.num_cpus": 1}) == set()


def test_prompt_versions_and_model_identities_are_part_of_it(tmp_path: Path, tiny_model: str) -> None:
    components = _fingerprints(tiny_recipe(tmp_path, **{"models.teacher.model": tiny_model}))["teacher_cot"].components
    assert components["stages.teacher_cot.prompt"] == "self_play/teacher_cot"
    assert len(components["stages.teacher_cot.prompt@version"]) == 12
    assert components["models.teacher.model@identity"].startswith(f"{tiny_model}@")
    assert components["input.questions"] and components["package.python"]


def test_a_run_reuses_resumes_or_reruns_by_fingerprint(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path / "run")
    run = RunRoot(recipe.run_root)
    manifest = load_manifest(run, recipe)
    prints = _fingerprints(recipe)
    manifest.stages["questions"] = StageRecord(status="done", fingerprint=prints["questions"].digest,
                                               fingerprint_components=prints["questions"].components)
    manifest.stages["teacher_cot"] = StageRecord(status="failed", fingerprint=prints["teacher_cot"].digest)
    manifest.stages["sft"] = StageRecord(status="done")  # a run from before fingerprints
    actions = {stage.NAME: action for stage, _, action in plan_stages(recipe, recipe_stages(Recipe), manifest)}
    assert actions == {"questions": "reuse", "teacher_cot": "resume", "sft": "stale", "student_answers": "run",
                       "preference_pairs": "run", "dpo": "run", "evaluate": "run"}
    assert stale_reasons(manifest.stages["sft"], prints["sft"]) == [
        "no fingerprint recorded (a run from before fingerprints)"]

    edited = tiny_recipe(tmp_path / "run", **{"seed": 7})
    actions = {stage.NAME: action for stage, _, action in plan_stages(edited, recipe_stages(Recipe), manifest)}
    assert actions["questions"] == "stale" and actions["teacher_cot"] == "stale"
    assert stale_reasons(manifest.stages["questions"], _fingerprints(edited)["questions"]) == ["seed: 0 -> 7"]


def test_stale_output_is_moved_aside_and_gc_removes_only_unreferenced_outputs(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path / "run")
    run = RunRoot(recipe.run_root)
    run.write_rows([{"id": "q1"}], "teacher_cot", "first")
    assert supersede(run, ("teacher_cot", "never_written"), "0123456789abcdef") == [
        ".superseded/teacher_cot@0123456789ab"]
    assert not run.exists("teacher_cot")
    assert run.read_rows(".superseded", "teacher_cot@0123456789ab", "first") == [{"id": "q1"}]

    manifest = load_manifest(run, recipe)
    manifest.stages["sft"] = StageRecord(status="done", fingerprint="f" * 64)
    save_manifest(run, manifest)
    run.write_text("x", "checkpoints", f"sft-{'f' * 12}", "checkpoint_000001", "state")
    run.write_text("x", "checkpoints", "sft-aaaaaaaaaaaa", "checkpoint_000001", "state")
    garbage = [".superseded/teacher_cot@0123456789ab", "checkpoints/sft-aaaaaaaaaaaa"]
    assert unreferenced_outputs(run, manifest) == garbage
    assert collect_garbage(run, dry_run=True) == garbage and run.exists(".superseded")
    assert collect_garbage(run) == garbage
    assert not run.exists(".superseded", "teacher_cot@0123456789ab")
    assert not run.exists("checkpoints", "sft-aaaaaaaaaaaa")
    assert run.exists("checkpoints", f"sft-{'f' * 12}", "checkpoint_000001", "state")


def test_status_command_says_what_a_run_would_do(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tiny_recipe(tmp_path / "run")
    run = RunRoot(recipe.run_root)
    manifest = load_manifest(run, recipe)
    questions = _fingerprints(recipe)["questions"]
    manifest.stages["questions"] = StageRecord(status="done", rows_in=68, rows_out=60, fingerprint=questions.digest,
                                               fingerprint_components=questions.components)
    save_manifest(run, manifest)
    assert [(s.name, s.state) for s in stage_statuses(run)] == [("questions", "done")]
    edited = tiny_recipe(tmp_path / "run", **{"data.test_fraction": 0.5})
    statuses = {s.name: s for s in stage_statuses(run, edited)}
    assert statuses["questions"].state == "stale" and "data.test_fraction: 0.25 -> 0.5" in statuses["questions"].why
    assert statuses["dpo"].state == "pending"
    assert main(["status", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "questions" in out and "done" in out and "68" in out and "60" in out


def test_eval_run_roots_differ_by_model_data_and_prompt() -> None:
    roots = {default_run_root(model, data, prompt) for model in ("m1", "m2") for data in ("a.jsonl", "b.jsonl")
             for prompt in ("self_play/student_answer", "huatuo_o1/eval")}
    assert len(roots) == 8 and all(root.startswith("runs/eval/") for root in roots)


def test_an_edited_question_file_reruns_the_questions_stage_and_all_after(tmp_path: Path) -> None:
    bank = tmp_path / "bank.jsonl"
    bank.write_text('{"id": "q1", "question": "Which vitamin prevents scurvy?", "options": {"A": "C", "B": "D"}, '
                    '"answer": ["A"]}\n')
    recipe = tiny_recipe(tmp_path / "run", **{"data.train": [{"path": str(bank)}]})
    before = _fingerprints(recipe)
    bank.write_text(bank.read_text() + '{"id": "q2", "question": "Which vitamin prevents rickets?", '
                                       '"options": {"A": "C", "B": "D"}, "answer": ["B"]}\n')
    after = _fingerprints(recipe)
    assert {name for name in before if before[name].digest != after[name].digest} == set(before)
    assert [line.split(":")[0] for line in changes(before["questions"].components, after["questions"].components)
            ] == ["data.train.0.path@identity"]
