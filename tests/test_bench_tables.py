"""The benchmark tables' arithmetic, without running a benchmark (tests/test_bench.py runs them)."""

from __future__ import annotations

import dataclasses


def test_bench_scale_table_gives_each_size_against_the_smallest_and_the_memory_target() -> None:
    from sphuatuo.commands.bench_scale import ScaleLine, format_scale_bench

    lines = [ScaleLine(5000, 5000, 50.0, 700.0), ScaleLine(50000, 50000, 250.0, 945.0)]
    table = format_scale_bench(lines, 256).splitlines()
    assert [row.split() for row in table[2:4]] == [
        ["5000", "5000", "50.0", "100.0", "700", "1.00", "1.00"],
        ["50000", "50000", "250.0", "200.0", "945", "1.35", "2.00"]]
    assert table[4] == "target: driver peak RSS at 50000 questions within 1.2x of that at 5000: 1.35x, missed"
    flat = format_scale_bench([lines[0], ScaleLine(50000, 50000, 250.0, 770.0)], 256).splitlines()
    assert flat[-1].endswith(": 1.10x, met")


def test_bench_generate_table_sets_each_line_against_the_first_of_its_kind_and_workload() -> None:
    from sphuatuo.commands.bench_generate import BenchLine, format_bench, passes_line

    lines = []
    for workload, scale in (("fixed", 1), ("long-tail", 2)):
        lines += [BenchLine("bare vLLM (own process, incl. import + engine start)", "whole", workload, 8, 10.0,
                            200 * scale),
                  BenchLine("bare vLLM (own process, engine ready)", "steady", workload, 8, 2.0, 200 * scale),
                  BenchLine("vllm, engine per pass (incl. actor + engine start)", "whole", workload, 8, 20.0,
                            200 * scale),
                  BenchLine("vllm, engine per pass (less 15 s start-up)", "steady", workload, 8, 4.0, 200 * scale),
                  # Three passes of 8 rows (generate, a one-token judge, generate), as `_ray_pass` reports them.
                  passes_line("engines per pass", workload, [(8, 20.0, 100 * scale), (8, 15.0, 8 * scale),
                                                             (8, 25.0, 100 * scale)]),
                  passes_line("one engine kept up", workload, [(8, 20.0, 100 * scale), (8, 2.0, 8 * scale),
                                                               (8, 8.0, 100 * scale)])]
    table = format_bench(lines, "every engine: dtype float32").splitlines()
    assert table[0] == "every engine: dtype float32" and table[1].startswith("engine ")
    rows = [[line[:58].strip(), *line[58:].split()] for line in table[2:-1]]
    assert [row[0] for row in rows[4:6]] == ["3 passes (generate, judge, generate), engines per pass",
                                             "3 passes (generate, judge, generate), one engine kept up"]
    assert [row[1:4] for row in rows[4:6]] == [["fixed", "24", "60.0"], ["fixed", "24", "30.0"]]
    assert [row[-2] for row in rows[4:6]] == ["3.5", "6.9"]  # 208 output tokens over each line's seconds
    # Bare whole pass, bare steady state, engines per pass: each kind's baseline, per workload (long-tail's
    # tokens/s are twice fixed's, and its ratios the same).
    ratios = [row[-1] for row in rows]
    assert ratios == ["1.00", "1.00", "0.50", "0.50", "1.00", "2.00"] * 2
    assert [row[-2] for row in rows[6:8]] == ["40.0", "200.0"]
    assert table[-1].startswith("vs base: against the first line of the same kind and workload")


