"""Parse model replies: reasoning/answer sections, chosen option letters, judge verdicts.

Everything here is a pure function over strings (stdlib only), so it can run inside Ray Data map
functions, reward functions and tests alike.

Two reply formats are understood:

* Self-Play: ``<think>...</think><answer>...</answer>`` (`split_think_answer`);
* HuatuoGPT-o1: ``## Thinking\\n\\n...\\n\\n## Final Response\\n\\n...`` (`split_thinking_response`).

`answer_commitment` finds the option letters a reply commits to, following the HuatuoGPT-o1
evaluation (explicit statement, then a bare letter, then option text, then the closest option text)
with Chinese phrasings, lower-case letters after a label, multi-letter answers and full-width
characters added, and says what the reply did when it committed to nothing: restated the option
list, copied the question back, held several candidates open, or gave no answer. A restated list
names every option and chooses none, so it is masked before any pattern reads it: read as its
first or last option, it would make a weak model's accuracy an artefact of option order.
`extract_answer` and `first_and_last_answers` are its letters.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

__all__ = [
    "CANDIDATES",
    "CATEGORIES",
    "COMMITTED",
    "COPIED_QUESTION",
    "NO_ANSWER",
    "RESTATED_OPTIONS",
    "AnswerCommitment",
    "ThinkAnswer",
    "answer_commitment",
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
    last '## Final Response', else nothing when the reply opened a reasoning section (<think>,
    '## Thinking') and never left it (it was cut, or broke off, before answering), else the whole reply."""
    if _ANSWER_OPEN.search(text):
        return split_think_answer(text).answer
    finals = list(_FINAL_HEADING.finditer(text))
    if finals:
        return text[finals[-1].end() :]
    if (_THINK_OPEN.search(text) and not _THINK_CLOSE.search(text)) or _THINKING_HEADING.search(text):
        return ""
    return text


# ---------------------------------------------------------------------------------------------
# Option letters
# ---------------------------------------------------------------------------------------------

# What a reply does with the options, as `answer_commitment` classifies it. Only `COMMITTED` replies
# have letters; the others are counted apart in evaluation so that "no answer" is not one opaque number.
COMMITTED = "committed"  # an answer label, a final section, a concluding sentence, a lone letter, option text
RESTATED_OPTIONS = "restated_options"  # the option list given back ("A. … B. … C. …"), whole or truncated
COPIED_QUESTION = "copied_question"  # the question given back, nothing chosen
CANDIDATES = "candidates"  # several options held open: "it could be A, B or C", "答案可能是A或C"
NO_ANSWER = "no_answer"  # empty, a refusal, a hedge that names no option, a reply cut before its answer
CATEGORIES = (COMMITTED, RESTATED_OPTIONS, COPIED_QUESTION, CANDIDATES, NO_ANSWER)


@dataclass(frozen=True)
class AnswerCommitment:
    """The options a reply commits to: `letters` by its last answer statement, `first` by its first one
    (the same when it makes one), and what kind of reply it is (`category`, one of `CATEGORIES`)."""

    letters: frozenset[str]
    first: frozenset[str]
    category: str


# Building blocks for "a list of option letters" (applied to width-folded text):
# one token: an upper-case letter run that is not part of a word ("B", "AB"; not the "A" of
# "Aspirin" nor the "B" of "Based"), optionally wrapped in brackets or markdown bold: "(C)", "**B**".
# Spaces belong to a token only inside its brackets, never between tokens (the separator's): were the spaces between
# two tokens free to go to either, a long list that ends in no statement ("…are: A, B, C, D, D, D, …", a small model's
# loop) would be tried every way it can be split, 2^n of them, before the pattern gave up.
_TOKEN = r"(?:[(\[【*]+[ \t]*)?(?<![A-Za-z0-9])[A-Z]+(?![A-Za-z0-9])(?:[ \t]*[)\]】*]+)?"
# between tokens: a comma, "、", "/", "&", ";", and/or/和/与/及/或, or plain spaces.
_SEP = r"(?:[ \t]*(?:,|、|/|&|;|\band\b|\bor\b|和|与|及|或)[ \t]*|[ \t]+)"
# the list itself, captured as `span`; `_letters_in_span` later keeps only option keys. At most as many tokens as
# the alphabet has letters: a longer run is a loop, and a bounded one keeps every search linear in the reply's
# length, since a pattern that begins with the list ("B and D are correct") is tried at every token of it.
MAX_LIST_TOKENS = 26
_SPAN = rf"(?P<span>{_TOKEN}(?:{_SEP}{_TOKEN}){{0,{MAX_LIST_TOKENS - 1}}})"
# A lower-case list, only trusted right after an answer label ("answer: c", "the answer is (b) and (d)"):
# single letters, and the list must end at punctuation or the line end, so "the answer is a vitamin"
# is not read as "A".
_LOWER_TOKEN = r"[(\[【]?(?<![A-Za-z0-9])[a-z](?![A-Za-z0-9])[)\]】]?"
_LOWER_SPAN = (rf"(?P<span>{_LOWER_TOKEN}(?:{_SEP}{_LOWER_TOKEN}){{0,{MAX_LIST_TOKENS - 1}}})"
               r"(?=[ \t]*(?:[.,;:!?。)\]]|\n|$))")
