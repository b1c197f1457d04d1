"""Notebook 07 exercise: write an experts backend; `check_backend(fn)` runs it on the awkward cases.

Each case builds a small `moe_lab.Experts` layer with seeded weights, hidden states and routing, runs
`fn(experts, hidden_states, top_k_index, top_k_weights)` and compares it with
`moe_lab.reference_experts_forward` (float64, dense). Then `fn` is registered under a temporary
name and run inside a `SparseMoeBlock` on a [batch, seq, H] input, against the built-in grouped_mm.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import backends as _backends
from ..config import MoEConfig
from ..modules import Experts, SparseMoeBlock
from ..reference import reference_experts_forward, relative_error
from ..routing import synthetic_routing, tokens_per_expert
from . import feedback, first_line

HIDDEN, INTERMEDIATE = 32, 48
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
CHECK_NAME = "nb07_check_backend"


@dataclass(frozen=True)
class Case:
    name: str
    num_tokens: int
    num_experts: int
    top_k: int
    dtype: torch.dtype = torch.float32
    distribution: str = "uniform"
    seed: int = 0

    def describe(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"T={self.num_tokens}, E={self.num_experts}, k={self.top_k}, {dtype}, {self.distribution} routing"


CASES = (
    Case("uniform routing", 32, 8, 2),
    Case("zero-token experts", 16, 8, 2, distribution="single"),  # only experts 0 and 1 get tokens
    Case("one token", 1, 8, 2),
    Case("no tokens", 0, 8, 2),
    Case("top_k = num_experts", 8, 4, 4),
    Case("bfloat16", 32, 8, 2, dtype=torch.bfloat16, seed=1),
)


def case_inputs(case: Case):
    """(experts, hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k] float32), seeded."""
    config = MoEConfig(HIDDEN, INTERMEDIATE, case.num_experts, case.top_k, dtype=case.dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(case.seed)
        experts = Experts(config, "eager")
        hidden = torch.randn(case.num_tokens, HIDDEN).to(case.dtype)
    index, weights = synthetic_routing(case.num_tokens, case.num_experts, case.top_k,
                                       distribution=case.distribution, seed=case.seed)
    return experts, hidden, index, weights


def _diagnose(experts, hidden, index, weights, out) -> str:
    """A hint for the usual mistakes, when the output matches one of them."""
    if out.numel() and not out.any():
        return " (the output is all zeros: nothing was added to it)"
    close = max(1e-3, TOLERANCE[hidden.dtype])
    unweighted = reference_experts_forward(experts, hidden, index, torch.ones_like(weights))
    if relative_error(out, unweighted) < close:
        return " (it equals the UNWEIGHTED sum: multiply each expert's rows by their top_k_weights)"
    first_only = reference_experts_forward(experts, hidden, index[:, :1], weights[:, :1])
    if index.shape[1] > 1 and relative_error(out, first_only) < close:
        return " (it equals the first choice alone: every one of the top_k slots must be added)"
    return ""


def run_case(fn, case: Case) -> str | None:
    """None when `fn` passes `case`, else what went wrong (one line)."""
    experts, hidden, index, weights = case_inputs(case)
    where = f"{case.name} ({case.describe()})"
    if case.distribution == "single":
        empty = [e for e, n in enumerate(tokens_per_expert(index, case.num_experts).tolist()) if n == 0]
        where = f"{case.name} ({case.describe()}; experts {empty} get no tokens)"
    try:
        with torch.no_grad():
            out = fn(experts, hidden, index, weights)
    except Exception as error:  # noqa: BLE001 - the student's code may raise anything
        hint = ""
        if "scalar type" in str(error) or "dtype" in str(error):
            hint = (" (top_k_weights are float32 while the hidden states are not: cast the weighted rows to the "
                    "output's dtype, or accumulate in float32 and cast at the end)")
        return f"{where}: raised {first_line(error)}{hint}"
    if not isinstance(out, torch.Tensor):
        return f"{where}: returned {type(out).__name__}, expected a tensor [T={case.num_tokens}, H={HIDDEN}]"
    if tuple(out.shape) != (case.num_tokens, HIDDEN):
        return f"{where}: returned shape {tuple(out.shape)}, expected ({case.num_tokens}, {HIDDEN})"
    if out.dtype != hidden.dtype:
        return (f"{where}: returned {out.dtype} for {hidden.dtype} hidden states; return the hidden states' dtype "
                f"(e.g. output.to(hidden_states.dtype))")
    if not torch.isfinite(out).all():
        return f"{where}: the output holds NaN or inf"
    expected = reference_experts_forward(experts, hidden, index, weights)
    error, tolerance = relative_error(out, expected), TOLERANCE[case.dtype]
    if not error <= tolerance:
        hint = _diagnose(experts, hidden, index, weights, out)
        return f"{where}: relative error {error:.2g} vs the float64 reference, tolerance {tolerance:g}{hint}"
    return None


def run_in_block(fn) -> str | None:
    """Register `fn`, run it in a SparseMoeBlock on [2, 5, H] input vs grouped_mm; None when equal."""
    previous = _backends.get_backend(CHECK_NAME) if CHECK_NAME in _backends.available_backends() else None
    try:
        _backends.register(CHECK_NAME, fn)
        config = MoEConfig(HIDDEN, INTERMEDIATE, num_experts=8, top_k=2)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(3)
            block = SparseMoeBlock(config, "grouped_mm")
            x = torch.randn(2, 5, HIDDEN)
        with torch.no_grad():
            expected = block(x)
            block.set_experts_implementation(CHECK_NAME)
            if block.get_experts_implementation() != CHECK_NAME:
                return f"SparseMoeBlock did not switch to {CHECK_NAME!r}"
            out = block(x)
    except Exception as error:  # noqa: BLE001
        return f"registered and run in a SparseMoeBlock on a [2, 5, {HIDDEN}] input: raised {first_line(error)}"
    finally:
        if previous is None:
            if CHECK_NAME in _backends.available_backends():
                _backends.unregister(CHECK_NAME)
        else:
            _backends.register(CHECK_NAME, previous)
    if tuple(out.shape) != tuple(x.shape):
        return f"in a SparseMoeBlock: output shape {tuple(out.shape)}, expected {tuple(x.shape)}"
    error = relative_error(out, expected)
    if not error <= TOLERANCE[torch.float32]:
        return f"in a SparseMoeBlock: relative error {error:.2g} vs grouped_mm, tolerance {TOLERANCE[torch.float32]:g}"
    return None


def check_backend(fn):
    """Run `fn` on every case of CASES and inside a SparseMoeBlock; print what passes and what does not."""
    if not callable(fn):
        return feedback(False, f"expected a function fn(experts, hidden_states, top_k_index, top_k_weights), "
                               f"got {type(fn).__name__}")
    failures = [message for message in (run_case(fn, case) for case in CASES) if message]
    if not failures:
        block = run_in_block(fn)
        if block:
            return feedback(False, f"all {len(CASES)} cases match the reference, but {block}")
        return feedback(True, f"all {len(CASES)} cases ({', '.join(c.name for c in CASES)}) match the float64 "
                              "reference, and it registers and runs inside a SparseMoeBlock like the built-ins")
    lines = "\n  - ".join(failures)
    return feedback(False, f"{len(failures)} of {len(CASES)} cases fail:\n  - {lines}")
