"""The run report, its HTML page and the model cards, from a manifest and training logs written by hand
(the numbers a small real run records), without Ray or a trainer.

The page is loaded in a real headless Chromium (Debian's `chromium`), which must decode every inlined plot."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import REPO
from sphuatuo.commands.model_cards import hub_id
from sphuatuo.commands.report import write_report
from sphuatuo.local_models import SMOLLM2, TINY
from sphuatuo.recipe import load_recipe
from sphuatuo.store.manifest import Manifest, StageRecord, save_manifest
from sphuatuo.store.run_root import RunRoot

START = datetime(2025, 3, 4, 9, 0, tzinfo=timezone.utc)
WEIGHTS = b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(range(256)) * 64


def _record(rows_in: int, rows_out: int, begin_s: float, seconds: float, **fields: object) -> StageRecord:
    start = START + timedelta(seconds=begin_s)
    return StageRecord(status=fields.pop("status", "done"), rows_in=rows_in, rows_out=rows_out, seconds=seconds,
                       started_at=start.isoformat(timespec="seconds"),
                       finished_at=(start + timedelta(seconds=seconds)).isoformat(timespec="seconds"), **fields)


def _train_log(steps: int, *, dpo: bool = False, rl: bool = False) -> list[dict]:
    """TRL's log_history as the recorded trainer writes it: one entry per step, then the run's summary."""
    log = []
    for step in range(1, steps + 1):
        entry = {"epoch": round(step / steps * 3, 3), "step": step, "learning_rate": 1e-4 * (1 - step / steps),
                 "loss": round(2.1 * 0.9 ** step, 4), "grad_norm": round(4.0 / step ** 0.5, 3),
                 "tokens_per_second_per_worker": 410.0 + 7 * (step % 3)}
        if dpo:
            entry |= {"loss": round(0.693 - 0.03 * step, 4), "rewards/chosen": 0.02 * step,
                      "rewards/rejected": -0.03 * step, "rewards/margins": 0.05 * step,
                      "rewards/accuracies": min(1.0, 0.5 + 0.05 * step)}
        if rl:
            entry |= {"reward": round(0.1 + 0.07 * step, 3), "reward_std": 0.2, "kl": 0.001 * step,
                      "completions/mean_length": 180.0 + step}
        log.append(entry)
    return log + [{"step": steps, "train_runtime": 95.2, "train_loss": 1.2, "total_flos": 1.0e12}]


def _evaluation(n: int, correct: dict[str, int], sources: dict[str, int] | None = None) -> dict:
    from sphuatuo.stages.evaluate import wilson_interval

    models = {}
    for name, c in correct.items():
        by = {"source": {source: {"n": k, "accuracy": (c * k // n) / k, "ci95": wilson_interval(c * k // n, k)}
                         for source, k in (sources or {"sample_bank": n}).items()}}
        models[name] = {"n": n, "correct": c, "accuracy": c / n, "ci95": wilson_interval(c, n),
                        "first_match_accuracy": c / n, "unparsable": 1, "truncated": 0, "by": by}
    return {"models": models}


def _model(run: RunRoot, name: str) -> None:
    folder = Path(run.path, name, "model")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(WEIGHTS)


def _write_logs(run: RunRoot, logs: dict[str, list[dict]]) -> None:
    for name, log in logs.items():
        run.write_text(json.dumps(log), name, "train_log.json")
        _model(run, name)


def self_play_run(tmp_path: Path) -> RunRoot:
    """The demo's two-strategy ablation: sampled pairs trained a DPO model, self_correction found none."""
    recipe = load_recipe(REPO / "pipelines" / "demo.yaml", [f"run_root={tmp_path / 'run'}"])
    run = RunRoot(recipe.run_root)
    stages = {
        "questions": _record(64, 64, 0, 1.2, details={"train": 48, "test": 16}),
        "teacher_cot": _record(48, 41, 5, 310.5, output_tokens=18_300, input_tokens=22_000,
                               details={"samples": 55, "accepted_unhinted": 36, "accepted_hinted": 5,
                                        "engines": {"starts": [{"model": "builtin:smollm2-135m-instruct",
                                                                "folder": "teacher_cot/replies", "seconds": 21.4}],
                                                    "reuses": 3}}),
        "sft": _record(55, 41, 316, 181.0, details={"global_batch": 8, "workers": 2, "zero_stage": 2, "steps": 15,
                                                    "first_loss": 1.89, "last_loss": 0.43}),
        "student_answers": _record(48, 96, 495, 75.3, details={"correct": 58, "wrong": 38, "engines": {"starts": [
            {"model": "sft", "folder": "student_answers/replies", "seconds": 2.5, "kept_process": True}],
            "reuses": 0}}),
        "preference_pairs": _record(96, 12, 571, 60.0, details={"strategies": {
            "self_correction": {"wrong": 38, "corrected": 38, "verified": 0, "paired": 0},
            "sampled": {"wrong": 38, "corrected": None, "verified": 58, "paired": 12}}}),
        "dpo": _record(12, 12, 632, 140.0, details={"runs": {
            "dpo_self_correction": {"strategy": "self_correction", "status": "skipped", "pairs": 0,
                                    "reason": "zero training examples for dpo_self_correction; nothing to train"},
            "dpo_sampled": {"strategy": "sampled", "status": "done", "pairs": 12, "global_batch": 16, "workers": 2,
                            "steps": 8, "first_loss": 0.663, "last_loss": 0.453}}}),
        "evaluate": _record(16, 48, 773, 95.0, details=_evaluation(16, {"base": 5, "sft": 8, "dpo_sampled": 9})),
    }
    save_manifest(run, Manifest(recipe=recipe.model_dump(mode="json"), created_at=START.isoformat(),
                                versions={"python": "3.12.3", "sphuatuo": "0.1.0", "trl": "1.0.0"}, stages=stages))
    _write_logs(run, {"sft": _train_log(15), "dpo_sampled": _train_log(8, dpo=True)})
    return run