# the letter runs inside a captured span.
_LETTER_RUN = re.compile(r"[A-Z]+")
# "or"/"或"/"either" inside a span: the reply holds several options open instead of choosing.
_HEDGED_SPAN = re.compile(r"\bor\b|或|\beither\b", re.IGNORECASE)
# A span that must end a sentence, so "So A patient…" or "It is A common…" are not answers.
_SENTENCE_STOP = r"(?=[ \t]*(?:[.!。,，;；)]|项|选项|\n|$))"

# English answer labels: "answer", "answers", "answer to this question", "final answer", then "is"
# (with "would be", "must be", adverbs such as "therefore" or "most likely"), or a colon or dash.
_ANSWER_LABEL = (
    r"(?i:\banswers?(?:[ \t]+(?:to|for)[ \t]+(?:this|the)[ \t]+(?:question|item|case|mcq))?"
    r"(?:[ \t]+(?:here|then|therefore|thus|clearly))?"
    r"(?:[ \t]*(?:is|are|would[ \t]+be|should[ \t]+be|will[ \t]+be|must[ \t]+be)"
    r"(?:[ \t]+(?:therefore|thus|clearly|definitely|probably|likely|most[ \t]+likely))?[ \t]*[:\-]?"
    r"|[ \t]*(?:\*\*)?[ \t]*[:\-]))"
)
# Chinese answer labels: "答案：", "答案是", "正确答案为", "答案应选", "答：", "回答：" (full-width
# punctuation is folded to ASCII before matching, so "答：（Ｃ）" reads as "答:(C)").
_ANSWER_LABEL_ZH = r"(?:答案[ \t]*(?:应该?是|应当是|应为|应选|是|为|选择?)?[ \t]*:?|(?:回答|解答|答)[ \t]*:)"

