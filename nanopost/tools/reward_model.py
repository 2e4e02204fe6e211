"""Reward models: a transformer that reads a conversation and returns one number.

    RewardModel              the nanopost Transformer without its LM head, plus `score`, a
                             hidden -> 1 linear layer read at the last real token of each row
    save / load              a Hugging Face sequence-classification directory (below)
    losses                   Bradley-Terry for preference pairs, MSE for scalar labels
    load_reward_data         JSONL pairs {"prompt", "chosen", "rejected"} or labels
                             {"prompt", "completion", "label"}, checked line by line
    train_reward_model       the training loop; evaluate_reward_model for held-out data
    ModelReward              a trained reward model as a reward function, scoring in batches
    RewardEnsemble           several reward models combined: mean, min, or mean - lam * std,
                             each member standardised within each prompt's completions first

A conversation is scored as the chat template renders it: the prompt as the user turn, the
completion as the assistant turn, tokenised exactly as `data.tokenize_chat` does for SFT (so the
ids match what the policy produced). The score is read at the last real token, which has attended
to everything before it; padding is on the right and never attended, so a padded row scores
exactly as it does alone.

Files. `save_reward_model` writes what transformers' `*ForSequenceClassification` reads:
config.json with "architectures": ["Qwen2ForSequenceClassification"] (or Llama/Qwen3), "num_labels"
1, pad_token_id and a "nanopost_reward_model" marker, and model.safetensors holding the backbone
("model.*") and the head ("score.weight"), no LM head. transformers finds the last token as the last
one that is not pad_token_id, this code by the attention mask; they agree whenever the pad token
never occurs inside a conversation (true for the chat templates here, whose pad token is a
document separator). `checkpoint.load_model` refuses such a directory (it has no lm_head.weight, and
score.weight is not a causal-LM tensor): start a reward model from a causal LM with
`RewardModel(load_model(path))`, and load a saved one with `load_reward_model`.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from ..data import tokenize_chat
from ..model import ModelConfig, Transformer
from ..plumbing.data_files import DataError, _json_type, is_number, read_jsonl
from ..plumbing.files import read_json, write_atomic
from ..plumbing.hf_io import DTYPES, INDEX_FILE, SINGLE_FILE, config_from_hf, config_to_hf, read_tensors, weight_files
from ..plumbing.runtime import autocast, make_optimizer
from ..plumbing.tokenizer import Tokenizer
from ..schedules import lr_at, set_lr

MARKER = "nanopost_reward_model"
HEAD = "score.weight"


# ---------------------------------------------------------------------------------------------
# The model


class RewardModel(nn.Module):
    """A Transformer backbone and a scalar head read at each row's last real token.

    The backbone's LM head is removed (set to None): a reward model never predicts tokens, and an
    untied head would cost vocab x hidden parameters of memory and optimizer state for nothing.
    So pass a Transformer made for this purpose, `RewardModel(load_model(path))`, not a policy
    that is still in use. The head starts as normal(0, 1 / sqrt(hidden + 1)), small enough that
    the first scores are near 0 whatever the hidden states' scale.
    """

    def __init__(self, backbone: Transformer, *, generator: torch.Generator | None = None):
        super().__init__()
        self.backbone = backbone
        backbone.lm_head = None
        hidden = backbone.config.hidden_size
        self.score = nn.Linear(hidden, 1, bias=False, device=backbone.device, dtype=backbone.dtype)
        if self.score.weight.device.type != "meta":  # meta: being built for loading, weights come next
            std = 1.0 / math.sqrt(hidden + 1)
            w = torch.randn(1, hidden, generator=generator) * std  # [1, H]; on the CPU: one seed, one head
            with torch.no_grad():
                self.score.weight.copy_(w)

    @property
    def config(self) -> ModelConfig:
        return self.backbone.config

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.dtype

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Scores [B] (fp32) for token ids [B, T]; attention_mask [B, T] is 1 on real tokens.

        Without a mask every position is real and the last column is read.
        """
        h = self.backbone.hidden_states(input_ids, attention_mask=attention_mask)  # [B, T, H]
        last = last_real_token(attention_mask) if attention_mask is not None else h.shape[1] - 1
        pooled = h[torch.arange(h.shape[0], device=h.device), last]  # [B, H]
        return self.score(pooled).squeeze(-1).float()


