"""Chat templates rendered in plain Python, without a Jinja engine.

A Hugging Face tokenizer carries its chat format as a Jinja template. Running arbitrary templates
needs a Jinja interpreter; rendering the few formats we post-train is a page of Python. This module
reads the template string, recognises which family it belongs to, and renders a conversation to
exactly the text transformers' `apply_chat_template` produces for that template:

    chatml     <|im_start|>{role}\\n{content}<|im_end|>\\n per message. Covers plain ChatML, and
               the Qwen2 and Qwen2.5 templates, which add a default system message (read from the
               template itself) when the conversation does not start with one.
    qwen3      ChatML with Qwen3's <think> handling: assistant turns after the last user query
               keep their reasoning in a <think> block (the final turn always gets one), earlier
               turns lose it. The generation prompt follows the template: an empty think block
               on enable_thinking=False, an opened <think> (2507 thinking models), or nothing.
    llama3     <|start_header_id|>{role}<|end_header_id|>\\n\\n{content stripped}<|eot_id|>,
               bos_token first (Llama 3).
    llama3.1   Llama 3 plus the system block with "Cutting Knowledge Date" and "Today Date"
               (Llama 3.1, 3.2, 3.3).

Recognition is strict. A template must write no text outside its {{ }} and {% %} tags once
Jinja's whitespace rules (as transformers configures them) are applied, and must contain, up to
whitespace, every statement that decides what its family renders. Anything else raises
ValueError saying what was found, and naming the override; nothing is guessed. A fine-tuned
checkpoint often carries a lightly edited template: `chat_format_override(family)` renders it as
the named family instead (`--chat-format` in the scripts), with that family's defaults.
Only plain conversations are rendered:
system / user / assistant messages with string content (and, for Qwen3, an optional
reasoning_content); tools, tool calls and multimodal content are rejected.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Literal

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content", "reasoning_content")

SUPPORTED = (
    "plain ChatML, Qwen2-style ChatML with a default system prompt, Qwen2.5, "
    "Qwen3 (incl. the 2507 thinking variant), Llama 3, Llama 3.1/3.2/3.3"
)

# The token each family closes a turn with: the last token of every reply the model writes, so
# both what SFT teaches the model to end with and a token sampling stops on.
END_OF_TURN = {
    "chatml": "<|im_end|>",
    "qwen3": "<|im_end|>",
    "llama3": "<|eot_id|>",
    "llama3.1": "<|eot_id|>",
}
FAMILIES = tuple(END_OF_TURN)
# The scripts' --chat-format option: its type (checked when parsed) and its help.
ChatFormatName = Literal["chatml", "qwen3", "llama3", "llama3.1"]
CHAT_FORMAT_HELP = ("chatml | qwen3 | llama3 | llama3.1: render the chat template as this family when it is an "
                    "edited one the recogniser refuses (kept in the saved tokenizer_config.json)")
OVERRIDE_HINT = (
    f"if it is an edited version of one of these, render it as that family with "
    f"--chat-format {'|'.join(FAMILIES)} (chat_format= in Python)"
)


@dataclass(frozen=True)
class ChatFormat:
    """What a recognised template renders; `name` says which template it was, for messages."""

    name: str
    family: str  # "chatml" | "qwen3" | "llama3" | "llama3.1"
    default_system: str | None = None  # chatml: system message used when the chat has none
    think_prompt: str = "none"  # qwen3 generation prompt: "optional" | "forced" | "none"
    always_generation_prompt: bool = False  # llama3: the first release always appended it
    knowledge_cutoff: str | None = None  # llama3.1
    default_date: str | None = None  # llama3.1: None means today's date, as strftime_now gives

    @property
    def end_of_turn(self) -> str:
        return END_OF_TURN[self.family]


def chat_format_override(family: str) -> ChatFormat:
    """The format a template is rendered as when the user names its family (--chat-format).

    Each family takes its released template's defaults: plain ChatML (no default system message:
    give one with --system), Qwen3 with the optional think prompt, Llama 3 with the generation
    prompt only when asked, Llama 3.1 with its knowledge cutoff and fixed default date.
    """
    if family not in END_OF_TURN:
        raise ValueError(f"chat format must be one of {', '.join(FAMILIES)}; got {family!r}")
    name = f"{family} (set by --chat-format)"
    if family == "qwen3":
        return ChatFormat(name=name, family=family, think_prompt="optional")
    if family == "llama3.1":
        return ChatFormat(name=name, family=family, knowledge_cutoff="December 2023", default_date="26 Jul 2024")
    return ChatFormat(name=name, family=family)


# ---------------------------------------------------------------------------------------------
# Messages


def validate_messages(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """Check a conversation and return it as plain dicts; ValueError names the bad message."""
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(
            f"messages must be a list of {{'role': ..., 'content': ...}} dicts, "
            f"got {type(messages).__name__}"
        )
    if len(messages) == 0:
        raise ValueError("messages is empty: a chat needs at least one message")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        for key in message:
            if key not in MESSAGE_KEYS:
                raise ValueError(
                    f"messages[{i}]: unsupported key {key!r}; nanopost renders only "
                    f"{', '.join(MESSAGE_KEYS)} (no tools or tool calls)"
                )
        role = message.get("role")
        if role not in ROLES:
            raise ValueError(f"messages[{i}]: role must be one of {', '.join(ROLES)}; got {role!r}")
        for key in ("content", "reasoning_content"):
            value = message.get(key, "")
            if not isinstance(value, str):
                raise ValueError(
                    f"messages[{i}] ({role}): {key} must be a string, got {type(value).__name__}"
                )
        if "content" not in message:
            raise ValueError(f"messages[{i}] ({role}): missing 'content'")
        if "reasoning_content" in message and role != "assistant":
            raise ValueError(f"messages[{i}] ({role}): reasoning_content is for assistant messages")
        out.append(dict(message))
    return out


# ---------------------------------------------------------------------------------------------
# Rendering


def render_chat(
    fmt: ChatFormat,
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = False,
    bos_token: str | None = None,
    enable_thinking: bool = True,
    date_string: str | None = None,
) -> str:
    """Render a conversation as the template `fmt` was recognised from renders it.

    enable_thinking and date_string are the template variables of the same names in transformers;
    a template that does not read them ignores them, as it does there.
    """
    messages = validate_messages(messages)
    if fmt.family == "chatml":
        return _render_chatml(messages, add_generation_prompt, fmt.default_system)
    if fmt.family == "qwen3":
        return _render_qwen3(messages, add_generation_prompt, fmt.think_prompt, enable_thinking)
    if fmt.family in ("llama3", "llama3.1"):
        if not bos_token:
            raise ValueError(f"the {fmt.name} chat template starts with bos_token; the tokenizer has none")
        if fmt.family == "llama3":
            add = add_generation_prompt or fmt.always_generation_prompt
            return _render_llama3(messages, add, bos_token)
        date = date_string
        if date is None:
            date = fmt.default_date or datetime.now().strftime("%d %b %Y")
        return _render_llama31(messages, add_generation_prompt, bos_token, fmt.knowledge_cutoff, date)
    raise ValueError(f"unknown chat format family {fmt.family!r}")


def _im_turn(role: str, content: str) -> str:
    return f"<|im_start|>{role}\n{content}<|im_end|>\n"


def _render_chatml(messages: list[dict], add_generation_prompt: bool, default_system: str | None) -> str:
    parts = []
    if default_system is not None and messages[0]["role"] != "system":
        parts.append(_im_turn("system", default_system))
    parts += [_im_turn(m["role"], m["content"]) for m in messages]
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def _render_qwen3(
    messages: list[dict], add_generation_prompt: bool, think_prompt: str, enable_thinking: bool
) -> str:
    # Reasoning is shown only for assistant turns answering the latest user query; a user
    # message that is a wrapped tool response does not count as a query.
    last_query = len(messages) - 1
    for i in range(len(messages) - 1, -1, -1):
        content = messages[i]["content"]
        is_tool_response = content.startswith("<tool_response>") and content.endswith("</tool_response>")
        if messages[i]["role"] == "user" and not is_tool_response:
            last_query = i
            break

    parts = []
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role != "assistant":
            parts.append(_im_turn(role, content))
        else:
            reasoning = m.get("reasoning_content")
            if reasoning is None:
                reasoning = ""
                if "</think>" in content:
                    reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                    content = content.split("</think>")[-1].lstrip("\n")
            is_last = i == len(messages) - 1
            if i > last_query and (is_last or reasoning):
                body = f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n{content.lstrip(chr(10))}"
            else:
                body = content
            parts.append(f"<|im_start|>assistant\n{body}<|im_end|>\n")

    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
        if think_prompt == "forced":
            parts.append("<think>\n")
        elif think_prompt == "optional" and enable_thinking is False:
            parts.append("<think>\n\n</think>\n\n")
    return "".join(parts)


def _header_turn(role: str, content: str) -> str:
    return f"<|start_header_id|>{role}<|end_header_id|>\n\n{content}<|eot_id|>"


def _render_llama3(messages: list[dict], add_generation_prompt: bool, bos_token: str) -> str:
    parts = [bos_token] + [_header_turn(m["role"], m["content"].strip()) for m in messages]
    if add_generation_prompt:
        parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(parts)


def _render_llama31(
    messages: list[dict], add_generation_prompt: bool, bos_token: str, cutoff: str | None, date: str
) -> str:
    system = ""
    if messages[0]["role"] == "system":
        system, messages = messages[0]["content"].strip(), messages[1:]
    header = f"Cutting Knowledge Date: {cutoff}\nToday Date: {date}\n\n{system}"
    parts = [bos_token, _header_turn("system", header)]
    parts += [_header_turn(m["role"], m["content"].strip()) for m in messages]
    if add_generation_prompt:
        parts.append("<|start_header_id|>assistant<|end_header_id|>\n\n")
    return "".join(parts)


# ---------------------------------------------------------------------------------------------
# Recognition
#
# Fragments below are written as the statements appear in the templates. `_pattern` turns one
# into a regex where whitespace between tokens is free (it renders nothing: `_text_outside_tags`
# checks that), {%- and {% are the same, string literals must match exactly, and «name» inside
# a literal captures that part of it.


@lru_cache(maxsize=None)
def _pattern(fragment: str) -> re.Pattern:
    units = []
    i, n = 0, len(fragment)
    while i < n:
        c = fragment[i]
        if c.isspace():
            i += 1
        elif fragment.startswith(("{%", "{{"), i):
            units.append(re.escape(fragment[i : i + 2]) + "-?")
            i += 3 if fragment.startswith("-", i + 2) else 2
        elif fragment.startswith(("-%}", "-}}"), i):
            units.append("-?" + re.escape(fragment[i + 1 : i + 3]))
            i += 3
        elif fragment.startswith(("%}", "}}"), i):
            units.append("-?" + re.escape(fragment[i : i + 2]))
            i += 2
        elif c in "'\"":
            j = i + 1
            while fragment[j] != c:
                j += 2 if fragment[j] == "\\" else 1
            units.append(_literal_pattern(c, fragment[i + 1 : j]))
            i = j + 1
        else:
            units.append(re.escape(c))
            i += 1
    return re.compile(r"\s*".join(units))


def _literal_pattern(quote: str, body: str) -> str:
    out = [re.escape(quote)]
    for k, piece in enumerate(re.split(r"«(\w+)»", body)):
        # re.split alternates text and captured placeholder names.
        if k % 2 == 1:
            out.append(rf"(?P<{piece}>(?:[^{quote}\\]|\\.)*?)")
            continue
        # A newline in a literal is written either as the escape \n or as itself (templates
        # stored as one JSON line usually hold the character).
        out.append("(?:\\\\n|\\n)".join(re.escape(part) for part in piece.split("\\n")))
    out.append(re.escape(quote))
    return "".join(out)


def _unescape_literal(raw: str) -> str:
    # Jinja reads string literals with Python's unicode-escape rules.
    return raw.encode("ascii", "backslashreplace").decode("unicode-escape")


class _Mismatch(Exception):
    """A template is not of the family being tried; the message says what differs."""


def _search(template: str, fragment: str) -> re.Match:
    m = _pattern(fragment).search(template)
    if m is None:
        raise _Mismatch(f"lacks {fragment[:160]!r}")
    return m


def _search_any(template: str, fragments: dict[str, str]) -> tuple[str, re.Match]:
    for key, fragment in fragments.items():
        m = _pattern(fragment).search(template)
        if m is not None:
            return key, m
    raise _Mismatch(f"lacks any of {[f[:160] for f in fragments.values()]!r}")


def _fullmatch_any(template: str, fragments: dict[str, str]) -> tuple[str, re.Match]:
    for key, fragment in fragments.items():
        m = _pattern(fragment).fullmatch(template.strip())
        if m is not None:
            return key, m
    raise _Mismatch("differs from the known one-line templates of this family")


_CHATML_TURN = (
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
)
_CHATML_GEN = "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"

# One-line templates are matched whole.
_CHATML_ONE_LINERS = {
    "plain": "{% for message in messages %}" + _CHATML_TURN + "{% endfor %}" + _CHATML_GEN,
    "default_system": (
        "{% for message in messages %}"
        "{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\n«default»<|im_end|>\\n' }}{% endif %}"
        + _CHATML_TURN + "{% endfor %}" + _CHATML_GEN
    ),
}


def _recognise_chatml(t: str) -> ChatFormat:
    kind, m = _fullmatch_any(t, _CHATML_ONE_LINERS)
    if kind == "plain":
        return ChatFormat(name="plain ChatML", family="chatml")
    default = _unescape_literal(m["default"])
    name = "Qwen2" if default == "You are a helpful assistant." else f"ChatML with default system {default!r}"
    return ChatFormat(name=name, family="chatml", default_system=default)


_QWEN25_SYSTEM = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\n«default»<|im_end|>\\n' }}{%- endif %}"
)
_QWEN25_BODY = (
    "{%- for message in messages %}"
    '{%- if (message.role == "user") or (message.role == "system" and not loop.first) '
    'or (message.role == "assistant" and not message.tool_calls) %}'
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}",
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
)


def _recognise_qwen25(t: str) -> ChatFormat:
    # The tools branch comes first in the template and only runs when tools are given.
    m = _search(t, _QWEN25_SYSTEM)
    for fragment in _QWEN25_BODY:
        _search(t, fragment)
    default = _unescape_literal(m["default"])
    name = (
        "Qwen2.5"
        if default == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
        else f"Qwen2.5-style ChatML with default system {default!r}"
    )
    return ChatFormat(name=name, family="chatml", default_system=default)


_QWEN3_BODY = (
    "{%- if messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}",
    "{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}"
    "{%- for message in messages[::-1] %}{%- set index = (messages|length - 1) - loop.index0 %}",
    "not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}"
    "{%- set ns.multi_step_tool = false %}{%- set ns.last_query_index = index %}",
    '{%- if (message.role == "user") or (message.role == "system" and not loop.first) %}',
    "'<|im_start|>' + message.role + '\\n' + content }}",
    ".split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n')",
    ".split('</think>')[-1].lstrip('\\n')",
    "{%- if loop.index0 > ns.last_query_index %}"
    "{%- if loop.last or (not loop.last and reasoning_content) %}"
    "{{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') "
    "+ '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + content }}{%- endif %}",
    "{{- '<|im_end|>\\n' }}",
)
# The first release's user turn reads message.content, the later one a `content` variable.
_QWEN3_USER_TURN = {
    "message": "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}",
    "variable": "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}",
}
_QWEN3_GENERATION = {
    "optional": (
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
        "{%- if enable_thinking is defined and enable_thinking is false %}"
        "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}"
    ),
    "forced": "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n<think>\\n' }}{%- endif %}",
    "none": "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}",
}


def _recognise_qwen3(t: str) -> ChatFormat:
    for fragment in _QWEN3_BODY:
        _search(t, fragment)
    _search_any(t, _QWEN3_USER_TURN)
    think_prompt, _ = _search_any(t, _QWEN3_GENERATION)
    return ChatFormat(name=f"Qwen3 (think prompt: {think_prompt})", family="qwen3", think_prompt=think_prompt)


_LLAMA3_TURNS = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
)
_LLAMA3_ONE_LINERS = {
    "guarded": _LLAMA3_TURNS
    + "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}",
    "always": _LLAMA3_TURNS + "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}",
}


def _recognise_llama3(t: str) -> ChatFormat:
    kind, _ = _fullmatch_any(t, _LLAMA3_ONE_LINERS)
    return ChatFormat(name="Llama 3", family="llama3", always_generation_prompt=kind == "always")


_LLAMA31_BODY = (
    "{{- bos_token }}",
    "{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content']|trim %}{%- set messages = messages[1:] %}"
    '{%- else %}{%- set system_message = "" %}{%- endif %}',
    '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}',
    '{{- "Today Date: " + date_string + "\\n\\n" }}',
    '{{- system_message }}{{- "<|eot_id|>" }}',
    "{%- for message in messages %}"
    "{%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    "+ message['content'] | trim + '<|eot_id|>' }}",
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}",
)
_LLAMA31_DATE = {
    "today": (
        "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
        '{%- set date_string = strftime_now("%d %b %Y") %}'
        '{%- else %}{%- set date_string = "«date»" %}{%- endif %}{%- endif %}'
    ),
    "fixed": '{%- if not date_string is defined %}{%- set date_string = "«date»" %}{%- endif %}',
}


def _recognise_llama31(t: str) -> ChatFormat:
    for fragment in _LLAMA31_BODY:
        _search(t, fragment)
    cutoff = _search(t, '{{- "Cutting Knowledge Date: «cutoff»\\n" }}')["cutoff"]
    kind, m = _search_any(t, _LLAMA31_DATE)
    return ChatFormat(
        name="Llama 3.1+" + (" (today's date)" if kind == "today" else ""),
        family="llama3.1",
        knowledge_cutoff=_unescape_literal(cutoff),
        default_date=None if kind == "today" else _unescape_literal(m["date"]),
    )


# (family, a string whose presence means the template is trying to be that family, recogniser)
_RECOGNISERS = (
    ("Qwen3", "<think>", _recognise_qwen3),
    ("Qwen2.5", "tool_calls", _recognise_qwen25),
    ("ChatML / Qwen2", "<|im_start|>", _recognise_chatml),
    ("Llama 3.1+", "Cutting Knowledge Date", _recognise_llama31),
    ("Llama 3", "<|start_header_id|>", _recognise_llama3),
)


def detect_chat_format(template: str, source: str = "chat_template") -> ChatFormat:
    """Recognise a chat template; ValueError says what was found when it is not supported."""
    if not isinstance(template, str) or not template.strip():
        raise ValueError(f"{source}: chat template is empty or not a string")
    leak = _text_outside_tags(template)
    if leak is not None:
        offset, text = leak
        raise ValueError(
            f"{source}: unrecognised chat template: it writes literal text {text[:40]!r} at "
            f"character {offset}, outside its tags, which none of the supported templates do "
            f"(supported: {SUPPORTED}; {OVERRIDE_HINT}). Template begins {template[:80]!r}"
        )
    near = []
    for family, marker, recognise in _RECOGNISERS:
        try:
            return recognise(template)
        except _Mismatch as e:
            if marker in template:
                near.append(f"{family}: {e}")
    found = "; ".join(near) if near else "no marker of a supported family"
    raise ValueError(
        f"{source}: unrecognised chat template ({found}). Supported: {SUPPORTED}; {OVERRIDE_HINT}. "
        f"Template begins {template[:80]!r}"
    )


def _text_outside_tags(template: str) -> tuple[int, str] | None:
    """The first text the template writes outside its tags, as (offset, text), or None.

    Applies Jinja's rules as transformers sets them: `-` strips whitespace on that side,
    trim_blocks drops the newline after a block or comment, lstrip_blocks drops spaces and tabs
    before one on its line, and a single trailing newline of the template is dropped.
    """
    tags = []  # (start, end, kind, strip_left, strip_right, plus_left, plus_right)
    i = 0
    opener = re.compile(r"\{[{%#]")
    while (m := opener.search(template, i)) is not None:
        start = m.start()
        kind = template[start + 1]
        sign_left = template[start + 2 : start + 3]
        if kind == "#":
            close = template.find("#}", start + 2)
        else:
            close = _find_tag_close(template, start + 2, "}}" if kind == "{" else "%}")
        if close < 0:
            raise ValueError(f"chat template: tag opened at character {start} is never closed")
        sign_right = template[close - 1]
        tags.append(
            (start, close + 2, kind, sign_left == "-", sign_right == "-", sign_left == "+", sign_right == "+")
        )
        i = close + 2

    end_of_text = len(template) - 1 if template.endswith("\n") else len(template)
    bounds = [None] + tags + [None]
    for prev, nxt in zip(bounds[:-1], bounds[1:]):
        lo = prev[1] if prev else 0
        hi = nxt[0] if nxt else end_of_text
        text = template[lo:hi]
        if not text:
            continue
        first, last = 0, len(text)
        if prev and prev[4]:
            first = len(text) - len(text.lstrip())
        elif prev and prev[2] in "%#" and not prev[6] and text.startswith("\n"):
            first = 1
        if nxt and nxt[3]:
            last = len(text.rstrip())
        elif nxt and nxt[2] in "%#" and not nxt[5]:
            line_tail = text[text.rfind("\n") + 1 :]
            if line_tail.strip(" \t") == "" and ("\n" in text or prev is None):
                last = len(text) - len(line_tail)
        if first < last:
            return lo + first, text[first:last]
    return None


def _find_tag_close(template: str, i: int, closer: str) -> int:
    # String literals inside a tag may contain the closing delimiter.
    while i < len(template):
        c = template[i]
        if c in "'\"":
            i += 1
            while i < len(template) and template[i] != c:
                i += 2 if template[i] == "\\" else 1
            i += 1
        elif template.startswith(closer, i):
            return i
        else:
            i += 1
    return -1