# Explicit answer statements; all patterns are searched together and the last match in the text wins.
_STATEMENTS = (
    # "The answer is (C)", "correct answers are B and D", "Answer: A, C", "answer is option B",
    # "The answer to this question is C", "**Answer:** D", "Final answer - B".
    re.compile(_ANSWER_LABEL + r"\s*(?:(?i:options?|choices?)[ \t]*)?" + _SPAN),
    # "the correct option is B", "best choices are A and C", "final choice: D", "correct response: C".
    re.compile(
        r"(?i:\b(?:correct|right|best|final)[ \t]+(?:options?|choices?|responses?)"
        r"(?:[ \t]+(?:is|are|would[ \t]+be|should[ \t]+be))?[ \t]*:?)\s*" + _SPAN
    ),
    # "I would choose B", "select options A and C", "go with D" (not "choose between A and C").
    re.compile(
        r"(?i:\b(?:choose|select|pick|go[ \t]+with)\b)(?![ \t]+between)[ \t]*:?[ \t]*"
        r"(?:(?i:options?|choices?)[ \t]*)?" + _SPAN
    ),
    # "B is correct", "B and D are the correct answers", "C is the best option", "C is the answer"
    # ("right"/"best" only before answer/option/choice or punctuation, so "B is the right atrium"
    # does not count).
    re.compile(
        _SPAN + r"[ \t]*(?i:(?:is|are)[ \t]+(?:both[ \t]+|all[ \t]+)?(?:the[ \t]+)?"
        r"(?:correct(?![\w-])|(?:final[ \t]+|most[ \t]+likely[ \t]+)?answers?\b|(?:right|best)"
        r"(?:[ \t]+(?:answers?|options?|choices?)\b|(?=[ \t]*(?:[.,;!)]|\n|$)))))"
    ),
    # A concluding sentence: "So, C.", "Therefore it's B.", "I think it's C.", "It is most likely D."
    # (the letters must end the sentence, so "So A patient with…" is not read as A).
    re.compile(
        r"(?i:\b(?:so|thus|therefore|hence|(?:it|this)(?:['’]s|[ \t]+is|[ \t]+must[ \t]+be|[ \t]+would[ \t]+be))\b"
        r"[ \t,:]*(?:(?:it|this)(?:['’]s|[ \t]+is|[ \t]+must[ \t]+be)[ \t]+)?"
        r"(?:(?:probably|likely|most[ \t]+likely|definitely|clearly)[ \t]+)?(?:(?:options?|choices?)[ \t]*)?)"
        + _SPAN + _SENTENCE_STOP
    ),
    # LaTeX "\boxed{B}", "\boxed{\text{B, D}}".
    re.compile(r"\\boxed\{[ \t]*(?:\\text(?:bf)?\{)?" + _SPAN),
    # "答案：B", "答案是B", "答案为 A、C", "正确答案是 B 和 D", "答案应选C", "答案是选项B", "答：B".
    re.compile(_ANSWER_LABEL_ZH + r"\s*(?:选项)?[ \t]*" + _SPAN),
    # "选 C", "选择C", "故选B", "应选 AB" (not "不选A", "排除选A"; "选项A" is handled as a mention).
    re.compile(r"(?<!不)(?<!不应)(?<!不能)(?<!排除)选(?:择)?(?:为|是)?[ \t]*:?[ \t]*" + _SPAN),
    # "正确的是B", "正确选项为 A、C", "最佳答案是D".
    re.compile(r"(?:正确|最佳|最合适)的?(?:选项|答案|选择)?(?:是|为|应为)[ \t]*:?[ \t]*(?:选项)?[ \t]*" + _SPAN),
    # "B正确", "B项正确", "B选项是正确的", "C为正确答案" (not "B项不正确").
    re.compile(_SPAN + r"[ \t]*(?:选项|项)?[ \t]*(?:是|为)?正确"),
    # A Chinese concluding sentence: "所以是C。", "因此为B", "综上，D。".
    re.compile(r"(?:所以|因此|故|因而|综上)[ \t,:]*(?:应?(?:是|为))?[ \t]*(?:选项)?[ \t]*" + _SPAN + _SENTENCE_STOP),
)

# The same labels followed by a lower-case letter list: "answer: c", "The answer is (b).", "答案：c".
_LOWER_STATEMENTS = (
    re.compile(_ANSWER_LABEL + r"\s*(?:(?i:options?|choices?)[ \t]*)?" + _LOWER_SPAN),
    re.compile(_ANSWER_LABEL_ZH + r"\s*(?:选项)?[ \t]*" + _LOWER_SPAN),
)

# Weaker evidence, used only when no statement above matched (the last one wins).
_MENTIONS = (
    # "options B and D", "Option C", "选项B和D".
    re.compile(r"(?:(?i:\b(?:options?|choices?))|选项)[ \t]*:?[ \t]*" + _SPAN),
    # a bold letter on its own: "**B**", "**(B)**", "**B. Aspirin**" (not "**A patient**").
    re.compile(r"\*\*[ \t]*" + _SPAN + r"[ \t]*(?:[.:)\-][^*\n]*)?\*\*"),
)
# A mention is not a choice when its clause rejects it: "Option A is incorrect", "选项B不正确",
# "rule out option C", "排除选项D".
_NEGATION_AFTER = re.compile(
    r"\b(?:not|incorrect|wrong|unlikely|false|ruled?[ \t]+out|excluded?|less[ \t]+likely|isn['’]t|doesn['’]t|"
    r"can['’]?t|cannot|fails?)\b|不|错|排除|否定|除外",
    re.IGNORECASE,
)
_NEGATION_BEFORE = re.compile(r"(?:\b(?:not|rule[ \t]+out|exclude|excluding|eliminate|except)|排除|不选|除了?)[ \t]*\Z",
                              re.IGNORECASE)
