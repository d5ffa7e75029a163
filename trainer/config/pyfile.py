"""Reading nanoGPT-style .py config files without running them.

nanoGPT's configurator `exec`s its config files. Here a file is parsed with `ast` and only a few
pure forms are evaluated, the ones nanoGPT's own config/ folder uses:

- `name = <expression>` at top level, and bare strings (docstrings, string "comments");
- numbers, strings, True/False/None; unary +/-; + - * / // % ** on numbers; + on two strings;
- `str(<expression>)`;
- a name assigned above in the file, as a value (`lr_decay_iters = max_iters`: nanoGPT execs the
  file, so hand-written configs do this); its value then, as exec would read it;
- `import time` (that module alone) and then `time.time()`, for a run name such as
  `wandb_run_name = 'ft-' + str(time.time())` (config/finetune_shakespeare.py).

Anything else (other imports, other names, attribute access, other calls, f-strings, containers,
control flow) is refused with the file, the line and the reason, before anything is evaluated
that could run code or grow without bound.
"""
from __future__ import annotations

import ast
import math
import operator
import time
import warnings
from typing import Any, Callable


class ConfigError(ValueError):
    """A config the user can fix: unknown key, bad value, unreadable or refused file."""


_MAX_EXPONENT = 64
_MAX_INT_BITS = 1024  # ~10**308, the float range; larger integers are no sane config value
# characters of a string: a name assigned above may be added to itself line after line (s = s + s
# doubles it), so a string no longer grows only as fast as the source text; no run name or path
# needs more
_MAX_STR = 65_536

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}

# Why a node is refused, in words a user recognises.
_REFUSED = {
    ast.Call: "function call", ast.Name: "name reference", ast.Attribute: "attribute access",
    ast.JoinedStr: "f-string", ast.Subscript: "subscript", ast.List: "list", ast.Tuple: "tuple",
    ast.Dict: "dict", ast.Set: "set", ast.Lambda: "lambda", ast.Compare: "comparison",
    ast.BoolOp: "and/or", ast.IfExp: "conditional expression", ast.ListComp: "comprehension",
    ast.SetComp: "comprehension", ast.DictComp: "comprehension", ast.GeneratorExp: "comprehension",
    ast.Starred: "starred expression", ast.NamedExpr: "walrus assignment", ast.Await: "await",
    ast.Import: "import", ast.ImportFrom: "import", ast.AugAssign: "augmented assignment",
    ast.AnnAssign: "annotated assignment", ast.If: "if statement", ast.For: "for loop",
    ast.While: "while loop", ast.FunctionDef: "function definition",
    ast.AsyncFunctionDef: "function definition", ast.ClassDef: "class definition",
    ast.With: "with statement", ast.Try: "try statement", ast.Delete: "del statement",
    ast.Global: "global statement", ast.Nonlocal: "nonlocal statement", ast.Assert: "assert",
    ast.Raise: "raise", ast.Return: "return", ast.Pass: "pass", ast.Match: "match statement",
}

_ALLOWED = "only literal assignments are allowed, with str(), + on strings, time.time() and names assigned above"

# Keys whose value is a list of tables (trainer/config/stages.py), read with Evaluator.tables
TABLE_KEYS = ("stages",)
_MAX_TABLES = 10_000  # items of such a list: no schedule needs more, and the check stays instant


class Refused(Exception):
    """A form the reader will not evaluate; `lineno` is where it stands."""

    def __init__(self, node: ast.AST, reason: str, about_value: bool = False):
        super().__init__(reason)
        self.lineno = getattr(node, "lineno", 0)
        self.reason = reason
        self.about_value = about_value  # a number out of range, not a form that is not allowed


def _describe(node: ast.AST) -> str:
    what = _REFUSED.get(type(node), type(node).__name__)
    if isinstance(node, ast.Name):
        what += f" {node.id!r}"
    return what


