"""Tests of the GRPO math in nanopost/grpo.py. Expected values are derived by hand next to each check."""

import math

import pytest
import torch

from nanopost import grpo
from nanopost.grpo import group_advantages, kl_penalty, masked_mean, masked_sum, policy_loss
from nanopost.model import Logprobs, ModelConfig, Transformer, token_logprobs

LN2 = math.log(2.0)


def close(actual, expected, atol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=atol,
        rtol=0,
    )


def mask_from_lengths(lengths, length):
    return torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]  # [N, T] bool


# --------------------------------------------------------------------------------------------
# Advantages


def test_group_advantages_known_group_uses_unbiased_std_and_eps():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 1.0], dtype=torch.float64)
    adv_4 = group_advantages(rewards[:4], 4, eps=0.1)
    # mean 3, deviations [-2, -1, 0, 3], Σ dev² = 14, unbiased var 14/3, std = √(14/3) ≈ 2.160247
    std = math.sqrt(14 / 3)
    close(adv_4, [-2 / (std + 0.1), -1 / (std + 0.1), 0.0, 3 / (std + 0.1)])
    adv_2 = group_advantages(rewards, 2, eps=0.0)
    # groups [1,2] [3,6] [0,1]: deviations ±0.5, ±1.5, ±0.5; unbiased stds √0.5, √4.5, √0.5
    # so each advantage is ±0.5/√0.5 = ±1.5/√4.5 = ±1/√2
    h = 1 / math.sqrt(2)
    close(adv_2, [-h, h, -h, h, -h, h])


def test_group_advantages_all_equal_group_is_exactly_zero():
    rewards = torch.tensor([0.1] * 7 + [0.3] * 7 + [0.0] * 6 + [1.0])  # [21], groups of 7
    adv = group_advantages(rewards, 7)
    assert not torch.isnan(adv).any()
    # the first two groups agree: centred rewards are 0, so the advantage is exactly 0.0, not 1e-9
    assert torch.equal(adv[:14], torch.zeros(14))
    # last group: mean 1/7, deviations -1/7 (×6) and 6/7, Σ dev² = 6/49 + 36/49 = 6/7,
    # var = (6/7)/6 = 1/7, std = 1/√7 ≈ 0.377964
    close(adv[14:], torch.tensor([-1 / 7] * 6 + [6 / 7]) * math.sqrt(7), atol=1e-4)
    for scale in ("batch", "none"):
        assert torch.equal(group_advantages(rewards, 7, scale=scale)[:14], torch.zeros(14))


def test_group_advantages_none_is_reward_minus_group_mean():
    rewards = torch.tensor([1.0, 2.0, 3.0, 6.0, 5.0, 5.0, 4.0, 2.0])
    # group means 3 and 4
    close(group_advantages(rewards, 4, scale="none"), [-2.0, -1.0, 0.0, 3.0, 1.0, 1.0, 0.0, -2.0])


def test_group_advantages_batch_divides_by_batch_std():
    rewards = torch.tensor([0.0, 1.0, 2.0, 2.0], dtype=torch.float64)
    adv = group_advantages(rewards, 2, scale="batch", eps=0.0)
    # group means 0.5 and 2 → centred [-0.5, 0.5, 0, 0]. Batch mean 1.25, deviations
    # [-1.25, -0.25, 0.75, 0.75], Σ dev² = 2.75, unbiased var 2.75/3, std ≈ 0.957427
    std = math.sqrt(2.75 / 3)
    close(adv, [-0.5 / std, 0.5 / std, 0.0, 0.0])


def test_group_size_one_gives_zero_advantage_not_nan():
    rewards = torch.tensor([3.0, -1.0, 0.5])
    for scale in ("group", "batch", "none"):
        # each row is its own group, so its mean is the reward itself and r − mean = 0
        assert torch.equal(group_advantages(rewards, 1, scale=scale), torch.zeros(3))


def test_group_advantages_rejects_indivisible_batch():
    with pytest.raises(ValueError, match="groups of 2"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, scale="std")