# How far a mention's clause is read for a rejection: a clause runs to its end or this many characters, so that a
# reply of thousands of mentions and no punctuation is read once, not once per mention.
MAX_CLAUSE_CHARS = 400
# The end of the clause a mention belongs to ("Option B fits, while option D does not": B stands).
_CLAUSE_END = re.compile(r"[.,;!?。，；！？\n]|\b(?:but|while|whereas|however)\b|但|而")

# Candidate lists that match no statement: "it could be A, B or C", "may be either B or D", "可能是A或C".
_CANDIDATE_LISTS = (
    re.compile(r"(?i:\b(?:could|might|may)[ \t]+(?:also[ \t]+)?be[ \t]+(?:either[ \t]+)?(?:options?[ \t]+)?)" + _SPAN),
    re.compile(r"(?i:\beither[ \t]+(?:options?[ \t]+)?)" + _SPAN),
    re.compile(r"(?:可能是|可能为|或许是|也许是)[ \t]*(?:选项)?[ \t]*" + _SPAN),
)

# A reply that is just letters, at its very start: "B", "(B)", "B.", "B) text", "B. Aspirin",
# "B, D", "BD" — the letters must be followed by punctuation or the end of the line, so that
# "A patient with ..." is not read as "A".
_STANDALONE = re.compile(r"\A[\s\"'“]*" + _SPAN + r"(?=[.:;,、。)\]】\-–—]|[ \t]*(?:\n|\Z))")
# A last line that is just letters: "…reasoning…\n\nC", "\n(B).", "\n> **D**".
_LONE_LAST_LINE = re.compile(r"[ \t\"'“>*\-]*" + _SPAN + r"[ \t]*[.。!]?[ \t\"”*]*")

# An option item as models restate them: the letter (optionally after "Option"/"选项", in brackets,
# in bold) followed by the punctuation that introduces an option's text: "A. ", "(A) ", "A) ", "A: ",
# "A、", "**A.** ", "Option A: ". Runs of these are option lists, not answers.
_ITEM_MARKER = re.compile(
    r"(?<![A-Za-z0-9])(?:(?i:options?|choices?)[ \t]+|选项[ \t]*)?\**[ \t]*[(\[【]?[ \t]*(?P<letter>[A-Z])[ \t]*"
    r"(?:[)\]】][ \t]*[.:、]?|[.:、](?![0-9]))[ \t]*\**"
)
# Most characters one restated option may take before the next letter (MedQA options are sentences).
MAX_OPTION_ITEM_CHARS = 400
# What a masked stretch of text (restated options, copied question) is replaced by: a line of its own,
# that no pattern reads as a letter, so "The correct answer is:\n<list>" keeps no answer.
_MASK = "\n\x00\n"
# Something a restated item must say between its letter and the next: a letter, digit or CJK character.
_HAS_TEXT = re.compile(r"[^\W_]")
# Sentence and line ends, to cut a question into pieces that a reply may copy.
_QUESTION_PIECES = re.compile(r"[.?!。？！\n]+")
# Shortest question piece considered copied, and the share of the question that makes a copy.
MIN_COPIED_PIECE_CHARS = 6
COPIED_QUESTION_SHARE = 0.5
# Bullets and punctuation around an option text given alone on a line.
_LINE_DECORATION = re.compile(r"^[\s\-*•>\d.)]*|[\s.;,。；，*]*$")

# Runs of whitespace, to compare option texts with replies.
_SPACES = re.compile(r"\s+")
# Runs of spaces and tabs within a line.
_SPACE_RUNS = re.compile(r"[ \t]+")
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


@dataclass(frozen=True)
class _Hit:
    position: int
    letters: frozenset[str]
    hedged: bool  # "A or C": options held open, not chosen


def _hits(text: str, patterns: Iterable[re.Pattern[str]], keys: Mapping[str, str], *,
          lower: bool = False) -> list[_Hit]:
    """Every match of `patterns` that names at least one option key, in text order."""
    hits = []
    for pattern in patterns:
        for match in pattern.finditer(text):
            span = match.group("span")
            letters = _letters_in_span(span.upper() if lower else span, keys)
            if letters:
                hits.append(_Hit(match.start("span"), letters, bool(_HEDGED_SPAN.search(span))))
    return sorted(hits, key=lambda hit: hit.position)


