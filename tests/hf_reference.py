"""Small random transformers models used as the reference in tests (never by the library)."""

from __future__ import annotations

import torch
import transformers

from nanopost.model import ModelConfig, Transformer

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
)

# One entry per feature the loader must get right.
CONFIGS = {
    "llama-gqa-untied": dict(model_type="llama", tie_word_embeddings=False),
    "llama-tied-bias-llama3rope": dict(
        model_type="llama",
        tie_word_embeddings=True,
        attention_bias=True,
        rope_scaling=dict(
            rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "qwen2-bias-tied": dict(model_type="qwen2", tie_word_embeddings=True),
    "qwen2-mha-untied": dict(model_type="qwen2", num_key_value_heads=4, tie_word_embeddings=False),
    "qwen3-qknorm-headdim": dict(model_type="qwen3", head_dim=24, tie_word_embeddings=True),
}

HF_CLASSES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}


def hf_model(name: str, seed: int = 0) -> transformers.PreTrainedModel:
    kw = {**BASE, **CONFIGS[name]}
    model_type = kw.pop("model_type")
    rope_scaling = kw.pop("rope_scaling", None)
    config_cls, model_cls = HF_CLASSES[model_type]
    # A wide init makes greedy decoding vary from token to token, so comparisons are informative.
    config = config_cls(**kw, rope_scaling=rope_scaling, initializer_range=0.25, attn_implementation="eager")
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # Default init leaves norms at 1 and biases at 0, which would hide mistakes there.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def nano_config(name: str) -> ModelConfig:
    return ModelConfig(**{**BASE, **CONFIGS[name]})


def random_nano_model(name: str, seed: int = 0) -> Transformer:
    model = Transformer(nano_config(name))
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith("bias"):
                p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1)))
    return model.eval()


def padded_batch(vocab: int, seed: int = 0):
    """Three rows of length 20 with 0, 5 and 11 left-pad tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 20), generator=g)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :11] = 0
    return ids, mask
