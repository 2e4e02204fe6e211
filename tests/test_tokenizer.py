"""Tokenizer and chat templates, checked against transformers on real published templates."""

from __future__ import annotations

import json
import random

import chat_templates as T
import pytest
import transformers

from nanopost.plumbing.chat_template import detect_chat_format
from nanopost.plumbing.tokenizer import Tokenizer, load_tokenizer, train_bpe

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 12 + 30? The answer is 42.",
    "Große Äpfel kosten 3,50 €. 你好，世界！ Emoji: 🙂",
    "def add(a, b):\n    return a + b\n",
    "<think>\nreasoning goes here\n</think>\n\nThe final answer.",
] * 20

CHATS = {
    "one_user": [{"role": "user", "content": "Hi there!"}],
    "system_user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "multi_turn": [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "Add 3 and 4."},
    ],
    "system_multi_turn_ends_with_assistant": [
        {"role": "system", "content": "  Be nice.\n"},
        {"role": "user", "content": " spaced question \n"},
        {"role": "assistant", "content": "\nan answer  "},
        {"role": "user", "content": "Große Äpfel? 你好"},
        {"role": "assistant", "content": "Ja."},
    ],
    "system_in_the_middle": [
        {"role": "user", "content": "a"},
        {"role": "system", "content": "b"},
        {"role": "user", "content": "c"},
    ],
    "thinking_history": [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "<think>\nr1\n</think>\n\na1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "<think>r2</think>a2"},
    ],
    "thinking_after_last_query": [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "<think>\nr1\n</think>\n\na1"},
        {"role": "user", "content": "<tool_response>\nresult\n</tool_response>"},
        {"role": "assistant", "content": "no think here"},
        {"role": "assistant", "content": "<think>\n\nr3\n\n</think>\n\n\na3"},
    ],
    "reasoning_content_field": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "answer", "reasoning_content": "\nsteps\n"},
    ],
}


@pytest.fixture(scope="module")
def chatml():
    return train_bpe(CORPUS, 400)


@pytest.fixture(scope="module")
def llama():
    return train_bpe(CORPUS, 400, chat_format="llama3")