def _mention_hits(text: str, keys: Mapping[str, str]) -> list[_Hit]:
    """Mentions of options that the surrounding clause does not reject; one naming every option of a
    question with three or more is a list of candidates."""
    hits = []
    for hit in _hits(text, _MENTIONS, keys):
        end = _CLAUSE_END.search(text, hit.position, hit.position + MAX_CLAUSE_CHARS)
        clause = text[hit.position : end.start() if end else hit.position + MAX_CLAUSE_CHARS]
        if _NEGATION_AFTER.search(clause) or _NEGATION_BEFORE.search(text[max(0, hit.position - 30) : hit.position]):
            continue
        every_option = len(keys) >= 3 and len(hit.letters) == len(keys)
        hits.append(_Hit(hit.position, hit.letters, hit.hedged or every_option))
    return hits


def _normalise(text: str) -> str:
    """Lower-case, single-spaced, without trailing sentence punctuation."""
    return _SPACES.sub(" ", _fold_width(text)).strip().lower().rstrip(".。;；")


def _restated_item_end(text: str, start: int, option_text: str) -> int:
    """Where the last item of a restated list ends: after its option text when it starts with it
    ("E. Anemia. So the answer is E." keeps the sentence after it), else at the end of its line."""
    tail = text[start:]
    wanted = _normalise(option_text)
    if wanted and _normalise(tail[: len(option_text) + 8]).startswith(wanted):
        match = re.match(r"\s*" + r"\s+".join(map(re.escape, wanted.split())) + r"[ \t]*[.;,。；]?", tail,
                         re.IGNORECASE)
        if match:
            return start + match.end()
    newline = text.find("\n", start)
    return len(text) if newline < 0 else newline


def _truncated_item(text: str, start: int, option_text: str) -> bool:
    """Whether the reply ends inside (or right after) this item: "B. Diab" of "B. Diabetes mellitus"."""
    tail = text[start:]
    return "\n" not in tail.strip() and _normalise(option_text).startswith(_normalise(tail))


def _list_item(text: str, marker: re.Match[str], option_text: str) -> bool:
    """Whether an item marker looks like part of an option list: it starts its line (after bullets or
    a '>' quote), or the option's text follows it (or the start of that text, where the reply ends)."""
    line_start = text.rfind("\n", 0, marker.start()) + 1
    if not text[line_start : marker.start()].strip(" \t-*•>"):
        return True
    wanted = _normalise(option_text)
    raw_tail = text[marker.end() : marker.end() + len(option_text) + 8]
    tail = _normalise(raw_tail)
    at_end = marker.end() + len(raw_tail) >= len(text)
    return bool(wanted) and (tail.startswith(wanted) or bool(at_end and tail and wanted.startswith(tail)))


def _option_list_spans(text: str, options: Mapping[str, str], keys: Mapping[str, str]) -> list[tuple[int, int]]:
    """Stretches of `text` that restate the options: runs of items with consecutive letters
    ("A. … B. … C. …", inline or one per line, "Option A: …", "（A）…"), at least three of them, or
    every option, or the first two when the first restates its option text and the reply ends in the
    second (a truncated list); and three or more lines that each hold nothing but an option's text.
    An item starts a line or restates its option's text, so "Vitamin B. Then C. Also D." is no list."""
    markers = [m for m in _ITEM_MARKER.finditer(text)
               if m.group("letter") in keys and _list_item(text, m, str(options[keys[m.group("letter")]]))]
    runs: list[list[re.Match[str]]] = []
    for marker in markers:
        if runs:
            previous = runs[-1][-1]
            between = text[previous.end() : marker.start()]
            if (ord(marker.group("letter")) == ord(previous.group("letter")) + 1
                    and _HAS_TEXT.search(between) and len(between) <= MAX_OPTION_ITEM_CHARS):
                runs[-1].append(marker)
                continue
        runs.append([marker])
    first_key = min(keys) if keys else ""
    spans = []
    for run in runs:
        last = run[-1]
        last_text = str(options[keys[last.group("letter")]])
        reaches_end = _truncated_item(text, last.end(), last_text)
        first = run[0]
        restates_first = _normalise(text[first.end() : run[1].start()] if len(run) > 1 else "").startswith(
            _normalise(str(options[keys[first.group("letter")]])))
        if len(run) >= 3 or len(run) == len(keys) >= 2 or (
            len(run) == 2 and first.group("letter") == first_key and restates_first and reaches_end
        ):
            spans.append((run[0].start(), _restated_item_end(text, last.end(), last_text)))

    # Option texts alone on their lines: "Hypertension\nDiabetes mellitus\nAsthma".
    texts = {_normalise(str(value)) for value in options.values()} - {""}
    offset, lines = 0, []
    for line in text.splitlines(keepends=True):
        if _normalise(_LINE_DECORATION.sub("", line)) in texts:
            lines.append((offset, offset + len(line)))
        offset += len(line)
    if len(lines) >= 3:
        spans += lines
    return spans


