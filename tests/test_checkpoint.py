"""Checkpoint files: round trips with transformers, sharding, dtypes, and errors that say where."""

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from hf_reference import random_nano_model
from nanopost.plumbing.hf_io import INDEX_FILE, load_model, save_model


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["llama-gqa-untied", "qwen2-bias-tied", "qwen3-qknorm-headdim",
                                  "llama-tied-bias-llama3rope"])
def test_saved_model_loads_in_transformers_with_identical_logits(name, tmp_path):
    ours = random_nano_model(name)
    save_model(ours, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__.lower().startswith(ours.config.model_type)
    assert torch.equal(logits(hf, IDS), logits(ours, IDS)) or (logits(hf, IDS) - logits(ours, IDS)).abs().max() < 1e-4
    # ... and back: transformers' save loads in nanopost with the same logits.
    hf.save_pretrained(tmp_path / "back")
    again = load_model(tmp_path / "back")
    assert torch.equal(logits(again, IDS), logits(ours, IDS))


def test_sharded_checkpoint_round_trip(tmp_path):
    ours = random_nano_model("llama-gqa-untied")
    save_model(ours, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert torch.equal(logits(load_model(tmp_path), IDS), logits(ours, IDS))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert (logits(hf, IDS) - logits(ours, IDS)).abs().max() < 1e-4


def test_transformers_sharded_checkpoint_loads(tmp_path):
    ours = random_nano_model("qwen2-mha-untied")
    save_model(ours, tmp_path / "a")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32)
    hf.save_pretrained(tmp_path / "b", max_shard_size="50KB")
    assert (tmp_path / "b" / INDEX_FILE).exists()
    assert torch.equal(logits(load_model(tmp_path / "b"), IDS), logits(ours, IDS))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_save_and_load(dtype, tmp_path):
    ours = random_nano_model("qwen2-bias-tied")
    save_model(ours, tmp_path, dtype=dtype)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == str(dtype).split(".")[1]
    assert all(t.dtype == dtype for t in load_file(tmp_path / "model.safetensors").values())
    assert load_model(tmp_path).dtype == dtype  # dtype=None keeps what is stored
    upcast = load_model(tmp_path, dtype=torch.float32)
    assert upcast.dtype == torch.float32
    assert (logits(upcast, IDS) - logits(ours, IDS)).abs().max() < 0.05


def test_tied_embeddings_stay_tied_after_load(tmp_path):
    save_model(random_nano_model("qwen2-bias-tied"), tmp_path)
    assert "lm_head.weight" not in load_file(tmp_path / "model.safetensors")
    model = load_model(tmp_path)
    assert model.lm_head.weight is model.model.embed_tokens.weight


# ---- bad inputs: each names what is wrong and where ----

@pytest.fixture
def saved(tmp_path):
    save_model(random_nano_model("llama-gqa-untied"), tmp_path)
    return tmp_path


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint directory not found"):
        load_model(tmp_path / "nope")


def test_missing_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json: file not found"):
        load_model(saved)


def test_missing_weights_file(saved):
    (saved / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor"):
        load_model(saved)


def test_truncated_safetensors(saved):
    f = saved / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(ValueError, match="model.safetensors"):
        load_model(saved)


def test_invalid_json_names_file_and_line(saved):
    (saved / "config.json").write_text('{\n  "model_type": "llama",\n  oops\n}')
    with pytest.raises(ValueError, match=r"config.json:3: invalid JSON"):
        load_model(saved)


def test_wrong_shape_names_tensor_file_and_both_shapes(saved):
    f = saved / "model.safetensors"
    state = load_file(f)
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(95, 64)
    save_file(state, f)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor model.layers.1.mlp.up_proj.weight has "
                                         r"shape \(95, 64\), the config needs \(96, 64\)"):
        load_model(saved)


def test_missing_tensor_is_named(saved):
    f = saved / "model.safetensors"
    state = load_file(f)
    del state["model.layers.0.self_attn.k_proj.weight"]
    save_file(state, f)
    with pytest.raises(ValueError, match="missing tensor.*model.layers.0.self_attn.k_proj.weight"):
        load_model(saved)


def test_unexpected_tensor_is_named(saved):
    f = saved / "model.safetensors"
    state = load_file(f)
    state["model.layers.9.extra"] = torch.zeros(2)
    save_file(state, f)
    with pytest.raises(ValueError, match="unexpected tensor.*model.layers.9.extra"):
        load_model(saved)


def test_unknown_architecture(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="config.json: model_type 'gpt2' is not supported"):
        load_model(saved)


def test_missing_shard_is_named(tmp_path):
    save_model(random_nano_model("llama-gqa-untied"), tmp_path, max_shard_bytes=40_000)
    (tmp_path / "model-00002-of-00004.safetensors").unlink(missing_ok=True)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[0].unlink()
    with pytest.raises(FileNotFoundError, match="shard listed in"):
        load_model(tmp_path)
