"""Read the HuatuoGPT-o1 generator's structured replies: JSON objects, reasoning chains, verdicts.

Pure functions over strings (stdlib only), like `sphuatuo.parsing.replies`. A reply that cannot be read gives
`None` plus a reason, never an exception: the stages keep the reason with the row and retry or count it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

FILTER_VERDICTS = ("Pass", "Too Simple", "Ambiguous Answer", "Not Reformulatable")
INNER_THINKING, FINAL_CONCLUSION, VERIFICATION = "Inner Thinking", "Final Conclusion", "Verification"

Step = dict[str, str]

_FENCE = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL | re.IGNORECASE)
_TRAILING_COMMA = re.compile(r",(\s*[}\]])")


@dataclass(frozen=True)
class Parsed:
    """A parsed value, or None with the reason."""

    value: Any
    error: str | None = None


def parse_json_object(text: str) -> Parsed:
    """The JSON object in a reply: inside a ```json fence if there is one, else from the first '{' to the
    last '}'. Recovers raw newlines and tabs inside strings and trailing commas, which models often write."""
    fenced = _FENCE.search(text or "")
    body = fenced.group(1) if fenced else (text or "")
    start, end = body.find("{"), body.rfind("}")
    if start < 0 or end <= start:
        return Parsed(None, "no JSON object in the reply")
    candidate = body[start : end + 1]
    error = "invalid JSON"
    for attempt in (candidate, _TRAILING_COMMA.sub(r"\1", candidate)):
        try:
            value = json.loads(attempt, strict=False)  # strict=False: control characters inside strings
        except json.JSONDecodeError as err:
            error = f"invalid JSON: {err.msg} at character {err.pos}"
            continue
        if not isinstance(value, dict):
            return Parsed(None, "the JSON is not an object")
        return Parsed(value)
    return Parsed(None, error)


def parse_problem(text: str) -> Parsed:
    """The rewrite step's reply: exactly the two keys, both non-empty strings -> (question, answer)."""
    parsed = parse_json_object(text)
    if parsed.error:
        return parsed
    obj = parsed.value
    keys = ("Open-ended Verifiable Question", "Ground-True Answer")
    if set(obj) != set(keys):
        return Parsed(None, f"expected exactly the keys {list(keys)}, got {sorted(obj)}")
    values = [obj[key] for key in keys]
    if not all(isinstance(v, str) and v.strip() for v in values):
        return Parsed(None, "question and answer must be non-empty strings")
    return Parsed((values[0].strip(), values[1].strip()))


def parse_filter_verdict(text: str) -> Parsed:
    """One of FILTER_VERDICTS: the label the reply starts with, else the only label it names."""
    stripped = re.sub(r"^[\s\"'*`#:\-]+", "", text or "").lower()
    for label in FILTER_VERDICTS:
        if stripped.startswith(label.lower()):
            return Parsed(label)
    named = [label for label in FILTER_VERDICTS if re.search(rf"\b{re.escape(label.lower())}\b", stripped)]
    if len(named) == 1:
        return Parsed(named[0])
    return Parsed(None, "no filter verdict in the reply" if not named else f"several verdicts named: {named}")


def parse_chain(text: str) -> Parsed:
    """The search reply's steps: {"CoT": [...]} whose last three actions are Inner Thinking, Final
    Conclusion, Verification (the released code's check); every step needs string content."""
    parsed = parse_json_object(text)
    if parsed.error:
        return parsed
    steps = parsed.value.get("CoT")
    if not isinstance(steps, list) or not steps:
        return Parsed(None, "'CoT' is missing or not a non-empty list")
    clean: list[Step] = []
    for index, step in enumerate(steps):
        if not isinstance(step, dict) or not isinstance(step.get("content"), str):
            return Parsed(None, f"step {index} has no string 'content'")
        action = step.get("action")
        if action not in (INNER_THINKING, FINAL_CONCLUSION, VERIFICATION):
            return Parsed(None, f"step {index} has an unknown action {action!r}")
        title = step.get("title")
        clean.append({"action": action, "content": step["content"],
                      **({"title": str(title)} if action == INNER_THINKING and title else {})})
    if [s["action"] for s in clean[-3:]] != [INNER_THINKING, FINAL_CONCLUSION, VERIFICATION]:
        return Parsed(None, "the last three steps must be Inner Thinking, Final Conclusion, Verification")
    return Parsed(clean)


def chain_from_plain_text(text: str) -> list[Step] | None:
    """For small generators that ignore the JSON format: the reply as one Inner Thinking step, its last
    paragraph as the Final Conclusion. None for an empty reply."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text or "") if p.strip()]
    if not paragraphs:
        return None
    return [{"action": INNER_THINKING, "title": "Reasoning", "content": "\n\n".join(paragraphs[:-1]) or paragraphs[0]},
            {"action": FINAL_CONCLUSION, "content": paragraphs[-1]},
            {"action": VERIFICATION, "content": ""}]


def last_conclusion(chain: list[Step]) -> str | None:
    """What the verifier sees: the content of the chain's last Final Conclusion."""
    for step in reversed(chain):
        if step["action"] == FINAL_CONCLUSION:
            return step["content"]
    return None


def extend_chain(chain: list[Step], continuation: list[Step]) -> list[Step]:
    """A continuation starts from a new Verification, which replaces the chain's last one."""
    return chain[:-1] + continuation if chain else continuation


def previous_reasoning(chain: list[Step]) -> str:
    """The chain shown to the generator when it continues: all but the last Verification, as JSON."""
    return json.dumps(chain[:-1], ensure_ascii=False, indent=2)


def render_chain(chain: list[Step]) -> str:
    """A verified chain as text, one `### title` block per step (`### Conclusion`, `### Verification`)."""
    blocks = []
    for step in chain:
        heading = step.get("title") or step["action"].replace(FINAL_CONCLUSION, "Conclusion")
        blocks.append(f"### {heading}\n{step['content']}\n")
    return "\n".join(blocks).strip()


def parse_natural_reasoning(text: str) -> Parsed:
    parsed = parse_json_object(text)
    if parsed.error:
        return parsed
    value = parsed.value.get("NaturalReasoning")
    if not isinstance(value, str) or not value.strip():
        return Parsed(None, "'NaturalReasoning' is missing or empty")
    return Parsed(value.strip())


def parse_true_false(text: str) -> bool | None:
    """A verifier reply: starts with True or False (any case, after quotes or markdown); else None."""
    stripped = re.sub(r"^[\s\"'*`]+", "", text or "").lower()
    if stripped.startswith("true"):
        return True
    if stripped.startswith("false"):
        return False
    return None


def format_o1(thinking: str, response: str) -> str:
    """The HuatuoGPT-o1 output format, for SFT targets."""
    return f"## Thinking\n\n{thinking.strip()}\n\n## Final Response\n\n{response.strip()}"
