"""Data: JSONL errors with file:line, assistant-only loss masks, truncation, packing."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import chat_templates as T
import pytest
import torch
import torch.nn.functional as F

from nanopost.data import Example, fit_examples, make_batch, pack_examples, PAD_SEGMENT, tokenize_chat, tokenize_prompt
from nanopost.plumbing.data_files import DataError, load_rl, load_sft, read_jsonl
from nanopost.model import ModelConfig, Transformer
from nanopost.plumbing.tokenizer import Tokenizer, train_bpe

WORDS = "the quick brown fox jumps over a lazy dog what is plus minus times answer question hello world".split()

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "what is 2 plus 2?"},
    {"role": "assistant", "content": "the answer is 4"},
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "hello world!"},
]


def _corpus() -> list[str]:
    rng = random.Random(0)
    def line() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 10))) + rng.choice(".?! 0123456789")

    return [line() for _ in range(300)]


@pytest.fixture(scope="module")
def chatml():
    return train_bpe(_corpus(), 400)


@pytest.fixture(scope="module")
def llama3():
    return train_bpe(_corpus(), 400, chat_format="llama3")


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def tok(request, chatml, llama3):
    return {"chatml": chatml, "llama3": llama3}[request.param]


def eot(tokenizer) -> str:
    return tokenizer.eos_token  # both trained formats end turns with their eos token


def masked_spans(tokenizer, ex: Example) -> list[str]:
    """Decoded runs of consecutive trained tokens."""
    spans, run = [], []
    for i, m in zip(ex.ids, ex.mask):
        if m:
            run.append(i)
        elif run:
            spans.append(tokenizer.decode(run))
            run = []
    if run:
        spans.append(tokenizer.decode(run))
    return spans


def write_jsonl(path, lines: list) -> str:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------- loss masks


def test_mask_covers_each_assistant_reply_and_its_end_of_turn_token_only(tok):
    ex = tokenize_chat(tok, CHAT)
    assert masked_spans(tok, ex) == ["the answer is 4" + eot(tok), "hello world!" + eot(tok)]
    # Nothing is lost or added: the ids are the rendered conversation.
    assert tok.decode(ex.ids) == tok.apply_chat_template(CHAT)


def test_mask_excludes_the_newline_chatml_writes_after_im_end(chatml):
    ex = tokenize_chat(chatml, CHAT)
    assert chatml.decode(ex.ids[-2:]) == "<|im_end|>\n"
    assert ex.mask[-2:] == [1, 0]


def test_generation_prompt_is_not_trained(chatml):
    ex = tokenize_chat(chatml, CHAT)
    prompt = tokenize_prompt(chatml, CHAT[:2])
    assert chatml.decode(prompt).endswith("<|im_start|>assistant\n")
    assert ex.mask[: len(prompt)] == [0] * len(prompt)
    assert ex.mask[len(prompt)] == 1


def test_prompt_completion_record_trains_only_the_completion(tmp_path, tok):
    record = {"system": "Be brief.", "prompt": "what is 3 times 3?", "completion": "9"}
    path = write_jsonl(tmp_path / "sft.jsonl", [record])
    (messages,) = load_sft(path)
    assert [m["role"] for m in messages] == ["system", "user", "assistant"]
    ex = tokenize_chat(tok, messages)
    assert masked_spans(tok, ex) == ["9" + eot(tok)]


@pytest.mark.parametrize("turns", [3, 5])
def test_tokenize_prompt_equals_the_ids_before_the_last_reply(tok, turns):
    messages = CHAT[:turns]
    ex = tokenize_chat(tok, messages)
    prompt = tokenize_prompt(tok, messages[:-1])
    assert ex.ids[: len(prompt)] == prompt
    assert ex.mask[len(prompt)] == 1 and ex.mask[len(prompt) - 1] == 0


def test_messages_after_the_last_reply_are_left_out(chatml):
    ex = tokenize_chat(chatml, CHAT + [{"role": "user", "content": "bye"}])
    assert ex == tokenize_chat(chatml, CHAT)


def with_template(base: Tokenizer, template: str) -> Tokenizer:
    return Tokenizer(base.backend, eos_token=base.eos_token, pad_token=base.pad_token,
                     bos_token=base.bos_token, chat_template=template)


@pytest.mark.parametrize("name", ["qwen2", "qwen2.5", "llama3.1", "llama3.2"])
def test_published_templates_train_every_reply(name, chatml, llama3):
    base = chatml if name.startswith("qwen") else llama3
    tokenizer = with_template(base, {**T.CHATML_TEMPLATES, **T.LLAMA_TEMPLATES}[name])
    options = {"date_string": "26 Jul 2024"} if name.startswith("llama") else {}
    ex = tokenize_chat(tokenizer, CHAT, **options)
    end = "<|im_end|>" if name.startswith("qwen") else "<|eot_id|>"
    assert masked_spans(tokenizer, ex) == ["the answer is 4" + end, "hello world!" + end]
    prompt = tokenize_prompt(tokenizer, CHAT[:-1], **options)
    assert ex.ids[: len(prompt)] == prompt and ex.mask[len(prompt)] == 1


def test_template_that_always_appends_a_header_trains_only_the_final_turn(llama3):
    # The first Llama 3 release wrote the assistant header unconditionally.
    always = T.LLAMA3[: T.LLAMA3.index("{% if add_generation_prompt %}")]
    always += "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    tokenizer = with_template(llama3, always)
    assert tokenizer.chat_format.always_generation_prompt
    ex = tokenize_chat(tokenizer, CHAT)
    assert masked_spans(tokenizer, ex) == ["hello world!<|eot_id|>"]


def test_qwen3_history_rewrite_trains_only_the_final_turn(chatml):
    # Qwen3 drops the <think> block of an earlier reply once a user speaks again, so the text
    # of that reply is not what the model wrote: only the last reply is a target.
    qwen3 = with_template(chatml, T.QWEN3)
    messages = [
        {"role": "user", "content": "what is 2 plus 2?"},
        {"role": "assistant", "content": "<think>\ntwo and two\n</think>\n\n4"},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "<think>\ngreet\n</think>\n\nhello world"},
    ]
    ex = tokenize_chat(qwen3, messages)
    assert masked_spans(qwen3, ex) == ["<think>\ngreet\n</think>\n\nhello world<|im_end|>"]
    prompt = tokenize_prompt(qwen3, messages[:-1])
    assert ex.ids[: len(prompt)] == prompt
    assert "two and two" not in qwen3.decode(prompt)  # the history as Qwen3 shows it
    # A single-turn conversation is a plain prefix extension and trains its one reply.
    single = tokenize_chat(qwen3, messages[:2])
    assert masked_spans(qwen3, single) == ["<think>\ntwo and two\n</think>\n\n4<|im_end|>"]


def test_tokenize_chat_rejects_conversations_without_a_reply_to_learn(chatml):
    with pytest.raises(ValueError, match="no assistant turn"):
        tokenize_chat(chatml, CHAT[:2])
    with pytest.raises(ValueError, match="starts with an assistant turn"):
        tokenize_chat(chatml, CHAT[2:])


# ------------------------------------------------------------------------------- JSONL errors


def test_read_jsonl_skips_blank_lines_and_counts_from_one(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"x": 1}, "", "   ", {"x": 2}])
    assert read_jsonl(path) == [(1, {"x": 1}), (4, {"x": 2})]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"x": 1}\n{"x": \n', ":2: invalid JSON"),
        ('{"x": 1}\n\n[1, 2]\n', ":3: expected a JSON object, got a list"),
        ("", ":1: empty file"),
        ("\n  \n", ":1: empty file"),
    ],
)
def test_read_jsonl_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match="^" + re.escape(str(path) + message)):
        read_jsonl(path)


def test_read_jsonl_reports_bad_utf8_at_its_line_and_missing_files(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"x": 1}\n{"x": "\xff"}\n')
    with pytest.raises(DataError, match="^" + re.escape(f"{path}:2: not valid UTF-8")):
        read_jsonl(path)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'nope.jsonl'}: file not found")):
        read_jsonl(tmp_path / "nope.jsonl")
    assert issubclass(DataError, ValueError)


USER, REPLY = {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}
GOOD_SFT = {"messages": [USER, REPLY]}


@pytest.mark.parametrize(
    "record, message",
    [
        ({"text": "hi"}, 'missing field "messages" or "prompt"/"completion"'),
        ({"prompt": "q"}, 'missing field "completion"'),
        ({"prompt": "q", "completion": 3}, 'field "completion" must be a string, got a number'),
        ({"prompt": "q", "completion": "a", "system": None}, 'field "system" must be a string, got null'),
        ({**GOOD_SFT, "prompt": "q"}, 'has both "messages" and "prompt"/"completion"'),
        ({"messages": "hi"}, 'field "messages" must be a non-empty list'),
        ({"messages": []}, 'field "messages" must be a non-empty list of {"role", "content"} objects, got an '
                           "empty list"),
        ({"messages": [USER, "a"]}, 'field "messages"[1] must be an object, got a string'),
        ({"messages": [USER, REPLY, {"role": "tool", "content": "x"}]},
         'field "messages"[2].role must be one of system/user/assistant, got \'tool\''),
        ({"messages": [{"role": "user"}, REPLY]}, 'missing field "messages"[0].content'),
        ({"messages": [{"role": "user", "content": ["q"]}]}, 'field "messages"[0].content must be a string, got a list'),
        ({"messages": [{**USER, "name": "bob"}]}, "field \"messages\"[0] has unsupported key 'name'"),
        ({"messages": [USER]}, 'field "messages" has no assistant turn'),
        ({"messages": [REPLY, USER]}, 'field "messages"[0] is an assistant turn'),
    ],
)
def test_load_sft_errors_name_file_line_and_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD_SFT, "", record])
    with pytest.raises(DataError, match="^" + re.escape(f"{path}:3: {message}")):
        load_sft(path)


def test_load_sft_reads_both_record_forms(tmp_path):
    pair = {"prompt": "q", "completion": "a", "source": "ignored"}
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD_SFT, pair])
    assert load_sft(path) == [GOOD_SFT["messages"], GOOD_SFT["messages"]]


def test_load_rl_normalises_records(tmp_path):
    path = write_jsonl(
        tmp_path / "math.jsonl",
        [
            {"question": "1+1?", "answer": 2, "difficulty": 1, "numbers": [1, 1]},
            {"prompt": "half?", "answer": 0.5, "id": 7},
            {"prompt": "name?", "answer": "Ada", "id": "x", "difficulty": None},
        ],
    )
    assert load_rl(path) == [
        {"prompt": "1+1?", "answer": "2", "difficulty": 1.0, "id": "math-1", "numbers": [1, 1]},
        {"prompt": "half?", "answer": "0.5", "difficulty": None, "id": "7"},
        {"prompt": "name?", "answer": "Ada", "difficulty": None, "id": "x"},
    ]


@pytest.mark.parametrize(
    "record, message",
    [
        ({"answer": "1"}, 'missing field "prompt" (or "question")'),
        ({"prompt": "q", "question": "q", "answer": "1"}, 'has both "prompt" and "question"'),
        ({"question": 5, "answer": "1"}, 'field "question" must be a string, got a number'),
        ({"prompt": "  ", "answer": "1"}, 'field "prompt" is empty'),
        ({"prompt": "q"}, 'missing field "answer"'),
        ({"prompt": "q", "answer": True}, 'field "answer" must be a string or a finite number, got a boolean'),
        ({"prompt": "q", "answer": ""}, 'field "answer" is empty'),
        ({"prompt": "q", "answer": "1", "difficulty": "hard"},
         'field "difficulty" must be a finite number, got a string'),
        ({"prompt": "q", "answer": "1", "id": 1.5}, 'field "id" must be a string or an integer, got a number'),
        ({"prompt": "q", "answer": "1", "id": "a"}, "duplicate id 'a' (first on line 1)"),
    ],
)
def test_load_rl_errors_name_file_line_and_field(tmp_path, record, message):
    path = write_jsonl(tmp_path / "rl.jsonl", [{"prompt": "p", "answer": "1", "id": "a"}, "", record])
    with pytest.raises(DataError, match="^" + re.escape(f"{path}:3: {message}")):
        load_rl(path)


# ------------------------------------------------------------------------------- length


def ex(n: int, trained_from: int = 0) -> Example:
    """n ids (distinct per length, so documents can be told apart), trained from `trained_from` on."""
    return Example(list(range(100 * n, 100 * n + n)), [0] * trained_from + [1] * (n - trained_from))


def test_fit_examples_truncates_keeping_the_start_and_counts():
    examples = [ex(4), ex(10, trained_from=2), ex(10, trained_from=8)]
    out, affected = fit_examples(examples, max_len=6)
    assert affected == 2
    # The third has no target left in its first 6 tokens, so it is dropped.
    assert out == [examples[0], Example(examples[1].ids[:6], examples[1].mask[:6])]


def test_fit_examples_drop_removes_every_overlong_example():
    examples = [ex(4), ex(10), ex(6)]
    assert fit_examples(examples, max_len=6, overflow="drop") == ([examples[0], examples[2]], 1)
    with pytest.raises(ValueError, match="overflow"):
        fit_examples(examples, 6, overflow="wrap")


# ------------------------------------------------------------------------------- batches


def documents(batches) -> list[list[int]]:
    """The examples' ids read back from packed batches, checking each row's layout on the way."""
    docs = []
    for b in batches:
        for row in range(b.input_ids.shape[0]):
            seg = b.segment_ids[row]
            pad = seg == PAD_SEGMENT
            assert not pad.any() or bool(pad[pad.nonzero()[0, 0] :].all())  # padding only at the end
            assert not b.loss_mask[row][pad].any()
            for s in seg[~pad].unique():
                where = (seg == s).nonzero()[:, 0]
                assert torch.equal(where, torch.arange(where[0], where[-1] + 1))  # contiguous
                assert torch.equal(b.positions[row, where], torch.arange(len(where)))  # restart at 0
                inputs, labels = b.input_ids[row, where], b.labels[row, where]
                # Labels are the next input within the same document, never the next document's.
                assert torch.equal(labels[:-1], inputs[1:])
                docs.append(inputs.tolist() + [int(labels[-1])])
    return docs


def varied_examples(n: int = 60, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    lengths = [rng.choice([rng.randint(2, 12), rng.randint(40, 64)]) for _ in range(n)]
    # Document k has ids 1000k.. so that documents can be told apart; its second half is trained.
    return [Example([1000 * k + j for j in range(L)], [0] * (L // 2) + [1] * (L - L // 2))
            for k, L in enumerate(lengths)]


def test_packing_keeps_every_example_exactly_once_within_the_row_limit():
    examples = varied_examples()
    batches = pack_examples(examples, max_tokens_per_row=64, rows_per_batch=4, shuffle_seed=1)
    assert Counter(map(tuple, documents(batches))) == Counter(tuple(e.ids) for e in examples)
    assert all(b.input_ids.shape[1] <= 64 and b.input_ids.shape[0] <= 4 for b in batches)
    assert sum(b.num_loss_tokens for b in batches) == sum(e.num_loss_tokens for e in examples)
    assert sum(b.num_examples for b in batches) == len(examples)


def test_packed_rows_shift_each_document_and_pad_to_the_longest_row():
    examples = [
        Example([5, 6, 7, 8], [0, 0, 1, 1]),
        Example([9, 10, 11], [0, 1, 1]),
        Example([12, 13, 14, 15, 16], [0, 0, 0, 1, 1]),
    ]
    # Best fit, longest first: [12..16] opens row 0 (4 of 6 positions), [5..8] does not fit
    # there and opens row 1, [9..11] fills row 0 exactly.
    (b,) = pack_examples(examples, max_tokens_per_row=6, rows_per_batch=2, pad_id=3)
    assert b.input_ids.tolist() == [[12, 13, 14, 15, 9, 10], [5, 6, 7, 3, 3, 3]]
    assert b.labels.tolist() == [[13, 14, 15, 16, 10, 11], [6, 7, 8, 3, 3, 3]]
    assert b.loss_mask.tolist() == [[0, 0, 1, 1, 1, 1], [0, 1, 1, 0, 0, 0]]
    assert b.positions.tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 0, 0]]
    assert b.segment_ids.tolist() == [[0, 0, 0, 0, 1, 1], [0, 0, 0, -1, -1, -1]]
    assert b.num_loss_tokens == 6
    assert b.num_examples == 3  # padding is not a document


def padding_fraction(batches) -> float:
    """Share of all [B, T] positions that are padding: compute spent on nothing."""
    total = sum(b.segment_ids.numel() for b in batches)
    return sum(int((b.segment_ids == PAD_SEGMENT).sum()) for b in batches) / total if total else 0.0


def test_packing_wastes_far_less_than_padding_each_example():
    examples = varied_examples(200)
    packed = pack_examples(examples, max_tokens_per_row=64, rows_per_batch=8, shuffle_seed=0)
    naive = [make_batch(examples[i : i + 8]) for i in range(0, len(examples), 8)]
    # Half the documents are longer than half a row, so some padding is unavoidable.
    assert padding_fraction(packed) < 0.15
    assert padding_fraction(naive) > 0.45


def test_packing_is_deterministic_given_the_seed():
    examples = varied_examples()
    a, b = (pack_examples(examples, 64, 4, shuffle_seed=3) for _ in range(2))
    assert all(torch.equal(x.input_ids, y.input_ids) for x, y in zip(a, b))
    c = pack_examples(examples, 64, 4, shuffle_seed=4)
    assert [x.input_ids.tolist() for x in a] != [y.input_ids.tolist() for y in c]


def test_packing_rejects_examples_longer_than_a_row():
    with pytest.raises(ValueError, match=r"examples\[1\] needs 9 positions > max_tokens_per_row 8.*max_len=9"):
        pack_examples([ex(3), ex(10)], max_tokens_per_row=8, rows_per_batch=1)


def test_make_batch_pads_one_example_per_row():
    b = make_batch([Example([5, 6, 7], [0, 1, 1]), Example([8, 9], [0, 1])], pad_id=3)
    assert b.input_ids.tolist() == [[5, 6], [8, 3]]
    assert b.labels.tolist() == [[6, 7], [9, 3]]
    assert b.loss_mask.tolist() == [[1, 1], [1, 0]]
    assert b.segment_ids.tolist() == [[0, 0], [0, -1]]
    assert padding_fraction([b]) == 0.25


def test_packed_and_padded_batches_give_the_same_loss():
    # The model sees each packed document as if it were alone: same summed loss, same count.
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    model.init_weights(std=0.2, generator=torch.Generator().manual_seed(0))
    rng = random.Random(0)
    examples = []
    for _ in range(6):
        n = rng.randint(3, 12)
        mask = [0] + [rng.randint(0, 1) for _ in range(n - 2)] + [1]
        examples.append(Example([rng.randrange(64) for _ in range(n)], mask))

    def summed_loss(b):
        with torch.no_grad():
            logits = model(b.input_ids, positions=b.positions, segment_ids=b.segment_ids)
        ce = F.cross_entropy(logits.flatten(0, 1), b.labels.flatten(), reduction="none")
        return (ce * b.loss_mask.flatten()).sum()

    packed = pack_examples(examples, max_tokens_per_row=16, rows_per_batch=8)
    assert len(packed) == 1 and packed[0].input_ids.shape[0] < len(examples)
    padded = make_batch(examples)
    assert packed[0].num_loss_tokens == padded.num_loss_tokens
    torch.testing.assert_close(summed_loss(packed[0]), summed_loss(padded), rtol=1e-5, atol=1e-5)


def test_load_rl_reads_gsm8k_style_answers(tmp_path):
    f = tmp_path / "g.jsonl"
    f.write_text('{"question": "How many?", "answer": "2 + 2 = 4 apples\\nThen 1,000 more.\\n#### 1,004"}\n')
    [record] = load_rl(f)
    assert record["prompt"] == "How many?" and record["answer"] == "1004"
    assert record["reasoning"] == "2 + 2 = 4 apples\nThen 1,000 more."