# --------------------------------------------------------------------------------------------
# KL estimators


def test_kl_estimators_on_hand_computed_values():
    logp = torch.log(torch.tensor([[0.5, 0.25]], dtype=torch.float64))
    ref = torch.log(torch.tensor([[0.25, 0.5]], dtype=torch.float64))
    # token 0: logp − ref = ln 2;  token 1: logp − ref = −ln 2
    close(kl_penalty(logp, ref, "k1"), [[LN2, -LN2]])
    # ½ (±ln 2)² = ½ · 0.480453 = 0.240227
    close(kl_penalty(logp, ref, "k2"), [[0.5 * LN2**2, 0.5 * LN2**2]])
    # token 0: ref/π = 0.5 → 0.5 − ln 0.5 − 1 = ln 2 − 0.5 ≈ 0.193147
    # token 1: ref/π = 2   → 2 − ln 2 − 1   = 1 − ln 2   ≈ 0.306853
    close(kl_penalty(logp, ref, "k3"), [[LN2 - 0.5, 1 - LN2]])


def test_k3_is_nonnegative_and_zero_when_policies_match():
    gen = torch.Generator().manual_seed(0)
    logp = -torch.rand(64, 32, generator=gen) * 10
    ref = -torch.rand(64, 32, generator=gen) * 10
    # x − log x − 1 ≥ 0 for x > 0 (tangent line of log at 1)
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    assert torch.equal(kl_penalty(logp, logp, "k3"), torch.zeros(64, 32))


def test_k3_survives_extreme_log_ratio():
    logp = torch.tensor([[-200.0]], dtype=torch.float64, requires_grad=True)
    kl = kl_penalty(logp, torch.tensor([[0.0]], dtype=torch.float64), "k3")
    # the log-ratio 200 is clamped to 20: exp(20) − 20 − 1 ≈ 4.85e8 instead of e^200
    close(kl, [[math.exp(20) - 21]])
    kl.sum().backward()
    assert torch.isfinite(logp.grad).all()


# --------------------------------------------------------------------------------------------
# Clipping and dual-clip


def test_clip_values_gradients_and_fractions_on_constructed_case():
    ratios = torch.tensor([[0.5, 1.0, 1.5, 2.0], [0.5, 0.9, 1.5, 2.0]], dtype=torch.float64)
    logp = torch.log(ratios).requires_grad_()
    old = torch.zeros_like(ratios)
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, stats = policy_loss(logp, old, adv, torch.ones(2, 4), clip_low=0.2, clip_high=0.28, agg="token-mean")
    # bounds [0.8, 1.28].  A = +1: ℓ = −min(ρ, clip ρ) → −0.5, −1, −1.28 (clipped), −1.28 (clipped)
    #                      A = −1: ℓ = max(ρ, clip ρ)  → 0.8 (clipped), 0.9, 1.5, 2.0
    # sum = −4.06 + 5.2 = 1.14, token-mean over 8 tokens = 0.1425
    close(loss, 1.14 / 8)
    loss.backward()
    # dℓ/dlogp = ρ·dℓ/dρ: unclipped tokens give −A·ρ, clipped tokens 0; each weighted 1/8
    close(logp.grad, torch.tensor([[-0.5, -1.0, 0.0, 0.0], [0.0, 0.9, 1.5, 2.0]]) / 8)
    # high clip won on 2 of 8 tokens (A>0, ρ = 1.5, 2), low clip on 1 of 8 (A<0, ρ = 0.5)
    close(stats["clip_frac_high"], 2 / 8)
    close(stats["clip_frac_low"], 1 / 8)
    close(stats["ratio_mean"], (0.5 + 1 + 1.5 + 2 + 0.5 + 0.9 + 1.5 + 2) / 8)


