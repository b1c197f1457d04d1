"""A notebook's parameters, checked inside the notebook: one message whoever set them.

A notebook's `parameters` cell can be changed three ways: a student edits it, papermill injects
`-p name value` after it, or `moe-lab run` does the same through papermill. The cell right after
it calls `check_parameters(globals(), SPEC)`, so all three get the same clear error in that cell —
a wrong type, a value out of range, an unknown backend name, a misspelled parameter — instead of
an empty table, a crash five cells later or a run that quietly used the default.

    SPEC = Parameters(
        device=Device(), dtype=Dtype(), num_experts=Int(min=1, max=256), top_k=Int(min=1),
        sweep_tokens=IntList(min=1, max=4096), backends=StrList(choices=available_backends),
        rules=[Rule(lambda p: p["top_k"] <= p["num_experts"],
                    "top_k={top_k} must be <= num_experts={num_experts}: a token picks k distinct experts")],
    )
    record("parameters", check_parameters(globals(), SPEC))   # in the notebook

What a check does with a value:
- papermill passes a list given with `-p` as text ("[1, 16]"): list parameters parse it
  (also "1,16"), and numbers or booleans given as text are parsed too. The parsed value is written
  back into the notebook's namespace, so later cells see the list.
- bool is not an int here (True == 1 in Python): an Int parameter refuses True.
- `choices` may be a function, called when the check runs, so a backend registered in the notebook
  counts (`moe_lab.available_backends`). The error lists what is allowed.
- `Device()` turns "auto" into this machine's default device and refuses "cuda" where there is none.

A misspelled name: papermill injects its values as a cell that starts with "# Parameters"; the
check reads that cell from IPython's input history (`In`), and a name in it that the notebook does
not declare is refused. A name that is not declared, typed into the parameters cell itself, is
refused the same way (the cell just before the check, when it only assigns names and at least one
of them is a declared parameter).

This module imports only torch and `moe_lab.config`: the specs live in `moe_lab.lessons`, which
may ask the registry for its names.
"""
from __future__ import annotations

import ast
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .config import DTYPES, resolve_dtype
from .devices import default_device
from .errors import ConfigError

#: How papermill marks the cell it injects (papermill.translators: "# Parameters" then one line per value).
PAPERMILL_MARKER = "# Parameters"


class NotebookParameterError(ValueError):
    """A notebook parameter with a wrong type or value, or a name the notebook does not declare."""


# ----------------------------------------------------------------------------- one parameter


def _literal(text: str):
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def _choices(choices) -> list | None:
    if choices is None:
        return None
    return list(choices() if callable(choices) else choices)


@dataclass(frozen=True)
class Parameter:
    """Base: `convert(name, value)` returns (value for the notebook, value to record) or raises."""

    help: str = ""

    def convert(self, name: str, value):  # pragma: no cover - every kind overrides it
        raise NotImplementedError

    def _fail(self, name: str, value, expected: str):
        raise NotebookParameterError(f"parameter {name} must be {expected}, got {value!r}"
                                     + (f" ({self.help})" if self.help else ""))


