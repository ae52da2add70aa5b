"""Every plot of the run report, as PNG bytes: `report.md` links them as files, `report.html` inlines them.

One place for the figures, so the two reports never draw the same curve two ways.
"""

from __future__ import annotations

import io
from datetime import datetime
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from sphuatuo.store.manifest import Manifest  # noqa: E402

Log = list[dict[str, Any]]


def series(log: Log, key: str) -> list[tuple[int, float]]:
    """(optimizer step, value) of every log entry that has `key` (the final summary entry has none)."""
    return [(entry["step"], entry[key]) for entry in log if key in entry]


def _png(fig: Any) -> bytes:
    for ax in fig.axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _per_step(ylabel: str, title: str) -> tuple[Any, Any]:
    """A figure with one axes of some value per optimizer step."""
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    return fig, ax


def training_loss(log: Log, title: str) -> bytes:
    """Loss per step, plus DPO's reward margin on a second axis when logged."""
    fig, ax = _per_step("loss", title)
    ax.plot(*zip(*series(log, "loss")), marker="o", markersize=3, label="training loss")
    margins = series(log, "rewards/margins")
    if margins:
        twin = ax.twinx()
        twin.plot(*zip(*margins), color="tab:orange", linestyle="--", label="reward margin")
        twin.set_ylabel("chosen - rejected reward")
        fig.legend(loc="upper right", fontsize=8)
    return _png(fig)


TRAINING_PANELS = (("loss", "loss"), ("grad_norm", "grad norm"),
                   ("tokens_per_second_per_worker", "tokens/s per worker"))


def training_curves(log: Log, title: str) -> bytes | None:
    """Loss, grad norm and tokens/s per worker per step, one panel each (those the log has)."""
    panels = [(label, points) for key, label in TRAINING_PANELS if (points := series(log, key))]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.4 * len(panels), 3), dpi=100, squeeze=False)
    for ax, (label, points) in zip(axes[0], panels):
        ax.plot(*zip(*points), marker="o", markersize=2)
        ax.set_xlabel("optimizer step")
        ax.set_title(label, fontsize=10)
    fig.suptitle(title, fontsize=11)
    return _png(fig)


def reward_margins(logs: dict[str, Log]) -> bytes | None:
    """DPO's reward margin (chosen - rejected implicit reward) per step, every DPO model on one plot."""
    curves = {name: points for name, log in logs.items() if (points := series(log, "rewards/margins"))}
    if not curves:
        return None
    fig, ax = _per_step("chosen - rejected reward", "DPO reward margin")
    for name, points in curves.items():
        ax.plot(*zip(*points), marker="o", markersize=3, label=name)
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.legend(fontsize=8)
    return _png(fig)


def rl_reward(log: Log) -> bytes | None:
    """RL's mean reward per step with one standard deviation of the group's rewards around it."""
    rewards = series(log, "reward")
    if not rewards:
        return None
    steps, means = zip(*rewards)
    fig, ax = _per_step("reward", "RL reward")
    ax.plot(steps, means, marker="o", markersize=3, label="mean reward")
    spread = dict(series(log, "reward_std"))
    if spread:
        ax.fill_between(steps, [m - spread.get(s, 0) for s, m in rewards], [m + spread.get(s, 0) for s, m in rewards],
                        alpha=0.2, label="± 1 std")
    ax.set_ylim(-0.05, 1.05)  # the reward: 0 (broken format), 0.1 (wrong), 1.0 (verified)
    ax.legend(fontsize=8)
    return _png(fig)


def stage_timeline(manifest: Manifest) -> bytes | None:
    """One bar per stage from its start to its end (minutes since the first start), labelled rows/s out."""
    timed = [(name, datetime.fromisoformat(r.started_at), datetime.fromisoformat(r.finished_at), r)
             for name, r in manifest.stages.items() if r.started_at and r.finished_at]
    if not timed:
        return None
    origin = min(start for _, start, _, _ in timed)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(timed) + 1.2), dpi=100)
    for y, (name, start, end, record) in enumerate(timed):
        left, width = (start - origin).total_seconds() / 60, max((end - start).total_seconds() / 60, 0.01)
        ax.barh(y, width, left=left, color="tab:red" if record.status == "failed" else "tab:blue")
        rate = f"{record.rows_out / record.seconds:.2f} rows/s" if record.seconds else record.status
        ax.annotate(f" {rate}", (left + width, y), va="center", fontsize=8)
    ax.set_yticks(range(len(timed)), [name for name, *_ in timed])
    ax.invert_yaxis()
    ax.set_xlabel("minutes since the first stage started")
    ax.set_title("Stage timeline")
    ax.margins(x=0.25)
    return _png(fig)


def accuracy(models: dict[str, dict[str, Any]]) -> bytes | None:
    """Every evaluated model's accuracy with its 95% Wilson interval."""
    if not models:
        return None
    names = list(models)
    values = [models[name]["accuracy"] for name in names]
    # Wilson intervals hold their proportion; max() keeps a rounded one from giving a negative error bar.
    low = [max(0.0, value - models[name]["ci95"][0]) for name, value in zip(names, values)]
    high = [max(0.0, models[name]["ci95"][1] - value) for name, value in zip(names, values)]
    fig, ax = plt.subplots(figsize=(6, 0.5 * len(names) + 1.3), dpi=100)
    ax.errorbar(values, range(len(names)), xerr=[low, high], fmt="o", capsize=4)
    for y, (name, value) in enumerate(zip(names, values)):
        ax.annotate(f"{value:.1%} (n={models[name]['n']})", (value, y), xytext=(0, 7), textcoords="offset points",
                    ha="center", fontsize=8)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlim(0, 1)
    ax.set_ylim(len(names) - 0.5, -0.7)  # top to bottom, with room for the first label
    ax.set_xlabel("accuracy (95% interval)")
    ax.set_title("Evaluation")
    return _png(fig)
