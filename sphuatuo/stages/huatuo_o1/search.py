"""The control of the HuatuoGPT-o1 reasoning-path search (METHOD B.2), as pure functions over one item.

An item starts with the initial reasoning (attempt 0, depth 0). While its last Final Conclusion is not
verified, it takes a strategy step: depth 1, 2, … up to `max_depth`, each continuing the chain under a
strategy drawn from the recipe's list (never Backtracking at depth 1, the first retry). An attempt that
reaches `max_depth` unverified starts over from the initial reasoning, up to `max_attempts` attempts,
as the released code does. Then the item is discarded, or, only if the recipe asks, takes one last
step with the ground truth revealed, which is flagged and still verified. An unparsable reply is a
failed step that leaves the chain as it was (with the recipe's `plain_text_fallback`, the stage reads it as
plain text instead); while an item has no chain at all, its next step asks for the initial reasoning
again.

The stage runs these steps in rounds, one Ray Data pass per round over the items still searching; here
is only the bookkeeping, so it can be tested on known verdicts without an engine. Strategy choice is
seeded by (recipe seed, item id, attempt, depth): a resumed run makes the same choices.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from sphuatuo.parsing.o1 import Step, extend_chain

INIT, LABEL = "init", "label"
Status = Literal["searching", "solved", "failed"]


@dataclass(frozen=True)
class SearchPlan:
    max_depth: int
    max_attempts: int
    reveal_label: bool
    strategies: tuple[str, ...]
    seed: int = 0


@dataclass(frozen=True)
class SearchState:
    """Where one item is: the step it takes next (`step`, at `attempt`/`depth`), its chain, its trace."""

    id: str
    attempt: int = 0
    depth: int = 0
    step: str = INIT
    chain: tuple[Step, ...] = ()
    initial_chain: tuple[Step, ...] = ()
    trace: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    status: Status = "searching"
    label_revealed: bool = False
    reason: str | None = None

    @property
    def key(self) -> str:
        """Unique per step of the item: the generation and verification passes resume by it."""
        return f"{self.id}:{LABEL}" if self.step == LABEL else f"{self.id}:a{self.attempt}:d{self.depth}"

    def columns(self) -> dict[str, Any]:
        """The state as row columns (chains and trace as JSON): an item's row carries it from round to round."""
        return {"key": self.key, "attempt": self.attempt, "depth": self.depth, "step": self.step,
                "chain": json.dumps(list(self.chain), ensure_ascii=False),
                "initial_chain": json.dumps(list(self.initial_chain), ensure_ascii=False),
                "trace": json.dumps(list(self.trace), ensure_ascii=False), "status": self.status,
                "label_revealed": self.label_revealed, "reason": self.reason}

    @classmethod
    def of_row(cls, row: dict[str, Any]) -> SearchState:
        return cls(id=row["id"], attempt=row["attempt"], depth=row["depth"], step=row["step"],
                   chain=tuple(json.loads(row["chain"])), initial_chain=tuple(json.loads(row["initial_chain"])),
                   trace=tuple(json.loads(row["trace"])), status=row["status"], label_revealed=row["label_revealed"],
                   reason=row["reason"])

    @property
    def solved_at(self) -> str | None:
        """The depth of the verified step ("0" = the initial reasoning), or "label"."""
        if self.status != "solved":
            return None
        return LABEL if self.label_revealed else str(self.trace[-1]["depth"])


def choose_strategy(plan: SearchPlan, item_id: str, attempt: int, depth: int) -> str:
    allowed = [s for s in plan.strategies if depth > 1 or s != "backtracking"]
    return random.Random(f"{plan.seed}:{item_id}:{attempt}:{depth}").choice(sorted(allowed))


def advance(plan: SearchPlan, state: SearchState, steps: list[Step] | None, verdict: bool | None,
            parse_error: str | None = None) -> SearchState:
    """The state after `state.step` was answered with `steps` (None: unparsable) and verified as `verdict`."""
    chain = state.chain if steps is None else tuple(extend_chain(list(state.chain), steps))
    trace = state.trace + ({"attempt": state.attempt, "depth": state.depth, "step": state.step,
                            "verdict": verdict, "parse_error": parse_error},)
    initial = chain if (state.attempt, state.depth) == (0, 0) and state.step != LABEL else state.initial_chain
    done = replace(state, chain=chain, initial_chain=initial, trace=trace)
    if verdict is True:
        return replace(done, status="solved")
    if state.step == LABEL:
        return replace(done, status="failed", reason="not verified even with the label revealed")
    attempt, depth = state.attempt, state.depth + 1
    if depth > plan.max_depth:
        attempt, depth, chain = attempt + 1, 1, initial
    if attempt >= plan.max_attempts:
        if plan.reveal_label:
            return replace(done, step=LABEL, label_revealed=True)
        return replace(done, status="failed",
                       reason=f"not verified in {plan.max_attempts} attempts of depth {plan.max_depth}")
    step = choose_strategy(plan, state.id, attempt, depth) if chain else INIT
    return replace(done, attempt=attempt, depth=depth, step=step, chain=chain)


def solved_counts(states: list[SearchState]) -> dict[str, int]:
    """How many items were solved at each depth ("0" = the initial reasoning, "label" = label revealed)."""
    counts: dict[str, int] = {}
    for state in states:
        if state.solved_at is not None:
            counts[state.solved_at] = counts.get(state.solved_at, 0) + 1
    return dict(sorted(counts.items()))
