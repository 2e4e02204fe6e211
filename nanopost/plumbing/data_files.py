"""Data files: JSONL readers that check every record before any work starts.

    read_jsonl(path)        [(line number, object)], blank lines skipped
    load_sft(path)          conversations: {"messages": [...]} or {"prompt", "completion"} per line
    load_text(path)         plain documents: {"text": ...} per line
    load_rl(path)           prompts with verifiable answers: {"prompt" or "question" or "messages",
                            "answer", "difficulty"?, "id"?}
    check_prompts_fit       every prompt leaves room for the tokens generated after it

Every problem is a DataError that names the file, the line and the field
("data/train.jsonl:17: missing field ...").
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = ("role", "content", "reasoning_content")



class DataError(ValueError):
    """A data file that cannot be used; the message starts with `path:line:` where there is a line."""


# ---------------------------------------------------------------------------------------------
# JSONL


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    """(1-based line number, record) for every non-blank line of a JSONL file.

    Lines are decoded one at a time so that bad UTF-8 is reported at its line, like bad JSON.
    """
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found")
    records = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                # utf-8-sig drops a byte-order mark, which some editors write at the start.
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 ({e.reason} at byte {e.start})") from e
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON: {e.msg} (column {e.colno})") from e
            if not isinstance(record, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {_json_type(record)}")
            records.append((lineno, record))
    if not records:
        raise DataError(f"{path}:1: empty file: no records")
    return records


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    if type(value) in names:
        return names[type(value)]
    return "a number" if isinstance(value, (int, float)) else type(value).__name__


def is_number(value: Any) -> bool:
    # JSON true/false arrive as bool, which Python counts as int; they are not numbers here.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------
# SFT records


def load_sft(path: str | Path) -> list[list[dict]]:
    """Conversations from an SFT JSONL file, one per record, as lists of {"role", "content"}.

    A record is {"messages": [{"role", "content"}, ...]} or {"prompt": str, "completion": str}
    with an optional "system": str; other fields are ignored. Every conversation starts with a
    system or user message and has at least one assistant turn, since without one there is
    nothing to learn and no generation prompt to learn it from.
    """
    return [_sft_messages(record, f"{path}:{lineno}") for lineno, record in read_jsonl(path)]


def load_text(path: str | Path) -> list[str]:
    """Documents from a {"text": str} JSONL file, for plain language-model training (pretraining)."""
    texts = []
    for lineno, record in read_jsonl(path):
        text = record.get("text")
        if not isinstance(text, str) or not text:
            raise DataError(f'{path}:{lineno}: field "text" must be a non-empty string')
        texts.append(text)
    return texts


def _sft_messages(record: dict, where: str) -> list[dict]:
    has_chat = "messages" in record
    has_pair = "prompt" in record or "completion" in record
    if has_chat and has_pair:
        raise DataError(f'{where}: has both "messages" and "prompt"/"completion"; use one form')
    if has_chat and "system" in record:
        raise DataError(f'{where}: field "system" goes with "prompt"/"completion"; put it in "messages"')
    if has_chat:
        messages = _check_messages(record["messages"], where)
    elif has_pair:
        for field in ("prompt", "completion"):
            if field not in record:
                raise DataError(f'{where}: missing field "{field}"')
        for field in ("system", "prompt", "completion"):
            if field in record and not isinstance(record[field], str):
                raise DataError(f'{where}: field "{field}" must be a string, got {_json_type(record[field])}')
        messages = [{"role": "system", "content": record["system"]}] if "system" in record else []
        messages += [
            {"role": "user", "content": record["prompt"]},
            {"role": "assistant", "content": record["completion"]},
        ]
    else:
        raise DataError(f'{where}: missing field "messages" or "prompt"/"completion"')
    return messages


def _check_messages(messages: Any, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if messages == [] else _json_type(messages)
        raise DataError(
            f'{where}: field "messages" must be a non-empty list of {{"role", "content"}} objects, got {got}'
        )
    out = [_check_message(m, where, f'field "messages"[{i}]') for i, m in enumerate(messages)]
    if out[0]["role"] == "assistant":
        raise DataError(
            f'{where}: field "messages"[0] is an assistant turn; a conversation starts with system or user'
        )
    if not any(m["role"] == "assistant" for m in out):
        raise DataError(f'{where}: field "messages" has no assistant turn: nothing to train on')
    return out


def _check_message(m: Any, where: str, field: str) -> dict:
    """One {"role", "content"} message; `field` names it in errors: 'field "messages"[2]'."""
    if not isinstance(m, dict):
        raise DataError(f"{where}: {field} must be an object, got {_json_type(m)}")
    for key in m:
        if key not in MESSAGE_KEYS:
            supported = ", ".join(MESSAGE_KEYS)
            raise DataError(f"{where}: {field} has unsupported key {key!r} (supported: {supported})")
    for key in ("role", "content"):
        if key not in m:
            raise DataError(f"{where}: missing {field}.{key}")
    if m["role"] not in ROLES:
        raise DataError(f"{where}: {field}.role must be one of {'/'.join(ROLES)}, got {m['role']!r}")
    for key in ("content", "reasoning_content"):
        if key in m and not isinstance(m[key], str):
            raise DataError(f"{where}: {field}.{key} must be a string, got {_json_type(m[key])}")
    if "reasoning_content" in m and m["role"] != "assistant":
        raise DataError(f"{where}: {field}.reasoning_content is only for assistant messages")
    return dict(m)


# ---------------------------------------------------------------------------------------------
# RL records


def load_rl(path: str | Path) -> list[dict]:
    """Prompts with gold answers from an RL JSONL file.

    A record is {"prompt" or "question": str, "answer": str | number, "difficulty"?: number,
    "id"?: str | int, ...}. Each becomes {"prompt", "answer" (str), "difficulty" (float or None),
    "id" (str), ...the other fields unchanged}. The id defaults to "{file stem}-{line}", so a
    prompt keeps its name while the file is unchanged; ids must be unique, because the curriculum
    and the eval logs key per-prompt statistics by them.

    The prompt may also be a conversation, as in TRL's conversational format: a list of
    {"role", "content"} messages (system, user, earlier assistant turns) ending with a user
    message. It is kept as "messages" and rendered as written (`PromptTemplate.record_messages`:
    no instruction or format request is added, since the user wrote the conversation), and
    "prompt" becomes the last user message's content: the question that rewards, tasks and
    model rewards read. A record may not carry its own "messages" field, which would be mistaken
    for such a conversation.
    """
    out = []
    first_seen: dict[str, int] = {}
    for lineno, record in read_jsonl(path):
        where = f"{path}:{lineno}"
        sample = _rl_sample(record, where, default_id=f"{Path(path).stem}-{lineno}")
        sample_id = sample["id"]
        if sample_id in first_seen:
            raise DataError(f"{where}: duplicate id {sample_id!r} (first on line {first_seen[sample_id]})")
        first_seen[sample_id] = lineno
        out.append(sample)
    return out


def _rl_sample(record: dict, where: str, default_id: str) -> dict:
    if "prompt" in record and "question" in record:
        raise DataError(f'{where}: has both "prompt" and "question"; use one')
    key = "prompt" if "prompt" in record else "question"
    if key not in record:
        raise DataError(f'{where}: missing field "prompt" (or "question")')
    if "messages" in record:
        raise DataError(f'{where}: field "messages" belongs to SFT records; an RL conversation goes in "{key}" '
                        'as a list of {"role", "content"} messages')
    prompt, messages = record[key], None
    if isinstance(prompt, list):
        messages = _check_prompt_messages(prompt, where, key)
        prompt = next(m["content"] for m in reversed(messages) if m["role"] == "user")
    elif not isinstance(prompt, str):
        raise DataError(f'{where}: field "{key}" must be a string, got {_json_type(prompt)} '
                        '(a conversation is a list of {"role", "content"} messages)')
    if not prompt.strip():
        raise DataError(f'{where}: field "{key}" is empty' if messages is None
                        else f'{where}: field "{key}"[{len(messages) - 1}].content is empty')

    if "answer" not in record:
        raise DataError(f'{where}: missing field "answer"')
    answer = record["answer"]
    if not (isinstance(answer, str) or is_number(answer)):
        got = _json_type(answer)
        raise DataError(f'{where}: field "answer" must be a string or a finite number, got {got}')
    answer = str(answer)
    if "####" in answer:
        # A worked solution ending in "#### x" (the GSM8K convention): x is the gold answer, and
        # the worked solution is kept as "reasoning".
        record = {**record, "reasoning": answer.rsplit("####", 1)[0].strip()}
        answer = answer.rsplit("####", 1)[1].strip().replace(",", "")
    if not answer.strip():
        raise DataError(f'{where}: field "answer" is empty')

    difficulty = record.get("difficulty")
    if difficulty is not None:
        if not is_number(difficulty):
            got = _json_type(difficulty)
            raise DataError(f'{where}: field "difficulty" must be a finite number, got {got}')
        difficulty = float(difficulty)

    sample_id = record.get("id", default_id)
    if isinstance(sample_id, bool) or not isinstance(sample_id, (str, int)):
        raise DataError(f'{where}: field "id" must be a string or an integer, got {_json_type(sample_id)}')
    sample_id = str(sample_id)

    extras = {k: v for k, v in record.items() if k not in (key, "answer", "difficulty", "id")}
    if messages is not None:
        extras["messages"] = messages
    return {"prompt": prompt, "answer": answer, "difficulty": difficulty, "id": sample_id, **extras}


def _check_prompt_messages(messages: list, where: str, key: str) -> list[dict]:
    """A conversational RL prompt: messages as in SFT, ending with the user turn the model answers."""
    if not messages:
        raise DataError(f'{where}: field "{key}" is an empty list of messages')
    out = [_check_message(m, where, f'field "{key}"[{i}]') for i, m in enumerate(messages)]
    if out[0]["role"] == "assistant":
        raise DataError(f'{where}: field "{key}"[0] is an assistant turn; a conversation starts with system or user')
    if out[-1]["role"] != "user":
        raise DataError(f'{where}: field "{key}"[{len(out) - 1}] is a {out[-1]["role"]} message; a conversational '
                        "prompt ends with the user message the model answers")
    return out


def check_prompts_fit(path: str | Path, prompt_lengths: Mapping[int, int], max_new_tokens: int, context: int) -> None:
    """Refuse before training the prompts that leave no room for `max_new_tokens` in the model's context.

    prompt_lengths maps a record's index in the file (the order of load_rl / load_sft) to its
    prompt's length in tokens, template included. Sampling such a prompt would fail only when it
    is first drawn, so the DataError names the first one as path:line and counts them all (the
    file is read again for the line number only then).
    """
    if max_new_tokens >= context:
        raise ValueError(f"--max-new-tokens {max_new_tokens} does not fit the model's context of {context} positions "
                         f"(max_position_embeddings), which must also hold the prompt: lower --max-new-tokens")
    over = sorted(i for i, n in prompt_lengths.items() if n + max_new_tokens > context)
    if not over:
        return
    first, n = over[0], prompt_lengths[over[0]]
    line = read_jsonl(path)[first][0]
    room = context - max(prompt_lengths.values())
    fix = f", or lower --max-new-tokens to {room}" if room >= 1 else " (the longest does not fit even alone)"
    raise DataError(
        f"{path}:{line}: the prompt is {n} tokens with the chat template; with --max-new-tokens {max_new_tokens} "
        f"it needs {n + max_new_tokens} positions, but the model's context is {context} (max_position_embeddings). "
        f"{len(over)} of {len(prompt_lengths)} prompt(s) checked in {path} are too long: shorten or remove them{fix}."
    )


# ---------------------------------------------------------------------------------------------
# Length
