"""Rule rewards: plain functions of strings, never `eval` of model text.

Every reward returns a finite float in its documented range, never raises on any string, and stays
fast on adversarial input (megabyte strings, unbalanced tags, huge numbers): patterns are linear
(no nested quantifiers), scans are bounded, and numbers are parsed only from short strings.

    accuracy_reward(completion, answer)  {0, 1}   the extracted answer equals the gold answer
    format_reward(completion)            {0, 1}   <think>reasoning</think> <answer>answer</answer>, nothing
                                         [0, 1]   else (partial=True: steps of 0.25)
    thinking_reward(completion, ...)     [0, 1]   reasoning that is actually there: length in tokens,
                                                  no repetition, not the question or the answer again
    arithmetic_step_score(text, answer)  [0, 1]   share of true equations in the reasoning (None: none)
    countdown_reward(...)                {0, 1}   Countdown expression (safe_math, re-exported here)

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
from fractions import Fraction
from typing import Any, Callable, Mapping, Sequence

from nanopost.safe_math import countdown_reward, evaluate, normalize_operators, safe_eval

__all__ = [
    "extract_answer", "parse_number", "answers_match", "accuracy_reward", "format_reward",
    "thinking_reward", "arithmetic_step_score", "anneal_weight", "countdown_reward", "safe_eval",
    "RewardFn", "sample_reward", "combine_rewards",
]

THINK_TAGS = ("<think>", "</think>")
ANSWER_TAGS = ("<answer>", "</answer>")

_MAX_ANSWER_CHARS = 10_000  # longer strings are not answers; keeps normalisation cheap
_MAX_NUMBER_CHARS = 64      # a number longer than this is not compared numerically (and int() never sees
                            # a digit string near Python's 4300-digit limit)
_MAX_BOX_CHARS = 1_000      # how far to look for the closing brace of \boxed{

# ------------------------------------------------------------------------------------------ answers

# Written-out markers are looked for only in the tail of the text: regex scans cost ~30 ms per MB, and
# an "answer" followed by pages of further text is not a final answer anyway.
_TAIL_CHARS = 20_000
_HASHES = re.compile(r"####")
_ANSWER_IS = re.compile(r"\banswer[ \t]+is[ \t]*:?", re.IGNORECASE)
_ANSWER_LINE = re.compile(r"^[ \t]*(?:final[ \t]+answer|answer|a)[ \t]*:", re.IGNORECASE | re.MULTILINE)
_SENTENCE_END = re.compile(r"[.!?;,](?=\s|$)")  # "1,000" and "1.5" continue; ". " and ", " end
_BOX_OPEN = re.compile(r"\\boxed[ \t]*\{")
_BRACES = re.compile(r"[{}]")


def extract_answer(text: str, *, answer_tags: tuple[str, str] = ANSWER_TAGS) -> str | None:
    """The final answer written in `text` (priority order in the module docstring), stripped, or None.

    An empty answer ("<answer> </answer>") is None, not a reason to look elsewhere.
    """
    if not isinstance(text, str):
        return None
    for find in (lambda t: _from_tags(t, answer_tags), _last_boxed, _from_hashes, _from_answer_is,
                 _from_answer_line):
        found = find(text)
        if found is not None:
            return found.strip() or None
    return None


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


def _last_in_tail(marker: re.Pattern, text: str) -> str | None:
    """The rest of the line after the last `marker` in the tail of `text`."""
    tail = text[-_TAIL_CHARS:]
    last = None
    for last in marker.finditer(tail):
        pass
    if last is None:
        return None
    end = tail.find("\n", last.end())
    return tail[last.end():end if end >= 0 else len(tail)]


def _from_hashes(text: str) -> str | None:
    return _last_in_tail(_HASHES, text)


def _from_answer_is(text: str) -> str | None:
    found = _last_in_tail(_ANSWER_IS, text)
    return None if found is None else _clip_sentence(found)


def _from_answer_line(text: str) -> str | None:
    found = _last_in_tail(_ANSWER_LINE, text)
    return None if found is None else _clip_sentence(found)


def _clip_sentence(line: str) -> str:
    end = _SENTENCE_END.search(line)
    return line if end is None else line[:end.start()]


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


def accuracy_reward(completion: str, answer: str | int | float) -> float:
    """1.0 if the answer extracted from `completion` matches `answer` (see answers_match), else 0.0."""
    return 1.0 if answers_match(extract_answer(completion), answer) else 0.0


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
_CHARS_PER_TOKEN_LIMIT = 32  # reasoning longer than this many characters per allowed token is over-long
_PUNCTUATION = "\"'`.,;:!?()[]{}"


def thinking_reward(completion: str, *, question: str | None = None,
                    tokenize: Callable[[str], Sequence[Any]] | None = None, min_tokens: int = 32,
                    max_tokens: int = 1024, overlong_tokens: int | None = None, ngram: int = 3,
                    arithmetic_weight: float = 0.0, think_tags: tuple[str, str] = THINK_TAGS,
                    answer_tags: tuple[str, str] = ANSWER_TAGS,
                    prompt_opens_think: bool = False) -> float:
    """How much real reasoning the think block holds, in [0, 1].

    The reasoning is the content of the one think block (none, several or unclosed: 0). Marker words
    and list bullets are removed first, then it is tokenized (`tokenize`, default whitespace split;
    pass a tokenizer's encode to count model tokens) and scored

        quality * overlong * ((1 - w) * ramp + w * arithmetic)

    ramp         n / min_tokens, clamped to 1: pays for reasoning up to the window, never beyond
    overlong     1 up to max_tokens, falling linearly to 0 over the next `overlong_tokens` (default
                 max_tokens); so the score never increases past the window
    quality      distinct / total n-grams (repetition)  *  (1 - share of n-grams found in `question`)
                 *  (1 - share found after the think block, i.e. copied into the answer)
    arithmetic   arithmetic_step_score(reasoning, final answer), 0 when it has no equations; w is
                 `arithmetic_weight` (use it for arithmetic tasks, anneal it with anneal_weight)

    Without `question` a restated question cannot be recognised.
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
    ramp = min(1.0, n / min_tokens)
    overlong = min(1.0, (limit - n) / overlong_tokens)

    grams = _ngrams(tokens, ngram)
    quality = len(set(grams)) / len(grams)
    # The question and the text after the reasoning lose their markers too, so n-grams line up.
    if isinstance(question, str):
        question = _MARKERS.sub(" ", question[:_CHARS_PER_TOKEN_LIMIT * limit])
        quality *= 1.0 - _share_in(grams, tokenize(question))
    after = text[think[3]:think[3] + _CHARS_PER_TOKEN_LIMIT * limit]
    copied = _MARKERS.sub(" ", after.replace(answer_tags[0], " ").replace(answer_tags[1], " "))
    quality *= 1.0 - _share_in(grams, tokenize(copied))

    w = min(1.0, max(0.0, float(arithmetic_weight)))
    arithmetic = 0.0
    if w > 0:
        final = extract_answer(after, answer_tags=answer_tags)
        arithmetic = arithmetic_step_score(reasoning, final) or 0.0
    return _unit(quality * overlong * ((1.0 - w) * ramp + w * arithmetic))


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


_EQUATION_RUN = re.compile(r"[0-9.,+\-*/()=$ \t]+")  # maximal runs of arithmetic characters
_CLAUSE_BREAK = re.compile(r",\s")                    # "3 + 4 = 7, 7 * 2 = 14"
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_MAX_SCAN_CHARS = 20_000  # arithmetic_step_score reads the tail of longer texts
_MAX_EQUATIONS = 64       # ... and at most this many of the last equations
_MAX_EQUATION_CHARS = 512


def arithmetic_step_score(text: str, final_answer: str | None = None) -> float | None:
    """Share of the equations in `text` that are arithmetically true, in [0, 1]; None if there are none.

    An equation is a run of arithmetic written inline, `a op b = c`, or a chain `a + b = c * 2 = d`
    (true when every side has the same value); it needs at least one side that is not a bare number.
    Values are exact (safe_math, never eval); stray leading words such as a list number ("1. 2 * 3 = 6")
    are skipped, but an expression that parses is taken as written, right or wrong.
    With `final_answer`, the score is 0.5 * (share of true equations) + 0.5 * (the final answer
    equals the value the last equation arrives at).
    """
    if not isinstance(text, str):
        return None
    text = normalize_operators(text[-_MAX_SCAN_CHARS:])
    clauses = [clause for run in _EQUATION_RUN.findall(text) if "=" in run
               for clause in _CLAUSE_BREAK.split(run) if "=" in clause]
    steps = []  # (true?, value of the last side)
    for clause in clauses[-_MAX_EQUATIONS:]:
        step = _check_equation(clause) if len(clause) <= _MAX_EQUATION_CHARS else None
        if step is not None:
            steps.append(step)
    if not steps:
        return None
    share = sum(ok for ok, _ in steps) / len(steps)
    if final_answer is None:
        return share
    answer = parse_number(final_answer)
    if answer is None:
        answer = safe_eval(final_answer)
    return 0.5 * share + 0.5 * (answer is not None and answer == steps[-1][1])


def _check_equation(clause: str) -> tuple[bool, Fraction] | None:
    sides = [s.strip() for s in _THOUSANDS.sub("", clause.replace("$", "")).split("=")]
    while sides and not sides[0]:   # "x = 3 + 4 = 7" leaves an empty first side
        sides.pop(0)
    while sides and not sides[-1].rstrip("."):
        sides.pop()
    if len(sides) < 2 or any(not s for s in sides):
        return None
    parsed = [_edge(sides[0], from_left=True)]
    parsed += [evaluate(s) for s in sides[1:-1]]
    parsed.append(_edge(sides[-1].rstrip("."), from_left=False))
    if any(p is None for p in parsed) or all(len(literals) == 1 for _, literals in parsed):
        return None
    values = [value for value, _ in parsed]
    return all(v == values[0] for v in values), values[-1]


def _edge(side: str, *, from_left: bool) -> tuple[Fraction, list[Fraction]] | None:
    """Evaluate an outer side of an equation, dropping up to a few stray words at its far end."""
    words = side.split()
    for k in range(min(len(words), 4)):
        kept = words[k:] if from_left else words[:len(words) - k]
        result = evaluate(" ".join(kept))
        if result is not None:
            return result
    return None


def anneal_weight(step: int, total_steps: int, start: float, end: float,
                  kind: str = "linear") -> float:
    """A reward weight moved from `start` (step 0) to `end` (step >= total_steps), clamped outside.

    kind="linear" or "cosine" (half cosine: slow at both ends). Use it to fade a shaping reward such
    as thinking_reward out as the accuracy reward takes over.
    """
    progress = 1.0 if total_steps <= 0 else min(1.0, max(0.0, step / total_steps))
    if kind == "linear":
        return start + (end - start) * progress
    if kind == "cosine":
        return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f'anneal_weight: kind must be "linear" or "cosine", got {kind!r}')