def test_clip_bounds_are_exactly_one_minus_low_and_one_plus_high():
    ratios = torch.tensor([[1.2799, 1.2801, 5.0], [0.8001, 0.7999, 0.01]], dtype=torch.float64)
    logp = torch.log(ratios).requires_grad_()
    adv = torch.tensor([1.0, -1.0], dtype=torch.float64)
    loss, _ = policy_loss(logp, torch.zeros_like(ratios), adv, torch.ones(2, 3),
                          clip_low=0.2, clip_high=0.28, agg="seq-mean-token-sum-norm", max_len=1)
    # max_len 1, N = 2: loss = Σ ℓ / 2, and dloss/dlogp = ρ·dℓ/dρ / 2
    loss.backward()
    # A = +1: just inside 1.28 the gradient is −ρ/2, just outside and far outside it is 0
    # A = −1: just inside 0.8 the gradient is +ρ/2, just below and far below it is 0
    close(logp.grad, [[-1.2799 / 2, 0.0, 0.0], [0.8001 / 2, 0.0, 0.0]])
    # clipped values: −(1 + 0.28) for A = +1, +(1 − 0.2) for A = −1
    # Σ ℓ = −1.2799 − 1.28 − 1.28 + 0.8001 + 0.8 + 0.8 = −1.4398
    close(loss, -1.4398 / 2)


def test_dual_clip_caps_negative_advantage_loss():
    ratios = torch.tensor([[5.0], [2.0], [5.0]], dtype=torch.float64)
    logp = torch.log(ratios).requires_grad_()
    adv = torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64)
    loss, stats = policy_loss(logp, torch.zeros_like(ratios), adv, torch.ones(3, 1),
                              dual_clip=3.0, agg="token-mean")
    # A = −1, ρ = 5: PPO loss max(5, 1.2) = 5, capped at −c·A = 3 (no gradient)
    # A = −1, ρ = 2: 2 < 3, untouched (gradient ρ = 2)
    # A = +1, ρ = 5: −1.2, the cap only concerns A < 0
    close(loss, (3.0 + 2.0 - 1.2) / 3)
    loss.backward()
    close(logp.grad, [[0.0], [2.0 / 3], [0.0]])
    close(stats["dual_clip_frac"], 1 / 3)
    loss_plain, stats_plain = policy_loss(logp, torch.zeros_like(ratios), adv, torch.ones(3, 1), agg="token-mean")
    close(loss_plain, (5.0 + 2.0 - 1.2) / 3)  # without the cap the first token costs 5
    assert "dual_clip_frac" not in stats_plain


# --------------------------------------------------------------------------------------------
# Aggregation


def _token_weights(lengths, agg, length=8, max_len=None):
    """d loss / d logp per token with ρ = 1 and A = 1 everywhere: −(the token's weight)."""
    mask = mask_from_lengths(lengths, length)
    logp = torch.zeros(len(lengths), length, dtype=torch.float64, requires_grad=True)
    adv = torch.ones(len(lengths), dtype=torch.float64)
    loss, _ = policy_loss(logp, logp.detach(), adv, mask, agg=agg, max_len=max_len)
    loss.backward()
    return -logp.grad


def test_seq_mean_token_sum_norm_weight_does_not_depend_on_length():
    short = _token_weights([2, 2], "seq-mean-token-sum-norm", max_len=8)
    long = _token_weights([4, 2], "seq-mean-token-sum-norm", max_len=8)
    # weight 1 / (N · max_len) = 1/16 on every real token, whatever the lengths
    close(short[0, :2], [1 / 16] * 2)
    close(long[0, :4], [1 / 16] * 4)
    close(long[1, :2], [1 / 16] * 2)


def test_seq_mean_token_mean_halves_weight_of_doubled_completion():
    short = _token_weights([2, 2], "seq-mean-token-mean")
    long = _token_weights([4, 2], "seq-mean-token-mean")
    # weight 1 / (N · |o_i|): 1/(2·2) = 1/4 before, 1/(2·4) = 1/8 after doubling; other row unchanged
    close(short[0, :2], [1 / 4] * 2)
    close(long[0, :4], [1 / 8] * 4)
    close(long[1, :2], short[1, :2])


