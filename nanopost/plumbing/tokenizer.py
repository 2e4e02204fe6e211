"""The tokenizer: a Hugging Face tokenizer directory read with the `tokenizers` library.

A checkpoint's tokenizer is two files: tokenizer.json (the fast tokenizer: vocabulary, merges,
pre-tokenizer, added tokens) and tokenizer_config.json (which added tokens are eos / pad / bos,
and the chat template, which transformers may also keep in chat_template.jinja). `Tokenizer`
reads both, renders chats with `nanopost.plumbing.chat_template` (no Jinja), and writes them back so that
transformers' AutoTokenizer loads the same ids and the same chat text.

`encode` adds nothing the text does not contain: special tokens written in the text, such as
<|im_start|>, become their single ids, and no bos/eos is prepended or appended.

Sampling stops on every token the checkpoint declares as an end (`stop_token_ids`): the
chat format's end-of-turn token, the tokenizer's eos_token, and generation_config.json's
eos_token_id (an int or a list, as transformers reads it). A base release's eos ends documents
(<|endoftext|>, <|end_of_text|>) while its chat turns end with another token (<|im_end|>,
<|eot_id|>): stopping on eos alone would run every reply on to the token limit.

`train_bpe` trains a small byte-level BPE tokenizer on local text with the chat special tokens,
for tests and demos that cannot download a real one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from nanopost.plumbing.chat_template import ChatFormat, chat_format_override, detect_chat_format, render_chat
from nanopost.plumbing.files import read_json

SPECIAL_TOKEN_FIELDS = ("eos_token", "pad_token", "bos_token")
GENERATION_CONFIG = "generation_config.json"
# tokenizer_config.json field that keeps a --chat-format override with the checkpoint, so a model
# trained with it loads as it was trained.
CHAT_FORMAT_FIELD = "nanopost_chat_format"


class Tokenizer:
    """Text <-> token ids, plus the model's chat format.

    vocab_size counts every token the tokenizer can produce, added tokens included; a model's
    embedding table may have more rows than that (padding for speed), never fewer.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        eos_token: str | None = None,
        pad_token: str | None = None,
        bos_token: str | None = None,
        chat_template: str | None = None,
        config: Mapping[str, Any] | None = None,
        source: str = "tokenizer",
        template_source: str | None = None,
        generation_config: Mapping[str, Any] | None = None,
        chat_format: str | None = None,
    ):
        self._tok = tokenizer
        self._override: str | None = None
        self.source = source  # where this came from, named in error messages
        # Fields of tokenizer_config.json nanopost does not use are kept and written back.
        self._config = dict(config or {})
        self.chat_template = chat_template
        if template_source is not None:
            self._template_source = template_source
        self.eos_token, self.pad_token, self.bos_token = eos_token, pad_token, bos_token
        for field in SPECIAL_TOKEN_FIELDS:
            token = getattr(self, field)
            if token is not None and tokenizer.token_to_id(token) is None:
                raise ValueError(f"{source}: {field} {token!r} is not in the vocabulary of tokenizer.json")
        # generation_config.json as read (what transformers' generate uses); written back with
        # the stop tokens by the training checkpoints.
        self.generation_config = dict(generation_config or {})
        self._generation_eos = _generation_eos_ids(self.generation_config, self.vocab_size, source)
        self.chat_format_override = chat_format

    # -- loading and saving --------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path, *, chat_format: str | None = None) -> Tokenizer:
        """Load tokenizer.json and (if present) tokenizer_config.json / chat_template.jinja and
        generation_config.json's end tokens.

        chat_format (chatml | qwen3 | llama3 | llama3.1) renders the chat template as that family
        instead of recognising it: for a lightly edited template the recogniser refuses.
        """
        path = Path(path)
        tokenizer_file = path / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(
                f"{tokenizer_file}: not found (nanopost reads the fast-tokenizer file tokenizer.json)"
            )
        try:
            tok = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"{tokenizer_file}: cannot be read by the tokenizers library: {e}") from e

        config_file = path / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_file.is_file():
            config = read_json(config_file)
        _check_added_tokens(tok, config.get("added_tokens_decoder", {}), config_file)

        specials = {f: _token_content(config.get(f), f, config_file) for f in SPECIAL_TOKEN_FIELDS}
        template, template_source = _find_chat_template(path, config)
        generation_file = path / GENERATION_CONFIG
        generation = read_json(generation_file) if generation_file.is_file() else {}
        saved_format = config.get(CHAT_FORMAT_FIELD)
        if saved_format is not None and not isinstance(saved_format, str):
            raise ValueError(f"{config_file}: {CHAT_FORMAT_FIELD} must be a string, got {saved_format!r}")
        return cls(
            tok,
            **specials,
            chat_template=template,
            config=config,
            source=str(path),
            template_source=template_source,
            generation_config=generation,
            chat_format=chat_format or saved_format,
        )

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json (with the chat template) into `path`."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path / "tokenizer.json"))

        config = dict(self._config)
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        # transformers' decode would otherwise be free to tidy spaces differently from ours.
        config.setdefault("clean_up_tokenization_spaces", False)
        for field in SPECIAL_TOKEN_FIELDS:
            config[field] = getattr(self, field)
        config.pop(CHAT_FORMAT_FIELD, None)
        if self.chat_format_override is not None:
            config[CHAT_FORMAT_FIELD] = self.chat_format_override
        config["added_tokens_decoder"] = {
            str(i): {
                "content": t.content,
                "lstrip": t.lstrip,
                "normalized": t.normalized,
                "rstrip": t.rstrip,
                "single_word": t.single_word,
                "special": t.special,
            }
            for i, t in sorted(self._tok.get_added_tokens_decoder().items())
        }
        original = self._config.get("chat_template")
        if isinstance(original, list) and _default_template(original, "") == self.chat_template:
            pass  # keep the named templates (e.g. tool_use) alongside the default
        elif self.chat_template is not None:
            config["chat_template"] = self.chat_template
        else:
            config.pop("chat_template", None)
        with open(path / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, ensure_ascii=False)
            f.write("\n")

    # -- text ----------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens in the text map to their ids, none are added."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids (a list, or anything iterable of ints such as a 1-D tensor)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int:
        """Id of a single token such as '<|im_end|>'; ValueError if it is not in the vocabulary."""
        i = self._tok.token_to_id(token)
        if i is None:
            raise ValueError(f"{self.source}: token {token!r} is not in the vocabulary")
        return i

    def id_to_token(self, i: int) -> str:
        token = self._tok.id_to_token(int(i))
        if token is None:
            raise ValueError(f"{self.source}: id {i} is outside the vocabulary (size {self.vocab_size})")
        return token

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying tokenizers.Tokenizer, for what this class does not wrap (offsets, batches)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int:
        if self.eos_token is None:
            raise ValueError(f"{self.source}: no eos_token in tokenizer_config.json")
        return self.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int:
        """The pad token's id, or eos's when the tokenizer defines no pad token."""
        return self.token_to_id(self.pad_token) if self.pad_token is not None else self.eos_token_id

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.token_to_id(self.bos_token)

    @property
    def end_of_turn(self) -> str:
        """The token that closes an assistant turn in this chat format (what SFT trains to end with)."""
        return self.chat_format.end_of_turn

    @property
    def stop_token_ids(self) -> list[int]:
        """Every id sampling stops on: the chat format's end of turn (when there is a chat
        template), eos_token, and generation_config.json's eos_token_id; first come first."""
        ids = []
        if self.chat_template is not None or self.chat_format_override is not None:
            ids.append(self.token_to_id(self.end_of_turn))
        if self.eos_token is not None:
            ids.append(self.eos_token_id)
        ids += self._generation_eos
        if not ids:
            raise ValueError(
                f"{self.source}: no token to stop sampling on (no chat template, eos_token or "
                f"{GENERATION_CONFIG} eos_token_id)"
            )
        return list(dict.fromkeys(ids))

    # -- chat ----------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template string, as transformers stores it."""
        return self._chat_template

    @chat_template.setter
    def chat_template(self, template: str | None) -> None:
        if template is not None and not isinstance(template, str):
            raise TypeError(f"chat_template must be a str, got {type(template).__name__}")
        self._chat_template = template
        self._template_source = f"{self.source}: chat_template"
        self._chat_format: ChatFormat | None = None  # recognised on first use

    @property
    def chat_format_override(self) -> str | None:
        """The family named by --chat-format (or saved with the checkpoint), or None to recognise."""
        return self._override

    @chat_format_override.setter
    def chat_format_override(self, family: str | None) -> None:
        if family is not None:
            chat_format_override(family)  # refuse an unknown family now, not at first use
        self._override = family
        self._chat_format = None

    @property
    def chat_format(self) -> ChatFormat:
        """The recognised family of the chat template (ValueError if missing or unsupported)."""
        if self._chat_format is None and self._override is not None:
            self._chat_format = chat_format_override(self._override)
        if self._chat_format is None:
            if self.chat_template is None:
                raise ValueError(
                    f"{self.source}: no chat template (looked for chat_template in "
                    f"tokenizer_config.json and for chat_template.jinja)"
                )
            self._chat_format = detect_chat_format(self.chat_template, self._template_source)
        return self._chat_format

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = False,
        *,
        enable_thinking: bool = True,
        date_string: str | None = None,
    ) -> str:
        """The chat as text, identical to transformers' apply_chat_template(tokenize=False).

        enable_thinking=False asks Qwen3 for an empty think block; date_string sets Llama 3.1's
        "Today Date". Templates that do not use them ignore them, as in transformers.
        """
        return render_chat(
            self.chat_format,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            enable_thinking=enable_thinking,
            date_string=date_string,
        )

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = False,
        *,
        enable_thinking: bool = True,
        date_string: str | None = None,
    ) -> list[int]:
        """Token ids of the rendered chat (what transformers gives with tokenize=True)."""
        text = self.apply_chat_template(
            messages, add_generation_prompt, enable_thinking=enable_thinking, date_string=date_string
        )
        return self.encode(text)

    def __repr__(self) -> str:
        return (
            f"Tokenizer(source={self.source!r}, vocab_size={self.vocab_size}, "
            f"eos={self.eos_token!r}, pad={self.pad_token!r}, bos={self.bos_token!r})"
        )


