"""`sphuatuo bench scale`: does the driver's memory stay flat as the question count grows?

For each question count N: N synthetic multiple-choice questions in the native JSONL format, then the
pipeline as a run drives it (`run_pipeline`: lease, manifest, Ray connection) over two stages, the real
questions stage and the teacher's first pass as `teacher_cot` makes it (its prompt, the vLLM back-end, the
tiny model, 1-token replies), judged by the rule judge (option letters) as the SP recipes judge multiple-choice
items. This module is that second stage (NAME, CONFIG, READS, run).
Each N runs in a process of its own, since a process's peak RSS only grows: every size gets a fresh driver,
against the cluster in RAY_ADDRESS if set, else a local one it starts. Each line gives rows/s and the driver's
peak RSS, each against the smallest size's. Target (issue 12): peak RSS at the largest size within 1.2x of
the smallest's.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from sphuatuo.engines import Request
from sphuatuo.passes.verdict import generate_and_judge
from sphuatuo.recipe import Recipe
from sphuatuo.stages import StageContext

NAME = "generation"
CONFIG = ("models.teacher", "models.judge", "stages.teacher_cot")
READS = ("questions",)
RSS_TARGET = 1.2
LETTERS = "ABCD"


@dataclass(frozen=True)
class ScaleLine:
    questions: int
    rows: int  # rows the judged pass wrote, counted in its folder
    seconds: float  # the two stages, engine start included (Ray's start or connection is not)
    peak_rss_mib: float

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds


def synthetic_questions(count: int) -> Iterator[dict]:
    """`count` distinct native question records (the number in the stem keeps them distinct: the questions
    stage rejects a repeated stem and options as a duplicate)."""
    for i in range(count):
        yield {"id": f"synthetic-{i:06d}",
               "question": f"Synthetic question {i}: which option is the one marked correct?",
               "options": {letter: f"Option {letter} of question {i}" for letter in LETTERS},
               "answer": [LETTERS[i % len(LETTERS)]], "explanation": "Synthetic.", "source": "synthetic",
               "metadata": {}}


def scale_recipe(questions_path: str, run_root: str, batch_size: int) -> Recipe:
    engine = {"backend": "vllm", "model": "builtin:tiny", "max_model_len": 1024, "batch_size": batch_size}
    return Recipe.model_validate({
        "name": "bench-scale", "run_root": run_root,
        "data": {"train": [{"path": questions_path, "format": "sphuatuo"}]},
        "models": {"teacher": engine, "student": engine, "judge": {"kind": "rule"}},
        "stages": {"teacher_cot": {"sampling": {"temperature": 0.0, "max_tokens": 1}}},
    })


def run(ctx: StageContext) -> None:
    """The teacher's first pass over every training question, generated and judged."""
    from sphuatuo.stages.self_play.teacher_cot import first_pass_rows, teacher_messages

    stage, teacher = ctx.recipe.stages.teacher_cot, ctx.recipe.models.teacher
    rows = first_pass_rows(ctx.run, stage, teacher)
    ctx.record.rows_in = rows.count
    ctx.record.rows_out = generate_and_judge(ctx, rows, NAME, judge=ctx.recipe.models.judge, engine=teacher,
                                             request=Request.from_config(stage.sampling),
                                             messages=partial(teacher_messages, stage)).rows


def measure(folder: Path, batch_size: int) -> ScaleLine:
    """One size in this process, over the questions in `folder`: the two stages, this process's peak RSS."""
    from sphuatuo.pipeline import run_pipeline
    from sphuatuo.stages import questions
    from sphuatuo.store.manifest import read_manifest

    recipe = scale_recipe(str(folder / "questions.jsonl"), str(folder / "run"), batch_size)
    run_root = run_pipeline(recipe, (questions, sys.modules[__name__]))
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux; read before the count below
    stages = read_manifest(run_root).stages
    return ScaleLine(stages[questions.NAME].rows_out, run_root.count_rows(NAME),
                     stages[questions.NAME].seconds + stages[NAME].seconds, peak_kib / 1024)


def bench_scale(sizes: list[int], batch_size: int) -> list[ScaleLine]:
    """Each size in a fresh driver process (this module run as a script), smallest first. The questions file
    is written here, so the driver holds only what the stages make it hold."""
    lines = []
    for count in sorted(sizes):
        with tempfile.TemporaryDirectory(prefix="sphuatuo-bench-scale-") as name:
            folder = Path(name)
            with (folder / "questions.jsonl").open("w") as out:
                out.writelines(json.dumps(q) + "\n" for q in synthetic_questions(count))
            # The child's own output (vLLM, Ray) goes to stderr: stdout stays the table's.
            subprocess.run([sys.executable, "-m", __spec__.name, name, str(batch_size)], check=True, stdout=sys.stderr)
            lines.append(ScaleLine(**json.loads((folder / "line.json").read_text())))
        print(f"bench scale: {lines[-1]}", file=sys.stderr)  # each size as it ends: a long run cut short keeps it
    return lines


def format_scale_bench(lines: list[ScaleLine], batch_size: int) -> str:
    base = lines[0]
    out = [f"every size: questions stage + one teacher pass, generated (builtin:tiny on vLLM, 1-token replies) and "
           f"judged (rule), "
           f"batch size {batch_size}, a fresh driver process; seconds: both stages, engine start included",
           f"{'questions':>9} {'rows':>7} {'seconds':>8} {'rows/s':>8} {'peak RSS MiB':>12} {'RSS vs base':>11} "
           f"{'rows/s vs base':>14}"]
    for line in lines:
        out.append(f"{line.questions:>9} {line.rows:>7} {line.seconds:>8.1f} {line.rows_per_s:>8.1f} "
                   f"{line.peak_rss_mib:>12.0f} {line.peak_rss_mib / base.peak_rss_mib:>11.2f} "
                   f"{line.rows_per_s / base.rows_per_s:>14.2f}")
    ratio = lines[-1].peak_rss_mib / base.peak_rss_mib
    out.append(f"target: driver peak RSS at {lines[-1].questions} questions within {RSS_TARGET}x of that at "
               f"{base.questions}: {ratio:.2f}x, {'met' if ratio <= RSS_TARGET else 'missed'}")
    return "\n".join(out)


if __name__ == "__main__":
    folder = Path(sys.argv[1])
    (folder / "line.json").write_text(json.dumps(asdict(measure(folder, int(sys.argv[2])))))
