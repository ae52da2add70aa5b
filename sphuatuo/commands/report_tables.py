"""What the run's reports and model cards read from the manifest and the training logs, as plain tables.

`report.md` writes these tables as Markdown, `report.html` as HTML and the model cards pick rows from them:
one reading of the run, so the three never disagree on a number.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sphuatuo.store.manifest import Manifest
from sphuatuo.store.run_root import RunRoot

Log = list[dict[str, Any]]


@dataclass
class Table:
    """A header, rows of formatted cells, and per column `l` (text) or `r` (a number, right-aligned)."""

    header: list[str]
    rows: list[list[str]]
    align: str


def training_runs(manifest: Manifest) -> list[str]:
    """The trained models: sft, then each DPO model the dpo stage recorded (`dpo` when it recorded none),
    or HuatuoGPT-o1's rl."""
    dpo = manifest.stages.get("dpo")
    runs = ["sft"]
    if dpo is not None:
        runs += dpo.details.get("runs") or ["dpo"]
    return runs + (["rl"] if "rl" in manifest.stages else [])


def training_stage(name: str) -> str:
    """The manifest stage that trained model `name` (every DPO model is the dpo stage's)."""
    return name if name in ("sft", "rl") else "dpo"


def training_log(run: RunRoot, name: str) -> Log | None:
    """The per-step log of a training run, None when it wrote none."""
    return json.loads(run.read_text(name, "train_log.json")) if run.exists(name, "train_log.json") else None


def missing_log_reason(manifest: Manifest, name: str) -> str:
    """Why a training run has no log: the reason its DPO run was skipped, else its stage's status."""
    stage = manifest.stages.get(training_stage(name))
    if stage is None:
        return "stage not run"
    return stage.details.get("runs", {}).get(name, {}).get("reason") or f"stage {stage.status}"


def throughput(log: Log) -> str:
    """Median tokens/s per worker (and MFU on GPUs) over the logged steps."""
    speeds = sorted(entry["tokens_per_second_per_worker"] for entry in log if "tokens_per_second_per_worker" in entry)
    if not speeds:
        return ""
    mfu = sorted(entry["mfu"] for entry in log if "mfu" in entry)
    return (f"Median {speeds[len(speeds) // 2]:.0f} tokens/s per worker"
            + (f", MFU {mfu[len(mfu) // 2]:.1%}." if mfu else "."))


def reward_trend(log: Log) -> str:
    """RL's mean reward in plain words: whether it rose from the first half of the steps to the second (in a run
    of two epochs, both halves see the same prompts), then every step's value."""
    rewards = [entry["reward"] for entry in log if "reward" in entry]
    if not rewards:
        return ""
    per_step = f"Per step: {', '.join(f'{reward:.3f}' for reward in rewards)}."
    if not any(rewards):
        return ("The mean reward was 0 at every step: no completion kept the format, so RL had nothing to learn "
                f"from. {per_step}")
    half = len(rewards) // 2
    if not half:
        return f"One step: no trend to tell. {per_step}"
    first, last = sum(rewards[:half]) / half, sum(rewards[-half:]) / half
    steps = "step" if half == 1 else f"{half} steps"
    halves = f"{first:.3f} over the first {steps}, {last:.3f} over the last {steps}"
    if last > first:
        return f"The mean reward rose: {halves}. {per_step}"
    return f"The mean reward did not rise: {halves}{' (it fell)' if last < first else ''}. {per_step}"


def stage_table(manifest: Manifest) -> Table:
    """Counts, time, rows/s out and the start and end (UTC) of every stage."""
    rows = []
    for name, r in manifest.stages.items():
        rate = f"{r.rows_out / r.seconds:.2f}" if r.seconds else "–"
        rows.append([name, r.status, str(r.rows_in), str(r.rows_out), str(r.rows_rejected), str(r.rows_failed),
                     f"{r.seconds:.1f}", rate, str(r.input_tokens), str(r.output_tokens),
                     r.started_at or "–", r.finished_at or "–"])
    return Table(["stage", "status", "rows in", "rows out", "rejected", "failed", "time (s)", "rows/s out",
                  "input tokens", "output tokens", "started", "finished"], rows, "llrrrrrrrrll")


