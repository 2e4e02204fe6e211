"""Prompt construction as the practitioner's checklist, one field per item.

A prompt that works states the task (`instruction`), says who is answering and what they need to
know (`system`), asks for reasoning before the answer (`reasoning`), and shows a few worked
examples in exactly the format wanted (`exemplars`, `n_shot`). `PromptTemplate` renders them:

    system     the system message, if given
    n-shot     exemplars as earlier user / assistant turns, the assistant turns written in the
               format the model must produce (`target`), so the examples teach the format too
    user       the instruction, the question, and the format request ("Think step by step
               inside <think> </think>, then give only the final answer inside <answer> </answer>.")

The exemplars shown are a sample of the pool, kept in pool order. Without an rng, `messages`
draws with Random(seed), so a template renders every question the same way; pass an rng to draw
afresh on each call. Which exemplars, and in which order, biases the answers: tools/shots.py
measures that and balances labels.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Mapping

EXEMPLAR_KEYS = ("question", "answer", "reasoning", "label")  # label: not shown; a classification pool has one


@dataclass
class PromptTemplate:
    """How to turn a question into chat messages, and what the answer should look like."""

    instruction: str
    system: str | None = None  # who is answering, what they need to know, how to sound
    reasoning: bool = True  # ask for reasoning in think_tags before the answer in answer_tags
    think_tags: tuple[str, str] = ("<think>", "</think>")
    answer_tags: tuple[str, str] = ("<answer>", "</answer>")
    exemplars: list[dict] = field(default_factory=list)  # {"question", "answer", "reasoning"?, "label"?}
    n_shot: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        # Checked here so that a bad config fails at load time, not at the first rollout.
        if not isinstance(self.instruction, str) or not self.instruction.strip():
            raise ValueError("PromptTemplate: instruction must be a non-empty string")
        if self.system is not None and not isinstance(self.system, str):
            raise ValueError(f"PromptTemplate: system must be a string or None, got {type(self.system).__name__}")
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
        return {**e, "answer": str(e["answer"])}

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
        """The n_shot exemplars for one prompt: a sample drawn with rng (Random(seed) if None), in pool order."""
        if self.n_shot == 0:
            return []
        rng = random.Random(self.seed) if rng is None else rng
        return [self.exemplars[i] for i in sorted(rng.sample(range(len(self.exemplars)), self.n_shot))]

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
        if self.system is not None and self.system.strip():
            out.append({"role": "system", "content": self.system.strip()})
        for e in self.select_exemplars(rng):
            out.append({"role": "user", "content": self.user_message(e["question"])})
            out.append({"role": "assistant", "content": self.target(e.get("reasoning", ""), e["answer"])})
        out.append({"role": "user", "content": self.user_message(question)})
        return out