def test_token_mean_renormalises_every_weight():
    short = _token_weights([2, 2], "token-mean")
    long = _token_weights([4, 2], "token-mean")
    # weight 1 / Σ|o_i|: 1/4 with 4 tokens, 1/6 for every token (both rows) with 6 tokens
    close(short[:, :2], torch.full((2, 2), 1 / 4))
    close(long[0, :4], [1 / 6] * 4)
    close(long[1, :2], [1 / 6] * 2)
    # padding never gets weight
    assert torch.equal(long[1, 2:], torch.zeros(6, dtype=torch.float64))


# --------------------------------------------------------------------------------------------
# Gradients against independent computations


def _random_batch(seed, n=6, length=7, vocab=11):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, length, vocab, generator=gen, dtype=torch.float64)
    tokens = torch.randint(vocab, (n, length), generator=gen)
    lengths = torch.randint(1, length + 1, (n,), generator=gen).tolist()
    rewards = torch.randint(0, 2, (n,), generator=gen).to(torch.float64)
    return logits, tokens, mask_from_lengths(lengths, length), rewards


def _weights(mask, agg, max_len=None):
    """Weight of each token in the loss, written out from the three formulas."""
    m = mask.to(torch.float64)
    n, length = m.shape
    if agg == "token-mean":
        return m / m.sum()
    if agg == "seq-mean-token-mean":
        return m / (n * m.sum(1, keepdim=True))
    return m / (n * (max_len or length))


