"""Benchmark helpers whose mistakes would bias a comparison."""

from nanopost.benchmark import alternate_rounds


def test_alternate_rounds_turns_the_order_each_round():
    calls = []
    sides = {name: (lambda name=name: calls.append(name) or len(calls)) for name in ("a", "b")}
    results = alternate_rounds(sides, rounds=3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert results == {"a": [1, 4, 5], "b": [2, 3, 6]}
