"""Property tests: every built-in experts backend computes what the float64 reference computes.

For random layer shapes (including sizes that are not multiples of 8, one expert, top_k == E and
zero tokens), all four supported dtypes, skewed routing (so some experts get no tokens), shuffled
tokens, non-contiguous and stride-0 inputs, each backend either returns the reference output within
a dtype tolerance or raises a `ValueError` with a message — never any other exception. Invalid
inputs must be rejected with `moe_lab.BackendInputError` (a ValueError) by the checked entry points.

Hypothesis settings come from the profile registered below: derandomized (the same examples on every
run, so CI failures reproduce) and with `print_blob=True` (a failure prints a `@reproduce_failure`
line). Set MOE_LAB_HYPOTHESIS_PROFILE=moe_lab-thorough to explore new random examples instead.
"""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, example, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import InvalidArgument  # noqa: E402

import moe_lab  # noqa: E402
from moe_lab import (  # noqa: E402
    BackendInputError,
    Experts,
    GatherBudgetError,
    MoEConfig,
    SparseMoeBlock,
    reference_experts_forward,
    relative_error,
    synthetic_routing,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))  # backend_cases, also under --import-mode=importlib
from backend_cases import MATMUL_BACKENDS  # noqa: E402

# ----------------------------------------------------------------------------- hypothesis profile

settings.register_profile(
    "moe_lab-ci",
    derandomize=True,  # fixed examples: a red CI run is red again on a laptop
    deadline=None,  # first calls pay torch's lazy initialisation; timing is not the property
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "moe_lab-thorough",
    parent=settings.get_profile("moe_lab-ci"),
    derandomize=False,
    max_examples=1000,
)
# Applied per test (not with settings.load_profile) so other test files keep their own settings.
PROFILE_NAME = os.environ.get("MOE_LAB_HYPOTHESIS_PROFILE", "moe_lab-ci")
PROFILE = settings.get_profile(PROFILE_NAME)
THOROUGH = PROFILE_NAME != "moe_lab-ci"


def examples(n: int) -> settings:
    return settings(PROFILE, max_examples=PROFILE.max_examples if THOROUGH else n)


# ----------------------------------------------------------------------------- tolerances

BACKENDS = tuple(MATMUL_BACKENDS)  # asked of the registry (tests/backend_cases.py)
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# Relative error ||out - ref|| / ||ref|| over the whole [T, H] tensor, against the float64 reference
# run on the same (already rounded) inputs and weights, so only the backend's own roundings count.
# The chain is: x @ gate_up (rounded), act(gate) (rounded), * up (rounded), @ down (rounded),
# * routing weight and the k-way sum (float32 accumulation), cast back (rounded): ~5 roundings.
RTOL = {
    # unit roundoff 2^-53 ~ 1.1e-16; ~5 roundings and dot products of <= 96 terms -> observed < 1e-15.
    # 1e-12 leaves a wide margin while still catching any detour through float32 (~1e-7).
    torch.float64: 1e-12,
    # unit roundoff 2^-24 ~ 6e-8; ~5 roundings plus dot products of <= 96 terms -> observed <= 7e-7.
    # 1e-5 is the usual "float32 agrees" bar and is far below what a bf16/fp16 detour would give.
    torch.float32: 1e-5,
    # 8 significand bits -> 2^-8 ~ 3.9e-3 per rounding; a few roundings in the chain add up to
    # ~1e-2 (observed <= 1.2e-2 over thousands of random layers). -> 3e-2.
    torch.bfloat16: 3e-2,
    # 11 significand bits -> 2^-11 ~ 4.9e-4 per rounding, x ~5 roundings -> ~2.5e-3 (observed
    # <= 2e-3). 1e-2 keeps margin and is still 3x tighter than bf16.
    torch.float16: 1e-2,
}
# Cancellation: when the k expert contributions (or the terms of a down-projection dot product)
# nearly cancel, the output is much smaller than the numbers that were rounded, and ||out-ref||/||ref||
# is ill-conditioned (found by hypothesis: T=1, H=1, bf16, five contributions of size ~1 summing to
# -0.026 -> relative error 0.28 in *every* backend, all bit-identical). Rounding errors scale with the
# size of the summed terms, so the fallback bound is rtol * ||M|| with
#     M[t] = sum_k |w_tk| * (|down_e| @ |h_te|)       (e = top_k_index[t, k], h = act(gate) * up)
# i.e. the output recomputed with every term made positive (M >= |ref| elementwise). Observed
# error / ||M|| stays <= 8e-3 (bf16), 1.2e-3 (fp16), 3e-7 (fp32): the same RTOL applies.
# A dropped or misrouted expert still fails: its term is a sizeable part of M.
# Absolute floor, RMS per element, for outputs that are (near) zero with M ~ 0 too (e.g. relu gates
# all negative): well below one rounding of an O(1) value.
ATOL = {torch.float64: 1e-14, torch.float32: 1e-7, torch.bfloat16: 1e-3, torch.float16: 1e-4}