def load_tokenizer(path: str | Path, *, chat_format: str | None = None) -> Tokenizer:
    """Load the tokenizer of a Hugging Face model directory (see Tokenizer.from_dir)."""
    return Tokenizer.from_dir(path, chat_format=chat_format)


# ---------------------------------------------------------------------------------------------
# Training a small tokenizer

CHATML_TEMPLATE = (
    "{%- for message in messages %}\n"
    "    {{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}"
)

LLAMA3_TEMPLATE = (
    "{%- set loop_messages = messages %}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}\n"
    "    {%- if loop.index0 == 0 %}\n"
    "        {%- set content = bos_token + content %}\n"
    "    {%- endif %}\n"
    "    {{- content }}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}"
)

# chat_format -> (special tokens in id order, eos, pad, bos, template). pad differs from eos so
# that padding never hides the real end of a sequence from the loss.
CHAT_FORMATS = {
    "chatml": (
        ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
        "<|im_end|>",
        "<|endoftext|>",
        None,
        CHATML_TEMPLATE,
    ),
    "llama3": (
        ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
        "<|eot_id|>",
        "<|end_of_text|>",
        "<|begin_of_text|>",
        LLAMA3_TEMPLATE,
    ),
}


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    *,
    chat_format: str = "chatml",
    min_frequency: int = 2,
    split_digits: bool = False,
    added_tokens: Sequence[str] = (),
) -> Tokenizer:
    """Train a byte-level BPE tokenizer on `texts`, with the chat special tokens of `chat_format`.

    Byte-level means every string is encodable (no unknown token). The special tokens take ids
    0.., then the 256 byte symbols, then merges. Training is deterministic for the same texts.
    split_digits makes every digit its own token, as Qwen2's tokenizer does: numbers then look
    the same to the model wherever they occur, which small models need to learn arithmetic.
    added_tokens (such as "<think>", "</think>") become one token each, with the last ids, as
    Qwen3 has its think tags: they are ordinary text, so decoding keeps them.
    """
    if chat_format not in CHAT_FORMATS:
        raise ValueError(f"chat_format must be one of {sorted(CHAT_FORMATS)}, got {chat_format!r}")
    specials, eos, pad, bos, template = CHAT_FORMATS[chat_format]
    added = list(added_tokens)
    for t in added:
        if not isinstance(t, str) or not t or t in specials or added.count(t) > 1:
            raise ValueError(f"added_tokens must be distinct non-empty strings that are not special tokens; got {t!r}")
    smallest = len(specials) + 256 + len(added)
    if vocab_size < smallest:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: {len(specials)} special tokens + 256 bytes"
            + (f" + {len(added)} added tokens" if added else "") + f" = {smallest}"
        )

    tok = tokenizers.Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(added),
        min_frequency=min_frequency,
        special_tokens=list(specials),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False) for t in added])
    return Tokenizer(
        tok, eos_token=eos, pad_token=pad, bos_token=bos, chat_template=template, source="train_bpe"
    )


