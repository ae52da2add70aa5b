"""The run report: `report.md` in the run root, with loss curves as PNG beside it.

Base, SFT and every DPO model (one per pair strategy) side by side on the evaluation sets, under each
chosen evaluation protocol (labelled with its settings), with 95% intervals, per source and per category;
the pair statistics per strategy; the DPO reward margins.
"""

from __future__ import annotations

import io
import json
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sphuatuo.stages.evaluate import protocol_label  # noqa: E402
from sphuatuo.store.manifest import Manifest, read_manifest  # noqa: E402
from sphuatuo.store.run_root import RunRoot  # noqa: E402


def _png(fig: Any) -> bytes:
    fig.axes[0].grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


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
    return _png(fig)


def _plot_margins(logs: dict[str, list[dict[str, Any]]]) -> bytes | None:
    """DPO's reward margin (chosen - rejected implicit reward) per step, every DPO model on one plot."""
    curves = {name: [(e["step"], e["rewards/margins"]) for e in log if "rewards/margins" in e]
              for name, log in logs.items()}
    curves = {name: points for name, points in curves.items() if points}
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, points in curves.items():
        ax.plot(*zip(*points), marker="o", markersize=3, label=name)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("chosen - rejected reward")
    ax.set_title("DPO reward margin")
    ax.legend(fontsize=8)
    return _png(fig)


def _lengths(run: RunRoot, name: str) -> list[str]:
    """The histogram of example lengths a training stage saw, and what became of the overlong ones."""
    if not run.exists(name, "lengths.json"):
        return []
    lengths = json.loads(run.read_text(name, "lengths.json"))
    bins = lengths["histogram"]
    return [f"{name}: example lengths in tokens (prompt and completion; max_length {lengths['max_length']}, "
            f"longest {lengths['longest']}): {lengths['overlong']} of {lengths['examples']} overlong, "
            f"{lengths['dropped']} dropped, {lengths['truncated']} cut from the left "
            f"(`overlong: {lengths['overlong_policy']}`).", "",
            "| " + " | ".join(bins) + " |", "|" + "---:|" * len(bins),
            "| " + " | ".join(map(str, bins.values())) + " |", ""]


def _training_runs(manifest: Manifest) -> list[str]:
    """The trained models: sft, then each DPO model the dpo stage recorded (`dpo` when it recorded none)."""
    dpo = manifest.stages.get("dpo")
    runs = ["sft"]
    if dpo is not None:
        runs += dpo.details.get("runs") or ["dpo"]
    return runs + (["rl"] if "rl" in manifest.stages else [])  # HuatuoGPT-o1: sft, then rl


def _pairs_table(manifest: Manifest) -> list[str]:
    pairs = manifest.stages.get("preference_pairs")
    strategies = pairs.details.get("strategies", {}) if pairs else {}
    if not strategies:
        return ["No preference pairs were built."]
    dpo = manifest.stages.get("dpo")
    runs = {run["strategy"]: (name, run) for name, run in (dpo.details.get("runs", {}) if dpo else {}).items()}
    lines = ["| strategy | wrong answers | corrections written | verified | pairs | DPO model |",
             "|---|---:|---:|---:|---:|---|"]
    for strategy, c in strategies.items():
        name, run = runs.get(strategy, ("–", {}))
        model = f"{name} ({run['status']}, trained on {run['pairs']} pairs)" if run else "–"
        corrected = "–" if c["corrected"] is None else c["corrected"]
        lines.append(f"| {strategy} | {c['wrong']} | {corrected} | {c['verified']} | {c['paired']} | {model} |")
    return lines + ["", "`sampled` writes no corrections: its verified count is the judged-correct, complete samples."]


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


def _protocols_table(manifest: Manifest) -> list[str]:
    """Every model under every chosen protocol in one table, each row labelled with the protocol's settings;
    below it, what each protocol is and how it scores."""
    evaluation = manifest.stages.get("evaluate")
    protocols = evaluation.details.get("protocols", {}) if evaluation else {}
    if not any(entry["models"] for entry in protocols.values()):
        return []
    lines = ["| protocol | model | questions | accuracy | 95% CI | first-match accuracy |",
             "|---|---|---:|---:|---|---:|"]
    for name, entry in protocols.items():
        for model, m in entry["models"].items():
            low, high = m["ci95"]
            lines.append(f"| {protocol_label(name, entry['settings'])} | {model} | {m['n']} | {m['accuracy']:.1%} | "
                         f"{low:.1%} – {high:.1%} | {m['first_match_accuracy']:.1%} |")
    lines.append("")
    for name, entry in protocols.items():
        lines.append(f"- **{name}**: {entry['settings']['description']}; a reply is {entry['settings']['scoring']}.")
    first = next(iter(protocols))
    return lines + ["", f"In detail, under `{first}`:", ""]


def _evaluation_table(manifest: Manifest) -> list[str]:
    evaluation = manifest.stages.get("evaluate")
    models = evaluation.details.get("models", {}) if evaluation else {}
    if not models:
        return ["No model was evaluated."]
    lines = [*_protocols_table(manifest),
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
                cells.append(f"{cell['accuracy']:.1%} ({cell['ci95'][0]:.0%}–{cell['ci95'][1]:.0%}, n={cell['n']})"
                             if cell else "–")
            lines.append(f"| {value} | " + " | ".join(cells) + " |")
    return lines


def _write_png(run: RunRoot, png: bytes, name: str) -> None:
    with run.fs.open_output_stream(run.fs_path(name)) as out:
        out.write(png)


def write_report(run: RunRoot) -> str:
    """Write `report.md` (and the loss plots) into the run root; return the report's location."""
    manifest = read_manifest(run)
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

    lines += ["## Preference pairs", "", *_pairs_table(manifest), "", "## Training", ""]
    dpo_logs = {}
    for name in _training_runs(manifest):
        if not run.exists(name, "train_log.json"):
            stage = manifest.stages.get(name if name in ("sft", "rl") else "dpo")
            why = stage.details.get("runs", {}).get(name, {}).get("reason") if stage else None
            status = f"stage {stage.status}" if stage else "stage not run"
            lines += [f"{name}: no training log ({why or status}).", ""]
            continue
        log = json.loads(run.read_text(name, "train_log.json"))
        if name not in ("sft", "rl"):
            dpo_logs[name] = log
        png = _plot_training(log, f"{name.upper()} training loss")
        _write_png(run, png, f"{name}_loss.png")
        losses = [entry["loss"] for entry in log if "loss" in entry]
        lines += [f"![{name} loss]({name}_loss.png)", "",
                  f"{name}: {len(losses)} logged steps, loss {losses[0]:.4f} → {losses[-1]:.4f}." if losses else "",
                  _throughput(log), "", *_lengths(run, name)]
    margins = _plot_margins(dpo_logs)
    if margins:
        _write_png(run, margins, "dpo_reward_margins.png")
        lines += ["![DPO reward margin](dpo_reward_margins.png)", ""]

    lines += ["## Evaluation", "", *_evaluation_table(manifest), ""]
    run.write_text("\n".join(lines), "report.md")
    return run.join("report.md")
