"""Data: tokenisation with loss masks, and packed batches.

Three stages after the files are read and checked (plumbing/data_files.py), each a plain function
of the one before:

    tokenize_chat           a conversation -> Example(ids, mask), mask 1 on the tokens the model is
                            trained to produce: every assistant reply and its end-of-turn token.
    fit_examples            over-long examples truncated or dropped, and counted.
    pack_examples           examples -> Batch tensors, several documents per row so that compute
                            is not spent on padding; `make_batch` pads one example per row.

The loss mask includes the end-of-turn token (<|im_end|>, <|eot_id|>) so that the model learns to
stop, and excludes the system and user text, the template's role headers and the generation prompt
(`<|im_start|>assistant\\n`), which at generation time are given, not produced.
"""

from __future__ import annotations

import random
from bisect import bisect_left, insort
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from nanopost.plumbing.tokenizer import Tokenizer

PAD_SEGMENT = -1  # segment id of padding positions in a Batch


# ---------------------------------------------------------------------------------------------
# Tokenisation


@dataclass
class Example:
    """One tokenised document. mask[t] = 1 iff token t is a training target."""

    ids: list[int]
    mask: list[int]

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.mask):
            raise ValueError(f"Example: {len(self.ids)} ids but {len(self.mask)} mask entries")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def num_loss_tokens(self) -> int:
        """Targets this example contributes once shifted: mask[0] is never predicted."""
        return sum(self.mask[1:])


class _NotPrefix(Exception):
    """Rendering one more message changed text already rendered."""


def tokenize_text(tokenizer: Tokenizer, text: str) -> Example:
    """A plain document followed by the end-of-sequence token, every token a target."""
    ids = tokenizer.encode(text) + [tokenizer.eos_token_id]
    return Example(ids, [1] * len(ids))


def tokenize_chat(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], **template_options: Any
) -> Example:
    """Token ids of a conversation and its assistant-only loss mask.

    The text is cut where the chat template says a turn begins and ends: for the i-th message,
    render(messages[:i+1]) extends render(messages[:i]) (system / user turns, mask 0), and for an
    assistant turn render(messages[:i], add_generation_prompt=True) first adds the generation
    prompt (mask 0), then the reply follows (mask 1 up to and including the end-of-turn token,
    0 for whatever the template writes after it, such as ChatML's "\\n"). Each piece is tokenised
    on its own and the ids concatenated: at generation time the prompt is tokenised alone and the
    model's tokens appended, and this reproduces exactly that cut (see `tokenize_prompt`).

    Templates that rewrite history once the conversation goes on (Qwen3 drops the <think> block
    of assistant turns before the last user message; the first Llama 3 template always ends with
    an assistant header, which the next message replaces) make the earlier turns' rendering
    differ from what the model produced. Then only the final assistant turn is trained, on the
    whole conversation before it as its prompt, which is what the model sees when it writes it.
    Messages after the last assistant turn teach nothing and are left out.

    template_options (enable_thinking, date_string) go to `tokenizer.apply_chat_template`.
    """
    messages = [dict(m) for m in messages]
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None:
        raise ValueError("tokenize_chat: the conversation has no assistant turn, so nothing to train on")
    if messages[0].get("role") == "assistant":
        raise ValueError(
            "tokenize_chat: the conversation starts with an assistant turn; it needs a prompt before it"
        )
    messages = messages[: last + 1]
    end_of_turn = tokenizer.end_of_turn  # one of the tokens sampling stops on

    def render(msgs: list[dict], generation_prompt: bool = False) -> str:
        return tokenizer.apply_chat_template(msgs, generation_prompt, **template_options)

    renderings = []  # (text so far, whether the text it adds is a reply)
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            renderings.append((render(messages[:i], True), False))
        renderings.append((render(messages[: i + 1]), m["role"] == "assistant"))
    try:
        pieces = _pieces(renderings)
    except _NotPrefix:
        try:
            pieces = _pieces([(render(messages[:last], True), False), (render(messages), True)])
        except _NotPrefix as e:
            raise ValueError(
                f"tokenize_chat: the {tokenizer.chat_format.name} template's generation prompt is not "
                f"the start of the rendered assistant turn, so the reply cannot be told from the prompt ({e})"
            ) from None

    ids: list[int] = []
    mask: list[int] = []
    for text, is_reply in pieces:
        if not is_reply:
            piece = tokenizer.encode(text)
            ids += piece
            mask += [0] * len(piece)
            continue
        end = text.rfind(end_of_turn)
        if end < 0:
            raise ValueError(
                f"tokenize_chat: an assistant turn rendered as {text[-80:]!r} "
                f"does not end with {end_of_turn!r}"
            )
        end += len(end_of_turn)
        reply, tail = tokenizer.encode(text[:end]), tokenizer.encode(text[end:])
        ids += reply + tail
        mask += [1] * len(reply) + [0] * len(tail)
    return Example(ids, mask)


