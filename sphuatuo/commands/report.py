"""The run report: `report.md` in the run root, with its plots as PNG beside it; `report.html` (the same run,
plots inlined) and a model card in every exported model folder are written with it.

Base, SFT and every DPO model (one per pair strategy) side by side on the evaluation sets, under each
chosen evaluation protocol (labelled with its settings), with 95% intervals, per source and per category;
the pair statistics per strategy; the DPO reward margins.
"""

from __future__ import annotations

import json

from sphuatuo.commands import plots
from sphuatuo.commands.model_cards import write_model_cards
from sphuatuo.commands.report_html import write_html_report
from sphuatuo.commands.report_tables import (
    PAIRS_FOOTNOTE,
    Table,
    breakdown_tables,
    engine_table,
    evaluated_models,
    evaluation_table,
    missing_log_reason,
    pairs_table,
    reward_trend,
    stage_table,
    throughput,
    training_log,
    training_runs,
    training_stage,
)
from sphuatuo.recipe import remote_code_summary
from sphuatuo.stages.evaluate import permutation_check, protocol_label
from sphuatuo.store.manifest import Manifest, read_manifest
from sphuatuo.store.run_root import RunRoot
from sphuatuo.store.secrets import redact, secret_names


def markdown_table(table: Table) -> list[str]:
    return ["| " + " | ".join(table.header) + " |",
            "|" + "".join("---:|" if a == "r" else "---|" for a in table.align),
            *("| " + " | ".join(row) + " |" for row in table.rows)]


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
    check = permutation_check(protocols)
    if check:
        lines += ["", "Permutation check (the same items, options shuffled):", "", *[f"- {line}" for line in check]]
    first = next(iter(protocols))
    return lines + ["", f"In detail, under `{first}`:", ""]


def _evaluation(manifest: Manifest) -> list[str]:
    models = evaluated_models(manifest)
    if not models:
        return ["No model was evaluated."]
    lines = [*_protocols_table(manifest), *markdown_table(evaluation_table(models))]
    lines += ["", "A reply is committed when it gives option(s) as its answer; restating the options, copying the "
              "question back or holding several candidates open is no answer, and is wrong."]
    for group, table in breakdown_tables(models).items():
        lines += ["", f"By {group}:", "", *markdown_table(table)]
    return lines


def _write_png(run: RunRoot, png: bytes, name: str) -> None:
    with run.fs.open_output_stream(run.fs_path(name)) as out:
        out.write(png)


def write_report(run: RunRoot) -> str:
    """Write `report.md` (and the loss plots), `report.html` and the model cards; return report.md's location.
    The values of the recipe's secrets are masked in the report.

    The cards are written here rather than at export because only now are the evaluation results known."""
    manifest = read_manifest(run)
    lines = [f"# Run report: {manifest.recipe['name']}", "",
             f"Run root: `{run.uri}`  ", f"Created: {manifest.created_at}  ",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in manifest.versions.items()) + "  ",
             f"Remote code: {remote_code_summary(manifest.recipe)}", "",
             "An HTML version with every plot inlined: [report.html](report.html).", "",
             "## Stages", "", *markdown_table(stage_table(manifest)), ""]
    engines = engine_table(manifest)
    if engines:
        lines += ["Engines (they stay up across the passes and stages that share a model):", "",
                  *markdown_table(engines), ""]
    for name, record in manifest.stages.items():
        notes = record.details.get("notes", [])
        if record.error:
            notes = [*notes, f"**{record.status}**: {record.error}"]
        if notes:
            lines += [f"**{name}**", "", *[f"- {note}" for note in notes], ""]

    pairs = pairs_table(manifest)
    lines += ["## Preference pairs", "",
              *(markdown_table(pairs) + ["", PAIRS_FOOTNOTE] if pairs else ["No preference pairs were built."]),
              "", "## Training", ""]
    dpo_logs = {}
    for name in training_runs(manifest):
        log = training_log(run, name)
        if log is None:
            lines += [f"{name}: no training log ({missing_log_reason(manifest, name)}).", ""]
            continue
        if training_stage(name) == "dpo":
            dpo_logs[name] = log
        _write_png(run, plots.training_loss(log, f"{name.upper()} training loss"), f"{name}_loss.png")
        losses = [entry["loss"] for entry in log if "loss" in entry]
        lines += [f"![{name} loss]({name}_loss.png)", "",
                  f"{name}: {len(losses)} logged steps, loss {losses[0]:.4f} → {losses[-1]:.4f}." if losses else "",
                  throughput(log), "", *_lengths(run, name)]
        reward = plots.rl_reward(log)
        if reward:
            _write_png(run, reward, f"{name}_reward.png")
            lines += [f"![{name} reward]({name}_reward.png)", "", f"{name}: {reward_trend(log)}", ""]
    margins = plots.reward_margins(dpo_logs)
    if margins:
        _write_png(run, margins, "dpo_reward_margins.png")
        lines += ["![DPO reward margin](dpo_reward_margins.png)", ""]

    lines += ["## Evaluation", "", *_evaluation(manifest), ""]
    run.write_text(redact("\n".join(lines), secret_names(manifest.recipe)), "report.md")
    write_html_report(run, manifest)
    write_model_cards(run, manifest)
    return run.join("report.md")
