"""Safe arithmetic on model-written text.

Model output is never passed to `eval`. An expression is parsed with `ast` (mode="eval") and walked
by a small interpreter that knows only:

    numeric literals (integers, decimals)   + - * /   unary minus   parentheses

Unicode and LaTeX operators are normalised first: × · \\times \\cdot become *, ÷ \\div become /,
− (U+2212) becomes -. Powers (`**`), floor division, names, calls, exponents (`1e9`) and anything
else give None. Inputs are bounded before parsing (length, literal size, nesting depth), so no
expression can hang or exhaust memory: without powers the value of a 256-character expression has at
most a few hundred digits. Arithmetic is exact (`fractions.Fraction`): 1/3 * 3 == 1, and 0.1 + 0.2 ==
0.3 because decimal literals are read as exact decimals, not floats. Division by zero gives None.
It imports nothing from the package: the core's rewards and the Countdown task's check build on it.
"""

from __future__ import annotations

import ast
import re
from fractions import Fraction
from typing import Iterable

MAX_CHARS = 256     # an expression longer than this is not a Countdown answer or an arithmetic step
MAX_DEPTH = 32      # depth of the expression tree (redundant parentheses add none)
MAX_DIGITS = 32     # characters in one literal

_OPERATORS = (("\\times", "*"), ("\\cdot", "*"), ("\\div", "/"),
              ("×", "*"), ("·", "*"), ("∗", "*"), ("÷", "/"), ("−", "-"))
_ALLOWED_CHARS = re.compile(r"[0-9.+\-*/() \t]*")
_BINARY = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


def normalize_operators(text: str) -> str:
    """Replace unicode / LaTeX multiplication, division and minus signs with * / -."""
    for old, new in _OPERATORS:
        text = text.replace(old, new)
    return text


def evaluate(expr: str, *, max_chars: int = MAX_CHARS, max_depth: int = MAX_DEPTH,
             max_digits: int = MAX_DIGITS) -> tuple[Fraction, list[Fraction]] | None:
    """(value, literals in order of appearance) of an arithmetic expression, or None if it is not one.

    None for: anything outside the grammar in the module docstring, an expression longer than
    `max_chars` (after normalisation and stripping), deeper than `max_depth`, a literal longer than
    `max_digits` characters, or a division by zero.
    """
    if not isinstance(expr, str) or len(expr) > 4 * max_chars:   # cheap cut before any copying
        return None
    expr = normalize_operators(expr).strip()
    if not expr or len(expr) > max_chars or _ALLOWED_CHARS.fullmatch(expr) is None:
        return None
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None
    literals: list[Fraction] = []

    def walk(node: ast.AST, depth: int) -> Fraction:
        if depth > max_depth:
            raise _Reject
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            left, right = walk(node.left, depth + 1), walk(node.right, depth + 1)
            if isinstance(node.op, ast.Div) and right == 0:
                raise _Reject
            return _BINARY[type(node.op)](left, right)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand, depth + 1)
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            # Read the literal's own text: Fraction("0.1") is exactly 1/10, the float 0.1 is not.
            source = expr[node.col_offset:node.end_col_offset]
            if len(source) > max_digits:
                raise _Reject
            literals.append(Fraction(source))
            return literals[-1]
        raise _Reject

    try:
        return walk(tree.body, 0), literals
    except (_Reject, ValueError, ZeroDivisionError, RecursionError):
        return None


def applies_identity(expr: str, given: Iterable[Fraction] = ()) -> bool:
    """True if a valid expression contains a step that changes nothing: x + 0, 0 + x, x - 0, x * 1,
    1 * x, x / 1 or -(-x). Such a step is not work (a reward must not pay for writing one), unless
    the 0 or 1 is one of the `given` numbers, which a problem may ask to use ("Compute 4 - 0 + 7")."""
    given = set(given)
    if evaluate(expr) is None:   # bounds and grammar first; parsing below is then cheap and safe
        return False
    expr = normalize_operators(expr).strip()
    tree = ast.parse(expr, mode="eval")

    def literal(node: ast.AST) -> Fraction | None:
        if isinstance(node, ast.Constant):
            value = Fraction(expr[node.col_offset:node.end_col_offset])
            return None if value in given else value
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp):
            left, right = literal(node.left), literal(node.right)
            if isinstance(node.op, (ast.Add, ast.Sub)) and right == 0 or isinstance(node.op, ast.Add) and left == 0:
                return True
            if isinstance(node.op, (ast.Mult, ast.Div)) and right == 1 or isinstance(node.op, ast.Mult) and left == 1:
                return True
        if isinstance(node, ast.UnaryOp) and isinstance(node.operand, ast.UnaryOp):
            return True
    return False


def safe_eval(expr: str) -> Fraction | None:
    """Exact value of an arithmetic expression (grammar in the module docstring), or None."""
    result = evaluate(expr)
    return None if result is None else result[0]


class _Reject(Exception):
    """Raised inside the evaluator for anything outside the grammar or its bounds."""