# ---------------------------------------------------------------------------------------- combining

RewardFn = Callable[[str, Mapping[str, Any]], float | None]


def sample_reward(name: str, **options: Any) -> RewardFn:
    """A built-in reward in the uniform `fn(completion, sample)` form; options go to the reward.

    "accuracy"  sample["answer"]                       None when the sample has no answer
    "format"    -
    "thinking"  sample["question"] (or a str "prompt") for the restatement check
    "countdown" sample["numbers"], sample["target"]    None when either is missing
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
        def reward(completion: str, sample: Mapping[str, Any]) -> float | None:
            question = sample.get("question", sample.get("prompt"))
            return thinking_reward(completion, question=question if isinstance(question, str) else None,
                                   **options)
    elif name == "countdown":
        def reward(completion: str, sample: Mapping[str, Any]) -> float | None:
            if sample.get("numbers") is None or sample.get("target") is None:
                return None
            return countdown_reward(completion, sample["numbers"], sample["target"], **options)
    else:
        raise ValueError(f'sample_reward: unknown reward {name!r}; '
                         'expected "accuracy", "format", "thinking" or "countdown"')
    reward.__name__ = name
    return reward


def combine_rewards(completions: Sequence[str], samples: Sequence[Mapping[str, Any]],
                    funcs: Sequence[tuple[str, RewardFn, float]], *, group_size: int = 1,
                    mode: str = "sum", eps: float = 1e-6
                    ) -> tuple[list[float], dict[str, list[float | None]]]:
    """Score every completion with every named, weighted reward function and combine.

    A function with a `score_batch(completions, samples)` method (a model reward) is called once
    for the whole batch; if it returns (scores, {member: scores}) (an ensemble), the members'
    scores are logged too, as "name.member". `samples` holds one record per completion, or one per group of `group_size` consecutive
    completions (the prompts of a GRPO batch). Returns (total per completion, raw values per
    function name for logging; None where a function did not apply).

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