class Evaluator:
    """Evaluates the pure forms listed in the module docstring; refuses everything else.

    `time_imported` says whether `import time` has been read (so `time.time()` may be called);
    `clock` is what `time.time()` returns (injected by tests).
    """

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.time_imported = False
        self.assigned: dict[str, Any] = {}  # the names set so far, each to a value already evaluated

    def value(self, node: ast.AST) -> int | float | str | bool | None:
        if isinstance(node, ast.Constant):
            v = node.value
            if v is None or isinstance(v, (bool, int, str)):
                return v
            if isinstance(v, float):
                return _check(node, v)  # 1e999 parses as inf
            raise Refused(node, f"{type(v).__name__} constant")
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
            v = self._number(node.operand)
            return _check(node, -v if isinstance(node.op, ast.USub) else +v)
        if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
            return self._binop(node)
        if isinstance(node, ast.BinOp):
            raise Refused(node, f"operator {type(node.op).__name__}")
        if isinstance(node, ast.Call):
            return self._call(node)
        if isinstance(node, ast.Name) and node.id in self.assigned and not isinstance(self.assigned[node.id], list):
            return self.assigned[node.id]  # a literal read before: nothing runs
        if isinstance(node, ast.Name) and node.id in self.assigned:
            raise Refused(node, f"{_describe(node)}: a list of tables, which only its own key takes")
        if isinstance(node, ast.Name):
            raise Refused(node, f"{_describe(node)}: only a name assigned above in the file can be used")
        raise Refused(node, _describe(node))

    def tables(self, node: ast.AST) -> list[dict[str, Any]]:
        """A list (or tuple) of tables, each a dict with string keys or dict(key=value), whose
        values are the pure forms `value` reads: `[dict(until_iter=100, block_size=256), {...}]`."""
        if not isinstance(node, (ast.List, ast.Tuple)):
            raise Refused(node, f"{_describe(node)}: expected a list of dicts")
        if len(node.elts) > _MAX_TABLES:
            raise Refused(node, f"a list of more than {_MAX_TABLES:,} tables", about_value=True)
        return [self._table(e) for e in node.elts]

    def _table(self, node: ast.AST) -> dict[str, Any]:
        if isinstance(node, ast.Dict) and all(isinstance(k, ast.Constant) and isinstance(k.value, str)
                                              for k in node.keys):
            return {k.value: self.value(v) for k, v in zip(node.keys, node.values)}
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" \
                and not node.args and all(k.arg is not None for k in node.keywords):
            return {k.arg: self.value(k.value) for k in node.keywords}
        raise Refused(node, f"{_describe(node)}: expected a dict with string keys, or dict(key=value, ...)")

    def _binop(self, node: ast.BinOp) -> int | float | str:
        left, right = self.value(node.left), self.value(node.right)
        if isinstance(node.op, ast.Add) and isinstance(left, str) and isinstance(right, str):
            if len(left) + len(right) > _MAX_STR:  # refused before it is built
                raise Refused(node, f"a string longer than {_MAX_STR:,} characters", about_value=True)
            return left + right
        a, b = self._as_number(node.left, left), self._as_number(node.right, right)
        if isinstance(node.op, ast.Pow):
            _check_power(node, a, b)
        try:
            v = _BINOPS[type(node.op)](a, b)
        except ZeroDivisionError:
            raise Refused(node, "division by zero", about_value=True) from None
        except OverflowError:
            raise Refused(node, "number too large", about_value=True) from None
        return _check(node, v)

    def _call(self, node: ast.Call) -> str | float:
        f = node.func
        if isinstance(f, ast.Name) and f.id == "str":
            if len(node.args) != 1 or node.keywords or isinstance(node.args[0], ast.Starred):
                raise Refused(node, "str() takes one argument here")
            return str(self.value(node.args[0]))
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) \
                and f.value.id == "time" and f.attr == "time":
            if not self.time_imported:
                raise Refused(node, "time.time() before `import time`")
            if node.args or node.keywords:
                raise Refused(node, "time.time() takes no arguments")
            return float(self.clock())
        raise Refused(node, "function call")

    def _number(self, node: ast.AST) -> int | float:
        return self._as_number(node, self.value(node))

    @staticmethod
    def _as_number(node: ast.AST, v: Any) -> int | float:
        # Arithmetic on strings ('x' * 10**9) could exhaust memory, and on bools/None means nothing.
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise Refused(node, "arithmetic is only allowed on numbers (and + on two strings)")
        return v

    def statement(self, stmt: ast.stmt) -> tuple[str, Any] | None:
        """One top-level statement: (name, value) for an assignment, None for what sets nothing."""
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) \
                and isinstance(stmt.value.value, str):
            return None  # docstring or a bare string used as a comment
        if isinstance(stmt, ast.Import):
            names = [(a.name, a.asname) for a in stmt.names]
            if names != [("time", None)]:
                shown = ", ".join(n + (f" as {a}" if a else "") for n, a in names)
                raise Refused(stmt, f"import {shown}: only `import time` is allowed")
            self.time_imported = True
            return None
        if isinstance(stmt, ast.Expr):
            raise Refused(stmt, _describe(stmt.value))
        if not isinstance(stmt, ast.Assign):
            raise Refused(stmt, _describe(stmt))
        if len(stmt.targets) != 1:
            raise Refused(stmt, "chained assignment")
        target = stmt.targets[0]
        if not isinstance(target, ast.Name):
            raise Refused(stmt, f"assignment to {_describe(target).split(' ')[0]}")
        try:
            if target.id in TABLE_KEYS:
                return target.id, self.tables(stmt.value)
            return target.id, self.value(stmt.value)
        except RecursionError:
            raise Refused(stmt, "expression nested too deeply") from None