def last_real_token(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index [B] of the rightmost 1 in each row of attention_mask [B, T] (right or left padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


# ---------------------------------------------------------------------------------------------
# Files


def _reward_config(rm: RewardModel, pad_token_id: int | None, dtype_name: str) -> dict[str, Any]:
    hf = config_to_hf(rm.config)
    arch = hf["architectures"][0].removesuffix("ForCausalLM") + "ForSequenceClassification"
    pad = pad_token_id if pad_token_id is not None else rm.config.pad_token_id
    hf.update(
        architectures=[arch],
        num_labels=1,
        id2label={"0": "LABEL_0"},
        label2id={"LABEL_0": 0},
        # transformers finds each row's last token by this id; without one it scores only batches of 1.
        pad_token_id=pad,
        torch_dtype=dtype_name,
        dtype=dtype_name,
    )
    hf[MARKER] = {"pooling": "last_token"}
    return hf


def save_reward_model(
    rm: RewardModel,
    path: str | os.PathLike,
    *,
    tokenizer: Tokenizer | None = None,
    dtype: torch.dtype | None = None,
) -> None:
    """Write config.json and model.safetensors (backbone + score.weight), and the tokenizer if given.

    The config's pad_token_id is the tokenizer's (the id batches are padded with), else the
    model's own: transformers needs one to score batches. Pass the tokenizer, since a model config
    whose pad id is the end-of-turn token would make transformers skip that token when it reads
    the score. Weights go in one file (no sharding); dtype=None keeps the weights' dtype.
    """
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    # The file names are transformers' sequence-classification names: "backbone.model.x" -> "model.x".
    state = {
        name.removeprefix("backbone."): t.detach().to(dtype=dtype or t.dtype, device="cpu").contiguous()
        for name, t in rm.state_dict().items()
    }
    dtype_name = {v: k for k, v in DTYPES.items()}[state[HEAD].dtype]
    pad = tokenizer.pad_token_id if tokenizer is not None else None
    hf = _reward_config(rm, pad, dtype_name)
    write_atomic(root / "config.json", lambda f: Path(f).write_text(json.dumps(hf, indent=2) + "\n"))
    for stale in list(root.glob("model*.safetensors")) + [root / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    write_atomic(root / SINGLE_FILE, lambda f: save_file(state, f, metadata={"format": "pt"}))
    if tokenizer is not None:
        tokenizer.save(root)


def _check_reward_config(hf: dict, file: Path) -> None:
    archs = hf.get("architectures") or []
    is_classifier = any(str(a).endswith("ForSequenceClassification") for a in archs)
    if MARKER not in hf and not is_classifier:
        raise ValueError(
            f"{file}: not a reward model (architectures {archs}); a causal LM becomes one with "
            f"RewardModel(load_model(path)), trained by train_reward_model"
        )
    # transformers' default is two labels, so a classifier config that says nothing has two.
    labels = 2
    if "num_labels" in hf:
        labels = hf["num_labels"]
    elif "id2label" in hf:
        labels = len(hf["id2label"])
    if labels != 1:
        raise ValueError(f"{file}: a reward model has one output (num_labels 1), this one has {labels}")


def load_reward_model(
    path: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> RewardModel:
    """Load a reward model directory, strictly: every tensor present, right shape, none left over.

    Reads what `save_reward_model` writes and transformers' single-output *ForSequenceClassification
    checkpoints of the supported families (single file or sharded). dtype=None keeps the files'.
    """
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: reward model directory not found")
    file = root / "config.json"
    hf = read_json(file)
    _check_reward_config(hf, file)
    cfg = config_from_hf(hf, source=str(file))
    with torch.device("meta"):
        rm = RewardModel(Transformer(cfg))
    expected = {name.removeprefix("backbone."): (name, t.shape) for name, t in rm.state_dict().items()}
    files = weight_files(root)
    if HEAD not in files:
        raise ValueError(
            f"{root}: missing tensor {HEAD} (the reward head); the weights are a backbone without its score"
        )
    shapes = {name: shape for name, (_, shape) in expected.items()}
    backbone = read_tensors(root, {n: f for n, f in files.items() if n != HEAD},
                            {n: s for n, s in shapes.items() if n != HEAD}, device=device, dtype=dtype)
    head = read_tensors(root, {HEAD: files[HEAD]}, {HEAD: shapes[HEAD]}, device=device, dtype=dtype,
                        needs="the reward head needs")
    state = {expected[name][0]: t for name, t in {**backbone, **head}.items()}
    rm.load_state_dict(state, strict=True, assign=True)
    return rm


# ---------------------------------------------------------------------------------------------
# Losses


def bradley_terry_loss(
    chosen_scores: torch.Tensor, rejected_scores: torch.Tensor, margin: torch.Tensor | float | None = None
) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected - margin) over pairs [N].

    Under the Bradley-Terry model P(chosen beats rejected) = sigmoid(r_c - r_r), so this is the
    pairs' negative log-likelihood. A margin (per pair or one number) asks for a gap of at least
    that much before the loss flattens, for pairs labelled as clearly different.
    """
    diff = chosen_scores.float() - rejected_scores.float()
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def scalar_loss(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean squared error between scores [N] and labels [N]."""
    return F.mse_loss(scores.float(), labels.float())


def preference_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> float:
    """Share of pairs ranked right; a tie counts one half, so a model that scores everything the
    same is at chance (0.5), not at 0."""
    right = (chosen_scores > rejected_scores).float() + 0.5 * (chosen_scores == rejected_scores).float()
    return right.mean().item()


# ---------------------------------------------------------------------------------------------
# Data


@dataclass(frozen=True)
class PreferencePair:
    """`chosen` is the better completion of `prompt`; margin: the gap asked for (None: 0)."""

    prompt: str
    chosen: str
    rejected: str
    margin: float | None = None


@dataclass(frozen=True)
class ScalarLabel:
    """A completion of `prompt` and the score it should get."""

    prompt: str
    completion: str
    label: float


def load_reward_data(path: str | os.PathLike) -> list[PreferencePair] | list[ScalarLabel]:
    """Preference pairs or scalar labels from a JSONL file; one file holds one kind.

    Pair:   {"prompt": str, "chosen": str, "rejected": str, "margin"?: number}
    Scalar: {"prompt": str, "completion": str, "label": number}
    Other fields are ignored. Every problem is a DataError naming the file, line and field.
    """
    out: list = []
    first: tuple[str, int] | None = None  # (kind, line) of the first record
    for lineno, record in read_jsonl(path):
        where = f"{path}:{lineno}"
        is_pair = "chosen" in record or "rejected" in record
        is_scalar = "completion" in record or "label" in record
        if is_pair and is_scalar:
            raise DataError(f'{where}: has both "chosen"/"rejected" and "completion"/"label"; use one form')
        if not (is_pair or is_scalar):
            raise DataError(f'{where}: missing field "chosen"/"rejected" (preference pair) '
                            f'or "completion"/"label" (scalar label)')
        kind = "preference pair" if is_pair else "scalar label"
        first = first or (kind, lineno)
        if kind != first[0]:
            raise DataError(f"{where}: a {kind}, but line {first[1]} is a {first[0]}; one file holds one kind")
        out.append(_pair(record, where) if is_pair else _scalar(record, where))
    return out


def _strings(record: dict, where: str, names: tuple[str, ...]) -> None:
    for name in names:
        if name not in record:
            raise DataError(f'{where}: missing field "{name}"')
        if not isinstance(record[name], str):
            raise DataError(f'{where}: field "{name}" must be a string, got {_json_type(record[name])}')
    if not record["prompt"].strip():
        raise DataError(f'{where}: field "prompt" is empty')


def _number(record: dict, where: str, name: str) -> float:
    if not is_number(record[name]):
        raise DataError(f'{where}: field "{name}" must be a finite number, got {_json_type(record[name])}')
    return float(record[name])


def _pair(record: dict, where: str) -> PreferencePair:
    _strings(record, where, ("prompt", "chosen", "rejected"))
    if record["chosen"] == record["rejected"]:
        raise DataError(f'{where}: fields "chosen" and "rejected" are identical; the pair teaches nothing')
    margin = _number(record, where, "margin") if record.get("margin") is not None else None
    return PreferencePair(record["prompt"], record["chosen"], record["rejected"], margin)


def _scalar(record: dict, where: str) -> ScalarLabel:
    _strings(record, where, ("prompt", "completion"))
    if "label" not in record:
        raise DataError(f'{where}: missing field "label"')
    return ScalarLabel(record["prompt"], record["completion"], _number(record, where, "label"))


def encode_conversation(tokenizer: Tokenizer, prompt: str, completion: str, max_len: int | None = None) -> list[int]:
    """Ids of the user prompt and assistant completion as the chat template renders them.

    Longer than max_len: the LAST max_len ids are kept, because the end of the completion is what
    is being judged and the score is read there; the start of a long prompt matters least.
    """
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    ids = tokenize_chat(tokenizer, messages).ids
    return ids[-max_len:] if max_len is not None and len(ids) > max_len else ids


def _pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and attention mask [B, T]."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros(len(rows), T, dtype=torch.long)  # [B, T]
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def score_ids(
    rm: RewardModel, rows: Sequence[Sequence[int]], *, pad_id: int, batch_size: int = 32, precision: str = "auto"
) -> torch.Tensor:
    """Scores [N] (fp32, on the CPU) of tokenised conversations, in batches of similar length.

    Rows are sorted by length before batching so that little compute goes to padding, and the
    scores are returned in the input order.
    """
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out = torch.empty(len(rows))
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        ids, mask = _pad([rows[i] for i in idx], pad_id, rm.device)
        with autocast(rm.device, precision):
            out[idx] = rm(ids, mask).cpu()
    return out


# ---------------------------------------------------------------------------------------------
# Training


def _tokenized(tokenizer: Tokenizer, data: Sequence[PreferencePair | ScalarLabel], max_len: int | None):
    """(rows, extras): pairs give rows (chosen, rejected) and margins; scalars one row and labels."""
    if all(isinstance(d, PreferencePair) for d in data):
        rows = [(encode_conversation(tokenizer, d.prompt, d.chosen, max_len),
                 encode_conversation(tokenizer, d.prompt, d.rejected, max_len)) for d in data]
        return rows, [d.margin or 0.0 for d in data]
    if all(isinstance(d, ScalarLabel) for d in data):
        rows = [encode_conversation(tokenizer, d.prompt, d.completion, max_len) for d in data]
        return rows, [d.label for d in data]
    raise ValueError("reward data must be all PreferencePair or all ScalarLabel")


def _pair_scores(rm: RewardModel, rows: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass for the chosen and the rejected halves of a batch of pairs."""
    ids, mask = _pad([c for c, _ in rows] + [r for _, r in rows], pad_id, rm.device)
    scores = rm(ids, mask)  # [2B]
    return scores[: len(rows)], scores[len(rows):]


def train_reward_model(
    rm: RewardModel,
    tokenizer: Tokenizer,
    data: Sequence[PreferencePair] | Sequence[ScalarLabel],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    warmup_steps: int = 0,
    min_lr_ratio: float = 0.0,
    weight_decay: float = 0.0,
    clip_grad: float = 1.0,
    center_coef: float = 0.0,
    max_len: int | None = None,
    seed: int = 0,
    precision: str = "auto",
    on_step: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train `rm` in place; returns one row per step ({"step", "loss", "lr", "grad_norm", ...}).

    Each step: batch_size pairs (or labelled completions) from a seeded shuffle of `data`, a new
    shuffle every epoch -> Bradley-Terry loss (or MSE) -> clip grad norm -> AdamW with warmup +
    cosine lr (schedules.lr_at). Pairs add "accuracy" (of the batch) to their rows.

    center_coef adds center_coef * mean((r_c + r_r)^2), which pins the scores' offset near 0 (the
    Bradley-Terry loss sees only differences, so the offset otherwise drifts); 0.01 is the
    published value. max_len None: the model's context. `on_step(row)` is called after every
    step, for logging.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    if not data:
        raise ValueError("train_reward_model: no data")
    rows, extras = _tokenized(tokenizer, data, max_len or rm.config.max_position_embeddings)
    is_pairs = isinstance(data[0], PreferencePair)
    pad_id = tokenizer.pad_token_id
    batch_size = min(batch_size, len(rows))
    optimizer = make_optimizer(rm, lr, weight_decay)
    rng = random.Random(seed)
    order: list[int] = []
    history = []
    rm.train()
    for step in range(steps):
        if len(order) < batch_size:  # a new epoch; the short remainder of the last one is dropped
            order = list(range(len(rows)))
            rng.shuffle(order)
        idx, order = order[:batch_size], order[batch_size:]
        lr_now = lr_at(step, base_lr=lr, total_steps=steps, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio)
        set_lr(optimizer, lr_now)
        row: dict[str, Any] = {"step": step + 1}
        with autocast(rm.device, precision):
            if is_pairs:
                chosen, rejected = _pair_scores(rm, [rows[i] for i in idx], pad_id)
                margin = torch.tensor([extras[i] for i in idx], device=rm.device)
                loss = bradley_terry_loss(chosen, rejected, margin)
                if center_coef:
                    loss = loss + center_coef * (chosen + rejected).pow(2).mean()
                row["accuracy"] = preference_accuracy(chosen.detach(), rejected.detach())
            else:
                ids, mask = _pad([rows[i] for i in idx], pad_id, rm.device)
                labels = torch.tensor([extras[i] for i in idx], device=rm.device)
                loss = scalar_loss(rm(ids, mask), labels)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(rm.parameters(), clip_grad if clip_grad > 0 else math.inf)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        row.update(loss=loss.item(), lr=lr_now, grad_norm=grad_norm.item())
        history.append(row)
        if on_step is not None:
            on_step(row)
    rm.eval()
    return history


def evaluate_reward_model(
    rm: RewardModel,
    tokenizer: Tokenizer,
    data: Sequence[PreferencePair] | Sequence[ScalarLabel],
    *,
    batch_size: int = 32,
    max_len: int | None = None,
    precision: str = "auto",
) -> dict[str, float]:
    """Held-out metrics. Pairs: accuracy, loss (Bradley-Terry, margins ignored) and mean score gap.
    Scalars: mse and the Pearson correlation of scores with labels."""
    rows, extras = _tokenized(tokenizer, data, max_len or rm.config.max_position_embeddings)
    pad_id = tokenizer.pad_token_id
    if isinstance(data[0], PreferencePair):
        scores = score_ids(rm, [r for pair in rows for r in pair], pad_id=pad_id, batch_size=batch_size,
                           precision=precision)
        chosen, rejected = scores[0::2], scores[1::2]
        return {
            "accuracy": preference_accuracy(chosen, rejected),
            "loss": bradley_terry_loss(chosen, rejected).item(),
            "margin": (chosen - rejected).mean().item(),
            "pairs": len(rows),
        }
    scores = score_ids(rm, rows, pad_id=pad_id, batch_size=batch_size, precision=precision)
    labels = torch.tensor(extras)
    corr = torch.corrcoef(torch.stack([scores, labels]))[0, 1].item() if len(rows) > 1 else math.nan
    return {"mse": scalar_loss(scores, labels).item(), "correlation": corr, "examples": len(rows)}


# ---------------------------------------------------------------------------------------------
# Reward functions


def _prompt_of(sample: Mapping[str, Any]) -> str:
    prompt = sample.get("prompt", sample.get("question"))
    if not isinstance(prompt, str):
        raise ValueError(f'a model reward needs the sample\'s "prompt" (or "question") string, got {sample!r:.200}')
    return prompt


class ModelReward:
    """A reward model as a reward function of (prompt, completion) text.

        score(prompts, completions) -> list[float]      the batched form; one forward per batch
        score_batch(completions, samples) -> list[float]  the same, prompts from sample["prompt"]
        __call__(completion, sample) -> float           the uniform per-sample reward signature

    GRPO scores a whole batch of rollouts at once, so call score_batch there: __call__ runs one
    forward pass per completion.

    normalize (applied to every score returned):
        "none"      raw scores
        "fixed"     (s - mean) / std with the given mean and std, e.g. measured on reference
                    completions with `calibrate`
        "running"   (s - m) / sd with m, sd the mean and standard deviation (n - 1) of every score
                    this object has produced so far, this batch included (sd = 1 until two
                    scores are seen). Save `state_dict()` with the run to resume it.
    A reward model's scale and offset are arbitrary (Bradley-Terry sees only differences), so
    normalise before mixing it with other rewards or other reward models.
    """

    def __init__(
        self,
        rm: RewardModel,
        tokenizer: Tokenizer,
        *,
        batch_size: int = 32,
        max_len: int | None = None,
        normalize: str = "none",
        mean: float = 0.0,
        std: float = 1.0,
        precision: str = "auto",
    ):
        if normalize not in ("none", "fixed", "running"):
            raise ValueError(f'normalize must be "none", "fixed" or "running", got {normalize!r}')
        if std <= 0:
            raise ValueError(f"std must be > 0, got {std}")
        self.rm, self.tokenizer = rm, tokenizer
        self.batch_size, self.precision = batch_size, precision
        self.max_len = max_len if max_len is not None else rm.config.max_position_embeddings
        self.normalize, self.mean, self.std = normalize, mean, std
        self._n, self._mean, self._m2 = 0, 0.0, 0.0  # running statistics (Welford)

    def raw_scores(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        """Unnormalised scores, one per (prompt, completion)."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
        rows = [encode_conversation(self.tokenizer, p, c, self.max_len) for p, c in zip(prompts, completions)]
        if not rows:
            return []
        return score_ids(self.rm, rows, pad_id=self.tokenizer.pad_token_id, batch_size=self.batch_size,
                         precision=self.precision).tolist()

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> list[float]:
        raw = self.raw_scores(prompts, completions)
        if self.normalize == "none":
            return raw
        if self.normalize == "running":
            for s in raw:
                self._n += 1
                delta = s - self._mean
                self._mean += delta / self._n
                self._m2 += delta * (s - self._mean)
            mean, std = self._mean, math.sqrt(self._m2 / (self._n - 1)) if self._n > 1 else 1.0
        else:
            mean, std = self.mean, self.std
        return [(s - mean) / max(std, 1e-6) for s in raw]

    def score_batch(self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]) -> list[float]:
        return self.score([_prompt_of(s) for s in samples], completions)

    def __call__(self, completion: str, sample: Mapping[str, Any]) -> float:
        return self.score_batch([completion], [sample])[0]

    def calibrate(self, prompts: Sequence[str], completions: Sequence[str]) -> tuple[float, float]:
        """Set normalize="fixed" with the mean and std (n - 1) of these completions' raw scores."""
        raw = torch.tensor(self.raw_scores(prompts, completions), dtype=torch.float64)
        if len(raw) < 2:
            raise ValueError("calibrate needs at least two completions")
        self.normalize, self.mean, self.std = "fixed", raw.mean().item(), max(raw.std().item(), 1e-6)
        return self.mean, self.std

    def state_dict(self) -> dict[str, float]:
        return {"n": self._n, "mean": self._mean, "m2": self._m2, "fixed_mean": self.mean, "fixed_std": self.std}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        self._n, self._mean, self._m2 = int(state["n"]), float(state["mean"]), float(state["m2"])
        self.mean, self.std = float(state["fixed_mean"]), float(state["fixed_std"])


ENSEMBLE_MODES = ("mean", "min", "mean_minus_std")
ENSEMBLE_NORMALIZE = ("group", "none")


def combine_scores(per_member: Mapping[str, Sequence[float]], mode: str = "mean", lam: float = 1.0) -> list[float]:
    """Per-completion combination of member scores ({name: [N scores]} -> [N]).

    "mean"            the members' mean
    "min"             the worst member (worst-case optimisation: the policy gains only what
                      every member agrees on)
    "mean_minus_std"  mean - lam * std, std the population standard deviation (divide by the
                      number of members K, not K - 1: the members are the whole ensemble, not a
                      sample of it). Disagreement is read as uncertainty and paid for. With two
                      members and lam = 1 this equals "min".
    """
    if mode not in ENSEMBLE_MODES:
        raise ValueError(f"mode must be one of {', '.join(ENSEMBLE_MODES)}, got {mode!r}")
    if not per_member:
        raise ValueError("combine_scores: no members")
    lengths = {name: len(v) for name, v in per_member.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"combine_scores: members scored different numbers of completions: {lengths}")
    s = torch.tensor([list(v) for v in per_member.values()], dtype=torch.float64)  # [K, N]
    if mode == "mean":
        out = s.mean(0)
    elif mode == "min":
        out = s.min(0).values
    else:
        out = s.mean(0) - lam * s.std(0, correction=0)
    return out.tolist()


def standardize_by_prompt(scores: Sequence[float], prompts: Sequence[str], eps: float = 1e-6) -> list[float]:
    """(s - mean) / (std + eps) over the scores of each prompt's completions, std unbiased (n - 1).

    A prompt with a single completion, or whose scores all agree, gets 0: no signal within it.
    """
    if len(scores) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts for {len(scores)} scores")
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    out = [0.0] * len(scores)
    for idx in groups.values():
        if len(idx) < 2:
            continue
        values = torch.tensor([float(scores[i]) for i in idx], dtype=torch.float64)
        std = values.std().item()
        if std == 0.0:
            continue
        for i, v in zip(idx, ((values - values.mean()) / (std + eps)).tolist()):
            out[i] = v
    return out


class RewardEnsemble:
    """Several reward models scoring the same completions, combined by `combine_scores`.

    A reward model's scale and offset are arbitrary, and a mean or a min over members on different
    scales is dominated by the widest one. So by default (normalize="group") each member's scores
    are standardised before they are combined, over the completions of the same prompt in the
    call (a GRPO group): (s - group mean) / (group std + 1e-6), std unbiased (n - 1); a prompt
    with one completion, or whose completions a member scores alike, gets 0 from that member.
    Groups never straddle processes, so the result does not depend on how a batch is split, and
    only differences within a group reach GRPO's advantages anyway. normalize="none" combines the
    members' scores as they come (each may still normalise itself, see ModelReward).

    The raw per-member scores are returned with the combination so that each can be logged: a
    member that the policy has learnt to exploit shows up as one curve rising away from the others.
    """

    def __init__(self, members: Mapping[str, ModelReward], mode: str = "mean", lam: float = 1.0,
                 normalize: str = "group"):
        if not members:
            raise ValueError("RewardEnsemble needs at least one member")
        if mode not in ENSEMBLE_MODES:
            raise ValueError(f"mode must be one of {', '.join(ENSEMBLE_MODES)}, got {mode!r}")
        if normalize not in ENSEMBLE_NORMALIZE:
            raise ValueError(f"normalize must be one of {', '.join(ENSEMBLE_NORMALIZE)}, got {normalize!r}")
        self.members, self.mode, self.lam, self.normalize = dict(members), mode, lam, normalize

    def score(self, prompts: Sequence[str], completions: Sequence[str]) -> tuple[list[float], dict[str, list[float]]]:
        per_member = {name: m.score(prompts, completions) for name, m in self.members.items()}
        if not completions:
            return [], per_member
        combined = per_member
        if self.normalize == "group":
            combined = {name: standardize_by_prompt(v, prompts) for name, v in per_member.items()}
        return combine_scores(combined, self.mode, self.lam), per_member

    def score_batch(
        self, completions: Sequence[str], samples: Sequence[Mapping[str, Any]]
    ) -> tuple[list[float], dict[str, list[float]]]:
        return self.score([_prompt_of(s) for s in samples], completions)

    def __call__(self, completion: str, sample: Mapping[str, Any]) -> float:
        return self.score_batch([completion], [sample])[0][0]

    def state_dict(self) -> dict[str, Any]:
        """The members' own state (running statistics), for a training checkpoint."""
        return {name: m.state_dict() for name, m in self.members.items() if hasattr(m, "state_dict")}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for name, member_state in state.items():
            if name in self.members:  # a member dropped since the save has nothing to restore
                self.members[name].load_state_dict(member_state)
