"""How n-shot exemplars bias a classifier, and contextual calibration ("Calibrate Before Use",
Zhao et al. 2021).

On a labelled task (records {"question", "answer", "label"}), every test question is asked with
0, 1, 2, ... exemplars shown as earlier chat turns, for every combination of exemplar labels
and every order of the chosen exemplars. For each such prompt:

    accuracy     share of test questions answered with their label
    copy rate    share of answers equal to the LAST exemplar's label (for 1 shot, the exemplar's):
                 compare with `gold_is_last`, the share a perfect classifier would show; the excess
                 is the majority-label / recency bias
    order std    for one set of exemplars, the std of accuracy over all its orders (population std:
                 every order is enumerated)

Answers are not generated: each label is scored as the answer "<answer>label</answer>" after the
prompt, by the sum of its tokens' log-probabilities in one forward pass, and the label
probabilities are those scores soft-maxed over the labels. Greedy decoding would pick the same
label as long as the model answers in the format; scoring also sees how sure it was.

Contextual calibration: the same prompt with a content-free question ("N/A") gives the model's
prior over labels, p_cf (averaged over the content-free strings). Each answer's probabilities
are divided by p_cf and renormalised, which has the same argmax as the paper's
softmax(diag(p_cf)^-1 p) and removes the prior the exemplars put in.

`select_exemplars` picks the exemplars of one few-shot prompt with the two usual remedies for
these biases: equal counts per label, interleaved, and a shuffled order.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from ..data import tokenize_prompt
from ..model import Logprobs
from ..plumbing.chat_template import CHAT_FORMAT_HELP, ChatFormatName
from ..plumbing.data_files import read_jsonl
from ..plumbing.hf_io import load_model, load_tokenizer
from ..plumbing.runtime import pick_device
from ..plumbing.tokenizer import Tokenizer
from ..prompts import PromptTemplate

INSTRUCTION = "Is the sentiment of this review positive or negative?"

# messages of each prompt, the labels -> probabilities [prompts, labels], rows summing to 1
Scorer = Callable[[list[list[dict]], Sequence[str]], np.ndarray]


@dataclass
class ShotsConfig:
    model: str = field(default="", metadata={"help": "HF checkpoint directory"})
    chat_format: ChatFormatName | None = field(default=None, metadata={"help": CHAT_FORMAT_HELP})
    data: str = field(default="data/shots/test.jsonl", metadata={"help": "test JSONL {question, answer, label}"})
    exemplars: str = field(default="data/shots/exemplars.jsonl", metadata={"help": "exemplar pool JSONL"})
    instruction: str = INSTRUCTION
    system: str | None = None
    shots: list[int] = field(default_factory=lambda: [0, 1, 2])
    draws: int = field(default=2, metadata={"help": "exemplar sets drawn per label combination"})
    calibrate: bool = field(default=False, metadata={"help": "also report contextual calibration"})
    content_free: list[str] = field(default_factory=lambda: ["N/A"])
    limit: int = field(default=0, metadata={"help": "test questions to use (0: all)"})
    batch_size: int = 16
    seed: int = 0
    device: str = "auto"
    out: str | None = field(default=None, metadata={"help": "write the full results as JSON here"})

    def validate(self) -> None:
        if not self.model:
            raise ValueError("--model is required")
        if any(k < 0 for k in self.shots) or self.draws < 1:
            raise ValueError("shots must be >= 0 and draws >= 1")


def load_labelled(path: str | Path) -> list[dict]:
    """Records with a question and a label (the answer defaults to the label)."""
    out = []
    for line, r in read_jsonl(path):
        if not isinstance(r.get("question"), str) or "label" not in r:
            raise ValueError(f"{path}:{line}: needs a string \"question\" and a \"label\"")
        out.append({"question": r["question"], "answer": str(r.get("answer", r["label"])), "label": str(r["label"])})
    return out


# -- which prompts -----------------------------------------------------------------------------------


@dataclass
class ShotPrompt:
    exemplars: tuple[dict, ...]  # in the order shown
    set_id: int  # prompts with the same set_id show the same exemplars in different orders

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(e["label"] for e in self.exemplars)


def shot_prompts(pool: Sequence[dict], shots: Sequence[int], draws: int = 1, seed: int = 0) -> list[ShotPrompt]:
    """Every label combination (with repeats) of each shot count, `draws` exemplar sets each, every
    distinct order of each set."""
    rng = random.Random(seed)
    by_label: dict[str, list[dict]] = defaultdict(list)
    for e in pool:
        by_label[e["label"]].append(e)
    labels = sorted(by_label)
    out: list[ShotPrompt] = []
    set_id = 0
    for k in shots:
        if k == 0:
            out.append(ShotPrompt((), set_id))
            set_id += 1
            continue
        for combo in itertools.combinations_with_replacement(labels, k):
            need = {label: combo.count(label) for label in set(combo)}
            short = {label: len(by_label[label]) for label, n in need.items() if len(by_label[label]) < n}
            if short:
                raise ValueError(f"{k}-shot with labels {combo} needs more exemplars than the pool has: {short}")
            for _ in range(draws):
                chosen = [e for label, n in sorted(need.items()) for e in rng.sample(by_label[label], n)]
                orders = dict.fromkeys(tuple(id(e) for e in p) for p in itertools.permutations(chosen))
                index = {id(e): e for e in chosen}
                out += [ShotPrompt(tuple(index[i] for i in order), set_id) for order in orders]
                set_id += 1
    return out


def select_exemplars(exemplars: Sequence[dict], n_shot: int, *, balance_labels: bool = False, shuffle: bool = False,
                     rng: random.Random) -> list[dict]:
    """The n_shot exemplars for one prompt, in the order shown, with the two remedies for n-shot bias.

    Plain: a sample kept in pool order, the draw `PromptTemplate.select_exemplars` makes with the same
    rng. balance_labels: n_shot / (number of labels) per label, interleaved label by label (labels in
    order of first appearance in the pool), so neither a majority nor the last position favours a
    label. shuffle: the chosen ones in random order.
    """
    if balance_labels:
        unlabelled = [i for i, e in enumerate(exemplars) if "label" not in e]
        if unlabelled:
            raise ValueError(f"exemplars[{unlabelled[0]}] has no 'label', which balance_labels=True needs")
    if n_shot > len(exemplars):
        raise ValueError(f"n_shot={n_shot} but the exemplar pool has only {len(exemplars)}")
    if n_shot == 0:
        return []
    chosen = _balanced(exemplars, n_shot, rng) if balance_labels else sorted(rng.sample(range(len(exemplars)), n_shot))
    if shuffle:
        rng.shuffle(chosen)
    return [exemplars[i] for i in chosen]


def _balanced(exemplars: Sequence[dict], n_shot: int, rng: random.Random) -> list[int]:
    """Pool indices, n_shot / (number of labels) per label, interleaved; ValueError when the pool cannot give that."""
    per_label: dict[object, list[int]] = {}
    for i, e in enumerate(exemplars):
        per_label.setdefault(e["label"], []).append(i)
    if n_shot % len(per_label):
        raise ValueError(f"balance_labels needs n_shot divisible by the number of labels; "
                         f"n_shot={n_shot}, labels {list(per_label)}")
    k = n_shot // len(per_label)
    short = {label: len(idx) for label, idx in per_label.items() if len(idx) < k}
    if short:
        raise ValueError(f"balance_labels with n_shot={n_shot} needs {k} exemplars per label; "
                         f"the pool has only {short}")
    drawn = [sorted(rng.sample(idx, k)) for idx in per_label.values()]
    return [drawn[j][i] for i in range(k) for j in range(len(drawn))]


def messages_for(template: PromptTemplate, exemplars: Sequence[dict], question: str) -> list[dict]:
    """Chat messages showing exactly these exemplars, in this order, then the question."""
    shown = PromptTemplate(instruction=template.instruction, system=template.system, reasoning=False,
                           answer_tags=template.answer_tags, exemplars=list(exemplars), n_shot=len(exemplars))
    return shown.messages(question)


# -- scoring labels with a model ---------------------------------------------------------------------


class ModelScorer:
    """Label probabilities from a model: log p("<answer>label</answer>" | prompt), soft-maxed over labels."""

    def __init__(self, model, tokenizer: Tokenizer, template: PromptTemplate, batch_size: int = 16):
        self.model, self.tokenizer, self.template, self.batch_size = model, tokenizer, template, batch_size

    @torch.no_grad()
    def __call__(self, messages: list[list[dict]], labels: Sequence[str]) -> np.ndarray:
        answers = [self.tokenizer.encode(self.template.target("", label)) for label in labels]
        prompts = [tokenize_prompt(self.tokenizer, m) for m in messages]
        pairs = [(p, a) for p in prompts for a in answers]
        scores = []
        for start in range(0, len(pairs), self.batch_size):
            scores += self._logprobs(pairs[start : start + self.batch_size])
        logp = torch.tensor(scores, dtype=torch.float64).view(len(prompts), len(labels))
        return torch.softmax(logp, dim=1).numpy()

    def _logprobs(self, pairs: list[tuple[list[int], list[int]]]) -> list[float]:
        """Sum of the answer tokens' log-probabilities for each (prompt, answer), right-padded batch."""
        device = self.model.device
        T = max(len(p) + len(a) for p, a in pairs)
        ids = torch.zeros(len(pairs), T, dtype=torch.long)
        mask = torch.zeros(len(pairs), T, dtype=torch.long)
        for i, (p, a) in enumerate(pairs):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            mask[i, : len(p) + len(a)] = 1
        was_training = self.model.training
        self.model.eval()
        ids, mask = ids.to(device), mask.to(device)
        logp = self.model(Logprobs(ids[:, :-1], ids[:, 1:], attention_mask=mask[:, :-1]))  # [B, T-1]
        self.model.train(was_training)
        out = []
        for i, (p, a) in enumerate(pairs):
            out.append(logp[i, len(p) - 1 : len(p) + len(a) - 1].sum().item())  # position t predicts token t+1
        return out


