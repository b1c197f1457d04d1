"""Shared by the backend tests: which backends to test (asked of the registry), cases, tolerances.

Not a test file: imported by tests/test_backend_*.py.
"""
from __future__ import annotations

import math

import torch

import moe_lab

CPU_FLOAT32 = moe_lab.Where.of("cpu", torch.float32)


def _matmul_backends() -> list[str]:
    """The built-in backends that do the matmuls themselves (not auto, which runs one of them) and run
    compiled on this machine's CPU; an interpreted one (triton here) is tested in test_triton.py."""
    names = []
    for name in moe_lab.backends.builtin_backends():
        spec = moe_lab.get_spec(name)
        runs = spec.supports("runs", CPU_FLOAT32)
        if not spec.dispatcher and runs.ok and not runs.slow:
            names.append(name)
    return names


MATMUL_BACKENDS = _matmul_backends()
assert {"eager", "batched_mm", "grouped_mm"} <= set(MATMUL_BACKENDS), MATMUL_BACKENDS

#: Unit roundoff (half the machine epsilon) of each dtype.
UNIT_ROUNDOFF = {dtype: torch.finfo(dtype).eps / 2 for dtype in (torch.float64, torch.float32, torch.float16,
                                                                  torch.bfloat16)}
#: Roundings of the model dtype allowed, in relative Frobenius error: the [S, 2I] projection, the
#: [S, I] activation, the [S, H] expert output and the result are each rounded once along a path,
#: and independent roundings add in quadrature (sqrt(4) = 2); one more for slack. Observed: 1.1-2.1
#: unit roundoffs in bfloat16 on every CPU backend (batched_mm's weight gradients, summed over an
#: expert's pairs in bfloat16 by the gather's backward, are the 2.1).
ROUNDINGS = 3


def tolerance(dtype: torch.dtype, reduction_length: int) -> float:
    """Relative (Frobenius) error allowed against the float64 reference for a result of `dtype`
    whose longest sum has `reduction_length` terms: ROUNDINGS roundings of the dtype, plus a float32
    accumulation of that many terms (a random walk: sqrt(n) roundings; float64 accumulates in float64).
    Every backend accumulates matmuls and the top-k sum in at least float32.

    bfloat16: 3 * 2^-8 = 1.2e-2 (+ 1.4e-6 at n = 512); float32: (3 + 22.6) * 6e-8 = 1.5e-6 at n = 512.
    A sum with a bfloat16 accumulator instead grows like sqrt(n) * 2^-8 and fails from a few dozen
    terms on, and a float32 result computed from bfloat16 fails by orders of magnitude
    (tests/test_backend_gradients.py shows both)."""
    accumulator = torch.promote_types(dtype, torch.float32)
    return ROUNDINGS * UNIT_ROUNDOFF[dtype] + math.sqrt(reduction_length) * UNIT_ROUNDOFF[accumulator]


def make_case(dtype=torch.float32, T=24, H=64, I=24, E=6, k=2, distribution="uniform", seed=0, activation="silu"):
    """A layer (I != H/2, so a swapped axis cannot pass), hidden states [T, H] and routing [T, k]."""
    config = moe_lab.MoEConfig(H, I, num_experts=E, top_k=k, dtype=dtype, activation=activation)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        experts = moe_lab.Experts(config)
    generator = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, H, generator=generator).to(dtype)
    idx, w = moe_lab.synthetic_routing(T, E, k, distribution=distribution, skew=1.5, seed=seed)
    return experts, x, idx, w
