"""Hugging Face model directories: config.json + safetensors (single file or sharded).

Loading is strict: every tensor the model needs must be in the files with the right shape, and
every tensor in the files must be used. Weights are read only from safetensors, never from
pickles. What `save_model` writes loads in transformers, and the other way round.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..model import SUPPORTED_MODEL_TYPES, SUPPORTED_ROPE_TYPES, ModelConfig, Transformer, rope_type_of
from .files import read_json, write_atomic

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(path: str | os.PathLike, *, chat_format: str | None = None):
    """The tokenizer saved beside the weights (tokenizer.json + tokenizer_config.json, and
    generation_config.json's end tokens); chat_format overrides template recognition."""
    from .tokenizer import Tokenizer

    return Tokenizer.from_dir(path, chat_format=chat_format)


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Read a transformers config dict, refusing values this model would silently get wrong."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"{source}: model_type {model_type!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported; supported: 'silu'")
    if hf.get("use_sliding_window", False):
        raise ValueError(f"{source}: use_sliding_window=true is not supported; only full attention is")
    layer_types = set(hf.get("layer_types") or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise ValueError(f"{source}: layer_types {sorted(layer_types)} not supported; only 'full_attention'")
    if hf.get("pretraining_tp", 1) != 1:
        raise ValueError(f"{source}: pretraining_tp={hf['pretraining_tp']} is not supported; only 1")
    # transformers >= 5 nests theta and scaling in rope_parameters; older files use two keys.
    rope = dict(hf.get("rope_parameters") or {})
    theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = rope if rope else hf.get("rope_scaling")
    if scaling is not None and rope_type_of(scaling) == "default":
        scaling = None
    if scaling is not None and rope_type_of(scaling) not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"{source}: rope type {rope_type_of(scaling)!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor != 1 is not supported")
    if model_type == "qwen2" and hf.get("attention_bias") is False:
        raise ValueError(f"{source}: qwen2 without q/k/v bias is not supported")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    kwargs = {k: hf[k] for k in known if k in hf and k not in ("rope_theta", "rope_scaling")}
    if model_type == "qwen2":
        kwargs.pop("attention_bias", None)
    kwargs.update(rope_theta=float(theta), rope_scaling=scaling)
    try:
        return ModelConfig(**kwargs)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: {e}") from None

def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """A config.json that transformers (4.x and 5.x) reads as the same model."""
    arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    out: dict[str, Any] = {
        "architectures": [arch[cfg.model_type]],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "use_cache": True,
    }
    if cfg.model_type != "qwen2":
        out["attention_bias"] = cfg.attention_bias
    if cfg.model_type == "llama":
        out["mlp_bias"] = cfg.mlp_bias
    else:
        out["use_sliding_window"] = False
    return out


def load_config(path: str | os.PathLike) -> ModelConfig:
    file = Path(path) / "config.json"
    return config_from_hf(read_json(file), source=str(file))


def weight_files(root: Path) -> dict[str, Path]:
    """tensor name -> file it lives in (from the shard index, or the single file's header)."""
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index}: missing field \"weight_map\"")
        files = {name: root / f for name, f in weight_map.items()}
        for f in set(files.values()):
            if not f.is_file():
                raise FileNotFoundError(f"{f}: shard listed in {index} not found")
        return files
    single = root / SINGLE_FILE
    if not single.is_file():
        raise FileNotFoundError(f"{root}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    with open_safetensors(single) as f:
        return {name: single for name in f.keys()}


def open_safetensors(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None


def read_tensors(
    root: Path,
    files: dict[str, Path],
    shapes: dict[str, tuple[int, ...]],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    needs: str = "the config needs",
) -> dict[str, torch.Tensor]:
    """Every tensor of `shapes` from its file, strictly: a missing, unexpected or misshaped
    tensor is an error naming the tensor, the file and both shapes."""
    missing = [n for n in shapes if n not in files]
    if missing:
        raise ValueError(f"{root}: missing tensor(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    unexpected = [n for n in files if n not in shapes]
    if unexpected:
        raise ValueError(f"{files[unexpected[0]]}: unexpected tensor(s) {', '.join(unexpected[:5])}")
    by_file: dict[Path, list[str]] = {}
    for name, file in files.items():
        by_file.setdefault(file, []).append(name)
    state: dict[str, torch.Tensor] = {}
    for file, names in by_file.items():
        with open_safetensors(file) as f:
            for name in names:
                try:
                    t = f.get_tensor(name)
                except (SafetensorError, OSError) as e:
                    raise ValueError(f"{file}: cannot read tensor {name} ({e})") from None
                want = tuple(shapes[name])
                if tuple(t.shape) != want:
                    raise ValueError(f"{file}: tensor {name} has shape {tuple(t.shape)}, {needs} {want}")
                state[name] = t.to(device=device, dtype=dtype or t.dtype)
    return state


def load_model(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> Transformer:
    """Load an HF checkpoint directory. dtype=None keeps the dtype stored in the files."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: checkpoint directory not found")
    cfg = load_config(root)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = model.state_dict()
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    files = weight_files(root)
    if cfg.tie_word_embeddings:
        files.pop("lm_head.weight", None)  # some writers store the tied copy too; it is redundant
    state = read_tensors(root, files, {n: t.shape for n, t in expected.items()}, device=device, dtype=dtype)
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def save_model(
    model: Transformer,
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = None,
    generation_config: Mapping[str, Any] | None = None,
) -> None:
    """Write config.json, generation_config.json and safetensors weights (sharded above max_shard_bytes).

    generation_config's fields (e.g. the stop tokens as eos_token_id) go over the token ids of
    the model's config.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    state = {
        n: t.detach().to(dtype=dtype or t.dtype, device="cpu").contiguous()
        for n, t in model.state_dict().items()
        if not (cfg.tie_word_embeddings and n == "lm_head.weight")
    }
    dtype_name = {v: k for k, v in DTYPES.items()}[next(iter(state.values())).dtype]
    hf = {**config_to_hf(cfg), "torch_dtype": dtype_name, "dtype": dtype_name}
    write_atomic(root / "config.json", lambda f: Path(f).write_text(json.dumps(hf, indent=2) + "\n"))
    gen = {k: v for k, v in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id),
                             ("pad_token_id", cfg.pad_token_id)) if v is not None}
    gen.update(generation_config or {})
    write_atomic(root / "generation_config.json", lambda f: Path(f).write_text(json.dumps(gen, indent=2) + "\n"))

    shards = _split(state, max_shard_bytes)
    for stale in list(root.glob("model*.safetensors")) + [root / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    meta = {"format": "pt"}
    if len(shards) == 1:
        write_atomic(root / SINGLE_FILE, lambda f: save_file(shards[0], f, metadata=meta))
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_atomic(root / name, lambda f, s=shard: save_file(s, f, metadata=meta))
        weight_map.update({n: name for n in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_atomic(root / INDEX_FILE, lambda f: Path(f).write_text(json.dumps(index, indent=2) + "\n"))


def _split(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if max_bytes and shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards
