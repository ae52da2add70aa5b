"""A stage's fingerprint: everything that makes its output what it is (after Nextflow's `-resume` task hashes
and DVC's stage locks).

It covers the recipe fields the stage reads, the identities of the models and the versions of the prompts
those fields name, its inputs' fingerprints and the versions of the packages that produce its rows. A
stage whose fingerprint is unchanged is reused; a changed one, and so everything downstream, runs again.
The components are kept beside the digest, so a run can say field by field what changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

Components = dict[str, Any]


@dataclass(frozen=True)
class Fingerprint:
    digest: str
    components: Components

    @classmethod
    def of(cls, components: Mapping[str, Any]) -> Fingerprint:
        canonical = json.dumps(components, sort_keys=True, ensure_ascii=False, default=str)
        return cls(hashlib.sha256(canonical.encode("utf-8")).hexdigest(), dict(sorted(components.items())))

    @property
    def short(self) -> str:
        """What names a stage's checkpoints and superseded outputs."""
        return self.digest[:12]


def flatten(value: Any, prefix: str) -> Components:
    """`{"a": {"b": 1}}` under `x` -> `{"x.a.b": 1}`; a list of mappings by index (`x.0.b`), other lists as
    values."""
    if isinstance(value, list) and value and all(isinstance(item, Mapping) for item in value):
        value = {str(index): item for index, item in enumerate(value)}
    if isinstance(value, Mapping):
        flat: Components = {}
        for key, inner in value.items():
            flat.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Each component that differs, as `field: old -> new` (`(unset)` where one side lacks it)."""
    lines = []
    for key in sorted(set(old) | set(new)):
        before, after = old.get(key, "(unset)"), new.get(key, "(unset)")
        if before != after:
            lines.append(f"{key}: {_short(before)} -> {_short(after)}")
    return lines


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."
