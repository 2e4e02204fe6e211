"""The two training loops read as the algorithm: each fits on a screen and calls named steps."""

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "nanopost"
SCREEN = 50  # lines, the signature and docstring included
LOOPS = {"grpo_loop.py": "train_grpo", "sft_loop.py": "train_sft"}


def loop_of(module: str) -> ast.FunctionDef:
    tree = ast.parse((CORE / module).read_text())
    return next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == LOOPS[module])


@pytest.mark.parametrize("module", LOOPS)
def test_each_training_loop_fits_on_a_screen(module):
    loop = loop_of(module)
    n = loop.end_lineno - min([loop.lineno] + [d.lineno for d in loop.decorator_list]) + 1
    assert n <= SCREEN, f"{module}: {loop.name} is {n} lines; give its parts names of their own"


@pytest.mark.parametrize("module, steps", [
    ("grpo_loop.py", {"start", "step_settings", "sample_rollouts", "group_advantages", "update_policy",
                      "record_step", "held_out_eval", "save"}),
    ("sft_loop.py", {"start", "accumulate_gradients", "held_out_eval", "save"}),
])
def test_each_loop_calls_its_named_steps(module, steps):
    loop = loop_of(module)
    called = {n.func.id for n in ast.walk(loop) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert steps <= called, f"{loop.name} no longer calls {sorted(steps - called)}"
    nested = [n.name for n in ast.walk(loop) if isinstance(n, ast.FunctionDef) and n is not loop]
    assert not nested, f"{loop.name} defines closures {nested}: make them named steps of the module"
