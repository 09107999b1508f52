"""`calculate_output` of a multi grader: a small arithmetic language evaluated by walking Python's `ast`.

Allowed: numbers, the sub-graders' names, `+ - * /`, unary minus and plus, parentheses, and calls of `min`, `max`
and `abs`. Everything else (attributes, subscripts, other calls, comparisons, `**`, strings...) is refused when
the grader is validated. Nothing is ever passed to `eval`.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Callable, Mapping

from core.graders.errors import GraderError

MAX_NODES = 256  # a formula's AST nodes

_BINARY: dict[type[ast.operator], Callable[[float, float], float]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}
_UNARY: dict[type[ast.unaryop], Callable[[float], float]] = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_CALLS: dict[str, Callable[..., float]] = {"min": min, "max": max, "abs": abs}


class FormulaError(ArithmeticError):
    """A formula that parsed but cannot be computed for these values (division by zero, not finite)."""


def parse_formula(source: str, *, names: set[str], param: str = "calculate_output") -> ast.expr:
    """The checked syntax tree of `source`.

    Args:
        source: the formula, e.g. `(name + email) / 2`.
        names: the names it may use (the multi grader's keys).
        param: the field, for errors.

    Returns:
        The expression node, for `evaluate`.

    Raises:
        GraderError: a syntax error, a construct outside the language, or an unknown name.
    """
    try:
        tree = ast.parse(source.strip(), mode="eval")
    except SyntaxError as exc:
        raise GraderError(f"'{param}' is not a valid formula: {exc.msg}.", param=param) from None
    if sum(1 for _ in ast.walk(tree)) > MAX_NODES:
        raise GraderError(f"'{param}' is too long (at most {MAX_NODES} terms).", param=param)
    _check(tree.body, names=names, param=param)
    return tree.body


def _check(node: ast.expr, *, names: set[str], param: str) -> None:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return
    if isinstance(node, ast.Name):
        if node.id not in names:
            raise GraderError(f"'{param}' uses {node.id!r}, which is none of the graders {sorted(names)}.",
                              param=param)  # fmt: skip
        return
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        _check(node.left, names=names, param=param)
        _check(node.right, names=names, param=param)
        return
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        _check(node.operand, names=names, param=param)
        return
    if _is_allowed_call(node):
        for arg in node.args:  # type: ignore[attr-defined]
            _check(arg, names=names, param=param)
        return
    raise GraderError(f"'{param}' may only use numbers, grader names, + - * /, min, max and abs "
                      f"(found {ast.unparse(node)!r}).", param=param)  # fmt: skip


def _is_allowed_call(node: ast.expr) -> bool:
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords):
        return False
    count = len(node.args)
    return node.func.id in _CALLS and (count == 1 if node.func.id == "abs" else count >= 1)


def evaluate(node: ast.expr, values: Mapping[str, float]) -> float:
    """The value of a checked formula.

    Args:
        node: from `parse_formula`.
        values: each name's value (the sub-graders' rewards).

    Returns:
        The result, a finite number.

    Raises:
        FormulaError: division by zero or a non-finite result.
    """
    try:
        result = float(_value(node, values))
    except ZeroDivisionError:
        raise FormulaError("division by zero") from None
    if not math.isfinite(result):
        raise FormulaError("the result is not a finite number")
    return result


def _value(node: ast.expr, values: Mapping[str, float]) -> float:
    if isinstance(node, ast.Constant):
        assert isinstance(node.value, int | float)  # parse_formula allows no other constant
        return float(node.value)
    if isinstance(node, ast.Name):
        return float(values[node.id])
    if isinstance(node, ast.BinOp):
        return _BINARY[type(node.op)](_value(node.left, values), _value(node.right, values))
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](_value(node.operand, values))
    assert isinstance(node, ast.Call) and isinstance(node.func, ast.Name)  # parse_formula allows nothing else
    return float(_CALLS[node.func.id](*(_value(arg, values) for arg in node.args)))