# -- the evaluation ----------------------------------------------------------------------------------


def calibrate(probs: np.ndarray, content_free: np.ndarray) -> np.ndarray:
    """Contextual calibration: probs [N, L] divided by the content-free prior [L], renormalised."""
    q = np.asarray(probs, dtype=float) / np.asarray(content_free, dtype=float)
    return q / q.sum(axis=-1, keepdims=True)


def prompt_scores(preds: np.ndarray, gold: np.ndarray, last: int | None) -> dict:
    """Accuracy and copy rate of one prompt's predictions (label indices)."""
    out = {"accuracy": float((preds == gold).mean())}
    if last is not None:
        out["copy_rate"] = float((preds == last).mean())
        out["gold_is_last"] = float((gold == last).mean())
    return out


def evaluate_shots(items: Sequence[dict], pool: Sequence[dict], scorer: Scorer, template: PromptTemplate, *,
                   shots: Sequence[int] = (0, 1, 2), draws: int = 1, seed: int = 0, calibrated: bool = False,
                   content_free: Sequence[str] = ("N/A",), log: Callable[[str], object] | None = None) -> dict:
    """Score every test item under every n-shot prompt; returns per-prompt rows and per-shot summaries."""
    labels = sorted({r["label"] for r in [*items, *pool]})
    if len(labels) < 2:
        raise ValueError(f"a classification task needs two labels or more, got {labels}")
    gold = np.array([labels.index(r["label"]) for r in items])
    rows = []
    prompts = shot_prompts(pool, shots, draws, seed)
    for n, sp in enumerate(prompts, start=1):
        probs = scorer([messages_for(template, sp.exemplars, r["question"]) for r in items], labels)
        last = labels.index(sp.labels[-1]) if sp.exemplars else None
        row = {"shots": len(sp.exemplars), "set": sp.set_id, "labels": list(sp.labels),
               **prompt_scores(probs.argmax(axis=1), gold, last)}
        if calibrated:
            prior = scorer([messages_for(template, sp.exemplars, q) for q in content_free], labels).mean(axis=0)
            row["content_free"] = prior.tolist()
            row["calibrated"] = prompt_scores(calibrate(probs, prior).argmax(axis=1), gold, last)
        rows.append(row)
        if log is not None:
            log(f"prompt {n}/{len(prompts)}: {len(sp.exemplars)}-shot {list(sp.labels)} accuracy {row['accuracy']:.3f}")
    return {"labels": labels, "n_items": len(items), "prompts": rows,
            "by_shots": {k: summarize_shots([r for r in rows if r["shots"] == k]) for k in sorted(set(shots))}}


