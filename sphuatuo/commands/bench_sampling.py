"""`sphuatuo bench sampling`: top-p on CPU, one decode step's filter, vLLM's sort against the candidates' top-k.

For each vocabulary (SmolLM2's 49,152 tokens, Qwen's 151,936) and batch size: rows shaped like a language model's
next-token distribution (Zipf-like logits over a shuffled vocabulary, at temperature 0.7), top_p 0.9, through vLLM's
own filter (`apply_top_k_top_p_pytorch`, a sort of every row) and through `top_p_among_candidates`; the median
milliseconds of each over the steps, their ratio, and the rows where they kept different tokens: the token at the
nucleus's edge, where the nucleus's mass is within float rounding of top_p (vLLM sums the whole vocabulary in
float32, the candidates' filter the candidates and the rest apart), with the largest such distance.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sphuatuo.engines.cpu_sampling import top_p_among_candidates

VOCABULARIES = {"SmolLM2": 49_152, "Qwen2.5": 151_936}


@dataclass(frozen=True)
class SamplingLine:
    model: str
    vocabulary: int
    rows: int
    vllm_ms: float
    candidates_ms: float
    differing_rows: int
    largest_gap: float  # of a differing row: |its smaller nucleus's mass - top_p|

    @property
    def speedup(self) -> float:
        return self.vllm_ms / self.candidates_ms


def language_model_logits(rows: int, vocabulary: int, temperature: float = 0.7, seed: int = 0) -> torch.Tensor:
    """Rows of Zipf-like logits (a few likely tokens, a long tail), each over its own shuffle of the vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    zipf = -1.1 * torch.arange(1, vocabulary + 1, dtype=torch.float32).log()
    return torch.stack([zipf[torch.randperm(vocabulary, generator=generator)]
                        + 0.5 * torch.randn(vocabulary, generator=generator) for _ in range(rows)]) / temperature


def vllm_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None) -> torch.Tensor:
    """vLLM's own top-k/top-p filter on CPU: a sort of every row."""
    from vllm.v1.sample.ops.topk_topp_sampler import apply_top_k_top_p_pytorch

    return apply_top_k_top_p_pytorch(logits, k, p, allow_cpu_sync=True)


def differing_rows(ours: torch.Tensor, theirs: torch.Tensor, logits: torch.Tensor, p: torch.Tensor,
                   ) -> tuple[int, float]:
    """How many rows two filters' kept tokens differ in, and the largest distance of such a row's smaller nucleus's
    probability mass from its top_p (0 when none differ)."""
    rows = (ours.isinf() != theirs.isinf()).any(dim=-1).nonzero().flatten().tolist()
    gaps = []
    for row in rows:
        kept = int(min((~ours[row].isinf()).sum(), (~theirs[row].isinf()).sum()))
        mass = logits[row].softmax(dim=-1, dtype=torch.float64).sort(descending=True).values[:kept].sum()
        gaps.append(abs(float(mass) - float(p[row])))
    return len(rows), max(gaps, default=0.0)


def _median_ms(step: Callable[[torch.Tensor], torch.Tensor], logits: torch.Tensor, steps: int,
               ) -> tuple[float, torch.Tensor]:
    times, out = [], logits
    for _ in range(steps):
        batch = logits.clone()  # both filters may write into their input
        started = time.perf_counter()
        out = step(batch)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), out


def bench_sampling(batch_sizes: list[int], vocabularies: dict[str, int], top_p: float = 0.9,
                   steps: int = 10) -> list[SamplingLine]:
    """One line per vocabulary and batch size."""
    lines = []
    for model, vocabulary in vocabularies.items():
        for rows in batch_sizes:
            logits, p = language_model_logits(rows, vocabulary), torch.full((rows,), top_p)
            vllm_ms, theirs = _median_ms(lambda batch: vllm_top_p(batch, None, p), logits, steps)
            ours_ms, ours = _median_ms(lambda batch: top_p_among_candidates(batch, None, p, vllm_top_p), logits,
                                       steps)
            lines.append(SamplingLine(model, vocabulary, rows, vllm_ms, ours_ms,
                                      *differing_rows(ours, theirs, logits, p)))
    return lines


def format_sampling(lines: list[SamplingLine], top_p: float, threads: int) -> str:
    out = [f"top_p {top_p}, {threads} torch threads; ms per decode step (median)",
           f"{'model':<8} {'vocabulary':>10} {'rows':>5} {'vLLM sort':>10} {'candidates':>10} {'speed-up':>8} "
           f"{'rows differing':>14} {'largest gap':>11}"]
    out += [f"{line.model:<8} {line.vocabulary:>10} {line.rows:>5} {line.vllm_ms:>10.1f} {line.candidates_ms:>10.1f} "
            f"{line.speedup:>7.1f}x {line.differing_rows:>14} {line.largest_gap:>11.1e}" for line in lines]
    out.append("speed-up: the time of vLLM's sort (the baseline) over the candidates'; rows differing: rows whose kept "
               "tokens differ; largest gap: of those rows, the largest |nucleus mass - top_p| (float rounding at the "
               "nucleus's edge: about 1e-5)")
    return "\n".join(out)
