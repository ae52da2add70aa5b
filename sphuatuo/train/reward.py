"""The HuatuoGPT-o1 reward and the verifiers it can use (METHOD B.4).

reward = 0   when the response lacks exactly one `## Thinking` and one `## Final Response` (in that order);
         1.0 when the verifier accepts the final response (the text after `## Final Response`);
         0.1 otherwise.

The reward is a plain function of the verdicts, so any verifier plugs in:
- `ExactMatchVerifier`: the option letters the final response names equal the gold letters (problems
  made from multiple-choice items); for other problems, the ground truth appears in the response;
- `ClassifierVerifier`: a sequence-classification model (the released 3B verifier), p(True) > threshold;
- `LLMVerifier`: a causal LM reads the `verify` prompt; accepts when it puts more probability on "True"
  than on "False" as its next token.
The model-based verifiers run in the RL worker's process, on its device.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from sphuatuo.parsing.replies import extract_answer, split_thinking_response

FORMAT_ERROR, REJECTED, ACCEPTED = 0.0, 0.1, 1.0


class Verifier(Protocol):
    def verify(self, responses: Sequence[str], problems: Sequence[Mapping[str, Any]]) -> list[bool]:
        """One verdict per final response; `problems` carry `ground_truth`, `options` (JSON) and `answer`."""
        ...


def final_response(text: str) -> str | None:
    """The final response of a well-formed reply, None when the format is broken."""
    parsed = split_thinking_response(text)
    return None if parsed.parse_error else parsed.answer


def o1_rewards(completions: Sequence[str], problems: Sequence[Mapping[str, Any]], verifier: Verifier) -> list[float]:
    finals = [final_response(text) for text in completions]
    checked = [i for i, final in enumerate(finals) if final is not None]
    verdicts = verifier.verify([finals[i] for i in checked], [problems[i] for i in checked]) if checked else []
    rewards = [FORMAT_ERROR] * len(completions)
    for i, verdict in zip(checked, verdicts, strict=True):
        rewards[i] = ACCEPTED if verdict else REJECTED
    return rewards


def _normalise(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .。")


class ExactMatchVerifier:
    def verify(self, responses: Sequence[str], problems: Sequence[Mapping[str, Any]]) -> list[bool]:
        verdicts = []
        for response, problem in zip(responses, problems, strict=True):
            options = json.loads(problem["options"] or "{}")
            if options:
                gold = frozenset(letter for letter in problem["answer"].split(",") if letter)
                verdicts.append(extract_answer(response, options) == gold)
            else:
                verdicts.append(bool(_normalise(problem["ground_truth"]))
                                and _normalise(problem["ground_truth"]) in _normalise(response))
        return verdicts


class ClassifierVerifier:
    """The released verifier's input: the `verifier_classifier` text ending in the eos token; label 1 = True."""

    def __init__(self, model: str, threshold: float, max_length: int, device: str = "cpu", *,
                 trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from sphuatuo.prompts import get_prompt

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model, trust_remote_code=trust_remote_code).to(device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.template, self.threshold, self.max_length, self.device = (
            get_prompt("huatuo_o1/verifier_classifier"), threshold, max_length, device)

    def true_probabilities(self, responses: Sequence[str], problems: Sequence[Mapping[str, Any]]) -> list[float]:
        texts = [self.template.render_user(reply=response, reference=problem["ground_truth"],
                                           eos=self.tokenizer.eos_token or "")
                 for response, problem in zip(responses, problems, strict=True)]
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                max_length=self.max_length, add_special_tokens=False).to(self.device)
        with self.torch.inference_mode():
            logits = self.model(**inputs).logits.float()
        return self.torch.softmax(logits, dim=-1)[:, 1].tolist()

    def verify(self, responses: Sequence[str], problems: Sequence[Mapping[str, Any]]) -> list[bool]:
        return [p > self.threshold for p in self.true_probabilities(responses, problems)]


class LLMVerifier:
    """A causal LM as verifier: the first tokens of "True" and "False" compete for its next token."""

    def __init__(self, model: str, prompt: str, max_length: int, device: str = "cpu", *,
                 trust_remote_code: bool = False):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from sphuatuo.prompts import get_prompt

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(model, padding_side="left", trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=trust_remote_code).to(device).eval()
        self.prompt, self.max_length, self.device = get_prompt(prompt), max_length, device
        self.true_id, self.false_id = (self.tokenizer.encode(word, add_special_tokens=False)[0]
                                       for word in ("True", "False"))
        if self.true_id == self.false_id:
            raise ValueError(f"{model}: 'True' and 'False' start with the same token; use another verifier")

    def verify(self, responses: Sequence[str], problems: Sequence[Mapping[str, Any]]) -> list[bool]:
        chats = [self.tokenizer.apply_chat_template(
                     self.prompt.messages(reply=response, reference=problem["ground_truth"]),
                     tokenize=False, add_generation_prompt=True)
                 for response, problem in zip(responses, problems, strict=True)]
        inputs = self.tokenizer(chats, return_tensors="pt", padding=True, truncation=True,
                                max_length=self.max_length, add_special_tokens=False).to(self.device)
        with self.torch.inference_mode():
            logits = self.model(**inputs).logits[:, -1, :]
        return (logits[:, self.true_id] > logits[:, self.false_id]).tolist()


def build_verifier(config: Any, device: str = "cpu") -> Verifier:
    """The verifier a recipe's `stages.rl.verifier` (a RewardVerifierConfig) describes."""
    from sphuatuo.local_models import resolve_model

    if config.kind == "exact_match":
        return ExactMatchVerifier()
    if config.kind == "classifier":
        return ClassifierVerifier(resolve_model(config.model), config.threshold, config.max_length, device,
                                  trust_remote_code=config.trust_remote_code)
    return LLMVerifier(resolve_model(config.model), config.prompt, config.max_length, device,
                       trust_remote_code=config.trust_remote_code)


class O1Reward:
    """A TRL reward function: called with the prompts, the completions and the dataset's columns."""

    __name__ = "o1_reward"  # TRL logs rewards under the function's name

    def __init__(self, verifier: Verifier):
        self.verifier = verifier

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: list[Any]) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        problems = [{"ground_truth": g, "options": o, "answer": a}
                    for g, o, a in zip(columns["ground_truth"], columns["options"], columns["answer"], strict=True)]
        return o1_rewards(texts, problems, self.verifier)