def summarize_shots(rows: Sequence[dict]) -> dict:
    """Mean, spread and bias over the prompts of one shot count (and the same for calibrated scores)."""
    out = _summary(rows)
    if rows and "calibrated" in rows[0]:
        out["calibrated"] = _summary([{**r["calibrated"], "set": r["set"]} for r in rows])
    return out


def _summary(rows: Sequence[dict]) -> dict:
    acc = np.array([r["accuracy"] for r in rows])
    out = {"prompts": len(rows), "accuracy": float(acc.mean()), "accuracy_std": float(acc.std()),
           "accuracy_min": float(acc.min()), "accuracy_max": float(acc.max())}
    if "copy_rate" in rows[0]:
        out["copy_rate"] = float(np.mean([r["copy_rate"] for r in rows]))
        out["gold_is_last"] = float(np.mean([r["gold_is_last"] for r in rows]))
    by_set: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        by_set[r["set"]].append(r["accuracy"])
    order_std = [float(np.std(v)) for v in by_set.values() if len(v) > 1]
    if order_std:
        out["order_std_mean"] = float(np.mean(order_std))
        out["order_std_max"] = float(np.max(order_std))
    return out


def format_shots_report(result: dict) -> str:
    """One line per shot count: accuracy (mean, std, range), copy rate vs the unbiased rate, order std."""
    lines = [f"{result['n_items']} questions, labels {', '.join(result['labels'])}", ""]
    lines.append(f"{'shots':>5} {'prompts':>7} {'accuracy':>9} {'std':>6} {'min-max':>11} {'copy':>6} "
                 f"{'if unbiased':>11} {'order std':>9}")

    def line(k, s, tag=""):
        copy = f"{s['copy_rate']:.3f}" if "copy_rate" in s else "-"
        unbiased = f"{s['gold_is_last']:.3f}" if "gold_is_last" in s else "-"
        order = f"{s['order_std_mean']:.3f}" if "order_std_mean" in s else "-"
        return (f"{str(k) + tag:>5} {s['prompts']:>7} {s['accuracy']:>9.3f} {s['accuracy_std']:>6.3f} "
                f"{s['accuracy_min']:>5.2f}-{s['accuracy_max']:<5.2f} {copy:>6} {unbiased:>11} {order:>9}")

    for k, s in result["by_shots"].items():
        lines.append(line(k, s))
        if "calibrated" in s:
            lines.append(line(k, s["calibrated"], "c"))
    if any("calibrated" in s for s in result["by_shots"].values()):
        lines.append("\n(Nc: the same prompts with contextual calibration)")
    lines.append("copy: answers equal to the last exemplar's label; if unbiased: the share a perfect classifier\n"
                 "would show. order std: accuracy std over the orders of one exemplar set, averaged over sets.")
    return "\n".join(lines) + "\n"


