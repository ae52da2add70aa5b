"""The run report: `report.md` in the run root, with loss curves as PNG beside it."""

from __future__ import annotations

import io
import json
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sphuatuo.runs import Manifest, RunRoot  # noqa: E402

TRAINING_STAGES = ("sft", "dpo")


def _plot_training(log: list[dict[str, Any]], title: str) -> bytes:
    """Loss per step, plus DPO's reward margin on a second axis when logged."""
    steps = [entry["step"] for entry in log if "loss" in entry]
    losses = [entry["loss"] for entry in log if "loss" in entry]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, marker="o", markersize=3, label="training loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    margins = [(entry["step"], entry["rewards/margins"]) for entry in log if "rewards/margins" in entry]
    if margins:
        twin = ax.twinx()
        twin.plot(*zip(*margins), color="tab:orange", linestyle="--", label="reward margin")
        twin.set_ylabel("chosen - rejected reward")
        fig.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _throughput(log: list[dict[str, Any]]) -> str:
    """Median tokens/s per worker (and MFU on GPUs) over the logged steps."""
    speeds = sorted(entry["tokens_per_second_per_worker"] for entry in log if "tokens_per_second_per_worker" in entry)
    if not speeds:
        return ""
    mfu = sorted(entry["mfu"] for entry in log if "mfu" in entry)
    return (f"Median {speeds[len(speeds) // 2]:.0f} tokens/s per worker"
            + (f", MFU {mfu[len(mfu) // 2]:.1%}." if mfu else "."))


def _stage_table(manifest: Manifest) -> list[str]:
    lines = [
        "| stage | status | rows in | rows out | rejected | failed | time (s) | input tokens | output tokens |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in manifest.stages.items():
        lines.append(f"| {name} | {r.status} | {r.rows_in} | {r.rows_out} | {r.rows_rejected} | {r.rows_failed} | "
                     f"{r.seconds:.1f} | {r.input_tokens} | {r.output_tokens} |")
    return lines


def _evaluation_table(manifest: Manifest) -> list[str]:
    evaluation = manifest.stages.get("evaluate")
    models = evaluation.details.get("models", {}) if evaluation else {}
    if not models:
        return ["No model was evaluated."]
    lines = [
        "| model | questions | accuracy | 95% CI | first-match accuracy | unparsable | truncated |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for name, m in models.items():
        low, high = m["ci95"]
        lines.append(f"| {name} | {m['n']} | {m['accuracy']:.1%} | {low:.1%} – {high:.1%} | "
                     f"{m['first_match_accuracy']:.1%} | {m['unparsable']} | {m['truncated']} |")
    return lines + _breakdowns(models)


def _breakdowns(models: dict[str, Any], max_values: int = 20) -> list[str]:
    """Accuracy per source and per metadata field, models side by side (fields with few values only)."""
    lines: list[str] = []
    groups = {group: values for m in models.values() for group, values in m.get("by", {}).items()}
    for group in sorted(groups):
        values = sorted({value for m in models.values() for value in m.get("by", {}).get(group, {})})
        if len(values) > max_values:
            continue
        lines += ["", f"By {group}:", "", f"| {group} | " + " | ".join(models) + " |",
                  "|---|" + "---:|" * len(models)]
        for value in values:
            cells = []
            for m in models.values():
                cell = m.get("by", {}).get(group, {}).get(value)
                cells.append(f"{cell['accuracy']:.1%} (n={cell['n']})" if cell else "–")
            lines.append(f"| {value} | " + " | ".join(cells) + " |")
    return lines


def write_report(run: RunRoot) -> str:
    """Write `report.md` (and the loss plots) into the run root; return the report's location."""
    manifest = Manifest.model_validate_json(run.read_text("manifest.json"))
    lines = [f"# Run report: {manifest.recipe['name']}", "",
             f"Run root: `{run.uri}`  ", f"Created: {manifest.created_at}  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in manifest.versions.items()), "",
             "## Stages", "", *_stage_table(manifest), ""]
    for name, record in manifest.stages.items():
        notes = record.details.get("notes", [])
        if record.error:
            notes = [*notes, f"**{record.status}**: {record.error}"]
        if notes:
            lines += [f"**{name}**", "", *[f"- {note}" for note in notes], ""]

    lines += ["## Training", ""]
    for name in TRAINING_STAGES:
        if not run.exists(name, "train_log.json"):
            status = manifest.stages[name].status if name in manifest.stages else "not run"
            lines += [f"{name}: no training log (stage {status}).", ""]
            continue
        log = json.loads(run.read_text(name, "train_log.json"))
        png = _plot_training(log, f"{name.upper()} training loss")
        with run.fs.open_output_stream(run.fs_path(f"{name}_loss.png")) as out:
            out.write(png)
        losses = [entry["loss"] for entry in log if "loss" in entry]
        lines += [f"![{name} loss]({name}_loss.png)", "",
                  f"{name}: {len(losses)} logged steps, loss {losses[0]:.4f} → {losses[-1]:.4f}." if losses else "",
                  _throughput(log), ""]

    lines += ["## Evaluation", "", *_evaluation_table(manifest), ""]
    run.write_text("\n".join(lines), "report.md")
    return run.join("report.md")
