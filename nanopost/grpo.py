"""GRPO math as pure tensor functions: advantages, KL estimators, the clipped policy loss.

Nothing here knows about models or tokenizers: tensors in, tensors out. Shapes: N = prompts ·
group_size rows (a prompt's G completions are consecutive rows), T = completion length,
V = vocabulary size. `mask[N, T]` is 1 on completion tokens that count in the loss, 0 on padding.

The objective (maximised; `policy_loss` returns its negative)
----------------------------------------------------------------
    J(θ) = Agg_{i,t} [ min( ρ_it·Â_i , clip(ρ_it, 1−ε_low, 1+ε_high)·Â_i ) − β·KL_it ]

    ρ_it = π_θ(o_it | q, o_i<t) / π_old(o_it | q, o_i<t)          token ratio (default)
    ρ_it = sg[s_i] · π_θ(o_it) / sg[π_θ(o_it)],                    sequence ratio (GSPO), with
    s_i  = exp( (1/|o_i|) Σ_t log(π_θ(o_it)/π_old(o_it)) )         sg = stop-gradient
    Â_i  = (r_i − mean_group(r)) / (std_group(r) + eps)            one value for every token of o_i
    KL_it = π_ref/π_θ − log(π_ref/π_θ) − 1                         k3, per token, in the loss

    with dual-clip (c > 1), for Â_i < 0 the per-token loss is also capped at −c·Â_i.

Agg is one of (|o_i| = Σ_t mask_it; N = the rows with |o_i| > 0):
    "seq-mean-token-mean"      (1/N) Σ_i (1/|o_i|) Σ_t ℓ_it        GRPO paper
    "token-mean"               (1/Σ_i |o_i|) Σ_i Σ_t ℓ_it          DAPO
    "seq-mean-token-sum-norm"  (1/(N·L_max)) Σ_i Σ_t ℓ_it          Dr. GRPO

A row with no loss token (padding only, or masked out whole by the overlong filter) is not
counted in N, as in verl's agg_loss: otherwise the update would shrink as truncation rises.

Every choice, its default here, and where it comes from
--------------------------------------------------------
- Advantage scale, `scale="group"`: z-score inside the group, unbiased std (n−1), eps 1e-6
  (GRPO / DeepSeekMath, arXiv 2402.03300). "batch": group mean, std of the whole batch (Lite PPO;
  TRL `scale_rewards="batch"`). "none": r − group mean, no division, which removes the
  question-level difficulty bias (Dr. GRPO, arXiv 2503.20783). TRL uses eps 1e-4, verl 1e-6,
  OpenRLHF 1e-9; all use the unbiased std.
- Groups of one: the group mean is the reward itself, so the advantage is 0 under every scale
  (verl instead returns the raw reward there). A group whose rewards all agree gets exactly 0.
- Clip range, `clip_low=0.2, clip_high=0.2`: symmetric PPO clip. DAPO (arXiv 2503.14476) raises
  only the upper bound ("clip-higher", 0.2 / 0.28) so low-probability tokens can grow.
- Dual clip, `dual_clip=None`: off. With c > 1, a negative-advantage token whose ratio has run far
  above 1 stops contributing a growing loss (Ye et al., dual-clip PPO, arXiv 1912.09729). verl
  has it always on with c = 3; OpenRLHF optional; TRL has none.
- Importance level, `importance="token"`. "sequence" is GSPO (arXiv 2507.18071): one length-
  normalised ratio per sequence, clipped as a whole, in the token-level form above so gradients
  still flow per token. GSPO's ratio sits much closer to 1, so its paper clips at 3e-4 / 4e-4,
  not 0.2, and aggregates per sequence ("seq-mean-token-mean", which verl forces for it). Only
  matters off-policy (more than one update per batch of samples).
- Aggregation, `agg="seq-mean-token-mean"` (the GRPO paper). It gives each sequence the same total
  weight, so a token of a long answer weighs less: shorter correct answers are pushed harder and
  longer wrong ones are punished less (the length bias Dr. GRPO points out). "token-mean" (DAPO;
  the default in TRL, verl and OpenRLHF) weights every token equally; "seq-mean-token-sum-norm"
  (Dr. GRPO) divides by a constant N·max_len, so a token's weight never depends on lengths.
- KL, `beta=0.0`, `kl="k3"`: no KL term by default (DAPO, Dr. GRPO and TRL drop it; DeepSeekMath
  used β = 0.04 with k3, R1 β = 0.001). It is added to the loss, not to the reward (GRPO).
  Differentiating k3 as a loss on samples of π_θ gives, in expectation, the gradient of the
  *forward* KL(π_ref‖π_θ); k2 ("0.5·(log ratio)²") gives the gradient of the reverse KL(π_θ‖π_ref).
  Pass `ref_logp` with β = 0 to log the KL without training on it.
- Numerical guards: log-ratios (π_θ/π_old and π_ref/π_θ) are clamped to ±20 before `exp`, as in
  verl and OpenRLHF, so a single badly-off token cannot overflow to inf; inside that range values
  are exact, outside it the gradient through the clamp is zero. Padded positions are zero-filled
  before any arithmetic, so garbage (even NaN or -inf) under mask 0 never reaches the loss or
  its gradient.

Global normalisers (gradient accumulation, data parallel)
---------------------------------------------------------
By default the normaliser comes from the tensors passed in. To split one batch over micro-batches
or processes and get the same update, pass the whole batch's counts: `num_tokens=` (token-mean:
Σ mask over the whole batch) or `num_seqs=` (the seq-* modes: rows of the whole batch that have
at least one loss token). Each
call then returns its share, and the shares *sum* to the full-batch loss. Data-parallel
wrappers that average gradients over W processes need the loss multiplied by W.

Logprobs for the loss are log softmax(logits / temperature) at the sampled tokens, with the same
temperature the sampler used, so the trained distribution is the one that was sampled. The GRPO
loop gets them from the model (`model(PrefixLogprobs(...))`; the formula is `token_logprobs` in
nanopost/model.py), whose fast path never materialises the logits (nanopost/fast/lm_head.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "group_advantages",
    "kl_penalty",
    "policy_loss",
    "masked_sum",
    "masked_mean",
]

SCALES = ("group", "batch", "none")
KL_KINDS = ("k1", "k2", "k3")
IMPORTANCE_LEVELS = ("token", "sequence")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")

# exp(20) ≈ 4.9e8: far beyond any ratio the clip lets through, far below float32 overflow.
_MAX_LOG_RATIO = 20.0


# ---------------------------------------------------------------------------------------------
# Masked reductions


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of x where mask is non-zero. Masked-out entries are dropped, not multiplied by 0,
    so NaN or inf under the mask cannot leak into the result."""
    kept = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of x over the entries where mask is non-zero; 0 where nothing is kept."""
    count = mask.bool().sum() if dim is None else mask.bool().sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Advantages and KL


def group_advantages(
    rewards: Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-6
) -> Tensor:
    """Advantage of each completion relative to the other completions of its prompt.

    rewards: [N], the G = group_size completions of a prompt on consecutive rows.
    scale:   "group" (r − group mean) / (group std + eps)     GRPO
             "batch" (r − group mean) / (batch std + eps)     Lite PPO
             "none"   r − group mean                          Dr. GRPO
    Stds are unbiased (n − 1). A group whose rewards all agree gets exactly 0, and so does every
    row when group_size is 1 (the group mean is then the reward itself), never NaN.
    Returns advantages [N] in the rewards' floating dtype.
    """
    if scale not in SCALES:
        raise ValueError(f"group_advantages: scale must be one of {SCALES}, got {scale!r}")
    if rewards.dim() != 1:
        raise ValueError(f"group_advantages: rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"group_advantages: {rewards.numel()} rewards do not split into groups of {group_size} "
            "(N must be prompts * group_size, with a prompt's completions on consecutive rows)"
        )
    if not torch.isfinite(rewards).all():
        raise ValueError("group_advantages: rewards contain NaN or inf")

    rewards = rewards.detach()
    if not rewards.is_floating_point():
        rewards = rewards.float()
    groups = rewards.reshape(-1, group_size)  # [P, G]
    centred = groups - groups.mean(dim=1, keepdim=True)
    # The mean of equal floats can be off by an ulp; a group that agrees carries no signal, so
    # make its advantage exactly zero (and the dynamic-sampling filter can test for == 0).
    agree = (groups == groups[:, :1]).all(dim=1, keepdim=True)  # [P, 1]
    centred = centred.masked_fill(agree, 0.0)

    if scale == "none":
        return centred.view(-1)
    if scale == "group":
        # std of one sample is undefined (NaN); its centred value is 0 anyway, so any finite std does.
        std = groups.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(centred)
    else:
        std = rewards.std() if rewards.numel() > 1 else torch.zeros((), dtype=rewards.dtype)
    return (centred / (std + eps)).view(-1)


def kl_penalty(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from the log-probs of tokens sampled from π.

    k1 = logp − ref                          unbiased, can be negative, high variance
    k2 = ½ (logp − ref)²                     biased, ≥ 0; its gradient is the reverse-KL gradient
    k3 = exp(ref − logp) − (ref − logp) − 1  unbiased, ≥ 0, low variance (Schulman; GRPO eq. 4)
    For k3 the log-ratio is clamped to ±20 before exp (see the module docstring).
    Returns a tensor of logp's shape.
    """
    if logp.shape != ref_logp.shape:
        raise ValueError(f"kl_penalty: logp {tuple(logp.shape)} and ref_logp {tuple(ref_logp.shape)} differ")
    if kind == "k1":
        return logp - ref_logp
    if kind == "k2":
        return 0.5 * (logp - ref_logp).square()
    if kind == "k3":
        log_ratio = (ref_logp - logp).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        return torch.exp(log_ratio) - log_ratio - 1.0
    raise ValueError(f"kl_penalty: kind must be one of {KL_KINDS}, got {kind!r}")


