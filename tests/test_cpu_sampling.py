"""Top-p on CPU among the likeliest candidates drops the tokens vLLM's sort-based rule drops (up to float rounding at
a nucleus's edge), and vLLM loads it as a plugin."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import REPO
from sphuatuo.commands.bench_sampling import differing_rows, language_model_logits, vllm_top_p
from sphuatuo.engines.cpu_sampling import CANDIDATES, top_p_among_candidates


@pytest.mark.parametrize("vocabulary", [49_152, 151_936], ids=["smollm2", "qwen"])
@pytest.mark.parametrize("top_p", [0.5, 0.9, 0.95])
def test_the_nucleus_among_candidates_is_vllms_nucleus(vocabulary: int, top_p: float) -> None:
    logits = language_model_logits(16, vocabulary, temperature=0.7, seed=int(top_p * 100))
    # Two rows whose nucleus reaches past the candidates (flat distributions) take vLLM's path, and a row at
    # top_p 1 keeps every token; the rest are found among the candidates.
    flat = torch.Generator().manual_seed(0)
    logits[3] = torch.randn(vocabulary, generator=flat) * 0.1
    logits[7] = torch.randn(vocabulary, generator=flat) * 0.01
    p = torch.full((16,), top_p)
    p[11] = 1.0
    ours = top_p_among_candidates(logits.clone(), None, p, vllm_top_p)
    theirs = vllm_top_p(logits.clone(), None, p)
    rows, gap = differing_rows(ours, theirs, logits, p)
    assert rows <= 1 and gap < 1e-4  # a row whose nucleus's mass is p within float rounding may differ at its edge
    both = ~ours.isinf() & ~theirs.isinf()
    assert torch.equal(ours[both], theirs[both])
    nucleus = (~ours.isinf()).sum(dim=-1)
    assert nucleus[[0, 1, 2]].max() < CANDIDATES  # found among the candidates
    assert nucleus[[3, 7]].min() > CANDIDATES and nucleus[11] == vocabulary


def test_top_k_and_no_filter_are_vllms_own() -> None:
    logits = language_model_logits(4, 1_000, temperature=1.0, seed=0)
    k = torch.tensor([5, 10, 50, 1000])
    for k_, p in ((k, None), (k, torch.full((4,), 0.9)), (None, None)):
        assert torch.equal(top_p_among_candidates(logits.clone(), k_, p, vllm_top_p), vllm_top_p(logits.clone(), k_, p))


def test_vllm_loads_it_as_a_general_plugin() -> None:
    from importlib.metadata import entry_points

    from vllm.plugins import load_general_plugins
    from vllm.v1.sample.ops import topk_topp_sampler

    (plugin,) = [entry for entry in entry_points(group="vllm.general_plugins") if entry.name == "sphuatuo_cpu_top_p"]
    assert plugin.value == "sphuatuo.engines.cpu_sampling:register"
    load_general_plugins()
    assert getattr(topk_topp_sampler.apply_top_k_top_p, "among_candidates", False)


def test_bench_sampling_prints_both_filters_and_their_ratio_per_vocabulary_and_batch() -> None:
    result = subprocess.run([sys.executable, "-m", "sphuatuo.cli", "bench", "sampling", "--rows", "2", "8",
                             "--vocabulary", "5000", "--steps", "2", "--threads", "1"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    header, columns, *rows, legend = result.stdout.splitlines()
    assert header == "top_p 0.9, 1 torch threads; ms per decode step (median)"
    assert columns.split() == ["model", "vocabulary", "rows", "vLLM", "sort", "candidates", "speed-up", "rows",
                               "differing", "largest", "gap"]
    assert [row.split()[:3] for row in rows] == [["V=5000", "5000", "2"], ["V=5000", "5000", "8"]]
    for row in rows:
        vllm_ms, candidates_ms, speedup, differing, gap = row.split()[3:]
        assert float(vllm_ms) > 0 and float(candidates_ms) > 0 and speedup.endswith("x") and float(speedup[:-1]) > 0
        assert int(differing) <= 1 and float(gap) < 1e-4
    assert legend.startswith("speed-up:")
