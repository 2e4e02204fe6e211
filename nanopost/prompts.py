"""Prompt construction as the practitioner's checklist, one field per item.

A prompt that works states the task (instruction), who is answering (role), what they need to
know (context), how to sound (tone), what the output looks like (output_format), asks for
reasoning before the answer, and shows a few worked examples in exactly the format wanted.
`PromptTemplate` holds those items and renders chat messages from them:

    system     system / role / tone / context / output_format, those given, one paragraph each
    n-shot     exemplars as earlier user / assistant turns, the assistant turns written in the
               format the model must produce (`target`), so the examples teach the format too
    user       the instruction, the question, and the format request ("Think step by step
               inside <think> </think>, then give only the final answer inside <answer> </answer>.")

Exemplar choice matters as much as wording ("Calibrate Before Use", Zhao et al. 2021): a
few-shot prompt whose examples mostly share one label pulls answers toward that label
(majority-label bias), and the label of the last examples pulls hardest (recency bias).
balance_labels takes equal numbers per label and interleaves them; shuffle_exemplars varies the
order. Without an rng, `messages` draws with Random(seed), so a template renders every question
the same way; pass an rng to draw afresh on each call.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any, Mapping

EXEMPLAR_KEYS = ("question", "answer", "reasoning", "label")


@dataclass
class PromptTemplate:
    """How to turn a question into chat messages, and what the answer should look like."""

    instruction: str
    system: str | None = None
    role: str | None = None  # "You are a careful math tutor."
    context: str | None = None
    tone: str | None = None
    output_format: str | None = None
    reasoning: bool = True  # ask for reasoning in think_tags before the answer in answer_tags
    think_tags: tuple[str, str] = ("<think>", "</think>")
    answer_tags: tuple[str, str] = ("<answer>", "</answer>")
    exemplars: list[dict] = field(default_factory=list)  # {"question", "answer", "reasoning"?, "label"?}
    n_shot: int = 0
    balance_labels: bool = False
    shuffle_exemplars: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        # Checked here so that a bad config fails at load time, not at the first rollout.
        if not isinstance(self.instruction, str) or not self.instruction.strip():
            raise ValueError("PromptTemplate: instruction must be a non-empty string")
        for name in ("system", "role", "context", "tone", "output_format"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                got = type(value).__name__
                raise ValueError(f"PromptTemplate: {name} must be a string or None, got {got}")
        for name in ("think_tags", "answer_tags"):
            tags = tuple(getattr(self, name))
            if len(tags) != 2 or not all(isinstance(t, str) and t.strip() for t in tags):
                raise ValueError(
                    f"PromptTemplate: {name} must be two non-empty strings (open, close), got {tags!r}"
                )
            setattr(self, name, tags)
        if isinstance(self.n_shot, bool) or not isinstance(self.n_shot, int) or self.n_shot < 0:
            raise ValueError(f"PromptTemplate: n_shot must be a non-negative integer, got {self.n_shot!r}")
        self.exemplars = [self._checked_exemplar(i, e) for i, e in enumerate(self.exemplars)]
        if self.n_shot > len(self.exemplars):
            raise ValueError(
                f"PromptTemplate: n_shot={self.n_shot} but the exemplar pool has only {len(self.exemplars)}"
            )
        if self.balance_labels and self.n_shot > 0:
            self._per_label()  # raises if the pool cannot give equal counts

    def _checked_exemplar(self, i: int, e: Any) -> dict:
        if not isinstance(e, Mapping):
            raise ValueError(f"PromptTemplate: exemplars[{i}] must be a dict, got {type(e).__name__}")
        unknown = sorted(set(e) - set(EXEMPLAR_KEYS))
        if unknown:
            raise ValueError(
                f"PromptTemplate: exemplars[{i}] has unknown keys {unknown} (known: {list(EXEMPLAR_KEYS)})"
            )
        for key in ("question", "answer"):
            if key not in e:
                raise ValueError(f"PromptTemplate: exemplars[{i}] is missing {key!r}")
        if not isinstance(e["question"], str):
            raise ValueError(f"PromptTemplate: exemplars[{i}]['question'] must be a string")
        if isinstance(e["answer"], bool) or not isinstance(e["answer"], (str, int, float)):
            raise ValueError(f"PromptTemplate: exemplars[{i}]['answer'] must be a string or a number")
        if self.reasoning and not isinstance(e.get("reasoning"), str):
            # An exemplar without reasoning would show the model the format it must not use.
            raise ValueError(
                f"PromptTemplate: exemplars[{i}] needs a 'reasoning' string because reasoning=True"
            )
        if self.balance_labels and "label" not in e:
            raise ValueError(
                f"PromptTemplate: exemplars[{i}] has no 'label', which balance_labels=True needs"
            )
        return {**e, "answer": str(e["answer"])}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PromptTemplate:
        """Build from a config mapping (TOML / JSON); an unknown key is an error naming it."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"PromptTemplate: unknown keys {unknown} (known: {sorted(known)})")
        if "instruction" not in d:
            raise ValueError("PromptTemplate: missing key 'instruction'")
        return cls(**d)

    # -- rendering -----------------------------------------------------------------------------

    def format_request(self) -> str:
        """The sentence asking for the output format the rewards check."""
        a_open, a_close = self.answer_tags
        if not self.reasoning:
            return f"Give only the final answer inside {a_open} {a_close}."
        t_open, t_close = self.think_tags
        return (
            f"Think step by step inside {t_open} {t_close}, "
            f"then give only the final answer inside {a_open} {a_close}."
        )

    def system_message(self) -> str | None:
        """The given system / role / tone / context / output_format paragraphs, or None."""
        parts = [self.system, self.role, self.tone, self.context, self.output_format]
        parts = [p.strip() for p in parts if p is not None and p.strip()]
        return "\n\n".join(parts) if parts else None

    def user_message(self, question: str) -> str:
        return f"{self.instruction.strip()}\n\n{question.strip()}\n\n{self.format_request()}"

    def target(self, reasoning: str, answer: str) -> str:
        """The assistant text in the expected format: the reasoning block (if asked) then the answer block."""
        a_open, a_close = self.answer_tags
        answer_block = f"{a_open}{str(answer).strip()}{a_close}"
        if not self.reasoning:
            return answer_block
        t_open, t_close = self.think_tags
        return f"{t_open}\n{reasoning.strip()}\n{t_close}\n{answer_block}"

    def select_exemplars(self, rng: random.Random | None = None) -> list[dict]:
        """The n_shot exemplars for one prompt, in the order they are shown.

        Plain: a seeded sample kept in pool order. balance_labels: n_shot / (number of labels)
        per label, interleaved label by label (labels in order of first appearance in the pool),
        so neither a majority nor the last position favours a label. shuffle_exemplars: the
        chosen ones in random order.
        """
        rng = random.Random(self.seed) if rng is None else rng
        if self.n_shot == 0:
            return []
        if self.balance_labels:
            per_label = self._per_label()
            k = self.n_shot // len(per_label)
            drawn = [sorted(rng.sample(pool, k)) for pool in per_label.values()]
            chosen = [drawn[j][i] for i in range(k) for j in range(len(drawn))]
        else:
            chosen = sorted(rng.sample(range(len(self.exemplars)), self.n_shot))
        if self.shuffle_exemplars:
            rng.shuffle(chosen)
        return [self.exemplars[i] for i in chosen]

    def _per_label(self) -> dict[Any, list[int]]:
        """Pool indices by label; ValueError when n_shot cannot be split equally among labels."""
        per_label: dict[Any, list[int]] = {}
        for i, e in enumerate(self.exemplars):
            per_label.setdefault(e["label"], []).append(i)
        if self.n_shot % len(per_label):
            raise ValueError(
                f"PromptTemplate: balance_labels needs n_shot divisible by the number of labels; "
                f"n_shot={self.n_shot}, labels {list(per_label)}"
            )
        k = self.n_shot // len(per_label)
        short = {label: len(idx) for label, idx in per_label.items() if len(idx) < k}
        if short:
            raise ValueError(
                f"PromptTemplate: balance_labels with n_shot={self.n_shot} needs {k} exemplars per label; "
                f"the pool has only {short}"
            )
        return per_label

    def record_messages(self, record: Mapping[str, Any]) -> list[dict]:
        """The chat messages for an RL record (plumbing/data_files.py: load_rl).

        A conversational record ("messages", from a prompt given as a list of messages) is rendered
        as written: the user wrote the whole conversation, system message included, so neither the
        instruction nor the format request nor the exemplars are added. A plain one is `messages`.
        """
        if record.get("messages") is not None:
            return [dict(m) for m in record["messages"]]
        return self.messages(record["prompt"])

    def messages(self, question: str, *, rng: random.Random | None = None) -> list[dict]:
        """Chat messages asking `question`: system, the n-shot exemplars as turns, then the question."""
        if not isinstance(question, str) or not question.strip():
            raise ValueError("PromptTemplate.messages: question must be a non-empty string")
        out = []
        system = self.system_message()
        if system is not None:
            out.append({"role": "system", "content": system})
        for e in self.select_exemplars(rng):
            out.append({"role": "user", "content": self.user_message(e["question"])})
            out.append({"role": "assistant", "content": self.target(e.get("reasoning", ""), e["answer"])})
        out.append({"role": "user", "content": self.user_message(question)})
        return out
