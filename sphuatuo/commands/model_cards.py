"""A Hugging Face model card (`README.md`) in every model folder a run exported (`<stage>/model`).

A model folder leaves the run root on its own (copied to a serving cluster, pushed to the Hub), and without a
card nobody can tell which recipe made it, from what data, with which settings, how well it did, or where it
departs from the paper. The card's YAML front matter is the Hub's metadata (base_model, datasets, tags, license
when known, model-index with the evaluation results); its body names the recipe, the data lineage, the
training settings and the departures. Written with the report (the evaluation results are known by then);
only `README.md` is written, never a weight or config file.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath
from typing import Any

import yaml

from sphuatuo.commands.report_tables import evaluated_models, training_runs, training_stage
from sphuatuo.local_models import SMOLLM2, TINY
from sphuatuo.store.manifest import Manifest
from sphuatuo.store.run_root import RunRoot

# What each recipe kind is, in one line, and the paper it reproduces.
RECIPES: dict[str, tuple[str, str]] = {
    "self_play": ("Self-Play (SP-Huatuo)",
                  "teacher chains of thought, rejection-sampled by a judge → SFT of the student → the SFT student's "
                  "wrong answers corrected into preference pairs → DPO from the SFT model"),
    "huatuo_o1": ("HuatuoGPT-o1",
                  "multiple-choice items rewritten as verifiable problems → verifier-guided search for complex "
                  "reasoning paths → SFT on the verified paths → RL with the verifier as reward"),
}

# Where sphuatuo departs from each paper and its released scripts whatever the recipe says (the recipes'
# comments say the same field by field).
DEPARTURES: dict[str, tuple[str, ...]] = {
    "self_play": (
        "The teacher does not see the gold answer (the original prompt leaked it); a rejected question may be "
        "asked once more with the reference shown, and such answers are marked `hinted`.",
        "Train and test share one chat template (the original scripts trained and tested on different ones).",
        "The self-correction prompt is written after the paper's description (no public script).",
        "Completions are never sliced by the prompt's length (the original cut `response[len(prompt):]`).",
        "Training examples longer than `max_length` are dropped or cut from the left and counted, never cut "
        "before the answer.",
        "Evaluation decodes greedily with a budget that fits the chain of thought (the original sampled at 0.7 "
        "with 450 new tokens); multiple-choice items are scored by option letters, first- and last-match "
        "accuracy apart.",
    ),
    "huatuo_o1": (
        "RL uses TRL's GRPO or RLOO with the paper's reward; the paper's PPO is no longer in TRL.",
        "The released code's label-reveal fallback is off by default; when on, its paths are flagged "
        "`label_revealed` and still verified.",
        "An unparsable search reply is a failed step (the chain stays as it was) instead of dropping the item.",
        "Evaluation decodes greedily and reports first- and last-match accuracy apart (the original sampled at "
        "0.5 and kept the larger of the two); empty or unparsable replies count as wrong.",
    ),
}

# Base models whose Hub id and licence sphuatuo knows; a local folder has neither (the card then omits them).
HUB_IDS = {SMOLLM2: "HuggingFaceTB/SmolLM2-135M-Instruct"}
LICENSES = {
    "huggingfacetb/smollm2-135m-instruct": "apache-2.0",
    **{f"qwen/qwen2.5-{size}-instruct": "apache-2.0" for size in ("0.5b", "1.5b", "7b", "14b", "32b")},
}

SETTINGS = ("finetuning", "learning_rate", "epochs", "max_steps", "lr_scheduler", "warmup_ratio", "weight_decay",
            "micro_batch_size", "grad_accumulation", "max_length", "overlong", "precision",
            # DPO and RL
            "beta", "loss_type", "algorithm", "kl_coef", "group_size", "iterations", "max_response_length",
            "temperature")


def hub_id(model: str) -> str | None:
    """The Hub id of a recipe's model name: a built-in's source model, a Hub id as it is, None for a local path
    or the random tiny model."""
    if model in HUB_IDS:
        return HUB_IDS[model]
    if model == TINY or "://" in model or model.startswith(("/", ".", "~")) or model.count("/") != 1:
        return None
    return model


def _details(manifest: Manifest, stage: str) -> dict[str, Any]:
    record = manifest.stages.get(stage)
    return record.details if record else {}


def _sources(recipe: dict[str, Any], split: str) -> list[str]:
    return [source["path"] for source in recipe["data"].get(split, [])]


def _test_set(recipe: dict[str, Any]) -> tuple[str, str]:
    """(name, type) of the evaluation data for the model-index: the test files, or the held-out share."""
    test = recipe["data"].get("test", [])
    if test:
        name = ", ".join(PurePosixPath(source["path"]).name or source["path"] for source in test)
        kind = test[0].get("format") or PurePosixPath(test[0]["path"]).stem
    else:
        name = f"{recipe['data'].get('test_fraction', 0):.0%} held out of " + ", ".join(_sources(recipe, "train"))
        kind = "held-out"
    return name, _slug(kind)


def _slug(text: str) -> str:
    """A model-index dataset type: lower case, dashes for anything else."""
    return re.sub(r"[^a-z0-9_-]+", "-", text.lower()).strip("-") or "test"


def front_matter(manifest: Manifest, name: str) -> dict[str, Any]:
    """The card's metadata: base model, datasets, tags, licence (when known) and the model-index."""
    recipe = manifest.recipe
    kind = recipe.get("recipe", "self_play")
    base = hub_id(recipe["models"]["student"]["model"])
    algorithm = {"sft": "sft", "rl": recipe["stages"].get("rl", {}).get("algorithm", "grpo")}.get(name, "dpo")
    meta: dict[str, Any] = {}
    if base:
        meta |= {"base_model": base, "base_model_relation": "finetune"}
        if base.lower() in LICENSES:
            meta["license"] = LICENSES[base.lower()]
    meta |= {"datasets": _sources(recipe, "train"), "library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": ["sphuatuo", "medical", kind.replace("_", "-"), algorithm, "trl"]}
    result = evaluated_models(manifest).get(name)
    if result:
        dataset, dataset_type = _test_set(recipe)
        results = [_result(dataset, dataset_type, result["accuracy"])]
        sources = result.get("by", {}).get("source", {})
        if len(sources) > 1:  # the HuatuoGPT-o1 eval file: one result per benchmark as well
            results += [_result(source, _slug(source), cell["accuracy"]) for source, cell in sources.items()]
        meta["model-index"] = [{"name": f"{recipe['name']}-{name}", "results": results}]
    return meta


