"""How close a result must be to count as "the same", by dtype: one table for every notebook.

A backend's output is compared with `moe_lab.reference_experts_forward` (float64) by relative error
(`moe_lab.relative_error`). Each output element is a chain of roundings — two matmuls of a few
hundred products each, an activation, a weighted sum — so the error scales with the dtype's unit
roundoff: float32 (eps 1.2e-7) stays near 1e-6, bfloat16 (eps 2^-8 = 3.9e-3) near 1e-2. The values
are those tests/test_backends.py uses, with the same reasons.
"""
from __future__ import annotations

import torch

from ..config import resolve_dtype

RELATIVE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}
#: Largest |logit difference| between two experts implementations of a whole (tiny) model: the
#: hidden states pass several layers, norms and an LM head, each rounding in the model's dtype.
LOGITS = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def reference_tolerance(dtype) -> float:
    """Relative error vs the float64 reference that counts as equal for `dtype` (a name or torch dtype)."""
    return RELATIVE[resolve_dtype(dtype)]


def logits_tolerance(dtype) -> float:
    """Max |logit difference| between two implementations of one model in `dtype` that counts as equal."""
    return LOGITS[resolve_dtype(dtype)]
