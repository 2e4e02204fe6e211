"""Tiny random checkpoints laid out like the real releases.

Each carries its release's special tokens at their real ids (so the vocabulary and the embedding
table have their real sizes), its eos / pad / bos settings, config.json's and
generation_config.json's end ids, and its published chat template; only the ordinary vocabulary
(a small byte-level BPE padded with unused entries up to the first special id) and the model's
width are made small.

    qwen2.5-base       eos <|endoftext|>, turns end with <|im_end|>; generation_config eos 151643
    qwen2.5-instruct   eos <|im_end|>;  generation_config eos [151645, 151643]
    qwen3              eos <|im_end|>;  generation_config eos [151645, 151643]; <think> tokens
    llama3-base        eos <|end_of_text|>, turns end with <|eot_id|>; no pad token
    llama3.1-instruct  eos <|eot_id|>;  config and generation_config eos [128001, 128008, 128009]

Llama 3 base is given the Llama 3 Instruct template, as a user fine-tuning it on chats would.
"""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, trainers

from chat_templates import LLAMA3, LLAMA3_1, QWEN2_5, QWEN3
from nanopost.plumbing.hf_io import config_from_hf, save_model
from nanopost.model import Transformer

QWEN_SPECIALS = [
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False),
]  # from id 151643
QWEN3_SPECIALS = QWEN_SPECIALS + [
    ("<tool_response>", False), ("</tool_response>", False), ("<think>", False), ("</think>", False),
]


def _llama_specials(version: str) -> list[tuple[str, bool]]:
    """Llama 3's 256 reserved ids from 128000; 3.1 names a few of the reserved ones."""
    named = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 6: "<|start_header_id|>",
             7: "<|end_header_id|>", 9: "<|eot_id|>"}
    if version == "3.1":
        named.update({4: "<|finetune_right_pad_id|>", 8: "<|eom_id|>", 10: "<|python_tag|>"})
    out, reserved = [], 0
    for i in range(256):
        if i in named:
            out.append((named[i], True))
        else:
            out.append((f"<|reserved_special_token_{reserved}|>", True))
            reserved += 1
    return out


SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, rms_norm_eps=1e-6, hidden_act="silu")

QWEN25_CONFIG = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=151936,
                     bos_token_id=151643, tie_word_embeddings=True, max_position_embeddings=32768,
                     rope_theta=1000000.0, use_sliding_window=False)

RELEASES = {
    "qwen2.5-base": dict(
        specials=QWEN_SPECIALS, first=151643, template=QWEN2_5,
        tokenizer=dict(eos_token="<|endoftext|>", pad_token="<|endoftext|>", bos_token=None,
                       tokenizer_class="Qwen2Tokenizer"),
        config={**QWEN25_CONFIG, "eos_token_id": 151643},
        generation=dict(bos_token_id=151643, do_sample=False, eos_token_id=151643, max_new_tokens=2048),
    ),
    "qwen2.5-instruct": dict(
        specials=QWEN_SPECIALS, first=151643, template=QWEN2_5,
        tokenizer=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
                       tokenizer_class="Qwen2Tokenizer"),
        config={**QWEN25_CONFIG, "eos_token_id": 151645},
        generation=dict(bos_token_id=151643, pad_token_id=151643, do_sample=True,
                        eos_token_id=[151645, 151643], repetition_penalty=1.1, temperature=0.7,
                        top_p=0.8, top_k=20),
    ),
    "qwen3": dict(
        specials=QWEN3_SPECIALS, first=151643, template=QWEN3,
        tokenizer=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None,
                       tokenizer_class="Qwen2Tokenizer"),
        config=dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], vocab_size=151936,
                    bos_token_id=151643, eos_token_id=151645, tie_word_embeddings=True, head_dim=16,
                    attention_bias=False, max_position_embeddings=40960, rope_theta=1000000.0,
                    use_sliding_window=False),
        generation=dict(bos_token_id=151643, do_sample=True, eos_token_id=[151645, 151643],
                        pad_token_id=151643, temperature=0.6, top_k=20, top_p=0.95),
    ),
    "llama3-base": dict(
        specials=_llama_specials("3"), first=128000, template=LLAMA3,
        tokenizer=dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                       tokenizer_class="PreTrainedTokenizerFast"),
        config=dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256,
                    bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False,
                    max_position_embeddings=8192, rope_theta=500000.0, attention_bias=False, mlp_bias=False),
        generation=dict(bos_token_id=128000, eos_token_id=128001, do_sample=True, temperature=0.6,
                        top_p=0.9, max_length=4096),
    ),
    "llama3.1-instruct": dict(
        specials=_llama_specials("3.1"), first=128000, template=LLAMA3_1,
        tokenizer=dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                       tokenizer_class="PreTrainedTokenizerFast"),
        config=dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256,
                    bos_token_id=128000, eos_token_id=[128001, 128008, 128009], tie_word_embeddings=False,
                    max_position_embeddings=131072, rope_theta=500000.0, attention_bias=False, mlp_bias=False,
                    rope_scaling={"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192, "rope_type": "llama3"}),
        generation=dict(bos_token_id=128000, do_sample=True, eos_token_id=[128001, 128008, 128009],
                        temperature=0.6, top_p=0.9),
    ),
}

# What a chat turn of each release ends with, and the eos its tokenizer declares.
END_OF_TURN = {"qwen2.5-base": "<|im_end|>", "qwen2.5-instruct": "<|im_end|>", "qwen3": "<|im_end|>",
               "llama3-base": "<|eot_id|>", "llama3.1-instruct": "<|eot_id|>"}


def release_tokenizer(texts: list[str], specials: list[tuple[str, bool]], first: int) -> tokenizers.Tokenizer:
    """A small byte-level BPE whose vocabulary is padded with unused entries so that the
    special tokens take their release's ids, first..first+len(specials)-1."""
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for i in range(len(vocab), first):
        vocab[f"unused{i}"] = i  # never produced: no merge builds it
    data["added_tokens"] = [
        {"id": first + i, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": special}
        for i, (content, special) in enumerate(specials)
    ]
    return tokenizers.Tokenizer.from_str(json.dumps(data))


def make_release(name: str, path: Path, texts: list[str], *, seed: int = 0) -> Path:
    """Write a tiny random checkpoint shaped like release `name` (see RELEASES) into `path`."""
    spec = RELEASES[name]
    path.mkdir(parents=True, exist_ok=True)
    tok = release_tokenizer(texts, spec["specials"], spec["first"])
    tok.save(str(path / "tokenizer.json"))
    tokenizer_config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(spec["first"] + i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False,
                                     "single_word": False, "special": sp}
            for i, (c, sp) in enumerate(spec["specials"])
        },
        "chat_template": spec["template"],
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec["config"]["max_position_embeddings"],
        **spec["tokenizer"],
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))

    hf = {**spec["config"], **SMALL, "torch_dtype": "float32"}
    torch.manual_seed(seed)
    model = Transformer(config_from_hf(hf, source=name))
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    save_model(model, path)
    # The release's own files, with fields nanopost does not model kept as they are.
    (path / "config.json").write_text(json.dumps(hf, indent=2))
    (path / "generation_config.json").write_text(json.dumps(spec["generation"], indent=2))
    return path