@pytest.mark.parametrize("agg", grpo.AGGREGATIONS)
def test_on_policy_gradient_equals_reinforce_with_group_baseline(agg):
    logits, tokens, mask, rewards = _random_batch(1)
    adv = group_advantages(rewards, 3)  # 2 prompts × 3 completions
    logits.requires_grad_()
    logp = token_logprobs(logits, tokens)
    loss, stats = policy_loss(logp, logp.detach(), adv, mask, agg=agg)
    (grad,) = torch.autograd.grad(loss, logits)

    # REINFORCE: −Σ_it w_it · A_i · ∇ log π(o_it), with log π from torch.log_softmax directly
    ref_logits = logits.detach().clone().requires_grad_()
    ref_logp = torch.log_softmax(ref_logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    surrogate = -(_weights(mask, agg) * adv[:, None] * ref_logp).sum()
    (expected,) = torch.autograd.grad(surrogate, ref_logits)
    close(grad, expected, atol=1e-10)
    # ρ ≡ 1 on-policy, so nothing is clipped
    close(stats["ratio_mean"], 1.0)
    close(stats["clip_frac_low"] + stats["clip_frac_high"], 0.0)


def test_kl_gradient_matches_closed_form_k3():
    gen = torch.Generator().manual_seed(2)
    logp = (-torch.rand(4, 5, generator=gen, dtype=torch.float64) * 3).requires_grad_()
    ref = -torch.rand(4, 5, generator=gen, dtype=torch.float64) * 3
    mask = mask_from_lengths([5, 3, 1, 4], 5)
    beta = 0.04
    # A = 0 removes the policy term, leaving β · Agg(k3)
    loss, stats = policy_loss(logp, logp.detach(), torch.zeros(4, dtype=torch.float64), mask,
                              ref_logp=ref, beta=beta, kl="k3")
    (grad,) = torch.autograd.grad(loss, logp)

    # closed form in probabilities: KL_t = π_ref/π − log(π_ref/π) − 1, weights 1/(N·|o_i|)
    lp = logp.detach().clone().requires_grad_()
    x = torch.exp(ref) / torch.exp(lp)
    closed = beta * (_weights(mask, "seq-mean-token-mean") * (x - torch.log(x) - 1)).sum()
    (expected,) = torch.autograd.grad(closed, lp)
    close(grad, expected, atol=1e-12)
    # by hand: d/dlogp (e^{ref−logp} − ref + logp − 1) = 1 − e^{ref−logp}
    by_hand = beta * _weights(mask, "seq-mean-token-mean") * (1 - torch.exp(ref - logp.detach()))
    close(grad, by_hand, atol=1e-12)
    close(stats["kl"], masked_mean(x.detach() - torch.log(x.detach()) - 1, mask))


def test_kl_is_logged_without_training_when_beta_is_zero():
    logp = torch.log(torch.tensor([[0.5]], dtype=torch.float64)).requires_grad_()
    ref = torch.log(torch.tensor([[0.25]], dtype=torch.float64))
    loss, stats = policy_loss(logp, logp.detach(), torch.zeros(1, dtype=torch.float64), torch.ones(1, 1), ref_logp=ref)
    close(stats["kl"], LN2 - 0.5)  # k3 from the hand-computed case above
    close(loss, 0.0)  # A = 0, β = 0


# --------------------------------------------------------------------------------------------
# GSPO sequence ratio


def test_sequence_ratio_value_and_gradient():
    old = torch.zeros(1, 3, dtype=torch.float64)
    logp = torch.tensor([[0.1, 0.3, 5.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    adv = torch.tensor([1.0], dtype=torch.float64)
    loss, stats = policy_loss(logp, old, adv, mask, importance="sequence", clip_low=0.5, clip_high=0.5)
    # s = exp(mean(0.1, 0.3)) = e^0.2 ≈ 1.221403 (the padded 5.0 is ignored); inside [0.5, 1.5]
    s = math.exp(0.2)
    close(stats["ratio_mean"], s)
    # seq-mean-token-mean with N = 1: loss = −(s + s)/2 = −s
    close(loss, -s)
    loss.backward()
    # token form: d(sg[s]·e^{logp − sg[logp]})/dlogp_t = s, times −A/|o| = −1/2
    close(logp.grad, [[-s / 2, -s / 2, 0.0]])

    # with GSPO's clip range s is far outside [1 − 3e-4, 1 + 4e-4]: loss −1.0004, all tokens clipped
    loss, stats = policy_loss(logp, old, adv, mask, importance="sequence", clip_low=3e-4, clip_high=4e-4)
    close(loss, -1.0004)
    close(stats["clip_frac_high"], 1.0)


def test_sequence_ratio_equals_token_ratio_when_log_ratios_are_equal():
    gen = torch.Generator().manual_seed(3)
    logp = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    shift = torch.tensor([[0.5], [-0.3], [0.0], [0.1]], dtype=torch.float64)
    old = logp - shift  # every token of row i has log-ratio shift_i
    mask = mask_from_lengths([6, 2, 4, 5], 6)
    adv = torch.tensor([1.0, -1.0, 0.5, -2.0], dtype=torch.float64)
    results = {}
    for level in ("token", "sequence"):
        lp = logp.clone().requires_grad_()
        loss, stats = policy_loss(lp, old, adv, mask, importance=level, dual_clip=3.0)
        loss.backward()
        results[level] = (loss, lp.grad, stats["clip_frac_high"], stats["clip_frac_low"])
    for a, b in zip(results["token"], results["sequence"]):
        close(a, b, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Global normalisers, masks and padding


@pytest.mark.parametrize("agg", grpo.AGGREGATIONS)
def test_halves_with_global_normaliser_sum_to_full_batch_loss(agg):
    gen = torch.Generator().manual_seed(4)
    logp = torch.randn(4, 6, generator=gen, dtype=torch.float64) * 0.1 - 2
    old = logp + torch.randn(4, 6, generator=gen, dtype=torch.float64) * 0.2
    ref = logp + torch.randn(4, 6, generator=gen, dtype=torch.float64) * 0.2
    adv = torch.randn(4, generator=gen, dtype=torch.float64)
    mask = mask_from_lengths([6, 1, 3, 5], 6)
    kw = dict(beta=0.1, clip_high=0.28, agg=agg, max_len=10)
    full, _ = policy_loss(logp, old, adv, mask, ref_logp=ref, **kw)
    # token-mean: the whole batch has 6 + 1 + 3 + 5 = 15 tokens; seq modes: 4 rows
    override = {"num_tokens": mask.sum()} if agg == "token-mean" else {"num_seqs": 4}
    halves = [
        policy_loss(logp[rows], old[rows], adv[rows], mask[rows], ref_logp=ref[rows], **kw, **override)[0]
        for rows in (slice(0, 2), slice(2, 4))
    ]
    close(halves[0] + halves[1], full, atol=1e-12)
    # without the override each half is normalised by its own counts, and the sum differs
    alone = sum(
        policy_loss(logp[r], old[r], adv[r], mask[r], ref_logp=ref[r], **kw)[0] for r in (slice(0, 2), slice(2, 4))
    )
    assert not torch.allclose(alone, full)


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_rows_without_loss_tokens_do_not_count_in_sequence_means(agg):
    # Row 1 is masked out whole (e.g. truncated, under the overlong filter): the loss and the other
    # rows' gradients must be those of the batch without it, as in verl's agg_loss.
    gen = torch.Generator().manual_seed(5)
    logp = (torch.randn(3, 4, generator=gen, dtype=torch.float64) * 0.1 - 1).requires_grad_()
    old = logp.detach() + torch.randn(3, 4, generator=gen, dtype=torch.float64) * 0.1
    adv = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    mask = mask_from_lengths([4, 0, 2], 4)
    loss, _ = policy_loss(logp, old, adv, mask, agg=agg, max_len=8)
    (grad,) = torch.autograd.grad(loss, logp)
    kept = [0, 2]
    sub = logp.detach()[kept].requires_grad_()
    expected, _ = policy_loss(sub, old[kept], adv[kept], mask[kept], agg=agg, max_len=8)
    (expected_grad,) = torch.autograd.grad(expected, sub)
    close(loss, expected, atol=1e-12)
    close(grad[kept], expected_grad, atol=1e-12)
    # the global normaliser counts the same rows: num_seqs=2 over the whole batch gives the same loss
    close(policy_loss(logp, old, adv, mask, agg=agg, max_len=8, num_seqs=2)[0], expected, atol=1e-12)


def test_normaliser_override_must_fit_the_aggregation():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="num_tokens"):
        policy_loss(x, x, torch.zeros(2), torch.ones(2, 3), agg="seq-mean-token-mean", num_tokens=6)
    with pytest.raises(ValueError, match="num_seqs"):
        policy_loss(x, x, torch.zeros(2), torch.ones(2, 3), agg="token-mean", num_seqs=2)
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(x, x, torch.zeros(2), torch.ones(2, 3), beta=0.1)
    with pytest.raises(ValueError, match="dual_clip"):
        policy_loss(x, x, torch.zeros(2), torch.ones(2, 3), dual_clip=1.0)


def test_garbage_under_padding_never_reaches_loss_or_gradient():
    logp = torch.tensor([[-1.0, float("nan")], [-0.5, float("-inf")]], requires_grad=True)
    old = torch.tensor([[-1.1, float("inf")], [-0.4, float("nan")]])
    ref = torch.tensor([[-0.9, float("nan")], [-0.6, 3.0]])
    mask = torch.tensor([[1, 0], [1, 0]])
    per_token_adv = torch.tensor([[1.0, float("nan")], [-1.0, float("inf")]])
    for agg, adv in zip(grpo.AGGREGATIONS, (torch.tensor([1.0, -1.0]), per_token_adv, per_token_adv)):
        loss, stats = policy_loss(logp, old, adv, mask, ref_logp=ref, beta=0.1, agg=agg, dual_clip=3.0)
        (grad,) = torch.autograd.grad(loss, logp)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert torch.equal(grad[:, 1], torch.zeros(2))
        assert all(torch.isfinite(v) for v in stats.values())


def test_masked_reductions():
    x = torch.tensor([[1.0, 2.0, float("nan")], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    close(masked_sum(x, mask), 3.0)
    close(masked_mean(x, mask), 1.5)  # (1 + 2) / 2
    close(masked_mean(x, mask, dim=1), [1.5, 0.0])  # an empty row has mean 0, not NaN


# --------------------------------------------------------------------------------------------
# Log-probs and entropy from logits: the formula the model applies (nanopost/model.py)


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_token_logprobs_match_log_softmax(temperature):
    logits, tokens, _, _ = _random_batch(5, n=3, length=5, vocab=11)
    logits.requires_grad_()
    weights = torch.randn(3, 5, dtype=torch.float64)
    got = token_logprobs(logits, tokens, temperature)
    want = torch.log_softmax(logits / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    close(got, want, atol=1e-12)
    (g_got,) = torch.autograd.grad((got * weights).sum(), logits)
    (g_want,) = torch.autograd.grad((want * weights).sum(), logits)
    close(g_got, g_want, atol=1e-12)


def test_token_logprobs_gradcheck_and_sliced_input():
    gen = torch.Generator().manual_seed(6)
    full = torch.randn(2, 6, 7, generator=gen, dtype=torch.float64)
    logits = full[:, 2:].detach().requires_grad_()  # the completion slice of a longer sequence
    tokens = torch.randint(7, (2, 4), generator=gen)
    assert torch.autograd.gradcheck(lambda z: token_logprobs(z, tokens, 0.8), (logits,))
    sliced = token_logprobs(full[:, 2:], tokens)  # a non-contiguous view
    close(sliced, torch.log_softmax(full[:, 2:], -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1), atol=1e-12)


def test_token_logprobs_returns_float32_for_bf16_logits():
    gen = torch.Generator().manual_seed(7)
    logits = (torch.randn(2, 3, 50, generator=gen) * 4).to(torch.bfloat16)
    tokens = torch.randint(50, (2, 3), generator=gen)
    got = token_logprobs(logits, tokens)
    assert got.dtype == torch.float32
    want = torch.log_softmax(logits.float(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    close(got, want, atol=1e-5)


def entropy(logits, temperature=1.0):
    """The entropy token_logprobs returns beside the log-probs (the targets do not change it)."""
    return token_logprobs(logits, torch.zeros(logits.shape[:-1], dtype=torch.long), temperature, True)[1]


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_entropy_matches_direct_computation(temperature):
    logits, _, _, _ = _random_batch(8, n=3, length=5, vocab=11)
    p = torch.softmax(logits / temperature, -1)
    close(entropy(logits, temperature), -(p * torch.log(p)).sum(-1), atol=1e-12)
    # a uniform distribution over 11 words has entropy ln 11
    close(entropy(torch.zeros(1, 1, 11)), [[math.log(11)]], atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_logprobs_with_entropy_in_one_pass_equal_the_logprobs_alone(temperature):
    logits, tokens, _, _ = _random_batch(9, n=3, length=5, vocab=11)
    logits.requires_grad_()
    logp, ent = token_logprobs(logits, tokens, temperature, with_entropy=True)
    close(logp, token_logprobs(logits, tokens, temperature), atol=1e-12)
    p = torch.softmax(logits.detach() / temperature, -1)
    close(ent, -(p * torch.log(p)).sum(-1), atol=1e-12)
    assert not ent.requires_grad
    weights = torch.randn(3, 5, dtype=torch.float64)
    (g_got,) = torch.autograd.grad((logp * weights).sum(), logits)
    want = torch.log_softmax(logits / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    (g_want,) = torch.autograd.grad((want * weights).sum(), logits)
    close(g_got, g_want, atol=1e-12)
    assert torch.autograd.gradcheck(lambda z: token_logprobs(z, tokens, temperature, with_entropy=True)[0], (logits,))


@pytest.mark.parametrize("impl", ["reference", "fast"])
def test_temperature_zero_is_rejected(impl):
    model = Transformer(ModelConfig(vocab_size=5, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1))
    model.impl = impl
    ids = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        model(Logprobs(ids, ids, temperature=0.0))
