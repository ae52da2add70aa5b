"""Examples longer than the training budget: counted, shown as a histogram, and dropped or cut from the left.

A teacher writes chains of thought of up to 10k tokens; a trainer that cuts them at `max_length` from the
end keeps the question and the start of the chain and drops `</think><answer>…`: the student would learn
chains that never conclude. So an overlong example is dropped (`overlong: drop`, the default) or, with
`truncate_left`, its completion loses tokens from the start of the chain, keeping the prompt and the answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

Row = dict[str, Any]

# Histogram bins as shares of max_length: up to a quarter, a half, three quarters, all of it, and beyond.
BIN_SHARES = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
TEMPLATE_SLACK = 8  # tokens the chat template adds around a completion (end-of-turn markers)


def _length(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = False) -> int:
    encoded = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return len(encoded["input_ids"] if isinstance(encoded, Mapping) else encoded)  # transformers 5: a BatchEncoding


def example_length(tokenizer: Any, row: Row, completions: Sequence[str]) -> int:
    """Tokens of the prompt and its longest completion, as the trainer's chat template renders them."""
    return max(_length(tokenizer, [*row["prompt"], *row[column]]) for column in completions)


def histogram(lengths: Sequence[int], max_length: int) -> dict[str, int]:
    edges = [round(share * max_length) for share in BIN_SHARES]
    labels = [f"<= {edge}" for edge in edges] + [f"> {edges[-1]}"]
    counts = dict.fromkeys(labels, 0)
    for length in lengths:
        index = next((i for i, edge in enumerate(edges) if length <= edge), len(edges))
        counts[labels[index]] += 1
    return counts


def _truncate_left(tokenizer: Any, row: Row, completions: Sequence[str], max_length: int) -> Row | None:
    """The row with each completion's text cut from its start to fit; None when even the prompt does not fit."""
    prompt_tokens = _length(tokenizer, row["prompt"], add_generation_prompt=True)
    budget = max_length - prompt_tokens - TEMPLATE_SLACK
    if budget <= 0:
        return None
    out = dict(row)
    for column in completions:
        (message,) = row[column]
        ids = tokenizer.encode(message["content"], add_special_tokens=False)
        out[column] = [{**message, "content": tokenizer.decode(ids[-budget:])}]
    return out


def fit_to_length(tokenizer: Any, rows: list[Row], completions: Sequence[str], max_length: int,
                  overlong: str) -> tuple[list[Row], dict[str, Any]]:
    """The rows to train on, and what happened to the long ones (counts and the length histogram)."""
    lengths = [example_length(tokenizer, row, completions) for row in rows]
    kept, dropped, truncated = [], 0, 0
    for row, length in zip(rows, lengths):
        if length <= max_length:
            kept.append(row)
            continue
        cut = _truncate_left(tokenizer, row, completions, max_length) if overlong == "truncate_left" else None
        if cut is None:
            dropped += 1
        else:
            kept.append(cut)
            truncated += 1
    report = {"max_length": max_length, "overlong_policy": overlong, "examples": len(rows),
              "overlong": sum(length > max_length for length in lengths), "dropped": dropped,
              "truncated": truncated, "longest": max(lengths, default=0), "histogram": histogram(lengths, max_length)}
    return kept, report