# ---------------------------------------------------------------------------------------------
# tokenizer_config.json and generation_config.json fields


def _generation_eos_ids(generation: Mapping[str, Any], vocab_size: int, source: str) -> list[int]:
    """generation_config.json's eos_token_id (absent, an int or a list of ints) as a checked list."""
    value = generation.get("eos_token_id")
    values = [] if value is None else value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab_size:
            raise ValueError(
                f"{Path(source) / GENERATION_CONFIG}: eos_token_id must be a token id or a list of them "
                f"(0 <= id < {vocab_size}, the tokenizer's size); got {value!r}"
            )
    return values


def _token_content(value: Any, field: str, file: Path) -> str | None:
    # Special tokens are written either as the string or as a serialized AddedToken.
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{file}: {field} must be a string or {{'content': ...}}, got {value!r}")


def _check_added_tokens(tok: tokenizers.Tokenizer, decoder: Any, file: Path) -> None:
    """Make tokenizer.json agree with added_tokens_decoder: same ids, none missing."""
    if not isinstance(decoder, Mapping):
        raise ValueError(f"{file}: added_tokens_decoder must be an object of id -> token")
    for key, entry in sorted(decoder.items(), key=lambda kv: int(kv[0])):
        if not isinstance(entry, Mapping) or not isinstance(entry.get("content"), str):
            raise ValueError(f"{file}: added_tokens_decoder[{key}] needs a 'content' string")
        want, content = int(key), entry["content"]
        have = tok.token_to_id(content)
        if have is None:
            # Declared only in the config: add it the way transformers would, then check the id.
            token = tokenizers.AddedToken(
                content,
                single_word=entry.get("single_word", False),
                lstrip=entry.get("lstrip", False),
                rstrip=entry.get("rstrip", False),
                normalized=entry.get("normalized", not entry.get("special", False)),
                special=entry.get("special", False),
            )
            if token.special:
                tok.add_special_tokens([token])
            else:
                tok.add_tokens([token])
            have = tok.token_to_id(content)
        if have != want:
            raise ValueError(
                f"{file}: added_tokens_decoder[{key}] is {content!r}, but tokenizer.json gives it id {have}"
            )


def _default_template(templates: list, source: str) -> str:
    named = {}
    for entry in templates:
        if not (
            isinstance(entry, Mapping)
            and isinstance(entry.get("name"), str)
            and isinstance(entry.get("template"), str)
        ):
            raise ValueError(f"{source}: chat_template list entries need 'name' and 'template' strings")
        named[entry["name"]] = entry["template"]
    if "default" not in named:
        raise ValueError(f"{source}: chat_template has no 'default' entry (found {sorted(named)})")
    return named["default"]


def _find_chat_template(path: Path, config: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """(template, where it came from). A chat_template.jinja file wins, as in transformers."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    value = config.get("chat_template")
    source = f"{path / 'tokenizer_config.json'}: chat_template"
    if value is None:
        return None, None
    if isinstance(value, str):
        return value, source
    if isinstance(value, list):
        return _default_template(value, source), source
    raise ValueError(
        f"{source} must be a string or a list of named templates, got {type(value).__name__}"
    )