@pytest.fixture(scope="module")
def hf_chatml(chatml, tmp_path_factory):
    path = tmp_path_factory.mktemp("chatml")
    chatml.save(path)
    return transformers.AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def hf_llama(llama, tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    llama.save(path)
    return transformers.AutoTokenizer.from_pretrained(path)


def with_template(tok: Tokenizer, template: str) -> Tokenizer:
    copy = Tokenizer(tok.backend, eos_token=tok.eos_token, pad_token=tok.pad_token, bos_token=tok.bos_token)
    copy.chat_template = template
    return copy


def hf_render(hf, template, messages, **kwargs) -> str:
    return hf.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


# -- chat templates: same text as transformers ----------------------------------------------------


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("chat", sorted(CHATS))
@pytest.mark.parametrize("name", sorted(T.CHATML_TEMPLATES))
def test_chatml_family_renders_like_transformers(name, chat, add_generation_prompt, chatml, hf_chatml):
    template, messages = T.CHATML_TEMPLATES[name], CHATS[chat]
    ours = with_template(chatml, template)
    want = hf_render(hf_chatml, template, messages, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == want


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("chat", sorted(CHATS))
@pytest.mark.parametrize("name", sorted(T.LLAMA_TEMPLATES))
def test_llama_family_renders_like_transformers(name, chat, add_generation_prompt, llama, hf_llama):
    template, messages = T.LLAMA_TEMPLATES[name], CHATS[chat]
    ours = with_template(llama, template)
    want = hf_render(hf_llama, template, messages, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == want


def random_chat(rng: random.Random) -> list[dict]:
    # Pieces that the templates treat specially: think tags, tool-response wrapping, whitespace.
    pieces = ["a", " b ", "\n", "\n\n", "<think>", "</think>", "<tool_response>", "</tool_response>", "\t", "é"]
    chat = []
    for _ in range(rng.randint(1, 6)):
        role = rng.choice(["system", "user", "assistant", "user", "assistant"])
        message = {"role": role, "content": "".join(rng.choices(pieces, k=rng.randint(0, 6)))}
        if role == "assistant" and rng.random() < 0.2:
            message["reasoning_content"] = "".join(rng.choices(pieces, k=rng.randint(0, 3)))
        chat.append(message)
    return chat


@pytest.mark.parametrize("name", sorted(T.CHATML_TEMPLATES) + sorted(T.LLAMA_TEMPLATES))
def test_random_chats_render_like_transformers(name, chatml, hf_chatml, llama, hf_llama):
    ours, hf = (chatml, hf_chatml) if name in T.CHATML_TEMPLATES else (llama, hf_llama)
    template = {**T.CHATML_TEMPLATES, **T.LLAMA_TEMPLATES}[name]
    ours = with_template(ours, template)
    rng = random.Random(name)
    for _ in range(50):
        messages, gen, thinking = random_chat(rng), rng.random() < 0.5, rng.random() < 0.5
        want = hf_render(hf, template, messages, add_generation_prompt=gen, enable_thinking=thinking)
        assert ours.apply_chat_template(messages, gen, enable_thinking=thinking) == want, messages


@pytest.mark.parametrize("name", ["qwen3", "qwen3-thinking-2507", "qwen2.5"])
def test_enable_thinking_false_matches_transformers(name, chatml, hf_chatml):
    template, messages = T.CHATML_TEMPLATES[name], CHATS["multi_turn"]
    ours = with_template(chatml, template)
    want = hf_render(hf_chatml, template, messages, add_generation_prompt=True, enable_thinking=False)
    assert ours.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False) == want


def test_qwen3_empty_think_block_when_thinking_disabled(chatml):
    ours = with_template(chatml, T.QWEN3)
    text = ours.apply_chat_template(CHATS["one_user"], add_generation_prompt=True, enable_thinking=False)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


@pytest.mark.parametrize("name", ["llama3.1", "llama3.2"])
def test_llama31_date_string_matches_transformers(name, llama, hf_llama):
    template, messages = T.LLAMA_TEMPLATES[name], CHATS["system_user"]
    ours = with_template(llama, template)
    want = hf_render(hf_llama, template, messages, add_generation_prompt=True, date_string="01 Jan 2025")
    assert ours.apply_chat_template(messages, add_generation_prompt=True, date_string="01 Jan 2025") == want
    assert "Today Date: 01 Jan 2025" in want


def test_default_system_prompts_are_read_from_the_template(chatml):
    assert detect_chat_format(T.QWEN2).default_system == "You are a helpful assistant."
    assert detect_chat_format(T.QWEN2_5).default_system == (
        "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    )
    assert detect_chat_format(T.QWEN3).default_system is None
    text = with_template(chatml, T.QWEN3).apply_chat_template(CHATS["one_user"])
    assert text == "<|im_start|>user\nHi there!<|im_end|>\n"


def test_encode_chat_gives_transformers_ids(chatml, hf_chatml):
    for template in T.CHATML_TEMPLATES.values():
        messages = CHATS["system_multi_turn_ends_with_assistant"]
        ours = with_template(chatml, template).encode_chat(messages, add_generation_prompt=True)
        want = hf_chatml.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        assert ours == list(want)


# -- chat templates: what is refused --------------------------------------------------------------


@pytest.mark.parametrize(
    "template, expected",
    [
        # Gemma-style: no supported family's markers at all.
        (
            "{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\\n' + m['content'] }}{% endfor %}",
            "no marker",
        ),
        # ChatML written with text outside the tags (a trailing space after each turn).
        (
            "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|> "
            "{% endfor %}",
            "literal text",
        ),
        # Qwen2.5 with the assistant turn changed: must not be rendered as Qwen2.5.
        (
            T.QWEN2_5.replace("message.content + '<|im_end|>'", "message.content | trim + '<|im_end|>'"),
            "Qwen2.5: lacks",
        ),
        # Qwen3 whose thinking rule depends on a variable we would not honour.
        (
            T.QWEN3.replace("if loop.last or (not loop.last and reasoning_content)", "if enable_thinking"),
            "Qwen3: lacks",
        ),
    ],
)
def test_unrecognised_template_raises_naming_what_was_found(template, expected, chatml):
    ours = with_template(chatml, template)
    with pytest.raises(ValueError, match="unrecognised chat template") as info:
        ours.apply_chat_template(CHATS["one_user"])
    assert expected in str(info.value)
    assert "Supported:" in str(info.value) or "supported:" in str(info.value)


TURN = "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
GEN = "{{ '<|im_start|>assistant\\n' }}"


def chatml_variant(a: str, b: str, c: str, d: str, end: str = "", dash: str = "") -> str:
    """Plain ChatML with text a..d between its tags, and `dash` inside every block tag."""
    o, e = "{%" + dash, dash + "%}"
    return (
        f"{o} for message in messages {e}{a}{TURN}{b}{o} endfor {e}{c}"
        f"{o} if add_generation_prompt {e}{d}{GEN}{o} endif {e}{end}"
    )


@pytest.mark.parametrize(
    "template, recognised",
    [
        # Newlines after block tags are eaten by trim_blocks, indentation before them by lstrip_blocks.
        (chatml_variant("\n", "", "\n  ", "", end="\n"), True),
        # Dashes strip everything on their side.
        (chatml_variant("\n    ", "\n", "\n", "\n  ", dash="-"), True),
        # A newline after an expression is not trimmed: it is written, once per message.
        (chatml_variant("", "\n", "", ""), False),
        # Indentation before an expression is written too.
        (chatml_variant("\n    ", "", "", ""), False),
        # Trailing newlines: trim_blocks takes one, Jinja drops the final one, a third is written.
        (chatml_variant("", "", "", "", end="\n\n"), True),
        (chatml_variant("", "", "", "", end="\n\n\n"), False),
    ],
)
def test_whitespace_variants_render_like_transformers_or_raise(template, recognised, chatml, hf_chatml):
    messages = CHATS["multi_turn"]
    ours = with_template(chatml, template)
    rendered_by_hf = hf_render(hf_chatml, template, messages, add_generation_prompt=True)
    if recognised:
        assert ours.apply_chat_template(messages, add_generation_prompt=True) == rendered_by_hf
    else:
        with pytest.raises(ValueError, match="literal text"):
            ours.apply_chat_template(messages, add_generation_prompt=True)
        # Rendering it as plain ChatML would have been wrong.
        assert rendered_by_hf != chatml.apply_chat_template(messages, add_generation_prompt=True)


def test_missing_chat_template_raises(chatml, tmp_path):
    chatml.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="no chat template"):
        load_tokenizer(tmp_path).apply_chat_template(CHATS["one_user"])


@pytest.mark.parametrize(
    "messages, expected",
    [
        ([], "empty"),
        ("hello", "must be a list"),
        ([{"role": "tool", "content": "x"}], "role must be one of system, user, assistant; got 'tool'"),
        ([{"role": "user", "content": ["a"]}], r"messages\[0\] \(user\): content must be a string, got list"),
        ([{"role": "user"}], "missing 'content'"),
        (
            [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "tool_calls": []}],
            r"messages\[1\]: unsupported key 'tool_calls'",
        ),
        (["hi"], r"messages\[0\] must be a dict"),
    ],
)
def test_bad_messages_raise_clear_errors(messages, expected, chatml):
    with pytest.raises(ValueError, match=expected):
        chatml.apply_chat_template(messages)


def test_llama_template_without_bos_token_raises(chatml):
    with pytest.raises(ValueError, match="bos_token"):
        with_template(chatml, T.LLAMA3).apply_chat_template(CHATS["one_user"])


# -- encode / decode ------------------------------------------------------------------------------


@pytest.mark.parametrize("text", CORPUS[:5] + ["", "  leading and trailing  ", "unseen: Ωμέγα 🚀 \t\r\n"])
def test_encode_decode_round_trip(text, chatml):
    assert chatml.decode(chatml.encode(text)) == text


@pytest.mark.parametrize(
    "fmt, tokens",
    [
        ("chatml", ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]),
        ("llama3", ["<|begin_of_text|>", "<|start_header_id|>", "<|eot_id|>"]),
    ],
)
def test_special_tokens_in_text_are_single_ids(fmt, tokens, chatml, llama):
    tok = chatml if fmt == "chatml" else llama
    for token in tokens:
        assert tok.encode(token) == [tok.token_to_id(token)]
    ids = tok.encode(f"a{tokens[1]}b{tokens[2]}")
    assert tok.token_to_id(tokens[1]) in ids and tok.token_to_id(tokens[2]) in ids
    assert tok.decode(ids, skip_special_tokens=True) == "ab"