@dataclass(frozen=True)
class Int(Parameter):
    """A whole number (not a bool), optionally within [min, max] and a multiple of `multiple_of`."""

    min: int | None = None
    max: int | None = None
    multiple_of: int | None = None

    def expected(self) -> str:
        text = "an integer"
        if self.min is not None and self.max is not None:
            text += f" from {self.min} to {self.max}"
        elif self.min is not None:
            text += f" >= {self.min}"
        elif self.max is not None:
            text += f" <= {self.max}"
        if self.multiple_of:
            text += f", a multiple of {self.multiple_of}"
        return text

    def convert(self, name, value):
        if isinstance(value, str):
            value = _literal(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self._fail(name, value, self.expected())
        if (self.min is not None and value < self.min) or (self.max is not None and value > self.max) \
                or (self.multiple_of and value % self.multiple_of):
            self._fail(name, value, self.expected())
        return value, value


@dataclass(frozen=True)
class Float(Parameter):
    """A real number (an int is fine, a bool is not), finite, optionally within [min, max];
    `positive=True` excludes 0."""

    min: float | None = None
    max: float | None = None
    positive: bool = False

    def expected(self) -> str:
        parts = ["a number"]
        if self.positive:
            parts.append("> 0")
        if self.min is not None:
            parts.append(f">= {self.min}")
        if self.max is not None:
            parts.append(f"<= {self.max}")
        return " ".join(parts)

    def convert(self, name, value):
        if isinstance(value, str):
            value = _literal(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self._fail(name, value, self.expected())
        if (self.positive and value <= 0) or (self.min is not None and value < self.min) \
                or (self.max is not None and value > self.max):
            self._fail(name, value, self.expected())
        return value, value


@dataclass(frozen=True)
class Bool(Parameter):
    """True or False (the strings "True" and "False" too)."""

    def convert(self, name, value):
        if isinstance(value, str) and value.strip() in ("True", "False"):
            value = value.strip() == "True"
        if not isinstance(value, bool):
            self._fail(name, value, "True or False")
        return value, value


@dataclass(frozen=True)
class Str(Parameter):
    """A string; with `choices` (a list, or a function returning one), one of them."""

    choices: Any = None

    def convert(self, name, value):
        allowed = _choices(self.choices)
        if not isinstance(value, str):
            self._fail(name, value, f"one of {allowed}" if allowed else "a string")
        if allowed is not None and value not in allowed:
            self._fail(name, value, f"one of {allowed}")
        return value, value


def _as_items(value):
    """A list from a list, a tuple, or text: "[1, 2]", "(1, 2)", "1,2" or a single "1"."""
    if isinstance(value, str):
        parsed = _literal(value)
        if isinstance(parsed, (list, tuple)):
            return list(parsed)
        if parsed is value:  # not a Python literal: split on commas ("eager,grouped_mm")
            return [_literal(part) for part in value.split(",") if part.strip()]
        return [parsed]
    if isinstance(value, (list, tuple)):
        return list(value)
    return None


@dataclass(frozen=True)
class _List(Parameter):
    item: Parameter = field(default_factory=Parameter)
    min_len: int = 1
    max_len: int | None = None
    unique: bool = True

    def expected(self) -> str:
        size = f"{self.min_len} to {self.max_len}" if self.max_len else f"at least {self.min_len}"
        return f"a list of {size} {'distinct ' if self.unique else ''}items, each {self._item_expected()}"

    def _item_expected(self) -> str:
        expected = getattr(self.item, "expected", None)
        if expected is not None:
            return expected()
        allowed = _choices(getattr(self.item, "choices", None))
        return f"one of {allowed}" if allowed else "a string"

    def convert(self, name, value):
        items = _as_items(value)
        if items is None or len(items) < self.min_len or (self.max_len and len(items) > self.max_len):
            self._fail(name, value, self.expected())
        converted = []
        for position, item in enumerate(items):
            try:
                converted.append(self.item.convert(f"{name}[{position}]", item)[0])
            except NotebookParameterError:
                self._fail(name, value, self.expected())
        if self.unique and len(set(converted)) != len(converted):
            self._fail(name, value, self.expected())
        return converted, converted


def IntList(min: int | None = None, max: int | None = None, *, min_len: int = 1, max_len: int | None = None,
            multiple_of: int | None = None, unique: bool = True, help: str = "") -> Parameter:
    """A list of integers, each within [min, max] (text such as "[1, 16]" or "1,16" is parsed)."""
    return _List(help=help, item=Int(min=min, max=max, multiple_of=multiple_of), min_len=min_len,
                 max_len=max_len, unique=unique)


def StrList(choices=None, *, min_len: int = 1, max_len: int | None = None, unique: bool = True,
            help: str = "") -> Parameter:
    """A list of strings, each one of `choices` (a list or a function returning one)."""
    return _List(help=help, item=Str(choices=choices), min_len=min_len, max_len=max_len, unique=unique)


@dataclass(frozen=True)
class Device(Parameter):
    """"auto" (the GPU when there is one, else the CPU), "cpu", "cuda", "cuda:N": a torch.device in the
    notebook, its name in the record. A device this machine does not have is refused."""

    def convert(self, name, value):
        if isinstance(value, torch.device):
            value = str(value)
        if not isinstance(value, str):
            self._fail(name, value, '"auto", "cpu" or "cuda"')
        if value == "auto":
            device = default_device()
        else:
            try:
                device = torch.device(value)
            except RuntimeError:
                self._fail(name, value, '"auto", "cpu" or "cuda"')
            if device.type == "cuda":
                count = torch.cuda.device_count() if torch.cuda.is_available() else 0
                if count == 0:
                    raise NotebookParameterError(
                        f'parameter {name}={value!r}: this machine has no CUDA GPU; use "auto" or "cpu"')
                if device.index is not None and device.index >= count:
                    raise NotebookParameterError(
                        f"parameter {name}={value!r}: this machine has {count} CUDA device(s), cuda:0..cuda:{count - 1}")
            elif device.type != "cpu":
                self._fail(name, value, '"auto", "cpu" or "cuda"')
        return device, str(device)


@dataclass(frozen=True)
class Dtype(Parameter):
    """A dtype name ("float32", "bfloat16", ... or bf16/fp32): its canonical name, as a string."""

    choices: tuple = tuple(DTYPES)

    def convert(self, name, value):
        try:
            dtype = resolve_dtype(value) if isinstance(value, (str, torch.dtype)) else None
        except ConfigError:
            dtype = None
        canonical = None if dtype is None else str(dtype).removeprefix("torch.")
        if canonical is None or canonical not in self.choices:
            self._fail(name, value, f"one of {list(self.choices)}")
        return canonical, canonical


# ----------------------------------------------------------------------------- a notebook's set


@dataclass(frozen=True)
class Rule:
    """A check across parameters: `test(values) -> bool`, and the message (formatted with the values)
    when it is False."""

    test: Callable[[dict], bool]
    message: str


class Parameters:
    """The parameters a notebook declares: name -> kind, plus rules across them."""

    def __init__(self, rules=(), **kinds: Parameter):
        for name, kind in kinds.items():
            if not isinstance(kind, Parameter):
                raise TypeError(f"{name}: expected a Parameter (Int(), Str(), ...), got {kind!r}")
        self.kinds = dict(kinds)
        self.rules = list(rules)

    @property
    def names(self) -> list[str]:
        return list(self.kinds)

    def describe(self) -> str:
        return ", ".join(self.kinds)

    def convert(self, values: dict) -> tuple[dict, dict]:
        """(values for the notebook, values to record) of every declared name in `values`."""
        missing = [name for name in self.kinds if name not in values]
        if missing:
            raise NotebookParameterError(f"parameter(s) {missing} are not defined: run the parameters cell first")
        rich, plain = {}, {}
        for name, kind in self.kinds.items():
            rich[name], plain[name] = kind.convert(name, values[name])
        for rule in self.rules:
            if not rule.test(rich):
                raise NotebookParameterError(rule.message.format(**plain))
        return rich, plain


def check_values(spec: Parameters, values: dict) -> dict:
    """Check `values` (name -> value) against `spec` without a notebook: unknown names and bad values
    raise NotebookParameterError; returns the values as the notebook would record them."""
    unknown = sorted(set(values) - set(spec.kinds))
    if unknown:
        raise NotebookParameterError(_unknown_message(unknown, spec))
    return spec.convert(values)[1]


def _unknown_message(unknown, spec: Parameters) -> str:
    return (f"this notebook has no parameter(s) {unknown}; its parameters are: {spec.describe()} "
            "(a misspelled name would otherwise run on the default)")


def _assigned_names(source: str) -> list[str] | None:
    """Names a cell assigns at top level, or None when it does anything but assign names."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    names = []
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and all(isinstance(t, ast.Name) for t in statement.targets):
            names += [t.id for t in statement.targets]
        elif isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
            names.append(statement.target.id)
        else:
            return None
    return names


def undeclared_names(history, spec: Parameters) -> list[str]:
    """Names set by the cell just before the check (history[-2]; history[-1] is the check itself)
    that `spec` does not declare: the cell papermill injected, or the parameters cell itself."""
    if not history or len(history) < 2:
        return []
    source = history[-2]
    names = _assigned_names(source)
    if names is None:
        return []
    injected = source.lstrip().startswith(PAPERMILL_MARKER)
    if not injected and not set(names) & set(spec.kinds):
        return []  # some other cell that only assigns names: not the parameters
    return sorted(set(names) - set(spec.kinds))


def check_parameters(namespace: dict, spec: Parameters) -> dict:
    """Check the notebook's parameters in `namespace` (pass `globals()`) against `spec`.

    Raises NotebookParameterError, in the notebook's first cells, for an undeclared name (see the
    module docstring), a wrong type, a value out of range or a broken rule. Writes the converted
    values back into `namespace` (a list given as text becomes a list; device "auto" becomes a
    torch.device) and returns them as plain values for `moe_lab.notebook_values.record("parameters", ...)`.
    """
    unknown = undeclared_names(namespace.get("In") or namespace.get("_ih"), spec)
    if unknown:
        raise NotebookParameterError(_unknown_message(unknown, spec))
    rich, plain = spec.convert(namespace)
    namespace.update(rich)
    return plain