def o1_run(tmp_path: Path) -> RunRoot:
    """HuatuoGPT-o1 at paper scale (Qwen2.5-7B, the released eval file with its five benchmarks)."""
    recipe = load_recipe(REPO / "pipelines" / "huatuo_o1_7b.yaml", [f"run_root={tmp_path / 'o1'}"])
    run = RunRoot(recipe.run_root)
    sources = {"MedMCQA": 400, "MedQA": 300, "PubMedQA": 300}
    stages = {
        "questions": _record(2000, 2000, 0, 4.0, details={"train": 1000, "test": 1000}),
        "verifiable_problems": _record(1000, 640, 5, 900.0, rows_rejected=360,
                                       details={"search": 320, "rl": 320}),
        "reasoning_search": _record(320, 201, 906, 3600.0, rows_failed=119,
                                    details={"searched": 320, "solved": 205, "written": 201, "label_revealed": 0}),
        "sft": _record(201, 201, 4507, 1200.0, details={"global_batch": 128, "workers": 8, "zero_stage": 3,
                                                        "steps": 6, "first_loss": 1.31, "last_loss": 0.92,
                                                        "origins": {"search": 137, "project-written": 64}}),
        "rl": _record(320, 320, 5708, 5400.0, details={"algorithm": "grpo", "start_model": run.join("sft", "model"),
                                                       "first_reward": 0.17, "last_reward": 0.8, "reward_steps": 10,
                                                       "steps": 10}),
        "evaluate": _record(1000, 3000, 11_110, 800.0,
                            details=_evaluation(1000, {"base": 540, "sft": 580, "rl": 610}, sources)),
    }
    save_manifest(run, Manifest(recipe=recipe.model_dump(mode="json"), created_at=START.isoformat(),
                                versions={"python": "3.12.3"}, stages=stages))
    _write_logs(run, {"sft": _train_log(6), "rl": _train_log(10, rl=True)})
    return run


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.name != "README.md"}


@pytest.fixture(scope="module")
def sp_report(tmp_path_factory: pytest.TempPathFactory) -> tuple[RunRoot, dict[str, dict[str, str]]]:
    """The self-play run with its report written, and its model folders' file digests from before."""
    run = self_play_run(tmp_path_factory.mktemp("self_play"))
    before = {name: _digest(Path(run.path, name, "model")) for name in ("sft", "dpo_sampled")}
    write_report(run)
    return run, before