def _check_power(node: ast.AST, base: int | float, exp: int | float) -> None:
    # Refuse before computing: 10 ** 10 ** 9 would hang the parser.
    if abs(exp) > _MAX_EXPONENT:
        raise Refused(node, f"exponent {exp} too large (at most {_MAX_EXPONENT})", about_value=True)
    if isinstance(base, int) and isinstance(exp, int) and exp > 0 \
            and base.bit_length() * exp > _MAX_INT_BITS:
        raise Refused(node, "number too large", about_value=True)


def _check(node: ast.AST, v: Any) -> int | float:
    if isinstance(v, complex):
        raise Refused(node, "complex result", about_value=True)
    if isinstance(v, int) and v.bit_length() > _MAX_INT_BITS:
        raise Refused(node, "number too large", about_value=True)
    if isinstance(v, float) and not math.isfinite(v):
        raise Refused(node, "number too large (not a finite float)", about_value=True)
    return v


def literal(text: str, key: str | None = None) -> Any:
    """The value of one expression in the same pure forms (used for --set values); for a key of
    TABLE_KEYS, a list of tables (Evaluator.tables).

    Raises Refused (or SyntaxError/ValueError/RecursionError from `ast.parse`) where `text` is not
    such an expression; time.time() is refused since no `import time` precedes it.
    """
    with warnings.catch_warnings():  # '/tmp/run-9ab/d' is a path, not 'invalid decimal literal' on stderr
        warnings.simplefilter("ignore", SyntaxWarning)
        node = ast.parse(text, mode="eval").body
    return Evaluator().tables(node) if key in TABLE_KEYS else Evaluator().value(node)


def parse_py_config(text: str, filename: str = "<config>",
                    clock: Callable[[], float] = time.time) -> dict[str, tuple[Any, int]]:
    """nanoGPT-style config text -> {key: (value, line)}, by reading its syntax tree, never running it.

    A later assignment to the same key wins, as when nanoGPT execs the file. Raises ConfigError
    (one line: 'FILE:LINE: refused: REASON ...' or 'FILE:LINE: syntax error: ...').
    """
    try:
        tree = ast.parse(text, filename=filename)
    except SyntaxError as e:
        raise ConfigError(f"{filename}:{e.lineno}: syntax error: {e.msg}") from None
    except (ValueError, RecursionError, MemoryError) as e:  # null bytes, absurd nesting
        why = str(e) or f"{type(e).__name__}, an expression nested too deeply for Python's parser"
        raise ConfigError(f"{filename}: cannot parse: {why}") from None
    ev = Evaluator(clock)
    out: dict[str, tuple[Any, int]] = {}
    try:
        for stmt in tree.body:
            item = ev.statement(stmt)
            if item is not None:
                out[item[0]] = (item[1], stmt.lineno)
                ev.assigned[item[0]] = item[1]
    except Refused as r:
        raise ConfigError(f"{filename}:{r.lineno}: refused: {r.reason} ({_ALLOWED})") from None
    return out