# ---------------------------------------------------------------------------------------------
# The loss


def policy_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    ref_logp: Tensor | None = None,
    beta: float = 0.0,
    kl: str = "k3",
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    dual_clip: float | None = None,
    importance: str = "token",
    agg: str = "seq-mean-token-mean",
    max_len: int | None = None,
    num_tokens: int | float | Tensor | None = None,
    num_seqs: int | float | Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped GRPO surrogate loss (to minimise) and detached statistics.

    logp [N, T]        log π_θ of the completion tokens (carries the gradient)
    old_logp [N, T]    log π_old, from the sampling pass (treated as a constant)
    advantages [N] or [N, T]  (constant)
    mask [N, T]        1 on tokens that count, 0 on padding (bool or 0/1 numbers)
    ref_logp [N, T]    log π_ref; needed for beta > 0, and logs the KL when given with beta = 0
    max_len            "seq-mean-token-sum-norm" constant; defaults to T
    num_tokens         override for Σ mask ("token-mean" only)
    num_seqs           override for N, the rows with loss tokens (the "seq-*" modes only)

    Per token: ℓ = −min(ρ·A, clip(ρ, 1 − clip_low, 1 + clip_high)·A) + beta·KL, then for A < 0
    and dual_clip = c the policy part is capped at −c·A. See the module docstring for the rest.

    stats (0-d tensors over the masked tokens of this call):
      clip_frac_low / clip_frac_high   share where the clipped term won and differed, ρ < 1 / ρ > 1
      ratio_mean                       mean importance ratio (the sequence ratio under GSPO)
      kl                               mean KL estimate (only when ref_logp is given)
      dual_clip_frac                   share where the dual-clip cap was active (only when used)
    """
    _check_loss_args(logp, old_logp, advantages, mask, ref_logp, beta, kl, clip_low, clip_high,
                     dual_clip, importance, agg, num_tokens, num_seqs)
    n_rows, length = logp.shape
    keep = mask.bool()
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    # Zero-fill padding first: a NaN there would otherwise survive both the loss (NaN·0 = NaN)
    # and the backward pass of exp.
    logp = torch.where(keep, logp, zero)
    old_logp = torch.where(keep, old_logp.detach(), zero)
    adv = advantages.detach().to(logp.dtype)
    adv = adv.unsqueeze(1).expand(n_rows, length) if adv.dim() == 1 else adv
    adv = torch.where(keep, adv, zero)  # [N, T]

    log_ratio = logp - old_logp  # [N, T]
    if importance == "sequence":
        seq_log_ratio = masked_mean(log_ratio.detach(), keep, dim=1)  # [N]
        # value log s_i on every token, gradient d logp_t per token (GSPO-token form)
        log_ratio = seq_log_ratio.unsqueeze(1) + logp - logp.detach()
    ratio = torch.exp(log_ratio.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))  # [N, T]

    unclipped = ratio * adv
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv
    per_token = -torch.minimum(unclipped, clipped)  # [N, T]
    clip_won = clipped < unclipped
    stats: dict[str, Tensor] = {
        "clip_frac_low": masked_mean((clip_won & (ratio < 1.0)).to(logp.dtype), keep).detach(),
        "clip_frac_high": masked_mean((clip_won & (ratio > 1.0)).to(logp.dtype), keep).detach(),
        "ratio_mean": masked_mean(ratio.detach(), keep),
    }
    if dual_clip is not None:
        cap = -dual_clip * adv  # > 0 where adv < 0
        capped = (adv < 0) & (per_token > cap)
        per_token = torch.where(capped, cap, per_token)
        stats["dual_clip_frac"] = masked_mean(capped.to(logp.dtype), keep).detach()

    if ref_logp is not None:
        ref_logp = torch.where(keep, ref_logp.detach(), zero)
        if beta != 0.0:
            kl_tok = kl_penalty(logp, ref_logp, kl)
            per_token = per_token + beta * kl_tok
        else:
            with torch.no_grad():
                kl_tok = kl_penalty(logp, ref_logp, kl)
        stats["kl"] = masked_mean(kl_tok.detach(), keep)

    loss = _aggregate(per_token, keep, agg, max_len, num_tokens, num_seqs)
    return loss, stats


def _aggregate(
    per_token: Tensor,
    keep: Tensor,
    agg: str,
    max_len: int | None,
    num_tokens: int | float | Tensor | None,
    num_seqs: int | float | Tensor | None,
) -> Tensor:
    length = per_token.shape[1]
    if agg == "token-mean":
        total = keep.sum() if num_tokens is None else num_tokens
        return masked_sum(per_token, keep) / _at_least_one(total, per_token)
    # Only rows with loss tokens count (as verl's agg_loss): a row masked out entirely (e.g. by
    # the overlong filter) must not shrink every other row's weight.
    rows = keep.any(dim=1).sum() if num_seqs is None else num_seqs
    if agg == "seq-mean-token-mean":
        per_seq = masked_mean(per_token, keep, dim=1)  # [N]; an empty row contributes 0
        return per_seq.sum() / _at_least_one(rows, per_token)
    # seq-mean-token-sum-norm: a constant length budget, so no token's weight depends on lengths
    budget = length if max_len is None else max_len
    return masked_sum(per_token, keep) / (_at_least_one(rows, per_token) * budget)


def _at_least_one(count: int | float | Tensor, like: Tensor) -> Tensor:
    # an all-padding batch gives loss 0 rather than 0/0
    return torch.as_tensor(count, device=like.device).to(like.dtype).clamp(min=1)


def _check_loss_args(logp, old_logp, advantages, mask, ref_logp, beta, kl, clip_low, clip_high,
                     dual_clip, importance, agg, num_tokens, num_seqs) -> None:
    where = "policy_loss"
    if logp.dim() != 2:
        raise ValueError(f"{where}: logp must be [N, T], got shape {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("mask", mask), ("ref_logp", ref_logp)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"{where}: {name} has shape {tuple(t.shape)}, logp has {tuple(logp.shape)}")
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(
            f"{where}: advantages must be [N] or [N, T] = {tuple(logp.shape)}, got {tuple(advantages.shape)}"
        )
    if importance not in IMPORTANCE_LEVELS:
        raise ValueError(f"{where}: importance must be one of {IMPORTANCE_LEVELS}, got {importance!r}")
    if agg not in AGGREGATIONS:
        raise ValueError(f"{where}: agg must be one of {AGGREGATIONS}, got {agg!r}")
    if kl not in KL_KINDS:
        raise ValueError(f"{where}: kl must be one of {KL_KINDS}, got {kl!r}")
    if beta != 0.0 and ref_logp is None:
        raise ValueError(f"{where}: beta={beta} needs ref_logp")
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"{where}: clip_low and clip_high must be >= 0, got {clip_low}, {clip_high}")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"{where}: dual_clip must be > 1 (it caps the loss at -dual_clip*A), got {dual_clip}")
    if num_tokens is not None and agg != "token-mean":
        raise ValueError(f"{where}: num_tokens is the token-mean normaliser; agg={agg!r} uses num_seqs")
    if num_seqs is not None and agg == "token-mean":
        raise ValueError(f"{where}: num_seqs is for the seq-* modes; token-mean uses num_tokens")
