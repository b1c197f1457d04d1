"""Notebook 08 exercise: switch only the vision backbone of a MultiBackboneMoEModel to batched_mm."""
from __future__ import annotations

from ..model import MultiBackboneMoEModel
from . import feedback, first_line

START = {"text_config": "grouped_mm", "vision_config": "eager"}
GOAL = {"text_config": "grouped_mm", "vision_config": "batched_mm"}


def check_vision_only(switch):
    """Apply `switch` to a model in the START state and say what changed that should not have."""
    if switch is None:
        return feedback(False, "`switch` is still None: set it to what you would pass to "
                               "model.set_experts_implementation(...)")
    model = MultiBackboneMoEModel(experts_implementation=dict(START))
    before = model.get_experts_implementation()
    try:
        model.set_experts_implementation(switch)
    except (ValueError, TypeError) as error:
        return feedback(False, f"set_experts_implementation({switch!r}) raised {first_line(error)}")
    after = model.get_experts_implementation()
    problems = []
    if after["vision_config"] != GOAL["vision_config"]:
        problems.append(f"vision_config is {after['vision_config']!r}, it should be 'batched_mm'")
    if after["text_config"] != before["text_config"]:
        why = ""
        if isinstance(switch, str):
            why = " (a str sets every backbone; pass a dict keyed by sub-config)"
        elif isinstance(switch, dict) and "" in switch and "text_config" not in switch:
            why = " (the \"\" key fills in every backbone the dict does not name)"
        problems.append(f"text_config changed from {before['text_config']!r} to {after['text_config']!r}, "
                        f"which should not have changed{why}")
    if problems:
        return feedback(False, "; ".join(problems) + f". get_experts_implementation() -> {after}")
    extra = "" if set(switch) == {"vision_config"} else " (naming text_config again is allowed, not needed)"
    return feedback(True, f"get_experts_implementation() -> {after}: only the vision backbone moved{extra}")