def _note(message: str) -> None:
    """hypothesis.note inside a property test (shown on failure), nothing in a plain test."""
    try:
        note(message)
    except InvalidArgument:
        pass


def term_magnitude(experts, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """M above: [T, H] float64, the reference with every summed term replaced by its absolute value."""
    x64 = x.detach().double()
    gate_up = torch.einsum("th,eoh->teo", x64, experts.gate_up_proj.detach().double())  # [T, E, 2I]
    inter = gate_up.shape[-1] // 2
    h = experts.act_fn(gate_up[..., :inter]) * gate_up[..., inter:]  # [T, E, I]
    y_abs = torch.einsum("tei,ehi->teh", h.abs(), experts.down_proj.detach().double().abs())  # [T, E, H]
    dense_w = torch.zeros(x64.shape[0], y_abs.shape[1], dtype=torch.float64)
    dense_w.scatter_add_(1, idx.long(), w.detach().double().abs())  # [T, E]
    return torch.einsum("te,teh->th", dense_w, y_abs)


def assert_close_to_reference(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "",
                              magnitude: torch.Tensor | None = None) -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert out.dtype == dtype, f"{what}: output dtype {out.dtype}, expected {dtype}"
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    out, ref = out.detach(), ref.detach()
    rel = relative_error(out, ref)
    abs_err = float((out.double() - ref).norm())
    floor = ATOL[dtype] * math.sqrt(max(ref.numel(), 1))
    if magnitude is not None:
        floor = max(floor, RTOL[dtype] * float(magnitude.norm()))
    _note(f"{what}: relative error {rel:.3e} (rtol {RTOL[dtype]:.0e}), abs {abs_err:.3e} (floor {floor:.1e})")
    assert rel <= RTOL[dtype] or abs_err <= floor, (
        f"{what}: relative error {rel:.3e} > {RTOL[dtype]:.0e} for {dtype} "
        f"(absolute {abs_err:.3e} > floor {floor:.1e}, cancellation-aware: {magnitude is not None})"
    )


def check_experts_output(out, experts, x, idx, w, dtype, what=""):
    """Output of an experts backend vs the reference, with the cancellation-aware floor."""
    assert_close_to_reference(out, reference_experts_forward(experts, x, idx, w), dtype, what,
                              magnitude=term_magnitude(experts, x, idx, w))


# ----------------------------------------------------------------------------- generated cases

HIDDEN_LAYOUTS = ("contiguous", "transposed", "strided_rows", "strided_cols", "expanded")


def make_experts(config: MoEConfig, seed: int) -> Experts:
    """An Experts module whose weights come from `seed` (not the global RNG)."""
    experts = Experts(config, "eager")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        E, H, I = config.num_experts, config.hidden_size, config.intermediate_size
        experts.gate_up_proj.copy_(torch.randn(E, 2 * I, H, generator=g, dtype=torch.float64) * H**-0.5)
        experts.down_proj.copy_(torch.randn(E, H, I, generator=g, dtype=torch.float64) * I**-0.5)
    return experts


def make_hidden(T: int, H: int, dtype: torch.dtype, layout: str, seed: int) -> torch.Tensor:
    """[T, H] hidden states of `dtype` in one of several memory layouts (same values semantics)."""
    g = torch.Generator().manual_seed(seed + 1)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    if layout == "contiguous":
        x = randn(T, H)
    elif layout == "transposed":  # column-major view
        x = randn(H, T).t()
    elif layout == "strided_rows":  # every other row of a taller tensor
        x = randn(2 * T, H)[::2]
    elif layout == "strided_cols":  # every other column of a wider tensor
        x = randn(T, 2 * H)[:, ::2]
    elif layout == "expanded":  # one token repeated T times, row stride 0
        x = randn(1, H).expand(T, H)
    else:
        raise AssertionError(layout)
    assert x.shape == (T, H)
    return x


@st.composite
def layer_shapes(draw, max_tokens: int = 40):
    E = draw(st.integers(1, 16))
    return dict(
        T=draw(st.integers(0, max_tokens)),
        H=draw(st.integers(1, 48)),
        I=draw(st.integers(1, 48)),
        E=E,
        k=draw(st.integers(1, E)),
        dtype=draw(st.sampled_from(DTYPES)),
        activation=draw(st.sampled_from(sorted(moe_lab.ACTIVATIONS))),
    )


@st.composite
def experts_cases(draw):
    case = draw(layer_shapes())
    case.update(
        distribution=draw(st.sampled_from(["uniform", "zipf", "single"])),
        skew=draw(st.sampled_from([0.5, 1.0, 2.0, 4.0])),
        seed=draw(st.integers(0, 2**16)),
        shuffle_tokens=draw(st.booleans()),
        shuffle_slots=draw(st.booleans()),
        hidden_layout=draw(st.sampled_from(HIDDEN_LAYOUTS)),
        routing_noncontiguous=draw(st.booleans()),
        index_dtype=draw(st.sampled_from([torch.int64, torch.int32])),
        weights_dtype=draw(st.sampled_from(["float32", "float64", "model"])),
        entry=draw(st.sampled_from(["experts_forward", "Experts.forward", "raw"])),
        # Inference (no grad mode) and training take different paths in some backends (triton: the decode
        # kernels only without a gradient, since the module's weights require grad), so both are drawn.
        inference=draw(st.booleans()),
    )
    return case


def build(case: dict):
    """(experts, hidden_states, top_k_index, top_k_weights) for a case dict."""
    T, H, I, E, k, dtype = (case[n] for n in ("T", "H", "I", "E", "k", "dtype"))
    config = MoEConfig(H, I, E, k, activation=case.get("activation", "silu"), dtype=dtype)
    experts = make_experts(config, case["seed"])
    x = make_hidden(T, H, dtype, case.get("hidden_layout", "contiguous"), case["seed"])
    idx, w = synthetic_routing(T, E, k, distribution=case.get("distribution", "uniform"),
                               skew=case.get("skew", 1.0), seed=case["seed"])
    g = torch.Generator().manual_seed(case["seed"] + 2)
    if case.get("shuffle_tokens"):  # tokens no longer in any expert order ("single" is sorted otherwise)
        perm = torch.randperm(T, generator=g)
        idx, w = idx[perm], w[perm]
    if case.get("shuffle_slots"):  # a token's experts in random (not best-first) order
        slots = torch.randperm(k, generator=g)
        idx, w = idx[:, slots], w[:, slots]
    weights_dtype = case.get("weights_dtype", "float32")
    w = w.to(dtype if weights_dtype == "model" else getattr(torch, weights_dtype))
    idx = idx.to(case.get("index_dtype", torch.int64))
    if case.get("routing_noncontiguous"):  # column-major copies of the routing tensors
        idx, w = idx.t().contiguous().t(), w.t().contiguous().t()
    return experts, x, idx, w


def call(entry: str, backend: str, experts, x, idx, w):
    if entry == "experts_forward":
        return moe_lab.experts_forward(backend, experts, x, idx, w)
    if entry == "Experts.forward":
        experts.set_experts_implementation(backend)
        return experts(x, idx, w)
    if entry == "raw":
        return moe_lab.get_backend(backend)(experts, x, idx, w)
    raise AssertionError(entry)


def _edge(**kw):
    base = dict(T=5, H=7, I=3, E=4, k=2, dtype=torch.float32, activation="silu", distribution="uniform",
                skew=1.0, seed=0, shuffle_tokens=False, shuffle_slots=False, hidden_layout="contiguous",
                routing_noncontiguous=False, index_dtype=torch.int64, weights_dtype="float32",
                entry="experts_forward", inference=False)
    return base | kw


# ----------------------------------------------------------------------------- valid inputs


@pytest.mark.parametrize("backend", BACKENDS)
@examples(100)
@given(case=experts_cases())
@example(case=_edge(T=0))  # no tokens at all
@example(case=_edge(T=1))  # one token, training: the sorted path
@example(case=_edge(T=1, inference=True))  # decode: one token without a gradient
@example(case=_edge(T=2, E=16, k=2, H=13, I=11, dtype=torch.bfloat16, inference=True))  # decode, unaligned rows
@example(case=_edge(T=1, E=1, k=1, H=1, I=1))  # the smallest layer
@example(case=_edge(T=6, E=1, k=1, dtype=torch.bfloat16))  # a single expert gets everything
@example(case=_edge(T=9, E=5, k=5, shuffle_slots=True))  # top_k == num_experts
@example(case=_edge(T=0, E=16, k=16, dtype=torch.float16, hidden_layout="transposed"))
@example(case=_edge(T=40, E=16, k=3, distribution="single", shuffle_tokens=True))  # 13 idle experts
@example(case=_edge(T=8, H=13, I=11, dtype=torch.bfloat16, hidden_layout="strided_cols"))  # unaligned rows
@example(case=_edge(T=8, H=32, I=16, dtype=torch.float16, hidden_layout="expanded"))  # torch grouped_mm fp16
@example(case=_edge(T=7, dtype=torch.float64, index_dtype=torch.int32, routing_noncontiguous=True))
def test_backend_matches_reference(backend, case):
    experts, x, idx, w = build(case)
    empty = int((moe_lab.tokens_per_expert(idx, case["E"]) == 0).sum())
    event(f"experts with zero tokens: {'none' if empty == 0 else 'some' if empty < case['E'] else 'all'}")
    event(f"dtype {case['dtype']}")
    inputs_before = [t.clone() for t in (x, idx, w)]
    params_before = [p.detach().clone() for p in experts.parameters()]

    with torch.set_grad_enabled(not case["inference"]):
        out = call(case["entry"], backend, experts, x, idx, w)

    check_experts_output(out, experts, x, idx, w, case["dtype"], f"{backend} via {case['entry']}")
    # A forward pass reads its inputs; it never writes to them.
    for before, after in zip(inputs_before, (x, idx, w)):
        assert torch.equal(before, after)
    for before, after in zip(params_before, experts.parameters()):
        assert torch.equal(before, after)


@pytest.mark.parametrize("backend", BACKENDS)
@examples(40)
@given(case=experts_cases(), top_k=st.integers(1, 4), duplicates=st.booleans())
def test_hand_made_routing_matches_reference(backend, case, top_k, duplicates):
    """Routing not produced by a router: arbitrary ids (repeats within a token allowed) and
    arbitrary (unnormalised, even negative) weights — the experts computation is still linear in them."""
    E = case["E"]
    top_k = min(top_k, E)
    experts, x, _, _ = build(case)
    g = torch.Generator().manual_seed(case["seed"] + 3)
    T = x.shape[0]
    if duplicates:
        idx = torch.randint(0, E, (T, top_k), generator=g)
    else:
        idx = torch.stack([torch.randperm(E, generator=g)[:top_k] for _ in range(T)]) if T else \
            torch.empty(0, top_k, dtype=torch.int64)
    w = torch.randn(T, top_k, generator=g)
    out = moe_lab.experts_forward(backend, experts, x, idx, w)
    check_experts_output(out, experts, x, idx, w, case["dtype"], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@examples(40)
@given(
    shapes=layer_shapes(max_tokens=12),
    batch=st.integers(0, 3),
    input_layout=st.sampled_from(["flat", "3d", "3d_transposed", "3d_strided"]),
    shared=st.sampled_from([0, 0, 5, 16]),
    router_score=st.sampled_from(["softmax", "sigmoid"]),
    norm_topk_prob=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(shapes=dict(T=0, H=8, I=4, E=4, k=2, dtype=torch.float32, activation="silu"), batch=2,
         input_layout="3d", shared=0, router_score="softmax", norm_topk_prob=True, seed=0)
@example(shapes=dict(T=1, H=5, I=3, E=1, k=1, dtype=torch.bfloat16, activation="silu"), batch=1,
         input_layout="3d_transposed", shared=5, router_score="sigmoid", norm_topk_prob=False, seed=1)
# Found by the thorough profile: five bf16 expert outputs of size ~1 cancel to -0.026 (see ATOL).
@example(shapes=dict(T=1, H=1, I=7, E=7, k=5, dtype=torch.bfloat16, activation="gelu"), batch=0,
         input_layout="flat", shared=0, router_score="sigmoid", norm_topk_prob=False, seed=7268)
def test_sparse_moe_block_matches_reference(backend, shapes, batch, input_layout, shared, router_score,
                                            norm_topk_prob, seed):
    """SparseMoeBlock = router + experts (+ gated shared expert), for [T, H] and [B, S, H] inputs."""
    H, dtype = shapes["H"], shapes["dtype"]
    config = MoEConfig(H, shapes["I"], shapes["E"], shapes["k"], activation=shapes["activation"],
                       router_score=router_score, norm_topk_prob=norm_topk_prob,
                       shared_expert_intermediate_size=shared, dtype=dtype)
    with torch.random.fork_rng(devices=[]):  # parameter init uses the global RNG; leave it as found
        torch.manual_seed(seed)
        block = SparseMoeBlock(config, experts_implementation=backend)
    g = torch.Generator().manual_seed(seed)
    S = shapes["T"]

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    if input_layout == "flat":
        x = randn(S, H)
    elif input_layout == "3d":
        x = randn(batch, S, H)
    elif input_layout == "3d_transposed":  # [S, B, H] memory seen as [B, S, H]
        x = randn(S, batch, H).transpose(0, 1)
    else:  # every other position of a longer sequence
        x = randn(batch, 2 * S, H)[:, ::2]

    out, routing = block(x, return_router_output=True)

    assert out.shape == x.shape and out.dtype == dtype
    flat = x.reshape(-1, H)
    T, k, E = flat.shape[0], config.top_k, config.num_experts
    idx, w = routing.top_k_index, routing.top_k_weights
    assert idx.shape == (T, k) and w.shape == (T, k)
    if T:
        assert int(idx.min()) >= 0 and int(idx.max()) < E
        assert (idx.sort(dim=1).values.diff(dim=1) != 0).all(), "a token picked the same expert twice"
        if norm_topk_prob:
            torch.testing.assert_close(w.double().sum(-1), torch.ones(T, dtype=torch.float64),
                                       rtol=0, atol=1e-5)
    ref = reference_experts_forward(block.experts, flat, idx, w)
    magnitude = term_magnitude(block.experts, flat, idx, w)
    if shared:  # + sigmoid(x @ g) * down(act(gate(x)) * up(x)), in float64
        x64 = flat.detach().double()
        gate, up = (x64 @ block.shared_expert.gate_up.weight.detach().double().T).chunk(2, dim=-1)
        h = config.act_fn(gate) * up
        down = block.shared_expert.down.weight.detach().double()
        shared_gate = torch.sigmoid(x64 @ block.shared_expert_gate.weight.detach().double().T)
        ref = ref + shared_gate * (h @ down.T)
        magnitude = magnitude + shared_gate * (h.abs() @ down.abs().T)
    assert_close_to_reference(out.reshape(-1, H), ref, dtype, f"SparseMoeBlock[{backend}] {input_layout}",
                              magnitude=magnitude)


# ----------------------------------------------------------------------------- batched_mm budget


@examples(40)
@given(shapes=layer_shapes(max_tokens=16), fraction=st.floats(0.0, 2.0), seed=st.integers(0, 2**16))
@example(shapes=dict(T=0, H=8, I=4, E=2, k=1, dtype=torch.float32, activation="silu"), fraction=0.0, seed=0)
def test_batched_mm_budget_is_exact(shapes, fraction, seed):
    """batched_mm refuses exactly when the predicted gather exceeds the budget, and says by how much."""
    case = shapes | dict(seed=seed)
    experts, x, idx, w = build(case)
    predicted = moe_lab.predict_gather_bytes(case["T"], case["k"], case["H"], case["I"], case["dtype"])
    assert predicted == case["T"] * case["k"] * 3 * case["H"] * case["I"] * x.element_size()
    budget = int(predicted * fraction)
    budget_before = moe_lab.get_batched_mm_budget()
    with moe_lab.batched_mm_budget(budget):
        assert moe_lab.get_batched_mm_budget() == budget
        if predicted > budget:
            with pytest.raises(GatherBudgetError) as info:
                moe_lab.experts_forward("batched_mm", experts, x, idx, w)
            assert isinstance(info.value, ValueError) and str(info.value)
            assert (info.value.predicted_bytes, info.value.budget_bytes) == (predicted, budget)
        else:
            out = moe_lab.experts_forward("batched_mm", experts, x, idx, w)
            check_experts_output(out, experts, x, idx, w, case["dtype"], "batched_mm under budget")
    assert moe_lab.get_batched_mm_budget() == budget_before  # the context manager restores it


# ----------------------------------------------------------------------------- invalid inputs

INVALID_KINDS = (
    "top_k_gt_num_experts", "wrong_hidden_size", "dtype_mismatch", "expert_id_too_large",
    "expert_id_negative", "hidden_1d", "hidden_3d", "index_rows", "weights_shape", "index_1d",
    "index_float", "weights_integer",
)
# What the message must talk about (loosely), so the error is actionable, not just raised.
MESSAGE_HINT = {
    "top_k_gt_num_experts": "top_k", "wrong_hidden_size": "hidden", "dtype_mismatch": "dtype",
    "expert_id_too_large": "expert ids", "expert_id_negative": "expert ids", "hidden_1d": "2-D",
    "hidden_3d": "2-D", "index_rows": "top_k_index", "weights_shape": "top_k_weights",
    "index_1d": "top_k_index", "index_float": "integer", "weights_integer": "floating",
}


def corrupt(kind: str, experts, x, idx, w, data):
    """Return (x, idx, w) made invalid in one way."""
    T, H = x.shape
    E, k = experts.num_experts, idx.shape[1]
    if kind == "top_k_gt_num_experts":  # hand-made: more slots than there are experts
        wide = E + data.draw(st.integers(1, 3), label="extra slots")
        return x, torch.randint(0, E, (T, wide)), torch.rand(T, wide)
    if kind == "wrong_hidden_size":
        other = data.draw(st.integers(0, H + 8).filter(lambda h: h != H), label="wrong H")
        return torch.randn(T, other).to(x.dtype), idx, w
    if kind == "dtype_mismatch":
        other = data.draw(st.sampled_from([d for d in DTYPES if d != x.dtype]), label="wrong dtype")
        return x.to(other), idx, w
    if kind in ("expert_id_too_large", "expert_id_negative"):
        bad = idx.clone()
        pos = data.draw(st.integers(0, bad.numel() - 1), label="bad position")
        off = data.draw(st.integers(0, 100), label="offset")
        bad[pos // k, pos % k] = E + off if kind == "expert_id_too_large" else -1 - off
        return x, bad, w
    if kind == "hidden_1d":
        return (x[0] if T else x.reshape(-1)), idx, w
    if kind == "hidden_3d":
        return x.unsqueeze(0), idx, w
    if kind == "index_rows":
        rows = data.draw(st.integers(0, T + 3).filter(lambda r: r != T), label="index rows")
        return x, torch.zeros(rows, k, dtype=torch.int64), torch.ones(rows, k)
    if kind == "weights_shape":
        shape = data.draw(st.sampled_from([(T, k + 1), (T + 1, k), (T,)] + ([(T, k - 1)] if k > 1 else [])),
                          label="weights shape")
        return x, idx, torch.ones(shape)
    if kind == "index_1d":
        return x, idx[:, 0], w[:, 0]
    if kind == "index_float":
        return x, idx.to(data.draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))), w
    if kind == "weights_integer":
        return x, idx, w.to(data.draw(st.sampled_from([torch.int64, torch.int32, torch.bool])))
    raise AssertionError(kind)


@pytest.mark.parametrize("backend", BACKENDS)
@examples(60)
@given(case=experts_cases(), kind=st.sampled_from(INVALID_KINDS), data=st.data())
def test_invalid_inputs_raise_backend_input_error(backend, case, kind, data):
    if kind.startswith("expert_id") and case["T"] == 0:
        case = case | dict(T=1)  # an id can only be out of range if there is one
    experts, x, idx, w = build(case)
    x, idx, w = corrupt(kind, experts, x, idx, w, data)
    entry = "Experts.forward" if case["entry"] == "Experts.forward" else "experts_forward"
    try:
        call(entry, backend, experts, x, idx, w)
    except ValueError as error:  # the contract: bad input is a ValueError ...
        assert isinstance(error, BackendInputError), f"{kind}: {type(error).__name__}: {error}"
        message = str(error)
        assert message.strip(), f"{kind}: empty message"
        assert MESSAGE_HINT[kind].lower() in message.lower(), f"{kind}: unhelpful message {message!r}"
    else:
        pytest.fail(f"{kind} was accepted by {backend} via {entry}")
    # ... and anything else (IndexError, RuntimeError, AttributeError) propagates and fails the test.


@examples(30)
@given(case=experts_cases(), data=st.data())
def test_any_input_matches_reference_or_raises_value_error(case, data):
    """The combined contract over valid and invalid inputs: the right answer, or a ValueError."""
    backend = data.draw(st.sampled_from(BACKENDS), label="backend")
    kind = data.draw(st.sampled_from((None,) + INVALID_KINDS), label="corruption")
    if kind and kind.startswith("expert_id") and case["T"] == 0:
        kind = None
    experts, x, idx, w = build(case)
    if kind:
        x, idx, w = corrupt(kind, experts, x, idx, w, data)
    try:
        out = moe_lab.experts_forward(backend, experts, x, idx, w)
    except ValueError as error:
        assert str(error).strip()
        assert kind is not None, f"valid input rejected: {error}"
        return
    assert kind is None, f"{kind} accepted"
    check_experts_output(out, experts, x, idx, w, case["dtype"], backend)


def test_unknown_backend_is_a_value_error():
    experts = make_experts(MoEConfig(8, 4, 2, 1), 0)
    x, (idx, w) = torch.randn(3, 8), synthetic_routing(3, 2, 1)
    with pytest.raises(moe_lab.UnknownBackendError, match="eager"):
        moe_lab.experts_forward("no-such-backend", experts, x, idx, w)
    assert issubclass(moe_lab.UnknownBackendError, ValueError)


# ----------------------------------------------------------------------------- regressions
# Each of these found a core bug once (small integer index dtypes, a dtype mismatch in
# SparseMoeBlock, a list as routing tensor); they now pin the fixed behaviour.


@pytest.mark.parametrize("index_dtype", [torch.uint8, torch.int8, torch.int16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_small_integer_index_dtypes(backend, index_dtype, request):
    """check_inputs accepts every integer dtype for top_k_index, so every backend must then compute
    the right thing (or check_inputs must reject the dtype with a ValueError)."""
    experts = make_experts(MoEConfig(8, 4, 4, 2), 0)
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(0))
    idx = torch.tensor([[3, 1], [2, 3]])  # T*k == E == 4 and no zero id: the uint8 silent case
    w = torch.full((2, 2), 0.5)
    try:
        out = moe_lab.experts_forward(backend, experts, x, idx.to(index_dtype), w)
    except ValueError as error:
        assert str(error).strip()
        return
    check_experts_output(out, experts, x, idx, w, torch.float32, backend)


def test_sparse_moe_block_dtype_mismatch_is_a_value_error():
    block = SparseMoeBlock(MoEConfig(8, 4, 4, 2, dtype=torch.bfloat16))
    try:
        block(torch.randn(3, 8))  # float32 into a bfloat16 block
    except ValueError as error:
        assert str(error).strip()
    except Exception as error:  # noqa: BLE001 - the point of the test
        raise AssertionError(f"{type(error).__name__} instead of a ValueError: {error}") from error
    else:
        pytest.fail("a float32 input to a bfloat16 block was accepted")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_tensor_routing_is_a_value_error(backend):
    experts = make_experts(MoEConfig(8, 4, 4, 2), 0)
    x, (idx, w) = torch.randn(3, 8), synthetic_routing(3, 4, 2)
    try:
        moe_lab.experts_forward(backend, experts, x, idx.tolist(), w)
    except ValueError as error:
        assert str(error).strip()
    except Exception as error:  # noqa: BLE001
        raise AssertionError(f"{type(error).__name__} instead of a ValueError: {error}") from error
    else:
        pytest.fail("a list top_k_index was accepted")
