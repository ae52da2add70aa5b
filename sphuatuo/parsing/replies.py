"""Parse model replies: reasoning/answer sections, chosen option letters, judge verdicts.

Everything here is a pure function over strings (stdlib only), so it can run inside Ray Data map
functions, reward functions and tests alike.

Two reply formats are understood:

* Self-Play: ``<think>...</think><answer>...</answer>`` (`split_think_answer`);
* HuatuoGPT-o1: ``## Thinking\\n\\n...\\n\\n## Final Response\\n\\n...`` (`split_thinking_response`).

`extract_answer` finds the option letters a reply commits to, following the HuatuoGPT-o1
evaluation (explicit statement, then a bare letter, then option text, then the closest option text)
with Chinese phrasings, multi-letter answers and full-width characters added.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "ThinkAnswer",
    "extract_answer",
    "first_and_last_answers",
    "format_cot",
    "letters_text",
    "parse_judge_verdict",
    "split_think_answer",
    "split_thinking_response",
]

_NO_LETTERS: frozenset[str] = frozenset()

# Full-width ASCII (U+FF01..U+FF5E: Ａ-Ｚ, ：, （, ）, ，...) and the ideographic space -> ASCII.
_FULLWIDTH_TO_ASCII = {cp: cp - 0xFEE0 for cp in range(0xFF01, 0xFF5F)} | {0x3000: ord(" ")}


def _fold_width(text: str) -> str:
    """Replace full-width ASCII characters by their ASCII twins."""
    return text.translate(_FULLWIDTH_TO_ASCII)


# ---------------------------------------------------------------------------------------------
# Section splitting
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ThinkAnswer:
    """A reply split into its reasoning and its answer; `parse_error` says what was malformed."""

    think: str
    answer: str
    parse_error: str | None = None


# Self-Play tags, tolerating spaces inside the brackets and any case: <think>, </think>, <answer>, </answer>.
_THINK_OPEN = re.compile(r"<\s*think\s*>", re.IGNORECASE)
_THINK_CLOSE = re.compile(r"<\s*/\s*think\s*>", re.IGNORECASE)
_ANSWER_OPEN = re.compile(r"<\s*answer\s*>", re.IGNORECASE)
_ANSWER_CLOSE = re.compile(r"<\s*/\s*answer\s*>", re.IGNORECASE)

# HuatuoGPT-o1 headings at the start of a line: "## Thinking" and "## Final Response" (any number
# of '#', optional trailing colon).
_THINKING_HEADING = re.compile(r"^[ \t]*#{1,6}[ \t]*Thinking\b[ \t]*:?", re.IGNORECASE | re.MULTILINE)
_FINAL_HEADING = re.compile(r"^[ \t]*#{1,6}[ \t]*Final[ \t]+Response\b[ \t]*:?", re.IGNORECASE | re.MULTILINE)


NO_ANSWER_SECTION = "no <answer> section"


def format_cot(think: str, answer: str) -> str:
    """The Self-Play training format that `split_think_answer` reads back."""
    return f"<think>\n{think.strip()}\n</think>\n<answer>\n{answer.strip()}\n</answer>"


def split_think_answer(text: str) -> ThinkAnswer:
    """Split a Self-Play reply ``<think>...</think><answer>...</answer>``.

    The think part runs from ``<think>`` (or the start, when the model began inside the think block)
    to ``</think>`` (or the first ``<answer>``, or the end). The answer is the last ``<answer>``
    block, up to ``</answer>`` or to the end of a truncated reply; without any ``<answer>`` tag the
    answer is empty and `parse_error` says so.
    """
    opening = _THINK_OPEN.search(text)
    think_start = opening.end() if opening else 0
    think_end_match = _THINK_CLOSE.search(text, think_start) or _ANSWER_OPEN.search(text, think_start)
    think = text[think_start : think_end_match.start() if think_end_match else len(text)].strip()

    answer_opens = list(_ANSWER_OPEN.finditer(text))
    if not answer_opens:
        return ThinkAnswer(think=think, answer="", parse_error=NO_ANSWER_SECTION)
    answer_start = answer_opens[-1].end()
    closing = _ANSWER_CLOSE.search(text, answer_start)
    answer = text[answer_start : closing.start() if closing else len(text)].strip()
    return ThinkAnswer(think=think, answer=answer, parse_error=None)


def split_thinking_response(text: str) -> ThinkAnswer:
    """Split a HuatuoGPT-o1 reply ``## Thinking\\n\\n...\\n\\n## Final Response\\n\\n...``.

    Best effort always: the think part runs from the first ``## Thinking`` to the next
    ``## Final Response``; the answer is the text after the last ``## Final Response`` (empty when
    there is none). `parse_error` is set unless each heading occurs exactly once, in that order.
    """
    thinking = list(_THINKING_HEADING.finditer(text))
    finals = list(_FINAL_HEADING.finditer(text))

    think_start = thinking[0].end() if thinking else 0
    think_end_match = _FINAL_HEADING.search(text, think_start)
    think = text[think_start : think_end_match.start() if think_end_match else len(text)].strip()
    answer = text[finals[-1].end() :].strip() if finals else ""

    problems = []
    if len(thinking) != 1:
        problems.append(f"expected one '## Thinking', found {len(thinking)}")
    if len(finals) != 1:
        problems.append(f"expected one '## Final Response', found {len(finals)}")
    if len(thinking) == 1 and len(finals) == 1 and finals[0].start() < thinking[0].start():
        problems.append("'## Final Response' comes before '## Thinking'")
    return ThinkAnswer(think=think, answer=answer, parse_error="; ".join(problems) or None)


def _final_part(text: str) -> str:
    """The part of a reply that holds its final answer: last <answer> block, else text after the
    last '## Final Response', else the whole reply."""
    if _ANSWER_OPEN.search(text):
        return split_think_answer(text).answer
    finals = list(_FINAL_HEADING.finditer(text))
    if finals:
        return text[finals[-1].end() :]
    return text


# ---------------------------------------------------------------------------------------------
# Option letters
# ---------------------------------------------------------------------------------------------

# Building blocks for "a list of option letters" (applied to width-folded text):
# one token: an upper-case letter run that is not part of a word ("B", "AB"; not the "A" of
# "Aspirin" nor the "B" of "Based"), optionally wrapped in brackets or markdown bold: "(C)", "**B**".
_TOKEN = r"[(\[【*]*[ \t]*(?<![A-Za-z0-9])[A-Z]+(?![A-Za-z0-9])[ \t]*[)\]】*]*"
# between tokens: a comma, "、", "/", "&", ";", and/or/和/与/及/或, or plain spaces.
_SEP = r"(?:[ \t]*(?:,|、|/|&|;|\band\b|\bor\b|和|与|及|或)[ \t]*|[ \t]+)"
# the list itself, captured as `span`; `_letters_in_span` later keeps only option keys.
_SPAN = rf"(?P<span>{_TOKEN}(?:{_SEP}{_TOKEN})*)"
# the upper-case letter runs inside a captured span.
_LETTER_RUN = re.compile(r"[A-Z]+")

# Explicit answer statements; all patterns are searched together and the last match in the text wins.
_STATEMENTS = (
    # "The answer is (C)", "correct answers are B and D", "Answer: A, C", "answer is option B".
    re.compile(
        r"(?i:\banswers?(?:[ \t]+(?:is|are|would[ \t]+be|should[ \t]+be|will[ \t]+be|must[ \t]+be)"
        r"[ \t]*:?|[ \t]*:))\s*(?:(?i:options?|choices?)[ \t]*)?" + _SPAN
    ),
    # "the correct option is B", "best choices are A and C", "final choice: D".
    re.compile(
        r"(?i:\b(?:correct|right|best|final)[ \t]+(?:options?|choices?)"
        r"(?:[ \t]+(?:is|are|would[ \t]+be|should[ \t]+be))?[ \t]*:?)\s*" + _SPAN
    ),
    # "I would choose B", "select options A and C", "go with D".
    re.compile(
        r"(?i:\b(?:choose|select|pick|go[ \t]+with)\b)[ \t]*:?[ \t]*(?:(?i:options?|choices?)[ \t]*)?" + _SPAN
    ),
    # "B is correct", "B and D are the correct answers", "C is the best option" ("right"/"best"
    # only before answer/option/choice or punctuation, so "B is the right atrium" does not count).
    re.compile(
        _SPAN + r"[ \t]*(?i:(?:is|are)[ \t]+(?:both[ \t]+|all[ \t]+)?(?:the[ \t]+)?"
        r"(?:correct(?![\w-])|(?:right|best)"
        r"(?:[ \t]+(?:answers?|options?|choices?)\b|(?=[ \t]*(?:[.,;!)]|\n|$)))))"
    ),
    # LaTeX "\boxed{B}", "\boxed{\text{B, D}}".
    re.compile(r"\\boxed\{[ \t]*(?:\\text(?:bf)?\{)?" + _SPAN),
    # "答案：B", "答案是B", "答案为 A、C", "正确答案是 B 和 D", "答案应选C", "答案是选项B".
    re.compile(r"答案[ \t]*(?:应该?是|应当是|应为|应选|是|为|选择?)?[ \t]*:?\s*(?:选项)?[ \t]*" + _SPAN),
    # "选 C", "选择C", "故选B", "应选 AB" (not "不选A", "排除选A"; "选项A" is handled as a mention).
    re.compile(r"(?<!不)(?<!不应)(?<!不能)(?<!排除)选(?:择)?(?:为|是)?[ \t]*:?[ \t]*" + _SPAN),
    # "正确的是B", "正确选项为 A、C", "最佳答案是D".
    re.compile(r"(?:正确|最佳|最合适)的?(?:选项|答案|选择)?(?:是|为|应为)[ \t]*:?[ \t]*(?:选项)?[ \t]*" + _SPAN),
    # "B正确", "B项正确", "B选项是正确的" (not "B项不正确").
    re.compile(_SPAN + r"[ \t]*(?:选项|项)?[ \t]*(?:是|为)?正确"),
)

# Weaker evidence, used only when no statement above matched (the last one wins).
_MENTIONS = (
    # "options B and D", "Option C", "选项B和D".
    re.compile(r"(?:(?i:\b(?:options?|choices?))|选项)[ \t]*:?[ \t]*" + _SPAN),
    # a bold letter on its own: "**B**", "**(B)**", "**B. Aspirin**" (not "**A patient**").
    re.compile(r"\*\*[ \t]*" + _SPAN + r"[ \t]*(?:[.:)\-][^*\n]*)?\*\*"),
)

# A reply that is just letters, at its very start: "B", "(B)", "B.", "B) text", "B. Aspirin",
# "B, D", "BD" — the letters must be followed by punctuation or the end of the line, so that
# "A patient with ..." is not read as "A".
_STANDALONE = re.compile(r"\A[\s\"'“]*" + _SPAN + r"(?=[.:;,、。)\]】\-–—]|[ \t]*(?:\n|\Z))")

# Runs of whitespace, to compare option texts with replies.
_SPACES = re.compile(r"\s+")
# Sentence ends, to take the last sentence of a reply for the similarity fallback.
_SENTENCE_END = re.compile(r"[.。!?！？;；\n]+")

# Minimum difflib ratio for the closest-option-text fallback.
SIMILARITY_THRESHOLD = 0.6


def _letter_keys(options: Mapping[str, str]) -> dict[str, str]:
    """Upper-case single-letter option keys -> the key as given."""
    keys = {}
    for key in options:
        folded = _fold_width(str(key)).strip().upper()
        if len(folded) == 1 and "A" <= folded <= "Z":
            keys[folded] = key
    return keys


def _letters_in_span(span: str, keys: Mapping[str, str]) -> frozenset[str]:
    """Option keys named in a captured letter list; a run like "BD" counts only if every letter in
    it is a distinct option key (so "DNA" yields nothing), a lone letter only if it is a key."""
    found = set()
    for run in _LETTER_RUN.findall(span):
        if all(ch in keys for ch in run) and len(set(run)) == len(run):
            found.update(keys[ch] for ch in run)
    return frozenset(found)


def _statements(text: str, patterns: Iterable[re.Pattern[str]], keys: Mapping[str, str]) -> list[frozenset[str]]:
    """Letters of every match of `patterns` that names at least one option key, in text order."""
    hits: list[tuple[int, frozenset[str]]] = []
    for pattern in patterns:
        for match in pattern.finditer(text):
            letters = _letters_in_span(match.group("span"), keys)
            if letters:
                hits.append((match.start("span"), letters))
    hits.sort(key=lambda hit: hit[0])
    return [letters for _, letters in hits]


def _standalone_letters(text: str, keys: Mapping[str, str]) -> frozenset[str]:
    """Letters when the reply opens with nothing but a letter list ("B", "(B)", "B. Aspirin")."""
    match = _STANDALONE.match(text)
    return _letters_in_span(match.group("span"), keys) if match else _NO_LETTERS


def _normalise(text: str) -> str:
    """Lower-case, single-spaced, without trailing sentence punctuation."""
    return _SPACES.sub(" ", _fold_width(text)).strip().lower().rstrip(".。;；")


def _text_pattern(option_text: str) -> re.Pattern[str]:
    """Match a normalised option text, not inside a longer ASCII word ("iron" not in "environment")."""
    before = r"(?<![a-z0-9])" if option_text[:1].isascii() and option_text[:1].isalnum() else ""
    after = r"(?![a-z0-9])" if option_text[-1:].isascii() and option_text[-1:].isalnum() else ""
    return re.compile(before + re.escape(option_text) + after)


def _option_text_matches(text: str, options: Mapping[str, str]) -> frozenset[str]:
    """Options whose text occurs in the reply, longest texts first (an occurrence inside a longer
    matched option's text does not count); empty when every option occurs (ambiguous)."""
    haystack = _normalise(text)
    texts = {key: _normalise(str(value)) for key, value in options.items()}
    found = set()
    for key in sorted(texts, key=lambda k: len(texts[k]), reverse=True):
        if not texts[key]:
            continue
        pattern = _text_pattern(texts[key])
        if pattern.search(haystack):
            found.add(key)
            haystack = pattern.sub("\0", haystack)  # mask it so shorter texts inside it do not match
    if len(found) == len(options) and len(options) > 1:
        return _NO_LETTERS
    return frozenset(found)


def _closest_option(text: str, options: Mapping[str, str]) -> frozenset[str]:
    """The one option whose text is most similar to the reply (whole, last line or last sentence),
    if that similarity reaches `SIMILARITY_THRESHOLD` and no other option ties it."""
    whole = _normalise(text)
    lines = [line for line in (_normalise(raw) for raw in text.splitlines()) if line]
    sentences = [s for s in (_normalise(raw) for raw in _SENTENCE_END.split(text)) if s]
    candidates = {whole, lines[-1] if lines else "", sentences[-1] if sentences else ""} - {""}
    scores = []
    for key, value in options.items():
        option_text = _normalise(str(value))
        if option_text:
            score = max(difflib.SequenceMatcher(None, c, option_text, autojunk=False).ratio() for c in candidates)
            scores.append((score, key))
    scores.sort(reverse=True)
    if not scores or scores[0][0] < SIMILARITY_THRESHOLD:
        return _NO_LETTERS
    if len(scores) > 1 and scores[1][0] == scores[0][0]:
        return _NO_LETTERS
    return frozenset({scores[0][1]})


def first_and_last_answers(reply: str, options: Mapping[str, str]) -> tuple[frozenset[str], frozenset[str]]:
    """The option keys named by the first and by the last explicit answer statement of the reply's
    final part; both are the same fallback (bare letter, option text, closest option text) when
    the reply makes no explicit statement. Empty sets when nothing is found."""
    text = _fold_width(_final_part(reply or "")).strip()
    if not text or not options:
        return _NO_LETTERS, _NO_LETTERS
    keys = _letter_keys(options)
    found = _statements(text, _STATEMENTS, keys) or _statements(text, _MENTIONS, keys)
    if found:
        return found[0], found[-1]
    fallback = (
        _standalone_letters(text, keys)
        or _option_text_matches(text, options)
        or _closest_option(text, options)
    )
    return fallback, fallback


def extract_answer(reply: str, options: Mapping[str, str]) -> frozenset[str]:
    """The option keys the reply gives as its final answer (its last explicit statement, else a
    bare letter, else the options whose text it names, else the closest option text); empty when none."""
    return first_and_last_answers(reply, options)[1]


# ---------------------------------------------------------------------------------------------
# Judge verdicts and rendering
# ---------------------------------------------------------------------------------------------


def parse_judge_verdict(text: str) -> bool | None:
    """A judge reply's first non-space character: "1" -> True (correct), "2" -> False, else None."""
    stripped = _fold_width(text or "").strip()
    if stripped.startswith("1"):
        return True
    if stripped.startswith("2"):
        return False
    return None


def letters_text(letters: Iterable[str]) -> str:
    """Canonical rendering of option letters: unique, sorted, comma-separated ("A, C")."""
    return ", ".join(sorted(set(letters)))