def _pieces(texts: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Successive renderings -> the text each one adds; _NotPrefix if one rewrites the last."""
    out, done = [], ""
    for text, is_reply in texts:
        if not text.startswith(done):
            at = next(k for k in range(len(done)) if k >= len(text) or text[k] != done[k])
            was, now = done[at : at + 40], text[at : at + 40]
            raise _NotPrefix(f"rendered text changes at character {at}: {was!r} -> {now!r}")
        out.append((text[len(done):], is_reply))
        done = text
    return out


def tokenize_prompt(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]], **template_options: Any
) -> list[int]:
    """Token ids of the generation-time prompt: the conversation plus the assistant header.

    For a conversation that ends with an assistant turn, these are exactly the ids that
    `tokenize_chat` gives before that turn's reply, so what SFT trains on and what sampling
    continues from agree token for token.
    """
    return tokenizer.encode(tokenizer.apply_chat_template(messages, True, **template_options))


def fit_examples(
    examples: Sequence[Example], max_len: int, overflow: str = "truncate"
) -> tuple[list[Example], int]:
    """Examples no longer than `max_len` tokens, and how many were over it.

    overflow="truncate" keeps the first max_len tokens (the prompt and the start of the reply:
    a reply cut short still teaches its beginning); an example left with no loss token is dropped.
    overflow="drop" drops every over-long example. Either way the count of over-long examples
    is returned for the caller to report. An example of max_len ids fills a packed row of
    max_len - 1 positions, so fitting to the row size always fits.
    """
    if overflow not in ("truncate", "drop"):
        raise ValueError(f'overflow must be "truncate" or "drop", got {overflow!r}')
    if max_len < 2:
        raise ValueError(f"max_len must be at least 2 (an input and a label), got {max_len}")
    out, affected = [], 0
    for ex in examples:
        if len(ex) <= max_len:
            out.append(ex)
            continue
        affected += 1
        if overflow == "truncate":
            cut = Example(ex.ids[:max_len], ex.mask[:max_len])
            if cut.num_loss_tokens > 0:
                out.append(cut)
    return out, affected


# ---------------------------------------------------------------------------------------------
# Batches


@dataclass
class Batch:
    """Token rows ready for the model and the loss; all tensors [B, T].

    input_ids[t] predicts labels[t]; loss_mask[t] = 1 where that prediction is trained.
    positions restart at 0 for every document; tokens attend only within their segment_ids
    (padding has segment PAD_SEGMENT, loss_mask 0 and label pad_id).
    """

    input_ids: torch.Tensor  # long
    labels: torch.Tensor  # long
    loss_mask: torch.Tensor  # float
    positions: torch.Tensor  # long
    segment_ids: torch.Tensor  # long

    @property
    def num_loss_tokens(self) -> int:
        """Trained predictions in the batch: the denominator of a token-mean loss."""
        return int(self.loss_mask.sum().item())

    @property
    def num_examples(self) -> int:
        """Documents in the batch (each starts at position 0)."""
        return int(((self.positions == 0) & (self.segment_ids != PAD_SEGMENT)).sum().item())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(t.to(device, non_blocking=True) for t in self._tensors()))

    def _tensors(self) -> tuple[torch.Tensor, ...]:
        return self.input_ids, self.labels, self.loss_mask, self.positions, self.segment_ids


def _rows_to_batch(rows: list[list[Example]], pad_id: int) -> Batch:
    """Documents laid end to end in each row, shifted by one, right padding to the longest row."""
    T = max(sum(len(ex) - 1 for ex in row) for row in rows)
    B = len(rows)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)  # [B, T]
    labels = torch.full((B, T), pad_id, dtype=torch.long)  # [B, T]
    loss_mask = torch.zeros(B, T)  # [B, T]
    positions = torch.zeros(B, T, dtype=torch.long)  # [B, T]
    segment_ids = torch.full((B, T), PAD_SEGMENT, dtype=torch.long)  # [B, T]
    for b, row in enumerate(rows):
        t = 0
        for seg, ex in enumerate(row):
            n = len(ex) - 1
            # Shifting within the document keeps every label inside its own document.
            input_ids[b, t : t + n] = torch.tensor(ex.ids[:-1])
            labels[b, t : t + n] = torch.tensor(ex.ids[1:])
            loss_mask[b, t : t + n] = torch.tensor(ex.mask[1:], dtype=torch.float)
            positions[b, t : t + n] = torch.arange(n)
            segment_ids[b, t : t + n] = seg
            t += n
    return Batch(input_ids, labels, loss_mask, positions, segment_ids)


def _check_trainable(examples: Sequence[Example]) -> None:
    for i, ex in enumerate(examples):
        if len(ex) < 2:
            raise ValueError(
                f"examples[{i}] has {len(ex)} token(s); a document needs two to give one prediction"
            )


def make_batch(examples: Sequence[Example], *, pad_id: int = 0) -> Batch:
    """One example per row, right padded: the plain layout, for tests and exact comparisons.

    pad_id only fills positions that are never attended to or trained; 0 is always a valid id.
    """
    if not examples:
        raise ValueError("make_batch: no examples")
    _check_trainable(examples)
    return _rows_to_batch([[ex] for ex in examples], pad_id)


def pack_examples(
    examples: Sequence[Example],
    max_tokens_per_row: int,
    rows_per_batch: int,
    *,
    pad_id: int = 0,
    shuffle_seed: int | None = None,
) -> list[Batch]:
    """Pack documents into rows of at most max_tokens_per_row positions, rows into batches.

    Padding every example to the longest one wastes most of the compute when lengths vary (a
    few long replies among many short ones). Best-fit decreasing packing — longest document
    first, each into the fullest row that still has room — leaves little padding; segment_ids
    and positions keep the documents independent. An example of n ids takes n - 1 positions.

    Every example appears exactly once; the last batch may have fewer rows. Without a seed, rows
    come in packing order (the longest documents first) and equal lengths keep the examples'
    order. With one, ties in length are broken and rows dealt into batches in a seeded random
    order, so a batch is not all long documents, and a new seed per epoch gives new batches.
    The same inputs and seed give the same batches.
    """
    if max_tokens_per_row < 1 or rows_per_batch < 1:
        raise ValueError(
            "max_tokens_per_row and rows_per_batch must be positive, "
            f"got {max_tokens_per_row} and {rows_per_batch}"
        )
    _check_trainable(examples)
    for i, ex in enumerate(examples):
        if len(ex) - 1 > max_tokens_per_row:
            raise ValueError(
                f"examples[{i}] needs {len(ex) - 1} positions > max_tokens_per_row {max_tokens_per_row}; "
                f"shorten it first with fit_examples(examples, max_len={max_tokens_per_row + 1})"
            )
    rng = random.Random(shuffle_seed)
    order = list(range(len(examples)))
    if shuffle_seed is not None:
        rng.shuffle(order)
    order.sort(key=lambda i: len(examples[i]), reverse=True)  # stable: ties keep the (shuffled) order

    rows: list[list[Example]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted: bisect finds the best fit
    for i in order:
        need = len(examples[i]) - 1
        k = bisect_left(free, (need, -1))
        if k == len(free):
            rows.append([])
            room, r = max_tokens_per_row, len(rows) - 1
        else:
            room, r = free.pop(k)
        rows[r].append(examples[i])
        if room - need > 0:
            insort(free, (room - need, r))

    if shuffle_seed is not None:
        rng.shuffle(rows)
    return [_rows_to_batch(rows[s : s + rows_per_batch], pad_id) for s in range(0, len(rows), rows_per_batch)]