def test_special_token_ids_and_pad_differs_from_eos(chatml, llama):
    assert chatml.decode([chatml.eos_token_id]) == "<|im_end|>"
    assert chatml.decode([chatml.pad_token_id]) == "<|endoftext|>"
    assert chatml.bos_token_id is None
    assert llama.decode([llama.bos_token_id, llama.eos_token_id]) == "<|begin_of_text|><|eot_id|>"
    assert chatml.pad_token_id != chatml.eos_token_id and llama.pad_token_id != llama.eos_token_id


def test_pad_falls_back_to_eos(chatml):
    no_pad = Tokenizer(chatml.backend, eos_token="<|im_end|>")
    assert no_pad.pad_token_id == no_pad.eos_token_id


def test_encode_matches_transformers(chatml, hf_chatml):
    for text in CORPUS[:5] + ["<|im_start|>user\nhi<|im_end|>\n"]:
        assert chatml.encode(text) == hf_chatml.encode(text, add_special_tokens=False)
        assert chatml.decode(chatml.encode(text)) == hf_chatml.decode(chatml.encode(text))


# -- save / load ----------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["chatml", "llama3"])
def test_saved_tokenizer_loads_in_transformers_with_same_ids_and_chat(fmt, chatml, llama, tmp_path):
    tok = chatml if fmt == "chatml" else llama
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in CORPUS[:5]:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
    assert hf.eos_token_id == tok.eos_token_id and hf.pad_token_id == tok.pad_token_id
    assert hf.bos_token_id == tok.bos_token_id
    for messages in CHATS.values():
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert tok.apply_chat_template(messages, add_generation_prompt=True) == want

    again = load_tokenizer(tmp_path)
    assert again.vocab_size == tok.vocab_size
    assert again.encode(CORPUS[2]) == tok.encode(CORPUS[2])
    assert again.chat_template == tok.chat_template