@pytest.fixture(scope="module")
def o1_report(tmp_path_factory: pytest.TempPathFactory) -> RunRoot:
    run = o1_run(tmp_path_factory.mktemp("o1"))
    write_report(run)
    return run


def test_report_counts_the_engines_each_stage_started(sp_report) -> None:
    run, _ = sp_report
    report = run.read_text("report.md")
    assert "| teacher_cot | builtin:smollm2-135m-instruct | 1 | 0 | 21.4 |" in report
    assert "| teacher_cot | (passes on an engine already up) | 3 | – | 0.0 |" in report
    assert "| student_answers | sft | 1 | 1 | 2.5 |" in report  # in the process the teacher's engine left
    assert "<h2>Engines</h2>" in run.read_text("report.html")


def test_model_cards_parse_as_hugging_face_cards_and_leave_the_weights_alone(sp_report) -> None:
    from huggingface_hub import ModelCard

    run, before = sp_report
    assert not Path(run.path, "dpo_self_correction").exists()  # skipped: no model, so no card
    for name in ("sft", "dpo_sampled"):
        folder = Path(run.path, name, "model")
        assert _digest(folder) == before[name]
        card = ModelCard.load(folder / "README.md")  # raises on a malformed model-index
        assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.license == "apache-2.0"
        assert card.data.datasets == ["builtin:sample_bank"] and "self-play" in card.data.tags
        (result,) = card.data.eval_results
        assert (result.metric_type, result.dataset_type, result.dataset_split) == ("accuracy", "held-out", "test")
        assert result.metric_value == {"sft": 0.5, "dpo_sampled": 0.5625}[name]
        assert "41 of 48 questions have an accepted answer" in card.text and "SFT on 41 examples" in card.text
        assert "The teacher does not see the gold answer" in card.text
    dpo = Path(run.path, "dpo_sampled", "model", "README.md").read_text()
    assert "Pair strategy `sampled`: 38 wrong answers, 58 verified, 12 pairs; DPO on 12 pairs." in dpo
    assert "| beta | 0.3 |" in dpo and "| loss | 0.6630 → 0.4530 |" in dpo and "- dpo" in dpo
    assert "| **dpo_sampled** (this model) | 16 | 56.2% |" in dpo


def test_o1_cards_carry_the_rl_rewards_and_one_result_per_benchmark(o1_report: RunRoot) -> None:
    from huggingface_hub import ModelCard

    run = o1_report
    card = ModelCard.load(Path(run.path, "rl", "model", "README.md"))
    assert card.data.base_model == "Qwen/Qwen2.5-7B-Instruct" and "grpo" in card.data.tags
    assert {(r.dataset_name, r.metric_value) for r in card.data.eval_results} == {
        ("eval_data.json", 0.61), ("MedMCQA", 0.61), ("MedQA", 0.61), ("PubMedQA", 0.61)}
    assert card.data.eval_results[0].dataset_type == "huatuo_o1_eval"
    assert "RL (grpo) on 320 problems: mean reward 0.170 at the first step, 0.800 at the last" in card.text
    assert "205 of 320 problems have a verified reasoning path" in card.text
    assert "SFT on 201 examples (137 search, 64 project-written)." in card.text
    assert "trained by RL from the run's SFT model, itself fine-tuned from `Qwen/Qwen2.5-7B-Instruct`" in card.text
    assert "PPO is no longer in TRL" in card.text
    assert Path(run.path, "rl_reward.png").is_file() and "![rl reward](rl_reward.png)" in run.read_text("report.md")
    # Beside the curve, in both reports, whether the reward rose, and every step's value.
    trend = "The mean reward rose: 0.310 over the first 5 steps, 0.660 over the last 5 steps. Per step: 0.170, 0.240"
    assert f"rl: {trend}" in run.read_text("report.md") and trend in run.read_text("report.html")