def _mask(text: str, spans: Iterable[tuple[int, int]]) -> str:
    """`text` with each span replaced by `_MASK` (overlapping spans merged)."""
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    for start, end in reversed(merged):
        text = text[:start] + _MASK + text[end:]
    return text


def _copied_question_spans(text: str, question: str) -> list[tuple[int, int]]:
    """The pieces of the question (sentences, lines) that the reply repeats word for word, when
    together they make at least `COPIED_QUESTION_SHARE` of the question; else none."""
    pieces = [p.strip() for p in _QUESTION_PIECES.split(_fold_width(question))]
    pieces = [p for p in pieces if len(p) >= MIN_COPIED_PIECE_CHARS]
    total = sum(len(p) for p in pieces)
    spans, copied = [], 0
    for piece in pieces:
        pattern = re.compile(r"\s+".join(map(re.escape, piece.split())), re.IGNORECASE)
        found = [(m.start(), m.end()) for m in pattern.finditer(text)]
        if found:
            spans += found
            copied += len(piece)
    return spans if total and copied >= COPIED_QUESTION_SHARE * total else []


def _standalone_letters(text: str, keys: Mapping[str, str]) -> _Hit | None:
    """The letters when the reply opens with nothing but a letter list ("B", "(B)", "B. Aspirin")."""
    match = _STANDALONE.match(text)
    if not match:
        return None
    letters = _letters_in_span(match.group("span"), keys)
    return _Hit(0, letters, bool(_HEDGED_SPAN.search(match.group("span")))) if letters else None


def _last_line_letters(text: str, keys: Mapping[str, str]) -> _Hit | None:
    """The letters when the reply's last line is nothing but a letter list ("…\n\nC.")."""
    lines = [line for line in text.splitlines() if line.strip()]
    match = _LONE_LAST_LINE.fullmatch(lines[-1]) if len(lines) > 1 else None
    if not match:
        return None
    letters = _letters_in_span(match.group("span"), keys)
    return _Hit(len(text), letters, bool(_HEDGED_SPAN.search(match.group("span")))) if letters else None


def _text_pattern(option_text: str) -> re.Pattern[str]:
    """Match a normalised option text, not inside a longer ASCII word ("iron" not in "environment")."""
    before = r"(?<![a-z0-9])" if option_text[:1].isascii() and option_text[:1].isalnum() else ""
    after = r"(?![a-z0-9])" if option_text[-1:].isascii() and option_text[-1:].isalnum() else ""
    return re.compile(before + re.escape(option_text) + after)


def _option_text_matches(text: str, options: Mapping[str, str]) -> frozenset[str]:
    """Options whose text occurs in the reply, longest texts first (an occurrence inside a longer
    matched option's text does not count)."""
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
    return frozenset(found)


def _closest_option(text: str, options: Mapping[str, str]) -> frozenset[str]:
    """The one option whose text is most similar to the reply (whole, last line or last sentence),
    if that similarity reaches `SIMILARITY_THRESHOLD` and no other option ties it."""
    whole = _normalise(text)
    lines = [line for line in (_normalise(raw) for raw in text.splitlines()) if line.strip("\x00 ")]
    sentences = [s for s in (_normalise(raw) for raw in _SENTENCE_END.split(text)) if s.strip("\x00 ")]
    candidates = {whole, lines[-1] if lines else "", sentences[-1] if sentences else ""} - {""}
    if not candidates:
        return _NO_LETTERS
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


def _committed(first: frozenset[str], last: frozenset[str]) -> AnswerCommitment:
    return AnswerCommitment(letters=last, first=first, category=COMMITTED)