def _result(dataset: str, dataset_type: str, accuracy: float) -> dict[str, Any]:
    return {"task": {"type": "question-answering", "name": "Medical question answering"},
            "dataset": {"name": dataset, "type": dataset_type, "split": "test"},
            "metrics": [{"type": "accuracy", "value": round(accuracy, 4), "name": "accuracy"}]}


def lineage(manifest: Manifest, name: str) -> list[str]:
    """How many questions, accepted teacher answers or verified paths, and pairs led to model `name`."""
    recipe, stages = manifest.recipe, manifest.stages
    questions = _details(manifest, "questions")
    lines = [f"{questions.get('train', 0)} training and {questions.get('test', 0)} test questions from "
             + ", ".join(f"`{path}`" for path in _sources(recipe, "train") + _sources(recipe, "test")) + "."]
    if "teacher_cot" in stages:
        teacher, d = stages["teacher_cot"], _details(manifest, "teacher_cot")
        lines.append(f"{teacher.rows_out} of {teacher.rows_in} questions have an accepted answer from the teacher "
                     f"`{recipe['models']['teacher']['model']}` ({d.get('accepted_unhinted', 0)} unhinted, "
                     f"{d.get('accepted_hinted', 0)} with the reference shown).")
    if "verifiable_problems" in stages:
        problems, d = stages["verifiable_problems"], _details(manifest, "verifiable_problems")
        lines.append(f"{problems.rows_out} verifiable problems from {problems.rows_in} items ({problems.rows_rejected} "
                     f"rejected): {d.get('search', 0)} for the reasoning search, {d.get('rl', 0)} for RL.")
    if "reasoning_search" in stages:
        d = _details(manifest, "reasoning_search")
        lines.append(f"{d.get('solved', 0)} of {d.get('searched', 0)} problems have a verified reasoning path "
                     f"({d.get('label_revealed', 0)} with the label revealed); {d.get('written', 0)} written up as "
                     f"natural thinking by `{recipe['models']['teacher']['model']}`.")
    if "sft" in stages:
        origins = _details(manifest, "sft").get("origins")  # HuatuoGPT-o1: search, released, project-written
        by_origin = f" ({', '.join(f'{n} {origin}' for origin, n in origins.items())})" if origins else ""
        lines.append(f"SFT on {stages['sft'].rows_out} examples{by_origin}.")
    if training_stage(name) == "dpo":
        d = _details(manifest, "student_answers")
        lines.append(f"The SFT student answered the training questions: {d.get('correct', 0)} correct, "
                     f"{d.get('wrong', 0)} wrong.")
        run = _details(manifest, "dpo").get("runs", {}).get(name, {})
        counts = _details(manifest, "preference_pairs").get("strategies", {}).get(run.get("strategy"), {})
        if counts:
            written = "" if counts["corrected"] is None else f"{counts['corrected']} corrections written, "
            lines.append(f"Pair strategy `{run['strategy']}`: {counts['wrong']} wrong answers, {written}"
                         f"{counts['verified']} verified, {counts['paired']} pairs; DPO on {run['pairs']} pairs.")
    if name == "rl":
        rl, d = stages["rl"], _details(manifest, "rl")
        lines.append(f"RL ({d.get('algorithm', '?')}) on {rl.rows_in} problems: mean reward "
                     f"{_number(d.get('first_reward'))} at the first step, {_number(d.get('last_reward'))} at the "
                     f"last ({d.get('reward_steps', 0)} steps).")
    return lines


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def settings(manifest: Manifest, name: str) -> list[tuple[str, str]]:
    """The recipe's training fields for this model, then what the training recorded."""
    stage = training_stage(name)
    config = manifest.recipe["stages"].get(stage, {})
    rows = [(key, str(config[key])) for key in SETTINGS
            if key in config and not (key == "max_steps" and config[key] <= 0)]  # -1: epochs decide
    if config.get("finetuning") == "lora":
        lora = config.get("lora", {})
        rows.append(("lora", f"rank {lora.get('rank')}, alpha {lora.get('alpha')}, {lora.get('target_modules')}"))
    details = _details(manifest, stage)
    if stage == "dpo":
        details = details.get("runs", {}).get(name, details)
    for key in ("global_batch", "workers", "zero_stage", "steps"):
        if key in details:
            rows.append((key, str(details[key])))
    if details.get("first_loss") is not None:
        rows.append(("loss", f"{details['first_loss']:.4f} → {details['last_loss']:.4f}"))
    return rows


