"""Prompt templates as versioned data (the YAML files in this folder), rendered into chat messages."""

from __future__ import annotations

import string
from functools import cache
from importlib import resources

import yaml
from pydantic import BaseModel, ConfigDict

from sphuatuo.data.questions import Question

Messages = list[dict[str, str]]
# What a generation pass sends per row: a chat (the engine applies the model's chat template) or a raw prompt,
# sent as it is (the SP paper's test prompted its models without their chat template).
PromptInput = Messages | str


class Example(BaseModel):
    """A worked exchange shown before the question (few-shot, as chat turns)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user: str
    assistant: str


class PromptTemplate(BaseModel):
    """System text, few-shot examples, a user message with named {fields}, and optionally the start of
    the assistant's reply, which the model continues (e.g. `<think>` to enter the reasoning format)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    version: int
    description: str = ""
    system: str | None = None
    examples: tuple[Example, ...] = ()
    user: str
    assistant_prefix: str = ""
    fields: tuple[str, ...]

    @property
    def tag(self) -> str:
        """What generated rows record as their prompt version, e.g. `self_play/teacher_cot@v1`."""
        return f"{self.name}@v{self.version}"

    def render_user(self, **values: str) -> str:
        missing = set(self.fields) - values.keys()
        extra = values.keys() - set(self.fields)
        if missing or extra:
            raise ValueError(
                f"prompt {self.tag}: missing fields {sorted(missing)}, unexpected fields {sorted(extra)}"
            )
        return self.user.format(**values)

    def messages(self, **values: str) -> Messages:
        """The chat to send; ends with the assistant prefix when there is one (the engine continues it)."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for example in self.examples:
            messages += [{"role": "user", "content": example.user}, {"role": "assistant", "content": example.assistant}]
        messages.append({"role": "user", "content": self.render_user(**values)})
        if self.assistant_prefix:
            messages.append({"role": "assistant", "content": self.assistant_prefix})
        return messages

    def raw_prompt(self, **values: str) -> str:
        """The same text without a chat template: system text, examples and user message, one blank line apart.
        The assistant prefix is left out: with no template there is no assistant turn to open, and the
        model writes its reply whole."""
        parts = [self.system] if self.system else []
        for example in self.examples:
            parts += [example.user, example.assistant]
        parts.append(self.render_user(**values))
        return "\n\n".join(parts) + "\n"

    def training_prompt(self, **values: str) -> Messages:
        """The chat a training example is prompted with: the same, less the assistant prefix (which
        belongs to the completion)."""
        messages = self.messages(**values)
        return messages[:-1] if self.assistant_prefix else messages


@cache
def _family(family: str) -> dict[str, PromptTemplate]:
    try:
        text = resources.files(__package__).joinpath(f"{family}.yaml").read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"unknown prompt family {family!r}") from None
    templates = {}
    for key, spec in yaml.safe_load(text).items():
        template = PromptTemplate(name=f"{family}/{key}", fields=tuple(spec.pop("fields")), **spec)
        declared = {name for _, name, _, _ in string.Formatter().parse(template.user) if name}
        if declared != set(template.fields):
            raise ValueError(f"prompt {template.tag}: text uses {sorted(declared)} but declares {template.fields}")
        templates[key] = template
    return templates


def get_prompt(name: str) -> PromptTemplate:
    """`family/template`, e.g. `self_play/teacher_cot`."""
    family, _, key = name.partition("/")
    templates = _family(family)
    if key not in templates:
        raise ValueError(f"prompt family {family!r} has no template {key!r} (has: {', '.join(templates)})")
    return templates[key]


def options_block(question: Question) -> str:
    """One `X. text` line per option; empty for open-ended items."""
    return "\n".join(f"{letter}. {text}" for letter, text in question.options.items())