def answer_commitment(reply: str, options: Mapping[str, str], question: str | None = None) -> AnswerCommitment:
    """Which options the reply commits to, and if none, why.

    Only the reply's final part counts (the last ``<answer>`` block, else the text after the last
    ``## Final Response``, else the whole reply). Restated option lists and, given `question`, a
    copy of the question are masked first: they name every option and choose none. Then, in order
    of strength: explicit answer statements (the first and the last one are kept), mentions of
    options the reply does not reject, a reply that is a lone letter (first or last line), the
    options whose text it names (not all of them), the one option whose text is closest to it.
    Letters held open ("A or C", "it could be A, B or C") are `CANDIDATES`, not an answer.
    """
    # Runs of spaces count as one space to every pattern here; collapsed, no pattern can split a long run of them
    # in many ways before it gives up.
    text = _SPACE_RUNS.sub(" ", _fold_width(_final_part(reply or ""))).strip()
    if not text or not options:
        return AnswerCommitment(_NO_LETTERS, _NO_LETTERS, NO_ANSWER)
    keys = _letter_keys(options)
    restated = _option_list_spans(text, options, keys)
    text = _mask(text, restated)
    copied = _copied_question_spans(text, question) if question else []
    text = _mask(text, copied)
    held_open = False

    for hits in (_hits(text, _STATEMENTS, keys) + _hits(text, _LOWER_STATEMENTS, keys, lower=True),
                 _mention_hits(text, keys)):
        chosen = sorted((hit for hit in hits if not hit.hedged), key=lambda hit: hit.position)
        if chosen:
            return _committed(chosen[0].letters, chosen[-1].letters)
        held_open = held_open or bool(hits)
    if held_open or _hits(text, _CANDIDATE_LISTS, keys):
        return AnswerCommitment(_NO_LETTERS, _NO_LETTERS, CANDIDATES)

    start, end = _standalone_letters(text, keys), _last_line_letters(text, keys)
    if start or end:
        first, last = start or end, end or start
        assert first is not None and last is not None
        if first.hedged or last.hedged:
            return AnswerCommitment(_NO_LETTERS, _NO_LETTERS, CANDIDATES)
        return _committed(first.letters, last.letters)

    named = _option_text_matches(text, options)
    if len(named) == len(options) > 1:  # every option named: a discussion of them all, no choice
        return AnswerCommitment(_NO_LETTERS, _NO_LETTERS, CANDIDATES)
    closest = named or _closest_option(text, options)
    if closest:
        return _committed(closest, closest)
    category = COPIED_QUESTION if copied else RESTATED_OPTIONS if restated else NO_ANSWER
    return AnswerCommitment(_NO_LETTERS, _NO_LETTERS, category)


def first_and_last_answers(
    reply: str, options: Mapping[str, str], question: str | None = None
) -> tuple[frozenset[str], frozenset[str]]:
    """The option keys named by the first and by the last explicit answer statement of the reply's
    final part; both are the same fallback (a lone letter, option text, closest option text) when
    the reply makes no explicit statement. Empty sets when it commits to nothing (see
    `answer_commitment`)."""
    commitment = answer_commitment(reply, options, question)
    return commitment.first, commitment.letters


def extract_answer(reply: str, options: Mapping[str, str], question: str | None = None) -> frozenset[str]:
    """The option keys the reply gives as its final answer; empty when it commits to none (a
    restated option list, a copied question, a list of candidates, a refusal: see `answer_commitment`)."""
    return answer_commitment(reply, options, question).letters


# ---------------------------------------------------------------------------------------------
# Judge verdicts and rendering
# ---------------------------------------------------------------------------------------------


JUDGE_VERDICT_WORDS = ("1", "2")
"""The Self-Play judge's one-token verdict: correct, wrong (its prompts say so)."""


def parse_judge_verdict(text: str) -> bool | None:
    """A judge reply's first non-space character: "1" -> True (correct), "2" -> False, else None."""
    stripped = _fold_width(text or "").strip()
    correct, wrong = JUDGE_VERDICT_WORDS
    if stripped.startswith(correct):
        return True
    if stripped.startswith(wrong):
        return False
    return None


def letters_text(letters: Iterable[str]) -> str:
    """Canonical rendering of option letters: unique, sorted, comma-separated ("A, C")."""
    return ", ".join(sorted(set(letters)))
