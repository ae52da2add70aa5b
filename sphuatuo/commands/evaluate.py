"""`sphuatuo eval`: the evaluation stage on its own, for any model directory (or hub id) and any
question file, without writing a recipe."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from sphuatuo.data.loaders import load_questions, resolve_source_path
from sphuatuo.pipeline import run_pipeline
from sphuatuo.recipe import (
    DataConfig,
    EngineConfig,
    EvaluateStage,
    JudgeConfig,
    ModelsConfig,
    ProtocolName,
    QuestionSource,
    Recipe,
    SamplingConfig,
    StagesConfig,
)
from sphuatuo.stages import evaluate, questions
from sphuatuo.stages.evaluate import protocol_label
from sphuatuo.store.manifest import read_manifest
from sphuatuo.store.run_root import RunRoot


def default_run_root(model: str, data: str, prompt: str) -> str:
    """One run root per model, question file and prompt, so evaluating another model never reuses this one's
    answers (the stage fingerprints would tell them apart too, but answers of both stay browsable)."""
    digest = hashlib.sha256("\n".join((model, os.path.abspath(data), prompt)).encode()).hexdigest()[:8]
    slug = "-".join(re.sub(r"[^A-Za-z0-9_.]+", "_", part).strip("_")[-32:]
                    for part in (model, Path(data).stem, prompt.split("/")[-1]))
    return f"runs/eval/{slug}-{digest}"


def evaluation_recipe(model: str, data: str, *, data_format: str | None, run_root: str | None, backend: str,
                      max_tokens: int, judge_model: str | None, prompt: str = "self_play/student_answer",
                      protocols: list[ProtocolName] | None = None) -> Recipe:
    """A recipe with the test set and the `base` student only, evaluated under `protocols` (default: project);
    the judge is the option-letter rule, or `judge_model` for open-ended items (refused without one, rather
    than scoring them all wrong)."""
    loaded = load_questions(resolve_source_path(data), format=data_format)
    open_ended = sum(1 for q in loaded.questions if not q.is_multiple_choice)
    if open_ended and judge_model is None:
        raise ValueError(f"{data}: {open_ended} open-ended questions need a judge: pass --judge-model")
    student = EngineConfig(backend=backend, model=model)
    judge = (JudgeConfig(kind="auto", engine=EngineConfig(backend=backend, model=judge_model)) if judge_model
             else JudgeConfig(kind="rule"))
    return Recipe(
        name="eval",
        run_root=run_root or default_run_root(model, data, prompt),
        data=DataConfig(train=[], test=[QuestionSource(path=data, format=data_format)], max_error_share=1.0),
        models=ModelsConfig(teacher=student, student=student, judge=judge),
        stages=StagesConfig(evaluate=EvaluateStage(models=["base"], prompt=prompt,
                                                   sampling=SamplingConfig(temperature=0.0, max_tokens=max_tokens),
                                                   protocols=protocols or ["project"])),
    )


def run_evaluation(recipe: Recipe) -> RunRoot:
    return run_pipeline(recipe, stages=(questions, evaluate))


def summary(run: RunRoot) -> str:
    manifest = read_manifest(run)
    result = manifest.stages["evaluate"].details["models"]["base"]
    low, high = result["ci95"]
    lines = [f"{manifest.recipe['models']['student']['model']}: accuracy {result['accuracy']:.1%} "
             f"(95% CI {low:.1%}-{high:.1%}) on {result['n']} questions; "
             f"first-match {result['first_match_accuracy']:.1%}; "
             f"committed {result.get('committed', '–')}, restated options {result.get('restated_options', '–')}, "
             f"copied question {result.get('copied_question', '–')}, candidates {result.get('candidates', '–')}, "
             f"no answer {result.get('no_answer', '–')}; "
             f"unparsable {result['unparsable']}, truncated {result['truncated']}"]
    for source, cell in result["by"].get("source", {}).items():
        lines.append(f"  {source}: {cell['accuracy']:.1%} on {cell['n']}")
    protocols = manifest.stages["evaluate"].details.get("protocols", {})
    for name, entry in protocols.items():
        if "base" in entry["models"]:
            low, high = entry["models"]["base"]["ci95"]
            lines.append(f"  under {protocol_label(name, entry['settings'])}: accuracy "
                         f"{entry['models']['base']['accuracy']:.1%} (95% CI {low:.1%}-{high:.1%})")
    return "\n".join(lines)
