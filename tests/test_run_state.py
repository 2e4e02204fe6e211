"""Training checkpoints: exact resume, crash safety, and errors that name the broken file."""

import json
import os
import random

import numpy as np
import pytest
import torch

import nanopost.plumbing.training_checkpoint as run_state
from nanopost.plumbing.hf_io import load_model
from nanopost.model import ModelConfig, Transformer
from nanopost.plumbing.training_checkpoint import (
    CheckpointError,
    capture_rng,
    checkpoint_path,
    latest_checkpoint,
    load_checkpoint,
    read_summary,
    restore_rng,
    save_checkpoint,
)
from nanopost.plumbing.tokenizer import Tokenizer, train_bpe

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1)


def make_model(seed: int = 0) -> Transformer:
    model = Transformer(CFG)
    model.init_weights(generator=torch.Generator().manual_seed(seed))
    return model


def train_step(model, opt, gen):
    """One AdamW step on random tokens drawn from every RNG a loop might use."""
    ids = torch.randint(0, 64, (2, 8), generator=gen)
    ids = (ids + torch.randint(0, 64, (2, 8)) + random.randrange(64) + int(np.random.randint(64))) % 64
    loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_resume_is_bitwise_identical_to_an_uninterrupted_run(tmp_path):
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        train_step(model, opt, gen)
    save_checkpoint(tmp_path / "ckpt", model=model, optimizer=opt, extra={"step": 3, "data": [1, 2]},
                    generators={"sampler": gen})
    # The uninterrupted run goes on ...
    expected_losses = [train_step(model, opt, gen) for _ in range(2)]
    expected = params(model)

    # ... and a fresh process (other weights, other RNG states) resumes from the checkpoint.
    torch.manual_seed(123), random.seed(123), np.random.seed(123)
    resumed = make_model(seed=9)
    opt2 = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    gen2 = torch.Generator().manual_seed(77)
    extra = load_checkpoint(tmp_path / "ckpt", model=resumed, optimizer=opt2, generators={"sampler": gen2})
    assert extra == {"step": 3, "data": [1, 2]}
    assert [train_step(resumed, opt2, gen2) for _ in range(2)] == expected_losses
    for name, p in resumed.named_parameters():
        assert torch.equal(p, expected[name]), name


def test_rng_capture_and_restore_repeats_every_draw():
    gen = torch.Generator().manual_seed(5)
    state = capture_rng({"g": gen})
    first = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3), torch.rand(2, generator=gen))
    restore_rng(state, {"g": gen})
    again = (random.random(), np.random.rand(), np.random.randn(), torch.rand(3), torch.rand(2, generator=gen))
    assert first[:3] == again[:3]
    assert torch.equal(first[3], again[3]) and torch.equal(first[4], again[4])
    with pytest.raises(KeyError, match="no saved state for generator 'other'"):
        restore_rng(state, {"other": torch.Generator()})


def test_checkpoint_is_a_model_directory_with_tokenizer(tmp_path):
    model = make_model()
    tok = train_bpe(["hello world, hello checkpoint"] * 20, vocab_size=300)
    save_checkpoint(tmp_path / "c", model=model, tokenizer=tok, extra={"step": 7, "metrics": {"loss": 1.5}})
    again = load_model(tmp_path / "c")
    for name, p in model.state_dict().items():
        assert torch.equal(again.state_dict()[name], p)
    assert Tokenizer.from_dir(tmp_path / "c").encode("hello world") == tok.encode("hello world")
    summary = json.loads((tmp_path / "c" / "trainer_state" / "state.json").read_text())
    assert summary["step"] == 7 and summary["metrics"] == {"loss": 1.5} and "saved_at" in summary


