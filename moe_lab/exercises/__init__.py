"""Self-check functions for the notebooks' exercises: one module per notebook.

Each `check_*` function takes the student's answer, never raises (a wrong answer must not stop
the notebook), prints what is right or what is wrong, and returns a `Feedback` that is truthy
only when the answer is correct.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

from ..errors import first_line  # noqa: F401  (re-exported for the exercise modules)


@dataclass
class Feedback:
    correct: bool
    message: str

    def __bool__(self) -> bool:
        return self.correct

    def __str__(self) -> str:
        return ("Correct: " if self.correct else "Not yet: ") + self.message

    def _repr_html_(self) -> str:
        colour = "#1a7f37" if self.correct else "#b35900"
        return f'<div style="color:{colour}"><b>{"Correct" if self.correct else "Not yet"}</b>: {self.message}</div>'


def feedback(correct: bool, message: str) -> Feedback:
    result = Feedback(bool(correct), message)
    print(result)
    return result


def as_whole_number(value, name: str, hint: str = "a number"):
    """(int, None) for a whole-number answer (a 0-d tensor counts), else (None, what is wrong)."""
    if value is None:
        return None, f"`{name}` is still None: replace it with {hint}"
    if hasattr(value, "numel") and value.numel() == 1:  # a one-element tensor
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value != int(value):
        return None, f"`{name}` must be a whole number, got {value!r}"
    return int(value), None

