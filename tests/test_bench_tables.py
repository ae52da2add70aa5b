"""The benchmark tables' arithmetic, without running a benchmark (tests/test_bench.py runs them)."""

from __future__ import annotations


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
