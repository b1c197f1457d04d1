"""NaN and inf stay where they entered: a non-finite value in one token's hidden state makes exactly
that token's output non-finite and leaves every other token's output bit-identical, in every backend
and both grouped_mm paths (torch's op and moe_lab's loop) — checked on 500 random layers, each also
against the float64 reference (tests/test_properties.py's strategies and tolerances), and for a NaN
in one expert's weights, one routing weight, and one token through the router.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st

import moe_lab
from moe_lab import MoEConfig, SparseMoeBlock

sys.path.insert(0, str(Path(__file__).resolve().parent))  # test_properties, also under --import-mode=importlib
from test_properties import (  # noqa: E402
    BACKENDS,
    assert_close_to_reference,
    build,
    call,
    examples,
    experts_cases,
    term_magnitude,
)

NON_FINITE = (math.nan, math.inf, -math.inf)


@examples(500)
@given(case=experts_cases(), poison=st.sampled_from(NON_FINITE), data=st.data())
def test_500_random_layers_every_backend_matches_reference_and_confines_nan_inf(case, poison, data):
    """For each random layer (tests/test_properties.py's strategy: T from 0, all four dtypes, skewed
    routing, odd memory layouts, three entry points; sizes rounded up to 16-byte rows half of the
    time, so both grouped_mm paths are exercised), every backend returns the
    float64 reference within the dtype's tolerance. Then one token gets a NaN or +-inf: its output
    becomes entirely non-finite and every other token's output stays bit-identical."""
    if data.draw(st.booleans(), label="16-byte rows"):  # half the layers can take torch's grouped_mm op
        case = case | dict(H=8 * math.ceil(case["H"] / 8), I=8 * math.ceil(case["I"] / 8))
    experts, x, idx, w = build(case)
    dtype, T, H = case["dtype"], x.shape[0], x.shape[1]
    reference = moe_lab.reference_experts_forward(experts, x, idx, w)
    magnitude = term_magnitude(experts, x, idx, w)
    event(f"grouped_mm path: {moe_lab.grouped_mm_path('cpu', dtype, H, case['I']).kernel}")
    for backend in BACKENDS:
        out = call(case["entry"], backend, experts, x, idx, w)
        assert_close_to_reference(out, reference, dtype, f"{backend} via {case['entry']}", magnitude)
    if T == 0:
        return
    token = data.draw(st.integers(0, T - 1), label="poisoned token")
    column = data.draw(st.integers(0, H - 1), label="poisoned column")
    clean = x.clone()  # the same layout for both runs (an expanded x has no row of its own to poison)
    bad = clean.clone()
    bad[token, column] = poison
    others = [t for t in range(T) if t != token]
    for backend in BACKENDS:
        with torch.no_grad():
            a = call(case["entry"], backend, experts, clean, idx, w)
            b = call(case["entry"], backend, experts, bad, idx, w)
        assert (~torch.isfinite(b[token])).all(), f"{backend}: {poison} in token {token} gave finite outputs"
        assert torch.equal(a[others], b[others]), f"{backend}: {poison} in token {token} changed other tokens"


# ----------------------------------------------------------------------------- more NaN/inf

@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_one_experts_weights_reaches_exactly_its_tokens(backend):
    experts = moe_lab.Experts(MoEConfig(16, 8, num_experts=6, top_k=2), backend)
    x = torch.randn(12, 16)
    idx, w = moe_lab.synthetic_routing(12, 6, 2, seed=3)
    with torch.no_grad():
        clean = experts(x, idx, w)
        expert = int(idx[0, 0])
        experts.down_proj[expert, 5, 0] = math.nan  # one weight of one expert
        out = experts(x, idx, w)
    routed = (idx == expert).any(dim=1)
    assert torch.isnan(out[routed, 5]).all() and torch.isfinite(out[routed][:, [c for c in range(16) if c != 5]]).all()
    assert torch.equal(out[~routed], clean[~routed])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_routing_weight_poisons_only_its_token(backend):
    experts = moe_lab.Experts(MoEConfig(16, 8, num_experts=6, top_k=2), backend)
    x = torch.randn(7, 16)
    idx, w = moe_lab.synthetic_routing(7, 6, 2, seed=4)
    bad = w.clone()
    bad[3, 1] = math.nan
    with torch.no_grad():
        clean, out = experts(x, idx, w), experts(x, idx, bad)
    assert torch.isnan(out[3]).all()
    assert torch.equal(out[[0, 1, 2, 4, 5, 6]], clean[[0, 1, 2, 4, 5, 6]])


def test_nan_token_through_the_router_gets_valid_ids_and_nan_weights():
    """torch.topk over NaN scores still returns k distinct, in-range expert ids; the weights are NaN."""
    for score in ("softmax", "sigmoid"):
        block = SparseMoeBlock(MoEConfig(16, 8, num_experts=6, top_k=3, router_score=score))
        x = torch.randn(4, 16)
        x[2, 7] = math.nan
        with torch.no_grad():
            out, routing = block(x, return_router_output=True)
        ids = routing.top_k_index[2]
        assert len(set(ids.tolist())) == 3 and 0 <= int(ids.min()) and int(ids.max()) < 6
        assert torch.isnan(routing.top_k_weights[2]).all() and torch.isnan(out[2]).all()
        assert torch.isfinite(out[[0, 1, 3]]).all()