def test_bench_generate_sets_each_line_against_the_bare_passes_on_either_side_and_gives_the_median() -> None:
    from sphuatuo.commands.bench_generate import BenchLine, format_bench

    # Three rounds and the bare pass after the last, on a machine whose speed drifts: bare vLLM at 200, 250, 160 and
    # then 180 tokens/s; the kept engine between them at 190, 200 and 152. Against the bare pass before it alone, the
    # second kept line would read 0.80; against the mean of the bare passes on either side (205), 0.98.
    lines = []
    for number, (bare, kept) in enumerate([(200, 190), (250, 200), (160, 152)], start=1):
        lines += [BenchLine("bare vLLM (own process, engine ready)", "steady", "fixed", 8, 1.0, bare, number),
                  BenchLine("vllm, engine kept up (engine already up)", "steady", "fixed", 8, 1.0, kept, number)]
    lines.append(BenchLine("bare vLLM again (own process, engine ready)", "steady", "fixed", 8, 1.0,
                           180, 4, closing=True))
    table = format_bench(lines).splitlines()
    assert table[0].split()[:3] == ["engine", "workload", "round"]
    rows = [[line[:58].strip(), *line[58:].split()] for line in table[1:8]]
    assert [row[2] for row in rows] == ["1", "1", "2", "2", "3", "3", "-"]
    assert [row[-1] for row in rows if row[0].startswith("vllm")] == ["0.84", "0.98", "0.89"]
    # A bare line's own ratio is its drift against the next bare pass; the last bare pass is a baseline only.
    assert [row[-1] for row in rows if row[0].startswith("bare vLLM")] == ["0.89", "1.22", "0.94", "-"]
    assert table[8].startswith("vs base:") and "the one after the last round" in table[8]
    assert table[9:] == ["median vs base over 3 rounds (lowest - highest):",
                         "  bare vLLM, steady, fixed: 0.94 (0.89 - 1.22)",
                         "  vllm, engine kept up, steady, fixed: 0.89 (0.84 - 0.98)"]
    # One round and the bare pass after it: no round column, no summary, the kept line against the mean of the two.
    single = format_bench([*lines[:2], dataclasses.replace(lines[-1], round=2)]).splitlines()
    assert "round" not in single[0] and not any(line.startswith("median") for line in single)
    assert [line[58:].split()[-1] for line in single[1:4]] == ["1.05", "1.00", "-"]


def test_bench_train_summary_sets_each_line_against_the_one_that_differs_in_one_thing() -> None:
    from sphuatuo.commands.bench_train import TrainBenchLine, format_train_bench

    def line(launcher: str, workers: int, steady: float, deepspeed: bool = True) -> TrainBenchLine:
        return TrainBenchLine(launcher, f"{launcher}, {workers}", workers, deepspeed, 6, 2, 600, 10.0, 20.0, steady)

    table = format_train_bench([line("bare", 1, 100.0, deepspeed=False), line("ray", 1, 96.0, deepspeed=False),
                                line("torchrun", 1, 80.0), line("ray", 1, 72.0),
                                line("torchrun", 2, 40.0), line("ray", 2, 30.0)]).splitlines()
    assert [row.split()[-1] for row in table[1:7]] == ["1.00", "0.96", "0.80", "0.72", "0.40", "0.30"]  # vs bare
    assert table[7:] == ["Ray cost alone (Ray Train, 1 worker, no DeepSpeed, vs bare TRL, steady): 0.96",
                         "Ray Train + DeepSpeed, 1 worker vs bare TRL (steady): 0.72",
                         "DeepSpeed cost (torchrun 1 worker vs bare, steady): 0.80",
                         "Ray cost at 1 worker (Ray Train vs torchrun, steady): 0.90",
                         "Ray cost at 2 workers (Ray Train vs torchrun, steady): 0.75",
                         "distribution without Ray (2 torchrun workers vs 1, per worker, steady): 0.50"]


def test_bench_train_summary_without_deepspeed_names_no_deepspeed_cost() -> None:
    from sphuatuo.commands.bench_train import TrainBenchLine, format_train_bench

    def line(launcher: str, workers: int, steady: float) -> TrainBenchLine:
        return TrainBenchLine(launcher, f"{launcher}, {workers}", workers, False, 6, 2, 600, 10.0, 20.0, steady)

    table = format_train_bench([line("bare", 1, 100.0), line("torchrun", 1, 98.0), line("ray", 1, 97.0),
                                line("torchrun", 2, 70.0), line("ray", 2, 63.0)]).splitlines()
    assert table[6:] == ["Ray cost alone (Ray Train, 1 worker, no DeepSpeed, vs bare TRL, steady): 0.97",
                         "Ray cost at 1 worker (Ray Train vs torchrun, steady): 0.99",
                         "Ray cost at 2 workers (Ray Train vs torchrun, steady): 0.90",
                         "distribution without Ray (2 torchrun workers vs 1, per worker, steady): 0.71"]
