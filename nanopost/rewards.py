"""Rule rewards: plain functions of strings, never `eval` of model text.

Every reward returns a finite float in its documented range, never raises on any string, and stays
fast on adversarial input (megabyte strings, unbalanced tags, huge numbers): patterns are linear
(no nested quantifiers), scans are bounded, and numbers are parsed only from short strings.

    accuracy_reward(completion, answer)  {0, 1}   the extracted answer equals the gold answer
    format_reward(completion)            {0, 1}   <think>reasoning</think> <answer>answer</answer>, nothing
                                         [0, 1]   else (partial=True: steps of 0.25)
    thinking_reward(completion, ...)     [0, 1]   reasoning that is really work: true, grounded, distinct
                                                  steps ending at the answer (free text: distinct content
                                                  words, no filler, repetition or copied question/answer)

Answer extraction, in priority order (the first kind found anywhere wins; within a kind the LAST
occurrence wins, because models revise themselves):
    1. <answer>...</answer>   the last closed block; a \\boxed{} inside it is unwrapped
    2. \\boxed{...}            the last one, nested braces balanced (an unclosed last box is no answer)
    3. "#### x"               rest of the line
    4. "the answer is x"      rest of the sentence (also "final answer is: x")
    5. "A: x" / "Answer: x"   at the start of a line, rest of the sentence
Markers 3-5 count only in the last 20,000 characters: an answer followed by more text
than that is not a final answer, and it keeps extraction linear and fast on megabyte inputs.
"the answer is" beats "A:": few-shot chain-of-thought answers read "A: <reasoning> The answer is x."

Several rewards are combined with `combine_rewards`, whose functions take one uniform signature,
`fn(completion, sample) -> float | None`, where `sample` is the data record ("answer", "question",
"numbers", "target", ...). None means "not applicable to this sample" and counts as 0.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections import Counter
from fractions import Fraction
from typing import Any, Callable, Mapping, Sequence

from nanopost.plumbing.safe_math import applies_identity, evaluate, normalize_operators, safe_eval

__all__ = [
    "extract_answer", "parse_number", "answers_match", "accuracy_reward", "format_reward", "thinking_reward",
    "RewardFn", "sample_reward", "combine_rewards",
]

THINK_TAGS = ("<think>", "</think>")
ANSWER_TAGS = ("<answer>", "</answer>")

_MAX_ANSWER_CHARS = 10_000  # longer strings are not answers; keeps normalisation cheap
_MAX_NUMBER_CHARS = 64      # a number longer than this is not compared numerically (and int() never sees
                            # a digit string near Python's 4300-digit limit)
_MAX_BOX_CHARS = 1_000      # how far to look for the closing brace of \boxed{

# ------------------------------------------------------------------------------------------ answers

def accuracy_reward(completion: str, answer: str | int | float) -> float:
    """1.0 if the answer extracted from `completion` matches `answer` (see answers_match), else 0.0."""
    return 1.0 if answers_match(extract_answer(completion), answer) else 0.0


# Written-out markers are looked for only in the tail of the text: a regex scan costs time in
# proportion to the text it reads, and an "answer" followed by pages of further text is not a
# final answer anyway.
_TAIL_CHARS = 20_000
_HASHES = re.compile(r"####")
_ANSWER_IS = re.compile(r"\banswer[ \t]+is[ \t]*:?", re.IGNORECASE)
_ANSWER_LINE = re.compile(r"^[ \t]*(?:final[ \t]+answer|answer|a)[ \t]*:", re.IGNORECASE | re.MULTILINE)
_SENTENCE_END = re.compile(r"[.!?;,](?=\s|$)")  # "1,000" and "1.5" continue; ". " and ", " end
# Markers 3-5 of the module docstring, in priority order: (marker, the answer ends with its sentence).
_TAIL_MARKERS = ((_HASHES, False), (_ANSWER_IS, True), (_ANSWER_LINE, True))
_BOX_OPEN = re.compile(r"\\boxed[ \t]*\{")
_BRACES = re.compile(r"[{}]")


def extract_answer(text: str, *, answer_tags: tuple[str, str] = ANSWER_TAGS) -> str | None:
    """The final answer written in `text` (priority order in the module docstring), stripped, or None.

    An empty answer ("<answer> </answer>") is None, not a reason to look elsewhere.
    """
    if not isinstance(text, str):
        return None
    found = _from_tags(text, answer_tags)
    if found is None:
        found = _last_boxed(text)
    for marker, to_sentence_end in _TAIL_MARKERS:
        if found is None:
            found = _last_in_tail(marker, text, to_sentence_end)
    return None if found is None else found.strip() or None


def _from_tags(text: str, tags: tuple[str, str]) -> str | None:
    end = text.rfind(tags[1])
    start = text.rfind(tags[0], 0, end) if end >= 0 else -1
    if start < 0:
        return None
    content = text[start + len(tags[0]):end]
    boxed = _last_boxed(content)
    return content if boxed is None else boxed


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed")
    opened = _BOX_OPEN.match(text, start) if start >= 0 else None
    if opened is None:
        return None
    depth = 1
    for brace in _BRACES.finditer(text, opened.end(), opened.end() + _MAX_BOX_CHARS):
        depth += 1 if brace.group() == "{" else -1
        if depth == 0:
            return text[opened.end():brace.start()]
    return None


def _last_in_tail(marker: re.Pattern, text: str, to_sentence_end: bool) -> str | None:
    """The rest of the line after the last `marker` in the tail of `text`, or of its sentence."""
    tail = text[-_TAIL_CHARS:]
    last = None
    for last in marker.finditer(tail):
        pass
    if last is None:
        return None
    end = tail.find("\n", last.end())
    line = tail[last.end():end if end >= 0 else len(tail)]
    stop = _SENTENCE_END.search(line) if to_sentence_end else None
    return line if stop is None else line[:stop.start()]


def answers_match(pred: str | None, gold: str | int | float | None) -> bool:
    """True if two answers are the same: numerically when both are numbers, else as text.

    Numbers are compared exactly (Fraction): "18" = "18.0" = "$18" = "18.00", "1,000" = "1000",
    "3/4" = "0.75", "-5" = "−5"; "18" != "180" and "1.5" != "15". Text is compared after removing
    case, repeated whitespace, surrounding quotes, math delimiters and a final period.
    """
    if pred is None or gold is None:
        return False
    try:
        pred, gold = str(pred), str(gold)
    except ValueError:  # an int too large to print (Python's 4300-digit limit) is no answer
        return False
    if len(pred) > _MAX_ANSWER_CHARS or len(gold) > _MAX_ANSWER_CHARS:
        return False
    a, b = parse_number(pred), parse_number(gold)
    if a is not None and b is not None:
        return a == b
    a_text, b_text = _normalize_text(pred), _normalize_text(gold)
    return a_text != "" and a_text == b_text


_WRAPPERS = (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"), ("**", "**"))
_TEXT_COMMAND = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\{([^{}]*)\}")
_ASSIGNMENT = re.compile(r"[a-zA-Z][ \t]*=[ \t]*")              # "x = 18"
_CURRENCY = "$€£¥"
# One unit word after a number is dropped ("18 dollars"), unless the word changes the value.
_SUFFIX = re.compile(r"(.*?[\d.])[ \t]*(%|percent|°|\^\\circ|\^\{\\circ\}|[a-zA-Z]{2,20}\.?)",
                     re.IGNORECASE)
_NOT_UNITS = {"hundred", "thousand", "million", "billion", "trillion", "dozen", "pi", "sqrt", "log"}
_DECIMAL = re.compile(r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?|\.\d+")   # "1,000.5", "18", "18.", ".5"
_FRACTION = re.compile(r"(\d{1,20})[ \t]*/[ \t]*(\d{1,20})")
_LATEX_FRACTION = re.compile(r"\\[dt]?frac\{[ \t]*(\d{1,20})[ \t]*\}\{[ \t]*(\d{1,20})[ \t]*\}")


def parse_number(text: str) -> Fraction | None:
    """Exact value of a number written as an answer, or None if `text` is not just a number.

    Accepts "18", "18.00", "-5", "−5" (unicode minus), "1,000" (groups of three only), "3/4",
    "\\frac{3}{4}", "$18", "-$18", "x = 18", "50%", "50 percent", "90°", "18 dollars" (one unit word;
    "5 thousand" is not 5). A percent sign is dropped, not divided: "50%" is 50, never 0.5.
    No exponents ("1e5"), no mixed numbers ("1 1/2").
    """
    if not isinstance(text, str) or len(text) > _MAX_ANSWER_CHARS:
        return None
    s = _unwrap(text)
    if len(s) > _MAX_NUMBER_CHARS:
        return None
    s = unicodedata.normalize("NFKC", s).replace("\u2212", "-").replace("\u2044", "/")
    for old, new in (("\\!", ""), ("\\,", ""), ("\\ ", " "), ("{,}", ","), ("\\$", "$"), ("\\%", "%")):
        s = s.replace(old, new)
    assignment = _ASSIGNMENT.match(s)
    if assignment is not None:
        s = s[assignment.end():]
    sign, s = _take_sign(s.strip())
    s = s.lstrip(_CURRENCY).strip()
    if not sign:
        sign, s = _take_sign(s)
    suffix = _SUFFIX.fullmatch(s)
    if suffix is not None and suffix.group(2).lower().rstrip(".") not in _NOT_UNITS:
        s = suffix.group(1)
    if _DECIMAL.fullmatch(s):
        value = Fraction(s.replace(",", ""))
    elif (m := _FRACTION.fullmatch(s) or _LATEX_FRACTION.fullmatch(s)) is not None:
        if int(m.group(2)) == 0:
            return None
        value = Fraction(int(m.group(1)), int(m.group(2)))
    else:
        return None
    return -value if sign == "-" else value


def _take_sign(s: str) -> tuple[str, str]:
    return (s[0], s[1:].lstrip()) if s[:1] in ("-", "+") else ("", s)


def _normalize_text(s: str) -> str:
    s = unicodedata.normalize("NFKC", _unwrap(s)).lower()
    s = " ".join(s.split()).strip("\"'`")
    if len(s) == 3 and s[0] == "(" and s[2] == ")":  # multiple choice "(b)" is "b"
        s = s[1]
    return s


def _unwrap(s: str) -> str:
    """Strip presentation around an answer: $..$, \\(..\\), **..**, \\boxed{..}, \\text{..}, final '.'."""
    s = _TEXT_COMMAND.sub(r"\1", s).strip()
    for _ in range(4):  # wrappers nest at most a few deep ("$\\boxed{18}$.")
        before = s
        for left, right in _WRAPPERS:
            if len(s) >= len(left) + len(right) and s.startswith(left) and s.endswith(right):
                s = s[len(left):len(s) - len(right)].strip()
        opened = _BOX_OPEN.match(s)
        if opened is not None and s.count("\\boxed") == 1:
            boxed = _last_boxed(s)
            if boxed is not None and opened.end() + len(boxed) == len(s) - 1:  # the box is all of s
                s = boxed.strip()
        s = s.rstrip(".").strip()
        if s == before:
            break
    return s


# ------------------------------------------------------------------------------------------- format

def _block(text: str, open_tag: str, close_tag: str) -> tuple[int, int, int, int] | None:
    """(open start, content start, content end, close end) of the one non-empty block, or None
    if the tags do not appear exactly once each, in order, around non-whitespace content."""
    if text.count(open_tag) != 1 or text.count(close_tag) != 1:
        return None
    start, end = text.find(open_tag), text.find(close_tag)
    inner = start + len(open_tag)
    if end < inner or not text[inner:end].strip():
        return None
    return start, inner, end, end + len(close_tag)


def format_reward(completion: str, *, think_tags: tuple[str, str] = THINK_TAGS,
                  answer_tags: tuple[str, str] = ANSWER_TAGS, prompt_opens_think: bool = False,
                  partial: bool = False) -> float:
    """1.0 for `<think>reasoning</think> <answer>answer</answer>` and nothing else, else 0.0.

    Exactly one think block then exactly one answer block, both non-empty; only whitespace before
    the think block, between the blocks and after the answer block (pass the completion without its
    stop token). With `prompt_opens_think=True` the prompt already ends with the think open tag, so
    the completion starts inside the reasoning (writing the open tag again is a duplicate).

    `partial=True` pays 0.25 for each of: a well-formed think block; a well-formed answer block;
    both in order with only whitespace around them up to the answer; only whitespace after the
    answer (counted only when the previous check holds). So an answer alone is 0.25, trailing text
    after a good pair is 0.75, and 1.0 is exactly the strict format.
    """
    if not isinstance(completion, str):
        return 0.0
    text = think_tags[0] + completion if prompt_opens_think else completion
    think = _block(text, *think_tags)
    answer = _block(text, *answer_tags)
    ordered = (think is not None and answer is not None and think[3] <= answer[0]
               and not text[:think[0]].strip() and not text[think[3]:answer[0]].strip())
    clean_end = ordered and not text[answer[3]:].strip()
    if not partial:
        return 1.0 if clean_end else 0.0
    return 0.25 * ((think is not None) + (answer is not None) + ordered + clean_end)


# ----------------------------------------------------------------------------------------- thinking

# Words that announce reasoning without being reasoning. They are removed before anything is
# counted, so adding them never raises the score ("First, Second, Finally" alone scores 0).
_MARKERS = re.compile(
    r"^[ \t]*(?:\d{1,3}[.)]|[-*•#>]+)(?=\s|$)"                # list numbers and bullets
    r"|(?<!\S)[.…,;:!?~_|\"'`]+(?!\S)"                        # free-standing punctuation, "..."
    r"|\b(?:step[ \t]*\d*|first(?:ly)?|second(?:ly)?|third(?:ly)?|fourth|fifth|next|then|finally"
    r"|lastly|so|therefore|thus|hence|now|also|okay|ok|hmm+|wait|let['’]?s[ \t]+think(?:[ \t]+step"
    r"[ \t]+by[ \t]+step)?|in[ \t]+conclusion|to[ \t]+summarize)\b[ \t]*[:,.]?",
    re.IGNORECASE | re.MULTILINE)
# Words that pad text without carrying content: removed before free-text reasoning is counted.
_FILLER = re.compile(
    r"\b(?:um+|uh+|er+|hm+|well|like|basically|actually|really|very|just|clearly|obviously|simply"
    r"|carefully|careful|indeed|definitely|certainly|surely|quite|think|thinking|thought|consider"
    r"|let|me|us|we|i|you|need|must|should|will|can|be|is|are|was|am|it|this|that|the|a|an|of|to"
    r"|and|or|about|here|again|more|some|all|answer|question|problem|solve|solution)\b",
    re.IGNORECASE)
_NO_LETTERS = re.compile(r"(?<!\S)(?:(?=\S)[\W\d_])+(?!\S)")  # words without a letter: numbers, symbols
_CHARS_PER_TOKEN_LIMIT = 32  # reasoning longer than this many characters per allowed token is over-long
_MAX_QUESTION_CHARS = 4_000  # only the start of a question is read; real questions are shorter
_PUNCTUATION = "\"'`.,;:!?()[]{}"


def thinking_reward(completion: str, *, question: str | None = None, steps: str | Sequence[str] | None = None,
                    tokenize: Callable[[str], Sequence[Any]] | None = None, min_tokens: int = 16,
                    max_tokens: int = 1024, overlong_tokens: int | None = None, ngram: int = 3,
                    arithmetic_weight: float = 0.0, think_tags: tuple[str, str] = THINK_TAGS,
                    answer_tags: tuple[str, str] = ANSWER_TAGS,
                    prompt_opens_think: bool = False) -> float:
    """How much real, grounded reasoning the think block holds, in [0, 1].

    The reasoning is the content of the one think block (none, several or unclosed: 0). It is scored
    by its equations when it has any (arithmetic), else as free text; either way times `overlong`
    (1 up to max_tokens tokens, falling linearly to 0 over the next `overlong_tokens`, default
    max_tokens; tokens as given by `tokenize`, default whitespace split) and times (1 - share of its
    word n-grams and of its steps copied after the think block, e.g. into the answer).

    Arithmetic. Each distinct equation is a step (safe_math, never eval). A step pays when it is
    true, grounded (every number it starts from is a number of `question`, digits or a number word
    like "half" or "dozen", or the result of an earlier step, each used at most as often as it is
    available) and not a no-op (x + 0, x * 1, x - 0, x / 1, unless that 0 or 1 is given or reached;
    "x = x"; "3 + 8 = 8 + 3", which arrives at no number). Repeating a step adds nothing, and no
    count of steps pays: the score is

        paid / steps  *  (0.25 + 0.75 * ends)  *  coverage

    ends      the final answer is the result of the last paid step
    coverage  share of the question's numbers in digits that the paid steps use or reach (stopping
              half-way does not pay: "4 * 2 = 8" with answer 8 covers 2 of 3); with `steps`
              (the task's own solution, "37 + 48 = 85\\n85 - 19 = 66" or a list of equations), share
              of those steps' results that the paid steps reach
    So `4 * 2 = 8`, `3 + 8 = 11` for "3 + 4 * 2" with answer 11 scores 1.0. Without `question`,
    grounding cannot be checked and every number counts as given.

    Free text (no equations). Counts distinct content tokens after removing marker words, filler
    words and anything without a letter (numbers, counting, symbols): their number over
    `min_tokens`, clamped to 1, times (distinct / total n-grams) for repetition, times (1 - share of
    n-grams found in `question`). With `arithmetic_weight` w, free text pays at most 1 - w (use w = 1
    for tasks whose reasoning should be arithmetic).
    """
    if not isinstance(completion, str) or min_tokens < 1 or max_tokens < min_tokens:
        return 0.0
    overlong_tokens = max_tokens if overlong_tokens is None else max(1, overlong_tokens)
    limit = max_tokens + overlong_tokens
    text = think_tags[0] + completion if prompt_opens_think else completion
    think = _block(text, *think_tags)
    if think is None or think[2] - think[1] > _CHARS_PER_TOKEN_LIMIT * limit:
        return 0.0
    tokenize = tokenize or str.split
    reasoning = text[think[1]:think[2]]
    tokens = tokenize(_MARKERS.sub(" ", reasoning))
    n = len(tokens)
    if n == 0 or n >= limit:
        return 0.0
    overlong = min(1.0, (limit - n) / overlong_tokens)
    after = text[think[3]:think[3] + _CHARS_PER_TOKEN_LIMIT * limit]
    # Words copied after the reasoning (into the answer) are not reasoning. Only words count: a
    # Countdown answer "4 + 4 + 8" may well repeat the numbers of the steps.
    # Looked for in a window twice the reasoning's length: a copy fits there, and it keeps this fast.
    near = after[:2 * len(reasoning) + 1_000]
    words = tokenize(_content(reasoning))
    copied = _content(near.replace(answer_tags[0], " ").replace(answer_tags[1], " "))
    not_copied = 1.0 - _share_in(_ngrams(words, ngram), tokenize(copied)) if len(words) else 1.0
    if isinstance(question, str):
        question = question[:_MAX_QUESTION_CHARS]

    chain = _parse_steps(reasoning)
    if chain:
        final = extract_answer(after, answer_tags=answer_tags)
        # Steps written again after the reasoning (into the answer) are copies, not work.
        again = {_step_key(step) for step in _equations(near)}
        not_copied *= 1.0 - sum(_step_key(step) in again for step in chain) / len(chain)
        score = _grounded_score(chain, final, question, steps)
    else:
        score = (1.0 - min(1.0, max(0.0, float(arithmetic_weight)))) * _text_score(
            reasoning, question, tokenize, min_tokens, ngram)
    return _unit(overlong * not_copied * score)


def _content(text: str) -> str:
    """`text` without marker words, filler words and words that hold no letter."""
    return _NO_LETTERS.sub(" ", _FILLER.sub(" ", _MARKERS.sub(" ", text)))


def _grounded_score(chain: list[tuple], final: str | None, question: str | None,
                    steps: str | Sequence[str] | None) -> float:
    """The arithmetic score of thinking_reward (see its docstring) for the parsed steps."""
    given, written = _question_numbers(question) if question is not None else (None, None)
    results: Counter = Counter()
    used: set = set()
    paid_last = None
    paid = 0
    for ok, operands, result, no_op, source, repeated in chain:
        need = Counter(abs(v) for v in operands)
        grounded = given is None or all(need[v] <= given[v] + results[v] for v in need)
        # x + 0 is no work, unless the 0 is given or was reached ("Compute 4 - 0 + 7", "7 - 7 = 0").
        if ok and grounded and not no_op and not applies_identity(source, [*(given or ()), *results]):
            # A repeated step pays nothing again, but its result is there twice ("8 - 2 = 6" twice,
            # then "6 + 6 = 12").
            paid += not repeated
            paid_last = result
            used.update(need)
            used.add(abs(result))
            results[abs(result)] += 1
    answer = None if final is None else parse_number(final)
    if answer is None and final is not None:
        answer = safe_eval(final)
    ends = answer is not None and paid_last is not None and answer == paid_last
    if steps is not None:
        reference = _parse_steps(steps if isinstance(steps, str) else "\n".join(map(str, steps)))
        wanted = {abs(step[2]) for step in reference}
    else:
        wanted = set(written) if written else set()
    coverage = len(wanted & used) / len(wanted) if wanted else 1.0
    return paid / sum(not step[-1] for step in chain) * (0.25 + 0.75 * ends) * coverage


# A number in a question: "1,000", "3.5", "48"; number words count too ("half as many": 2).
_QUESTION_NUMBER = re.compile(r"(?<![\d.])\d{1,32}(?:,\d{3})*(?:\.\d+)?")
_NUMBER_WORDS = {"zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
                 "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12, "twenty": 20, "hundred": 100,
                 "thousand": 1000, "half": 2, "twice": 2, "double": 2, "doubles": 2, "third": 3,
                 "triple": 3, "thrice": 3, "quarter": 4, "dozen": 12, "percent": 100, "%": 100}
_WORD = re.compile(r"[a-zA-Z]+|%")


def _question_numbers(question: str) -> tuple[Counter, Counter]:
    """(numbers a step may start from, the numbers written in digits, which a solution should use)."""
    question = question[:_MAX_QUESTION_CHARS]
    written = Counter(m.group().replace(",", "") for m in _QUESTION_NUMBER.finditer(question))
    digits = Counter({Fraction(text): count for text, count in written.items()})
    words = Counter(_NUMBER_WORDS[w] for w in map(str.lower, _WORD.findall(question)) if w in _NUMBER_WORDS)
    return digits + Counter({Fraction(value): count for value, count in words.items()}), digits


def _text_score(reasoning: str, question: str | None, tokenize: Callable[[str], Sequence[Any]],
                min_tokens: int, ngram: int) -> float:
    """Free-text reasoning: distinct content tokens up to min_tokens, less repetition and restating."""
    tokens = tokenize(_content(reasoning))
    if not len(tokens):
        return 0.0
    keys = {t.lower().strip(_PUNCTUATION) if isinstance(t, str) else t for t in tokens}
    ramp = min(1.0, len(keys - {""}) / min_tokens)
    grams = _ngrams(tokens, ngram)
    quality = len(set(grams)) / len(grams)
    if question is not None:
        quality *= 1.0 - _share_in(grams, tokenize(_content(question)))
    return ramp * quality


def _ngrams(tokens: Sequence[Any], n: int) -> list[tuple]:
    keys = [t.lower().strip(_PUNCTUATION) if isinstance(t, str) else t for t in tokens]
    n = max(1, min(n, len(keys)))
    return [tuple(keys[i:i + n]) for i in range(len(keys) - n + 1)]


def _share_in(grams: list[tuple], other_tokens: Sequence[Any]) -> float:
    """Fraction of `grams` that also occur in `other_tokens` (as n-grams of the same length)."""
    if not grams or not other_tokens:
        return 0.0
    other = set(_ngrams(other_tokens, len(grams[0]))) if len(other_tokens) >= len(grams[0]) else set()
    return sum(g in other for g in grams) / len(grams)


def _unit(x: float) -> float:
    return min(1.0, max(0.0, x)) if math.isfinite(x) else 0.0


def _parse_steps(text: str) -> list[tuple[bool, list[Fraction], Fraction, bool, str, bool]]:
    """The equations of `text`, each with a last field that is True where it repeats an earlier one."""
    seen, steps = set(), []
    for step in _equations(text):
        key = _step_key(step)
        steps.append((*step, key in seen))
        seen.add(key)
    return steps


def _step_key(step: tuple) -> tuple:
    """What makes two steps the same: true or not, the expression (spacing aside), the result."""
    return step[0], "".join(step[4].split()), step[2]


_EQUATION_RUN = re.compile(r"[0-9.,+\-*/()=$ \t]+")  # maximal runs of arithmetic characters
_CLAUSE_BREAK = re.compile(r",\s")                    # "3 + 4 = 7, 7 * 2 = 14"
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_MAX_SCAN_CHARS = 20_000  # _equations reads the tail of longer texts
_MAX_EQUATIONS = 64       # ... and at most this many of the last equations
_MAX_EQUATION_CHARS = 512


def _equations(text: str) -> list[tuple[bool, list[Fraction], Fraction, bool, str]]:
    """(true?, numbers the step starts from, value of its last side, arrives at no number?, the
    expression it starts from) for each equation.

    An equation is a run of arithmetic written inline, `a op b = c`, or a chain `a + b = c * 2 = d`
    (true when every side has the same value); it needs at least one side that is not a bare number.
    Values are exact (safe_math, never eval); stray leading words such as a list number ("1. 2 * 3 = 6")
    are skipped, but an expression that parses is taken as written, right or wrong."""
    text = normalize_operators(text[-_MAX_SCAN_CHARS:])
    clauses = [clause for run in _EQUATION_RUN.findall(text) if "=" in run
               for clause in _CLAUSE_BREAK.split(run) if "=" in clause]
    steps = []
    for clause in clauses[-_MAX_EQUATIONS:]:
        step = _check_equation(clause) if len(clause) <= _MAX_EQUATION_CHARS else None
        if step is not None:
            steps.append(step)
    return steps


def _check_equation(clause: str) -> tuple[bool, list[Fraction], Fraction, bool, str] | None:
    sides = [s.strip() for s in _THOUSANDS.sub("", clause.replace("$", "")).split("=")]
    while sides and not sides[0]:   # "x = 3 + 4 = 7" leaves an empty first side
        sides.pop(0)
    while sides and not sides[-1].rstrip("."):
        sides.pop()
    if len(sides) < 2 or any(not s for s in sides):
        return None
    parsed = [_edge(sides[0], from_left=True)]
    parsed += [(*r, s) if (r := evaluate(s)) is not None else None for s in sides[1:-1]]
    parsed.append(_edge(sides[-1].rstrip("."), from_left=False))
    if any(p is None for p in parsed) or all(len(literals) == 1 for _, literals, _ in parsed):
        return None
    values = [value for value, _, _ in parsed]
    # The work starts from the first side that computes something; later sides rewrite it, and the
    # last side is the number it arrives at. "3 + 8 = 8 + 3" or "11 = 8 + 3" arrive at no new number,
    # and "12 + 0 = 12" changes nothing: no-ops, never paid.
    _, operands, source = next(p for p in parsed if len(p[1]) > 1)
    no_op = len(parsed[-1][1]) != 1 or len(parsed[0][1]) == 1
    return all(v == values[0] for v in values), operands, values[-1], no_op, source


def _edge(side: str, *, from_left: bool) -> tuple[Fraction, list[Fraction], str] | None:
    """Evaluate an outer side of an equation, dropping up to a few stray words at its far end."""
    words = side.split()
    for k in range(min(len(words), 4)):
        kept = " ".join(words[k:] if from_left else words[:len(words) - k])
        result = evaluate(kept)
        if result is not None:
            return (*result, kept)
    return None


# ---------------------------------------------------------------------------------------- combining

RewardFn = Callable[[str, Mapping[str, Any]], float | None]


def sample_reward(name: str, **options: Any) -> RewardFn:
    """A built-in reward in the uniform `fn(completion, sample)` form; options go to the reward.

    "accuracy"  sample["answer"]                       None when the sample has no answer
    "format"    -
    "thinking"  sample["question"] (or a str "prompt"): the numbers steps may start from;
                option reference_steps=True: coverage of sample["reasoning"], the task's solution
    """
    if name == "accuracy":
        if options:
            raise TypeError(f"sample_reward: accuracy takes no options, got {sorted(options)}")

        def reward(completion: str, sample: Mapping[str, Any]) -> float | None:
            answer = sample.get("answer")
            return None if answer is None else accuracy_reward(completion, answer)
    elif name == "format":
        def reward(completion: str, sample: Mapping[str, Any]) -> float | None:
            return format_reward(completion, **options)
    elif name == "thinking":
        # reference_steps=True checks coverage of the task's own solution steps, sample["reasoning"]
        # (arithmetic: the one left-to-right chain; not for Countdown, whose puzzles have many).
        reference = options.pop("reference_steps", False)

        def reward(completion: str, sample: Mapping[str, Any]) -> float | None:
            question = sample.get("question", sample.get("prompt"))
            steps = sample.get("reasoning") if reference else None
            return thinking_reward(completion, question=question if isinstance(question, str) else None,
                                   steps=steps if isinstance(steps, str) else None, **options)
    else:
        raise ValueError(f'sample_reward: unknown reward {name!r}; '
                         'expected "accuracy", "format" or "thinking"')
    reward.__name__ = name
    return reward


def combine_rewards(completions: Sequence[str], samples: Sequence[Mapping[str, Any]],
                    funcs: Sequence[tuple[str, RewardFn, float]], *, group_size: int = 1,
                    mode: str = "sum", eps: float = 1e-6
                    ) -> tuple[list[float], dict[str, list[float | None]]]:
    """Score every completion with every named, weighted reward function and combine.

    A function with a `score_batch(completions, samples)` method (a model reward) is called once
    for the whole batch; if it returns (scores, {member: scores}) (an ensemble), the members'
    scores are logged too, as "name.member". `samples` holds one record per completion, or one per
    group of `group_size` consecutive completions (the prompts of a GRPO batch). Returns (total per
    completion, raw values per function name for logging; None where a function did not apply).

    mode="sum":            total = sum_k w_k * r_k, with None as 0. Group normalisation happens
                           afterwards, in grpo.group_advantages (the GRPO / TRL default).
    mode="normalize_each": each function's rewards are standardised within each group,
                           (r - group mean) / (group std + eps), std unbiased (n - 1), over the
                           values that are not None (None and groups with fewer than two values
                           count 0), then weighted and summed: a reward with a small spread
                           counts as much as one with a large spread instead of being drowned.
    """
    n = len(completions)
    if group_size < 1 or n % group_size:
        raise ValueError(f"combine_rewards: {n} completions do not split into groups of {group_size}")
    if len(samples) == n // group_size and len(samples) != n:
        samples = [s for s in samples for _ in range(group_size)]
    if len(samples) != n:
        raise ValueError(f"combine_rewards: {len(samples)} samples for {n} completions "
                         f"(need one per completion or one per group of {group_size})")
    if mode not in ("sum", "normalize_each"):
        raise ValueError(f'combine_rewards: mode must be "sum" or "normalize_each", got {mode!r}')
    names = [name for name, _, _ in funcs]
    if len(set(names)) != len(names):
        raise ValueError(f"combine_rewards: reward names must be unique, got {names}")

    per_function: dict[str, list[float | None]] = {}
    total = [0.0] * n
    for name, fn, weight in funcs:
        # A model reward scores the whole batch in one pass instead of one forward per completion;
        # an ensemble also returns each member's scores, logged as "name.member".
        raw = fn.score_batch(completions, samples) if hasattr(fn, "score_batch") else [
            fn(c, s) for c, s in zip(completions, samples)]
        if isinstance(raw, tuple):
            raw, members = raw
            per_function.update({f"{name}.{m}": list(v) for m, v in members.items()})
        values = [_checked(name, i, v) for i, v in enumerate(raw)]
        per_function[name] = values
        scored = _normalize_groups(values, group_size, eps) if mode == "normalize_each" else values
        for i, v in enumerate(scored):
            if v is not None:
                total[i] += weight * v
    return total, per_function


def _checked(name: str, index: int, value: Any) -> float | None:
    if value is None:
        return None
    try:  # a string is a bug in the reward function, even when it spells a number
        number = math.nan if isinstance(value, (str, bytes)) else float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ValueError(f"combine_rewards: reward {name!r} returned {value!r} for completion {index}")
    return number


def _normalize_groups(values: list[float | None], group_size: int, eps: float) -> list[float]:
    out = [0.0] * len(values)
    for g in range(0, len(values), group_size):
        idx = [i for i in range(g, g + group_size) if values[i] is not None]
        if len(idx) < 2:
            continue
        mean = sum(values[i] for i in idx) / len(idx)
        std = math.sqrt(sum((values[i] - mean) ** 2 for i in idx) / (len(idx) - 1))
        if std == 0.0:  # all equal: no signal in this group
            continue
        for i in idx:
            out[i] = (values[i] - mean) / (std + eps)
    return out
