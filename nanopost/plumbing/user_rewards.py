"""Reward functions of your own, named on the command line: `--reward-fn SPEC`; and the reward
models of `--reward-models`.

    --reward-fn mypkg.rewards:brevity          a function in an importable module
    --reward-fn path/to/my_rewards.py:brevity  a function in a file (imported as a module, never eval'd)
    --reward-fn my_rewards.py:brevity=0.5      with its weight (default: the weight --rewards gives that
                                               name, else 1.0)

The function takes (completion, record) and returns a float, or None for "does not apply" (counted
as 0), like the built-in rewards: `record` is the training record ("prompt", "answer", "difficulty",
"id" and any other fields) plus "question". It is logged under its own name (reward_<name>_mean).
A function named like a reward of --rewards (e.g. `accuracy`) takes that reward's place.

Before step 1 each function is called on a few training records with an empty completion and a
short made-up one: a function that raises there, or returns something other than a finite number
or None, is refused then, naming the option and the function, rather than hours into the run.

`model_rewards` loads the reward models (nanopost/tools/reward_model.py) before step 1 too, so
the GRPO loop receives every reward ready to call.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

OPTION = "--reward-fn"
# What the start-of-run check feeds each function: nothing at all, and a plausible short answer.
PROBES = ("", "<think>1 + 1 = 2</think> <answer>2</answer>")
PROBE_RECORDS = 3


def parse_spec(spec: str) -> tuple[str, str, float | None]:
    """(module or file, function name, weight or None) of `where:function[=weight]`."""
    target, eq, weight_text = spec.rpartition("=")
    if not eq:
        target, weight_text = spec, ""
    where, colon, name = target.rpartition(":")
    if not colon or not where or not name.isidentifier():
        raise ValueError(f"{OPTION} {spec}: expected module:function or path/to/file.py:function, "
                         "optionally =weight (e.g. mypkg.rewards:brevity=0.5)")
    weight = None
    if eq:
        try:
            weight = float(weight_text)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise ValueError(f"{OPTION} {spec}: the weight after '=' must be a finite number, got {weight_text!r}")
    return where, name, weight


def load_reward_fn(spec: str) -> tuple[str, Callable]:
    """(name, function) named by `spec`; ValueError naming the option when it cannot be had."""
    where, name, _ = parse_spec(spec)
    try:
        module = _import(where)
    except FileNotFoundError:
        raise ValueError(f"{OPTION} {spec}: no file {where}") from None
    except ModuleNotFoundError as e:
        raise ValueError(f"{OPTION} {spec}: cannot import module {where!r} ({e})") from None
    except Exception as e:  # the user's module failed while importing: say so without a traceback
        raise ValueError(f"{OPTION} {spec}: importing {where} raised {type(e).__name__}: {e}") from None
    fn = getattr(module, name, None)
    if fn is None:
        raise ValueError(f"{OPTION} {spec}: {where} has no function {name!r}")
    if not callable(fn):
        raise ValueError(f"{OPTION} {spec}: {where}:{name} is a {type(fn).__name__}, not a function")
    return name, fn


def _import(where: str):
    if not (where.endswith(".py") or "/" in where or "\\" in where):
        return importlib.import_module(where)
    path = Path(where).resolve()
    if not path.is_file():
        raise FileNotFoundError(where)
    module_name = f"nanopost_user_rewards_{abs(hash(str(path)))}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module  # so dataclasses and pickling inside the file resolve the module
    try:
        loader_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def check_total(spec: str, name: str, fn: Callable, records: Sequence[dict]) -> None:
    """Call `fn` on the first records with each probe completion; ValueError on a raise or a bad value."""
    for index, record in enumerate(records[:PROBE_RECORDS]):
        sample = {**record, "question": record.get("prompt")}  # what the GRPO loop passes
        for completion in PROBES:
            where = f"on record {record.get('id', index)!r} with completion {completion!r}"
            try:
                value = fn(completion, sample)
            except Exception as e:
                raise ValueError(f"{OPTION} {spec}: {name}(completion, record) raised "
                                 f"{type(e).__name__}: {e} {where}") from None
            if not _finite_or_none(value):
                raise ValueError(f"{OPTION} {spec}: {name}(completion, record) returned {value!r} {where}; "
                                 "a reward must be a finite number (or None: does not apply)")


def _finite_or_none(value: Any) -> bool:
    if value is None:
        return True
    # numbers.Real: Python and NumPy numbers alike (and bools, 1.0 / 0.0, as combine_rewards reads them)
    return isinstance(value, numbers.Real) and math.isfinite(value)


def load_reward_fns(specs: Sequence[str], records: Sequence[dict]) -> dict[str, Callable]:
    """{name: function} for every spec, each imported and checked on `records` (see the docstring)."""
    funcs: dict[str, Callable] = {}
    for spec in specs:
        name, fn = load_reward_fn(spec)
        check_total(spec, name, fn, records)
        funcs[name] = fn
    return funcs


def model_rewards(cfg, device) -> dict[str, Callable]:
    """The reward models a GRPOConfig names in --reward-models, each a batched reward function
    under its name there (or, with --rm-ensemble, one ensemble named 'rm').

    An ensemble standardises each member within each prompt's completions before combining them
    (--rm-ensemble-normalize group, the default): a reward model's scale is arbitrary, and the
    widest-scaled member would otherwise decide the mean or the min alone.
    """
    if not cfg.reward_models:
        return {}
    # Reward models are a tool (nanopost/tools/reward_model.py): loaded only when a run names one.
    from ..tools.reward_model import ModelReward, RewardEnsemble, load_reward_model
    from .hf_io import load_tokenizer

    members = {name: ModelReward(load_reward_model(path, device=device), load_tokenizer(path))
               for name, path in cfg.reward_models.items()}
    if cfg.rm_ensemble == "none":
        return members
    return {"rm": RewardEnsemble(members, mode=cfg.rm_ensemble, lam=cfg.rm_ensemble_lambda,
                                 normalize=cfg.rm_ensemble_normalize)}