def run_shots(cfg: ShotsConfig, log: Callable[[str], object] = print) -> dict:
    """Load the model and data as configured, evaluate, print the report, write JSON if asked."""
    items = load_labelled(cfg.data)
    if cfg.limit:
        items = items[: cfg.limit]
    pool = load_labelled(cfg.exemplars)
    device = pick_device(cfg.device)
    tokenizer = load_tokenizer(cfg.model, chat_format=cfg.chat_format)
    model = load_model(cfg.model, device=device)
    template = PromptTemplate(instruction=cfg.instruction, system=cfg.system, reasoning=False)
    scorer = ModelScorer(model, tokenizer, template, cfg.batch_size)
    result = evaluate_shots(items, pool, scorer, template, shots=cfg.shots, draws=cfg.draws, seed=cfg.seed,
                            calibrated=cfg.calibrate, content_free=cfg.content_free, log=log)
    log(format_shots_report(result))
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {cfg.out}")
    return result


# -- the task shipped in data/shots ------------------------------------------------------------------

_SUBJECTS = ["The movie", "The food", "The service", "This book", "The hotel room", "The concert", "The new phone",
             "The game", "The coffee", "The staff", "The plot", "The camera", "The trip", "The show", "The app",
             "The museum", "The pizza", "The lecture", "The album", "The bike"]
_PREDICATES = {
    "positive": ["was wonderful", "was a delight", "exceeded my expectations", "made my day",
                 "was absolutely brilliant", "felt warm and welcoming", "worked perfectly",
                 "was worth every penny", "left me smiling", "was great fun"],
    "negative": ["was terrible", "was a letdown", "fell far short of my expectations", "ruined my day",
                 "was painfully dull", "felt cold and unwelcoming", "broke within a day",
                 "was a waste of money", "left me annoyed", "was no fun at all"],
}
_TAILS = ["", " last week", " on Friday", " overall", " this time"]


def sentiment_task(n_test: int = 200, n_exemplars: int = 20, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(test, exemplars): short synthetic reviews, half positive and half negative, no sentence in both."""
    rng = random.Random(seed)
    per_label = {}
    for label, predicates in _PREDICATES.items():
        sentences = [f"{s} {p}{t}." for s in _SUBJECTS for p in predicates for t in _TAILS]
        per_label[label] = rng.sample(sentences, (n_test + n_exemplars) // 2)
    split = n_exemplars // 2

    def records(label_slices):
        out = [{"question": q, "answer": label, "label": label} for label, qs in label_slices for q in qs]
        rng.shuffle(out)
        return out

    exemplars = records([(label, qs[:split]) for label, qs in per_label.items()])
    test = records([(label, qs[split:]) for label, qs in per_label.items()])
    return test, exemplars