def test_bf16_checkpoint_loads_into_fp32_model(tmp_path):
    model = make_model()
    save_checkpoint(tmp_path / "c", model=model, dtype=torch.bfloat16)
    target = make_model(seed=3)
    load_checkpoint(tmp_path / "c", model=target)
    assert target.dtype == torch.float32
    ref = model.model.embed_tokens.weight.to(torch.bfloat16).float()
    assert torch.equal(target.model.embed_tokens.weight, ref)


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last"
    model = make_model()
    save_checkpoint(path, model=model, extra={"step": 1})
    before = params(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    monkeypatch.setattr(run_state.torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model=model, extra={"step": 2})
    monkeypatch.undo()

    restored = make_model(seed=4)
    assert load_checkpoint(path, model=restored) == {"step": 1}
    for name, p in restored.named_parameters():
        assert torch.equal(p, before[name])
    assert [p.name for p in tmp_path.iterdir()] == ["last"]  # the half-written temp dir was removed


def test_stale_temp_dirs_are_ignored_and_cleaned(tmp_path):
    path = tmp_path / "last"
    save_checkpoint(path, model=make_model(), extra={"step": 1})
    stale = tmp_path / ".last.tmp-deadbeef"  # what a SIGKILL during a save leaves behind
    (stale / "trainer_state").mkdir(parents=True)
    (stale / "config.json").write_text("{")
    assert load_checkpoint(path) == {"step": 1}
    save_checkpoint(path, model=make_model(), extra={"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last"]
    assert read_summary(path)["step"] == 2


def test_kill_between_the_two_renames_is_recovered(tmp_path, monkeypatch):
    path = tmp_path / "checkpoints" / "last"
    save_checkpoint(path, model=make_model(), extra={"step": 1})
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the old one is renamed away; die before the new one is renamed in
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(run_state.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model=make_model(), extra={"step": 2})
    monkeypatch.undo()
    assert not path.exists()
    assert latest_checkpoint(tmp_path) == path  # the previous checkpoint is put back
    assert load_checkpoint(path) == {"step": 1}
    save_checkpoint(path, model=make_model(), extra={"step": 3})
    assert sorted(p.name for p in path.parent.iterdir()) == ["last"]


def test_truncated_state_file_is_a_corrupt_checkpoint(tmp_path):
    path = tmp_path / "c"
    model = make_model()
    save_checkpoint(path, model=model, optimizer=torch.optim.AdamW(model.parameters()), extra={"step": 1})
    state = path / "trainer_state" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"corrupt checkpoint: .*trainer_state/state\.pt"):
        load_checkpoint(path)


def test_garbage_state_file_is_a_corrupt_checkpoint(tmp_path):
    path = tmp_path / "c"
    save_checkpoint(path, model=make_model())
    torch.save({"something": "else"}, path / "trainer_state" / "state.pt")
    with pytest.raises(CheckpointError, match=r"corrupt checkpoint: .*state\.pt is not a nanopost trainer state"):
        load_checkpoint(path)


@pytest.mark.parametrize("victim, message", [
    ("trainer_state/state.pt", r"not a checkpoint \(.*trainer_state/state\.pt is missing\)"),
    ("config.json", r"corrupt checkpoint: .*config\.json"),
    ("model.safetensors", r"corrupt checkpoint: .*model\.safetensors"),
])
def test_missing_files_are_named(tmp_path, victim, message):
    path = tmp_path / "c"
    save_checkpoint(path, model=make_model())
    (path / victim).unlink()
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path, model=make_model())


def test_truncated_weights_are_a_corrupt_checkpoint(tmp_path):
    path = tmp_path / "c"
    save_checkpoint(path, model=make_model())
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"corrupt checkpoint: .*model\.safetensors"):
        load_checkpoint(path, model=make_model())


def test_missing_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope: not a checkpoint"):
        load_checkpoint(tmp_path / "nope")


def test_weights_of_another_shape_are_refused(tmp_path):
    save_checkpoint(tmp_path / "c", model=make_model())
    other = Transformer(ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1))
    with pytest.raises(CheckpointError, match="weights do not fit the model"):
        load_checkpoint(tmp_path / "c", model=other)


def test_extra_that_could_not_be_loaded_is_refused_when_saving(tmp_path):
    with pytest.raises(TypeError, match=r"extra\['order'\]: a ndarray cannot go in a checkpoint"):
        save_checkpoint(tmp_path / "c", model=make_model(), extra={"order": np.arange(3)})
    assert not (tmp_path / "c").exists()
    save_checkpoint(tmp_path / "c", model=make_model(), extra={"pos": np.int64(4), "t": torch.arange(3)})
    extra = load_checkpoint(tmp_path / "c")
    assert extra["pos"] == 4 and type(extra["pos"]) is int and torch.equal(extra["t"], torch.arange(3))


def test_saving_over_a_directory_that_is_not_a_checkpoint_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="exists and is not a checkpoint"):
        save_checkpoint(tmp_path, model=make_model())
    assert (tmp_path / "notes.txt").read_text() == "precious"


def test_latest_checkpoint_prefers_the_highest_step(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    model = make_model()
    save_checkpoint(checkpoint_path(tmp_path, "best"), model=model, extra={"step": 4})
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "best"
    save_checkpoint(checkpoint_path(tmp_path), model=model, extra={"step": 4})
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "last"  # a tie goes to last
    save_checkpoint(checkpoint_path(tmp_path, "best"), model=model, extra={"step": 6})
    assert latest_checkpoint(tmp_path) == tmp_path / "checkpoints" / "best"