def _evaluation(manifest: Manifest, name: str) -> list[str]:
    models = evaluated_models(manifest)
    if name not in models:
        return ["Not evaluated in this run."]
    lines = ["| model | questions | accuracy | 95% interval |", "|---|---:|---:|---|"]
    for model, m in models.items():
        label = f"**{model}** (this model)" if model == name else model
        lines.append(f"| {label} | {m['n']} | {m['accuracy']:.1%} | {m['ci95'][0]:.1%} – {m['ci95'][1]:.1%} |")
    return lines


def _origin(manifest: Manifest, name: str) -> str:
    """What the model was trained from: the student, or the run's SFT model (itself from the student); RL says
    which by the start model it recorded."""
    student = f"`{manifest.recipe['models']['student']['model']}`"
    start = str(_details(manifest, training_stage(name)).get("start_model", ""))
    if name == "sft" or (name == "rl" and not start.rstrip("/").endswith("sft/model")):
        return f"fine-tuned from {student}"
    return f"trained by {'RL' if name == 'rl' else 'DPO'} from the run's SFT model, itself fine-tuned from {student}"


def model_card(manifest: Manifest, name: str) -> str:
    """The card of model `name` (sft, dpo, dpo_<strategy> or rl) as Markdown with YAML front matter."""
    recipe = manifest.recipe
    kind = recipe.get("recipe", "self_play")
    title, pipeline = RECIPES[kind]
    meta = yaml.safe_dump(front_matter(manifest, name), sort_keys=False, allow_unicode=True)
    lines = [f"---\n{meta}---", "", f"# {recipe['name']} / {name}", "",
             f"The `{name}` model of the run `{recipe['name']}` of sphuatuo's {title} recipe: "
             f"{_origin(manifest, name)}.",
             "", "## Recipe", "", f"{title}: {pipeline}.", "",
             "## Data lineage", "", *[f"- {line}" for line in lineage(manifest, name)], "",
             "## Training", "", "| setting | value |", "|---|---|",
             *[f"| {key} | {value} |" for key, value in settings(manifest, name)], "",
             "## Evaluation", "", *_evaluation(manifest, name), "",
             "## Departures from the paper", "", *[f"- {item}" for item in DEPARTURES[kind]], ""]
    return "\n".join(lines)


def write_model_cards(run: RunRoot, manifest: Manifest) -> list[str]:
    """Write `README.md` into every exported model folder of the run; return the cards' locations."""
    written = []
    for name in training_runs(manifest):
        if run.exists(name, "model", "config.json"):
            run.write_text(model_card(manifest, name), name, "model", "README.md")
            written.append(run.join(name, "model", "README.md"))
    return written
