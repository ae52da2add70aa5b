"""`report.html`: the run report as one self-contained page to look at rather than read.

Every plot is a base64 PNG inside the page and there is no script, stylesheet or font from elsewhere, so the
file opens the same from an object store, an e-mail attachment or an air-gapped cluster: the stage timeline,
loss / grad norm / tokens/s per training run, DPO reward margins, RL reward curves, and every model's accuracy
with its 95% interval, with the tables of `report.md` beside them.
"""

from __future__ import annotations

import base64
from html import escape

from sphuatuo.commands import plots
from sphuatuo.commands import report_tables as tables
from sphuatuo.store.manifest import Manifest
from sphuatuo.store.run_root import RunRoot

STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f3f3f3; }
td.r { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; }
figure img { max-width: 100%; }
figcaption, .note { color: #555; font-size: 0.9em; }
"""


def html_table(table: tables.Table) -> str:
    head = "".join(f"<th>{escape(cell)}</th>" for cell in table.header)
    body = "".join("<tr>" + "".join(f'<td class="{align}">{escape(cell)}</td>' for cell, align in zip(row, table.align))
                   + "</tr>" for row in table.rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure(png: bytes, caption: str) -> str:
    """A plot inlined as a data URI, so the page needs no file beside it."""
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img src="data:image/png;base64,{data}" alt="{escape(caption)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure>")


def _training(run: RunRoot, manifest: Manifest) -> list[str]:
    parts = ["<h2>Training</h2>"]
    dpo_logs = {}
    for name in tables.training_runs(manifest):
        log = tables.training_log(run, name)
        if log is None:
            parts.append(f"<h3>{escape(name)}</h3><p class=note>No training log "
                         f"({escape(tables.missing_log_reason(manifest, name))}).</p>")
            continue
        if tables.training_stage(name) == "dpo":
            dpo_logs[name] = log
        parts.append(f"<h3>{escape(name)}</h3>")
        curves = plots.training_curves(log, f"{name}: loss, grad norm and tokens/s per worker")
        if curves:
            parts.append(figure(curves, f"{name}: loss, gradient norm and tokens/s per worker per optimizer step"))
        parts.append(f"<p>{escape(tables.throughput(log))}</p>")
        reward = plots.rl_reward(log)
        if reward:
            parts += ["<h3>RL reward</h3>", figure(reward, f"{name}: mean reward per step (0 broken format, "
                                                          "0.1 wrong, 1.0 verified)"),
                      f"<p>{escape(tables.reward_trend(log))}</p>"]
    margins = plots.reward_margins(dpo_logs)
    if margins:
        parts += ["<h3>DPO reward margins</h3>",
                  figure(margins, "chosen minus rejected implicit reward per step, every DPO model")]
    return parts


def _evaluation(manifest: Manifest) -> list[str]:
    models = tables.evaluated_models(manifest)
    parts = ["<h2>Evaluation</h2>"]
    if not models:
        return parts + ["<p>No model was evaluated.</p>"]
    parts += [figure(plots.accuracy(models), "accuracy of every model with its 95% Wilson interval"),
              html_table(tables.evaluation_table(models))]
    for group, table in tables.breakdown_tables(models).items():
        parts += [f"<h3>By {escape(group)}</h3>", html_table(table)]
    return parts


def render_html(run: RunRoot, manifest: Manifest) -> str:
    """The whole page."""
    name = escape(manifest.recipe["name"])
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>Run report: {name}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>Run report: {name}</h1>",
             f"<p class=note>Run root: <code>{escape(run.uri)}</code><br>Created: {escape(manifest.created_at)}<br>"
             "Versions: " + escape(", ".join(f"{k} {v}" for k, v in manifest.versions.items())) + "</p>",
             "<h2>Stage timeline</h2>"]
    timeline = plots.stage_timeline(manifest)
    if timeline:
        parts.append(figure(timeline, "each stage from its start to its end, with rows per second out"))
    parts.append(html_table(tables.stage_table(manifest)))
    engines = tables.engine_table(manifest)
    if engines:
        parts += ["<h2>Engines</h2>", html_table(engines)]
    notes = [(stage, note) for stage, record in manifest.stages.items()
             for note in [*record.details.get("notes", []), *([f"{record.status}: {record.error}"] if record.error
                                                                else [])]]
    if notes:
        parts.append("<ul>" + "".join(f"<li><b>{escape(stage)}</b>: {escape(note)}</li>" for stage, note in notes)
                     + "</ul>")
    pairs = tables.pairs_table(manifest)
    if pairs:
        parts += ["<h2>Preference pairs</h2>", html_table(pairs), f"<p class=note>{escape(tables.PAIRS_FOOTNOTE)}</p>"]
    parts += _training(run, manifest) + _evaluation(manifest) + ["</body></html>"]
    return "\n".join(parts)


def write_html_report(run: RunRoot, manifest: Manifest) -> str:
    """Write `report.html` into the run root; return its location."""
    run.write_text(render_html(run, manifest), "report.html")
    return run.join("report.html")
