"""Benchmark helpers whose mistakes would bias a comparison."""

from benchmark import alternate_rounds, bench_config, training_flops, training_matmul_floor, training_matmuls
from nanopost.model import Transformer


def test_alternate_rounds_turns_the_order_each_round():
    calls = []
    sides = {name: (lambda name=name: calls.append(name) or len(calls)) for name in ("a", "b")}
    results = alternate_rounds(sides, rounds=3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert results == {"a": [1, 4, 5], "b": [2, 3, 6]}


def test_training_matmuls_are_three_per_linear_with_the_lm_head_and_what_feeds_it_at_the_loss_tokens_only():
    cfg = bench_config("tiny")
    model = Transformer(cfg)
    n, loss = 37, 11
    shapes = training_matmuls(model, n, loss)
    flops = sum(2 * a[0] * a[1] * b[1] for a, b in shapes)
    for a, b in shapes:
        assert a[1] == b[0]
    h, d = cfg.hidden_size, cfg.head_dim
    qkv = h * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d
    after = cfg.num_attention_heads * d * h + 3 * h * cfg.intermediate_size  # o_proj and the MLP
    # The last layer's output projection and MLP feed the LM head alone, so run where it does.
    expected = 3 * 2 * (n * cfg.num_hidden_layers * qkv + (n * (cfg.num_hidden_layers - 1) + loss) * after
                        + loss * h * cfg.vocab_size)
    assert len(shapes) == 3 * (7 * cfg.num_hidden_layers + 1)
    assert flops == expected
    assert training_matmul_floor(model, n, loss, repeats=1) > 0


def test_training_flops_count_what_feeds_the_lm_head_at_the_loss_tokens_only():
    cfg = bench_config("tiny")
    model = Transformer(cfg)
    lengths, loss = [30, 20], 11
    full, needed = training_flops(model, lengths), training_flops(model, lengths, loss)
    h = cfg.hidden_size
    tail = cfg.num_attention_heads * cfg.head_dim * h + 3 * h * cfg.intermediate_size + h * cfg.vocab_size
    assert full - needed == 3 * 2 * tail * (50 - loss)
    # A loss at every position needs all of it.
    assert training_flops(model, lengths, 50) == full