def test_save_load_keeps_a_real_template_and_unknown_config_fields(chatml, tmp_path):
    chatml.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.update(chat_template=T.QWEN2_5, model_max_length=32768, eos_token={"content": "<|im_end|>"})
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = load_tokenizer(tmp_path)
    assert loaded.eos_token == "<|im_end|>" and loaded.chat_format.name == "Qwen2.5"

    out = tmp_path / "out"
    loaded.save(out)
    saved = json.loads((out / "tokenizer_config.json").read_text())
    assert saved["model_max_length"] == 32768 and saved["chat_template"] == T.QWEN2_5
    hf = transformers.AutoTokenizer.from_pretrained(out)
    messages = CHATS["multi_turn"]
    assert hf.apply_chat_template(messages, tokenize=False) == loaded.apply_chat_template(messages)


def test_chat_template_jinja_file_wins_and_named_templates_use_default(chatml, tmp_path):
    chatml.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": T.QWEN3},
        {"name": "default", "template": T.QWEN2},
    ]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(tmp_path).chat_format.name == "Qwen2"

    (tmp_path / "chat_template.jinja").write_text(T.QWEN3)
    assert load_tokenizer(tmp_path).chat_format.family == "qwen3"


def test_missing_tokenizer_json_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "tokenizer.json")):
        load_tokenizer(tmp_path)


def test_added_tokens_decoder_disagreeing_with_tokenizer_json_raises(chatml, tmp_path):
    chatml.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["0"]["content"] = "<|im_end|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: added_tokens_decoder\[0\]"):
        load_tokenizer(tmp_path)


def test_bad_special_token_in_config_raises(chatml, tmp_path):
    chatml.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|not_a_token|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="eos_token '<\\|not_a_token\\|>' is not in the vocabulary"):
        load_tokenizer(tmp_path)


# -- training -------------------------------------------------------------------------------------


def test_train_bpe_is_deterministic(chatml, tmp_path):
    again = train_bpe(CORPUS, 400)
    chatml.save(tmp_path / "a")
    again.save(tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_train_bpe_special_tokens_come_first_and_vocab_is_bounded(chatml):
    assert [chatml.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    assert 3 + 256 < chatml.vocab_size <= 400


def test_train_bpe_rejects_bad_arguments():
    with pytest.raises(ValueError, match="too small"):
        train_bpe(CORPUS, 100)
    with pytest.raises(ValueError, match="chat_format must be one of"):
        train_bpe(CORPUS, 400, chat_format="gemma")


def test_train_bpe_added_tokens_are_single_plain_tokens_everywhere(tmp_path):
    tags = ["<think>", "</think>", "<answer>", "</answer>"]
    tok = train_bpe(CORPUS, 400, added_tokens=tags)
    assert tok.vocab_size <= 400
    ids = [tok.token_to_id(t) for t in tags]
    assert ids == list(range(tok.vocab_size - 4, tok.vocab_size))  # the last ids
    text = "<think>\n12+30=42\n</think>\n<answer>42</answer>"
    encoded = tok.encode(text)
    assert [i for i in encoded if i in ids] == [ids[0], ids[1], ids[2], ids[3]]
    assert len(encoded) < len(train_bpe(CORPUS, 400).encode(text))
    # plain text, not special: skipping special tokens keeps them (a reward reads the tags)
    assert tok.decode(encoded) == tok.decode(encoded, skip_special_tokens=True) == text
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert hf.encode(text, add_special_tokens=False) == encoded
    assert hf.decode(encoded, skip_special_tokens=True) == text
    again = load_tokenizer(tmp_path)
    assert again.encode(text) == encoded and again.decode(encoded) == text


@pytest.mark.parametrize("added", [["<think>", "<think>"], [""], ["<|im_end|>"]])
def test_train_bpe_rejects_bad_added_tokens(added):
    with pytest.raises(ValueError, match="added_tokens must be distinct non-empty strings"):
        train_bpe(CORPUS, 400, added_tokens=added)