def test_the_reward_sentence_says_plainly_when_rl_rewards_did_not_rise() -> None:
    from sphuatuo.commands.report_tables import reward_trend

    def log(*rewards: float) -> list[dict]:
        return [{"step": step, "reward": reward} for step, reward in enumerate(rewards, 1)] + [{"train_runtime": 1}]

    assert reward_trend(log(0.0, 0.0, 0.0)).startswith("The mean reward was 0 at every step")
    assert reward_trend(log(0.3, 0.1, 0.2, 0.1)) == ("The mean reward did not rise: 0.200 over the first 2 steps, "
                                                     "0.150 over the last 2 steps (it fell). Per step: 0.300, 0.100, "
                                                     "0.200, 0.100.")
    assert reward_trend(log(0.1, 0.4, 0.1)).startswith("The mean reward did not rise: 0.100 over the first step, "
                                                       "0.100 over the last step. Per step")
    assert reward_trend(log(0.1)) == "One step: no trend to tell. Per step: 0.100."
    assert reward_trend([{"step": 1, "loss": 1.0}]) == ""


def test_sphuatuo_report_refreshes_the_cards(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A card follows the manifest: after a re-evaluation, `sphuatuo report RUN_ROOT` writes it anew."""
    from sphuatuo.cli import main
    from sphuatuo.commands.model_cards import write_model_cards
    from sphuatuo.store.manifest import read_manifest

    run = o1_run(tmp_path)
    card = Path(run.path, "sft", "model", "README.md")
    manifest = read_manifest(run)
    write_model_cards(run, manifest)
    assert "model-index" in card.read_text()
    manifest.stages["evaluate"].details["models"].pop("sft")
    save_manifest(run, manifest)
    assert main(["report", run.path]) == 0 and f"report: {run.path}/report.md" in capsys.readouterr().out
    assert "model-index" not in card.read_text() and "Not evaluated in this run." in card.read_text()


@pytest.mark.parametrize(("model", "hub"), [(SMOLLM2, "HuggingFaceTB/SmolLM2-135M-Instruct"), (TINY, None),
                                            ("Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-7B-Instruct"),
                                            ("/mnt/models/qwen7b", None), ("s3://bucket/model", None)])
def test_a_card_names_a_base_model_only_by_its_hub_id(model: str, hub: str | None) -> None:
    assert hub_id(model) == hub


def _images(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]*)"', html)


def test_report_html_is_one_self_contained_page(sp_report, o1_report: RunRoot) -> None:
    pages = {}
    for run in (sp_report[0], o1_report):
        html = pages[run.path] = run.read_text("report.html")
        # The timeline, the curves of each trained model, the DPO margins or the RL reward, the accuracy chart.
        assert len(_images(html)) == 5 and all(src.startswith("data:image/png;base64,") for src in _images(html))
        assert not re.search(r'(src|href)="(?!data:)', html) and "<script" not in html
        assert "<th>rows/s out</th>" in html and "<td class=\"l\">2025-03-04T09:00:05+00:00</td>" in html
    sp, o1 = pages.values()
    assert "No training log (zero training examples for dpo_self_correction; nothing to train)" in sp
    assert "<h3>DPO reward margins</h3>" in sp and "<h3>RL reward</h3>" in o1 and "<h3>By source</h3>" in o1


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Appended to a copy of the page: at `load` every <img> states whether it decoded (naturalWidth > 0).
CHECKER = ("<script>addEventListener('load', () => { for (const img of document.images) "
           "img.setAttribute('data-rendered', img.complete && img.naturalWidth > 0 ? "
           "img.naturalWidth + 'x' + img.naturalHeight : 'no'); "
           "document.body.setAttribute('data-checked', document.images.length); });</script>")


def _chromium(tmp_path: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                           "--disable-background-networking", "--disable-component-update", "--disable-sync",
                           f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000", *arguments],
                          capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH: apt-get install chromium (.ci/run does)")
def test_report_html_renders_every_plot_in_a_headless_browser(o1_report: RunRoot, tmp_path: Path) -> None:
    from PIL import Image

    page = Path(o1_report.path, "report.html")
    checked = tmp_path / "checked.html"
    checked.write_text(page.read_text().replace("</body>", CHECKER + "</body>"))
    dom = _chromium(tmp_path, "--dump-dom", checked.as_uri()).stdout
    rendered = re.findall(r'data-rendered="([^"]*)"', dom)
    assert f'data-checked="{len(_images(page.read_text()))}"' in dom and len(rendered) == 5
    assert all(re.fullmatch(r"[1-9]\d*x[1-9]\d*", size) for size in rendered), rendered

    # The page as it is (no script): a screenshot that is not blank.
    shot = tmp_path / "page.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri())
    colours = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, axes, bars and curves, not one background colour
