"""Reward models: learning a preference, files, last-token pooling, ensembles, data errors, losses."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from nanopost.plumbing.hf_io import load_model, save_model
from nanopost.plumbing.data_files import DataError
from nanopost.model import ModelConfig, Transformer
from nanopost.tools.reward_model import (
    ModelReward,
    PreferencePair,
    RewardEnsemble,
    RewardModel,
    ScalarLabel,
    bradley_terry_loss,
    combine_scores,
    encode_conversation,
    evaluate_reward_model,
    load_reward_data,
    load_reward_model,
    preference_accuracy,
    save_reward_model,
    scalar_loss,
    score_ids,
    train_reward_model,
)
from nanopost.plumbing.tokenizer import train_bpe

FILLER = "apple river stone cloud green table music paper window light quiet north seven tiger".split()
KEYWORD, DECOY = "thanks", "maybe"


def _pair(rng: random.Random) -> PreferencePair:
    """Both completions are the same filler words with one word in the same place: the keyword in
    the chosen one, a decoy in the rejected one (same length, so length cannot give it away)."""
    words = [rng.choice(FILLER) for _ in range(rng.randint(3, 7))]
    at = rng.randint(0, len(words))
    chosen, rejected = words[:at] + [KEYWORD] + words[at:], words[:at] + [DECOY] + words[at:]
    prompt = f"say something about the {rng.choice(FILLER)}"
    return PreferencePair(prompt, " ".join(chosen), " ".join(rejected))


def _tiny_rm(vocab_size: int, seed: int = 0) -> RewardModel:
    cfg = ModelConfig(model_type="qwen2", vocab_size=vocab_size, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=128, tie_word_embeddings=True)
    backbone = Transformer(cfg)
    backbone.init_weights(generator=torch.Generator().manual_seed(seed))
    return RewardModel(backbone, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def trained():
    """A tiny reward model trained to prefer completions containing the keyword."""
    rng = random.Random(0)
    train = [_pair(rng) for _ in range(400)]
    held_out = [_pair(rng) for _ in range(100)]
    corpus = [t for p in train for t in (p.prompt, p.chosen, p.rejected)]
    tokenizer = train_bpe(corpus, vocab_size=320)
    torch.manual_seed(0)
    rm = _tiny_rm(tokenizer.vocab_size)
    before = evaluate_reward_model(rm, tokenizer, held_out)
    history = train_reward_model(rm, tokenizer, train, steps=30, lr=3e-3, batch_size=16, warmup_steps=5,
                                 center_coef=0.01, seed=0)
    return rm, tokenizer, held_out, before, history


def test_trained_reward_model_ranks_held_out_pairs(trained):
    rm, tokenizer, held_out, before, history = trained
    after = evaluate_reward_model(rm, tokenizer, held_out)
    print(f"held-out preference accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}", file=sys.stderr)
    assert after["accuracy"] > 0.9
    assert after["margin"] > 0
    assert history[-1]["loss"] < history[0]["loss"]
    assert [r["step"] for r in history] == list(range(1, 31))
    # The centering term keeps the scores' offset, which the pairwise loss cannot see, near 0.
    rows = [encode_conversation(tokenizer, p.prompt, c) for p in held_out for c in (p.chosen, p.rejected)]
    assert abs(score_ids(rm, rows, pad_id=tokenizer.pad_token_id).mean().item()) < 0.1  # 1.9 without it


def test_round_trip_gives_identical_scores(trained, tmp_path):
    rm, tokenizer, held_out, _, _ = trained
    save_reward_model(rm, tmp_path, tokenizer=tokenizer)
    loaded = load_reward_model(tmp_path)
    rows = [encode_conversation(tokenizer, p.prompt, p.chosen) for p in held_out[:8]]
    pad = tokenizer.pad_token_id
    assert torch.equal(score_ids(rm, rows, pad_id=pad), score_ids(loaded, rows, pad_id=pad))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForSequenceClassification"]
    assert config["num_labels"] == 1 and config["pad_token_id"] == pad
    assert sorted(load_file(tmp_path / "model.safetensors"))[-1] == "score.weight"
    assert (tmp_path / "tokenizer.json").is_file()


def test_transformers_sequence_classifier_gives_the_same_scores(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    rm, tokenizer, held_out, _, _ = trained
    save_reward_model(rm, tmp_path, tokenizer=tokenizer)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert type(hf).__name__ == "Qwen2ForSequenceClassification"
    rows = [encode_conversation(tokenizer, p.prompt, c) for p in held_out[:6] for c in (p.chosen, p.rejected)]
    T = max(map(len, rows))
    pad = tokenizer.pad_token_id
    ids = torch.tensor([r + [pad] * (T - len(r)) for r in rows])  # right padded: transformers' last non-pad
    mask = (torch.arange(T)[None] < torch.tensor([len(r) for r in rows])[:, None]).long()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        ours = rm(ids, mask)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # And the other way: what transformers writes loads here and scores the same.
    hf.save_pretrained(tmp_path / "from_hf")
    with torch.no_grad():
        again = load_reward_model(tmp_path / "from_hf")(ids, mask)
    torch.testing.assert_close(again, ours, atol=1e-5, rtol=1e-5)


def test_scalar_labels_train_by_regression(trained):
    _, tokenizer, held_out, _, _ = trained
    rng = random.Random(2)
    data = [ScalarLabel(p.prompt, c, float(c == p.chosen)) for p in (_pair(rng) for _ in range(200))
            for c in (p.chosen, p.rejected)]
    rm = _tiny_rm(tokenizer.vocab_size, seed=1)
    history = train_reward_model(rm, tokenizer, data, steps=40, lr=1e-3, batch_size=16, warmup_steps=5, seed=0)
    assert "accuracy" not in history[0]
    held = [ScalarLabel(p.prompt, c, float(c == p.chosen)) for p in held_out[:30] for c in (p.chosen, p.rejected)]
    result = evaluate_reward_model(rm, tokenizer, held)
    print(f"scalar labels: held-out mse {result['mse']:.3f}, correlation {result['correlation']:.3f}", file=sys.stderr)
    assert result["mse"] < 0.1 and result["correlation"] > 0.9


def test_missing_head_tensor_is_a_named_error(trained, tmp_path):
    rm, tokenizer, _, _, _ = trained
    save_reward_model(rm, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    del weights["score.weight"]
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing tensor score.weight"):
        load_reward_model(tmp_path)


def test_misshaped_head_is_a_named_error(trained, tmp_path):
    rm, _, _, _, _ = trained
    save_reward_model(rm, tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    weights["score.weight"] = torch.zeros(1, 32)
    save_file(weights, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"score.weight has shape \(1, 32\), the reward head needs \(1, 64\)"):
        load_reward_model(tmp_path)


def test_causal_lm_and_reward_model_directories_are_not_confused(tmp_path):
    lm = Transformer(ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1))
    save_model(lm, tmp_path / "lm")
    with pytest.raises(ValueError, match="not a reward model"):
        load_reward_model(tmp_path / "lm")
    save_reward_model(RewardModel(load_model(tmp_path / "lm")), tmp_path / "rm")
    with pytest.raises(ValueError, match="lm_head.weight"):  # untied: the LM head is not there
        load_model(tmp_path / "rm")


def test_padding_does_not_change_the_score(trained):
    rm, tokenizer, held_out, _, _ = trained
    short = encode_conversation(tokenizer, held_out[0].prompt, held_out[0].chosen)
    long = encode_conversation(tokenizer, held_out[1].prompt, held_out[1].chosen + " and more words here")
    assert len(long) > len(short) + 3
    pad = tokenizer.pad_token_id
    with torch.no_grad():
        alone = rm(torch.tensor([short]), torch.ones(1, len(short), dtype=torch.long))
        ids = torch.tensor([short + [pad] * (len(long) - len(short)), long])
        mask = torch.tensor([[1] * len(short) + [0] * (len(long) - len(short)), [1] * len(long)])
        batched = rm(ids, mask)
        # The pad id is never looked at: any id in the padded slots gives the same score.
        junk = rm(ids.masked_fill(mask == 0, 7), mask)
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(junk, batched, atol=0, rtol=0)


def test_model_reward_batches_agree_with_per_sample_calls(trained):
    rm, tokenizer, held_out, _, _ = trained
    reward = ModelReward(rm, tokenizer, batch_size=3)
    samples = [{"prompt": p.prompt, "answer": "unused"} for p in held_out[:5]]
    completions = [p.chosen for p in held_out[:5]]
    batched = reward.score_batch(completions, samples)
    one_by_one = [reward(c, s) for c, s in zip(completions, samples)]
    assert batched == pytest.approx(one_by_one, abs=1e-5)
    assert reward.score([p.prompt for p in held_out[:5]], completions) == pytest.approx(batched, abs=1e-6)


def test_model_reward_normalisation(trained):
    rm, tokenizer, held_out, _, _ = trained
    prompts, completions = [p.prompt for p in held_out[:4]], [p.rejected for p in held_out[:4]]
    raw = ModelReward(rm, tokenizer).score(prompts, completions)

    fixed = ModelReward(rm, tokenizer, normalize="fixed", mean=1.0, std=2.0).score(prompts, completions)
    assert fixed == pytest.approx([(s - 1.0) / 2.0 for s in raw], abs=1e-6)

    # Running: the statistics include the batch being scored; std is the sample std (n - 1).
    running = ModelReward(rm, tokenizer, normalize="running")
    got = running.score(prompts, completions)
    m = sum(raw) / 4
    sd = math.sqrt(sum((s - m) ** 2 for s in raw) / 3)
    assert got == pytest.approx([(s - m) / sd for s in raw], abs=1e-5)
    resumed = ModelReward(rm, tokenizer, normalize="running")
    resumed.load_state_dict(running.state_dict())
    assert resumed.score(prompts[:1], completions[:1]) == pytest.approx(running.score(prompts[:1], completions[:1]))


def test_ensemble_rules_on_fixed_scores():
    scores = {"a": [1.0, 4.0, -1.0], "b": [3.0, 0.0, -1.0], "c": [2.0, 2.0, 2.0]}
    # Column 0: 1, 3, 2 -> mean 2, min 1, population std sqrt((1 + 1 + 0) / 3) = sqrt(2/3).
    # Column 1: 4, 0, 2 -> mean 2, min 0, std sqrt((4 + 4 + 0) / 3) = sqrt(8/3).
    # Column 2: -1, -1, 2 -> mean 0, min -1, std sqrt((1 + 1 + 4) / 3) = sqrt(2).
    assert combine_scores(scores, "mean") == pytest.approx([2.0, 2.0, 0.0])
    assert combine_scores(scores, "min") == pytest.approx([1.0, 0.0, -1.0])
    expected = [2.0 - 0.5 * math.sqrt(2 / 3), 2.0 - 0.5 * math.sqrt(8 / 3), 0.0 - 0.5 * math.sqrt(2)]
    assert combine_scores(scores, "mean_minus_std", lam=0.5) == pytest.approx(expected)
    # Two members, lam = 1: the population std is half the gap, so mean - std is the min.
    two = {"a": [1.0, 5.0], "b": [3.0, -2.0]}
    assert combine_scores(two, "mean_minus_std", lam=1.0) == pytest.approx(combine_scores(two, "min"))
    with pytest.raises(ValueError, match="mode must be one of"):
        combine_scores(scores, "max")


def test_ensemble_returns_per_member_scores():
    class Fixed:  # anything with score(prompts, completions) can be a member
        def __init__(self, values):
            self.values = values

        def score(self, prompts, completions):
            return list(self.values[: len(completions)])

    ensemble = RewardEnsemble({"a": Fixed([1.0, 4.0]), "b": Fixed([3.0, 0.0])}, mode="min", normalize="none")
    combined, per_member = ensemble.score_batch(["x", "y"], [{"prompt": "p"}, {"prompt": "q"}])
    assert combined == [1.0, 0.0]
    assert per_member == {"a": [1.0, 4.0], "b": [3.0, 0.0]}
    assert ensemble("x", {"prompt": "p"}) == 1.0


class _Fixed:
    """A member with set scores: anything with score(prompts, completions) can be one."""

    def __init__(self, values):
        self.values = values

    def score(self, prompts, completions):
        return list(self.values[: len(completions)])


def test_ensemble_standardises_members_per_prompt_by_default():
    # Prompt p has three completions, q two. Member b is 100 times wider than a and ranks p's
    # completions differently; raw, b alone decides the mean and the min.
    a, b = [1.0, 2.0, 3.0, 5.0, 7.0], [300.0, 100.0, 200.0, -50.0, 50.0]
    prompts = ["p", "p", "p", "q", "q"]
    samples = [{"prompt": x} for x in prompts]
    ensemble = RewardEnsemble({"a": _Fixed(a), "b": _Fixed(b)}, mode="mean")
    combined, per_member = ensemble.score_batch(["c"] * 5, samples)
    # p: a -> (-1, 0, 1), b -> (1, -1, 0) (std 1 and 100); q: a and b -> (-1/sqrt2, 1/sqrt2)
    r = 1 / math.sqrt(2)
    assert combined == pytest.approx([0.0, -0.5, 0.5, -r, r], abs=1e-5)
    assert per_member == {"a": a, "b": b}  # logged raw: a member drifting away stays visible
    low, _ = RewardEnsemble({"a": _Fixed(a), "b": _Fixed(b)}, mode="min").score_batch(["c"] * 5, samples)
    assert low == pytest.approx([-1.0, -1.0, 0.0, -r, r], abs=1e-5)
    raw, _ = RewardEnsemble({"a": _Fixed(a), "b": _Fixed(b)}, mode="mean", normalize="none").score_batch(
        ["c"] * 5, samples)
    assert raw == pytest.approx([150.5, 51.0, 101.5, -22.5, 28.5])
    with pytest.raises(ValueError, match="normalize must be one of group, none"):
        RewardEnsemble({"a": _Fixed(a)}, normalize="batch")


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "p", "chosen": "a"}', 'missing field "rejected"'),
        ('{"prompt": "p", "chosen": "a", "rejected": 3}', 'field "rejected" must be a string, got a number'),
        ('{"prompt": "", "chosen": "a", "rejected": "b"}', 'field "prompt" is empty'),
        ('{"prompt": "p", "chosen": "a", "rejected": "a"}', '"chosen" and "rejected" are identical'),
        ('{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}', 'field "margin" must be a finite number'),
        ('{"prompt": "p", "completion": "a", "label": 1}', "a scalar label, but line 1 is a preference pair"),
        ('{"prompt": "p", "text": "a"}', 'missing field "chosen"/"rejected"'),
        ("not json", "invalid JSON"),
    ],
)
def test_bad_jsonl_lines_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "prefs.jsonl"
    path.write_text('{"prompt": "p", "chosen": "good", "rejected": "bad"}\n\n' + line + "\n")
    with pytest.raises(DataError, match=f"^{path}:3: ") as err:
        load_reward_data(path)
    assert message in str(err.value)


def test_scalar_label_file_reads_and_checks_labels(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"prompt": "p", "completion": "a", "label": 0.5}\n{"prompt": "p", "completion": "b", "label": true}\n')
    with pytest.raises(DataError, match=f'^{path}:2: field "label" must be a finite number, got a boolean'):
        load_reward_data(path)
    path.write_text('{"prompt": "p", "completion": "a", "label": 0.5, "source": "x"}\n')
    assert load_reward_data(path) == [ScalarLabel("p", "a", 0.5)]


def test_bradley_terry_loss_matches_hand_value():
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0])
    # Pair 1: -log sigmoid(2) = log(1 + e^-2) = 0.126928; pair 2: -log sigmoid(0) = log 2 = 0.693147.
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx((0.126928 + 0.693147) / 2, abs=1e-6)
    # A margin of 2 on pair 1 leaves a gap of 0: log 2.
    assert bradley_terry_loss(chosen[:1], rejected[:1], margin=2.0).item() == pytest.approx(math.log(2), abs=1e-6)


def test_scalar_loss_and_accuracy_by_hand():
    # Errors 1 and -2: (1 + 4) / 2 = 2.5.
    assert scalar_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 2.0])).item() == pytest.approx(2.5)
    # Right, wrong, tie: (1 + 0 + 0.5) / 3.
    acc = preference_accuracy(torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 1.0]))
    assert acc == pytest.approx(0.5)


def test_train_rm_script_end_to_end(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "scripts"))
    import train_rm

    rng = random.Random(1)
    pairs = [_pair(rng) for _ in range(24)]
    tokenizer = train_bpe([t for p in pairs for t in (p.prompt, p.chosen, p.rejected)], vocab_size=300)
    backbone = _tiny_rm(tokenizer.vocab_size).backbone
    backbone.lm_head = torch.nn.Linear(64, tokenizer.vocab_size, bias=False)  # a causal LM again, to start from
    backbone.lm_head.weight = backbone.model.embed_tokens.weight
    save_model(backbone, tmp_path / "base")
    tokenizer.save(tmp_path / "base")
    for name, part in (("train", pairs[:16]), ("val", pairs[16:])):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for p in part:
                f.write(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n")
    result = train_rm.main([
        "--model", str(tmp_path / "base"), "--train", str(tmp_path / "train.jsonl"),
        "--val", str(tmp_path / "val.jsonl"), "--out", str(tmp_path / "rm"), "--steps", "3",
        "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "1", "--device", "cpu",
    ])
    assert 0.0 <= result["accuracy"] <= 1.0 and result["pairs"] == 8
    load_reward_model(tmp_path / "rm")
    assert (tmp_path / "rm" / "metrics.jsonl").is_file() and (tmp_path / "rm" / "train_config.json").is_file()