def engine_table(manifest: Manifest) -> Table | None:
    """Per stage and model: engines started (how many in the kept process of a released one, and the seconds they
    took to come up), and passes that found one already up."""
    rows = []
    for name, record in manifest.stages.items():
        engines = record.details.get("engines")
        if not engines:
            continue
        starts: dict[str, list[dict]] = {}
        for start in engines["starts"]:
            starts.setdefault(start["model"], []).append(start)
        rows += [[name, model, str(len(each)), str(sum(start.get("kept_process", False) for start in each)),
                  f"{sum(start['seconds'] for start in each):.1f}"] for model, each in starts.items()]
        rows.append([name, "(passes on an engine already up)", str(engines["reuses"]), "–", "0.0"])
    if not rows:
        return None
    return Table(["stage", "model", "engines started", "in a kept process", "start time (s)"], rows, "llrrr")


def pairs_table(manifest: Manifest) -> Table | None:
    """Per pair strategy: wrong answers, corrections, verified, pairs and the DPO model trained on them."""
    pairs = manifest.stages.get("preference_pairs")
    strategies = pairs.details.get("strategies", {}) if pairs else {}
    if not strategies:
        return None
    dpo = manifest.stages.get("dpo")
    runs = {run["strategy"]: (name, run) for name, run in (dpo.details.get("runs", {}) if dpo else {}).items()}
    rows = []
    for strategy, c in strategies.items():
        name, run = runs.get(strategy, ("–", {}))
        model = f"{name} ({run['status']}, trained on {run['pairs']} pairs)" if run else "–"
        corrected = "–" if c["corrected"] is None else str(c["corrected"])
        rows.append([strategy, str(c["wrong"]), corrected, str(c["verified"]), str(c["paired"]), model])
    return Table(["strategy", "wrong answers", "corrections written", "verified", "pairs", "DPO model"], rows,
                 "lrrrrl")


PAIRS_FOOTNOTE = "`sampled` writes no corrections: its verified count is the judged-correct, complete samples."


def evaluated_models(manifest: Manifest) -> dict[str, dict[str, Any]]:
    """The evaluate stage's results per model (empty when nothing was evaluated)."""
    evaluation = manifest.stages.get("evaluate")
    return evaluation.details.get("models", {}) if evaluation else {}


def evaluation_table(models: dict[str, dict[str, Any]]) -> Table:
    rows = []
    for name, m in models.items():
        low, high = m["ci95"]
        rows.append([name, str(m["n"]), f"{m['accuracy']:.1%}", f"{low:.1%} – {high:.1%}",
                     f"{m['first_match_accuracy']:.1%}", _committed_cell(m), _no_answer_cell(m), str(m["unparsable"]),
                     str(m["truncated"])])
    return Table(["model", "questions", "accuracy", "95% CI", "first-match accuracy", "committed",
                  "no answer (restated options / copied question / candidates / none)", "unparsable", "truncated"],
                 rows, "lrrlrrlrr")


def _committed_cell(m: dict[str, Any]) -> str:
    """'97 (97.0%)'; '–' for a record written before commitments were counted."""
    if "committed" not in m:
        return "–"
    return f"{m['committed']} ({m['committed'] / m['n']:.1%})" if m["n"] else "0"


def _no_answer_cell(m: dict[str, Any]) -> str:
    """'1 / 0 / 2 / 0': restated options, copied question, candidates, none."""
    keys = ("restated_options", "copied_question", "candidates", "no_answer")
    return " / ".join(str(m[key]) for key in keys) if all(key in m for key in keys) else "–"


def breakdown_tables(models: dict[str, dict[str, Any]], max_values: int = 20) -> dict[str, Table]:
    """Accuracy per source and per metadata field, models side by side (fields with few values only)."""
    tables = {}
    groups = {group for m in models.values() for group in m.get("by", {})}
    for group in sorted(groups):
        values = sorted({value for m in models.values() for value in m.get("by", {}).get(group, {})})
        if len(values) > max_values:
            continue
        rows = []
        for value in values:
            cells = []
            for m in models.values():
                cell = m.get("by", {}).get(group, {}).get(value)
                cells.append(f"{cell['accuracy']:.1%} ({cell['ci95'][0]:.0%}–{cell['ci95'][1]:.0%}, n={cell['n']})"
                             if cell else "–")
            rows.append([value, *cells])
        tables[group] = Table([group, *models], rows, "l" + "r" * len(models))
    return tables
