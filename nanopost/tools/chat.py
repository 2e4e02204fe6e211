"""Talk to a checkpoint, the command behind scripts/chat.py.

Each reply is generated from the whole conversation so far, rendered by the checkpoint's chat
format, and ends on any of the end tokens the checkpoint declares (`Tokenizer.stop_token_ids`),
as in training and evaluation. One-shot (--message) prints one reply; otherwise every line read
from stdin is a user turn, and /quit or end of input ends the conversation.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, TextIO

import torch

from ..data import tokenize_prompt
from ..generate import generate
from ..plumbing.chat_template import CHAT_FORMAT_HELP, ChatFormatName
from ..plumbing.config import is_finite, require
from ..plumbing.hf_io import load_config, load_model, load_tokenizer
from ..plumbing.runtime import pick_device
from ..plumbing.tokenizer import Tokenizer

QUIT = ("/quit", "/exit")


@dataclass
class ChatConfig:
    model: str = field(default="", metadata={"help": "HF checkpoint directory"})
    message: str | None = field(default=None, metadata={"help": "one-shot: print the reply to this and exit"})
    system: str | None = field(default=None, metadata={"help": "system message opening the conversation"})
    temperature: float = field(default=0.6, metadata={"help": "sampling temperature (0: greedy)"})
    max_new_tokens: int = 256
    chat_format: ChatFormatName | None = field(default=None, metadata={"help": CHAT_FORMAT_HELP})
    seed: int = 0
    device: str = "auto"

    def validate(self) -> None:
        if not self.model:
            raise ValueError("--model is required")
        require(
            ("--temperature", self.temperature, is_finite(self.temperature) and self.temperature >= 0,
             "a finite number >= 0 (0: greedy)"),
            ("--max-new-tokens", self.max_new_tokens, self.max_new_tokens >= 1, ">= 1"),
        )


class Conversation:
    """The messages so far; `reply(text)` adds a user turn and the model's answer, and returns it."""

    def __init__(self, model, tokenizer: Tokenizer, *, context: int, system: str | None = None,
                 temperature: float = 0.6, max_new_tokens: int = 256, seed: int = 0):
        self.model, self.tokenizer, self.context = model, tokenizer, context
        self.temperature, self.max_new_tokens = temperature, max_new_tokens
        self.messages = [{"role": "system", "content": system}] if system else []
        self.generator = torch.Generator(device=model.device).manual_seed(seed)

    @torch.no_grad()
    def reply(self, text: str) -> str:
        messages = self.messages + [{"role": "user", "content": text}]
        ids = tokenize_prompt(self.tokenizer, messages)
        room = self.context - len(ids)  # the reply is cut short rather than overrun the context
        if room < 1:
            raise ValueError(f"the conversation is {len(ids)} tokens, the model's context {self.context}: "
                             "start a new one")
        out = generate(self.model, [ids], max_new_tokens=min(self.max_new_tokens, room),
                       temperature=self.temperature, stop_token_ids=self.tokenizer.stop_token_ids,
                       generator=self.generator, pad_token_id=self.tokenizer.pad_token_id)
        answer = self.tokenizer.decode(out.completion(0), skip_special_tokens=True)
        self.messages = messages + [{"role": "assistant", "content": answer}]
        return answer


def run_chat(cfg: ChatConfig, stdin: TextIO = sys.stdin, say: Callable[[str], None] = print) -> Conversation:
    """One reply to cfg.message, or a conversation over the lines of stdin; returns it."""
    device = pick_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model, chat_format=cfg.chat_format)
    context = load_config(cfg.model).max_position_embeddings
    model = load_model(cfg.model, device=device, dtype=torch.float32).eval()
    chat = Conversation(model, tokenizer, context=context, system=cfg.system, temperature=cfg.temperature,
                        max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    if cfg.message is not None:
        say(chat.reply(cfg.message))
        return chat
    interactive = stdin.isatty()
    if interactive:
        say(f"chatting with {cfg.model}; {QUIT[0]} or Ctrl-D ends")
    while True:
        if interactive:
            try:
                line = input("> ")
            except EOFError:
                break
        else:
            line = stdin.readline()
            if not line:  # end of input
                break
        line = line.strip()
        if line in QUIT:
            break
        if line:
            say(chat.reply(line))
    return chat
