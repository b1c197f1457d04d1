"""Predicted peak memory of one forward + backward (`bench --backward`), from the shapes alone.

The forward-only replays of `memory_model` extended to a training step, for the two paths the
issue's memory goal compares: moe_lab's `triton` (its custom ops and the launch plan's choices)
and transformers' `grouped_mm` (torch's autograd through its ops). Each is a list of
allocations and frees in the order the code makes them: what autograd saves stays alive until
the node that saved it has run its backward; a custom op's backward keeps its saved tensors
until it returns. The quantity is the one `measure_peak_memory` measures for `bench --backward`:
bytes allocated from the call's start (weights, inputs and the upstream gradient excluded) —
the forward's output and the four returned gradients (dX, d top_k_weights, both weight
gradients) included. Sort scratch and library workspaces are not modelled (tens of KiB at the
recorded points). Checked against the H200 recording in tests/test_training_memory_model.py: within
1 MiB at all 21 points for both. One order there was read from the recording, not from source: in
the backward of transformers' routing-weight multiply, the float32 product for y's gradient is still
alive beside its bf16 cast while the weights' gradient product is formed (the only order that
matches the large-S points, where that node is transformers' peak).

Symbols: T tokens, k top_k, S = T*k pairs, H hidden, I intermediate, E experts, b the model
dtype's itemsize, routing weights in float32 (as the bench's router gives them), W the three
weight gradients E*3*H*I*b.
"""
from __future__ import annotations

import math

import torch

from ..backends.triton_plan import LaunchPlan, launch_plan

MODELLED_TRAINING_BACKENDS = ("triton", "transformers:grouped_mm")

#: The triton backward's memory levers, each on in the current code (docs/performance_notes.md,
#: training section): the kept pre-activation freed once d_pre exists instead of when the backward
#: returns, and the split down_backward's [S, I] buffer in the model dtype instead of float32.
TRITON_LEVERS = ("release_pre_activation", "split_buffer_in_model_dtype")


class _NamedTimeline:
    """Allocations by name; remembers the names and sizes alive at the high-water mark."""

    def __init__(self):
        self.alive: dict[str, int] = {}
        self.peak = 0
        self.at_peak: dict[str, int] = {}

    def new(self, name: str, nbytes: float) -> None:
        assert name not in self.alive, name
        self.alive[name] = int(nbytes)
        total = sum(self.alive.values())
        if total > self.peak:
            self.peak, self.at_peak = total, dict(self.alive)

    def temp(self, name: str, nbytes: float) -> None:
        self.new(name, nbytes)
        self.drop(name)

    def drop(self, *names: str) -> None:
        for name in names:
            self.alive.pop(name, None)


def _triton(t: _NamedTimeline, T, k, H, I, E, b, plan: LaunchPlan, levers) -> None:
    """moe_lab/backends/triton_autograd.py: experts_op and its backward (a fused activation)."""
    S = T * k
    t.new("sorted_pair", S * 4)
    t.new("counts", E * 4)
    # forward: gate_up (+ the pre-activation kept), down, the k-row sum
    t.new("h", S * I * b)
    if plan.save_pre_activation:
        t.new("pre", S * 2 * I * b)
    t.new("y", S * H * b)
    t.new("out", T * H * b)
    t.drop("h", "y")
    # backward
    if not plan.save_pre_activation:
        t.new("pre", S * 2 * I * b)  # the gate_up GEMM again
    if plan.sorted_grad_out:
        t.new("grad_out_sorted", S * H * b)
    if plan.split_down_backward:
        buffer_itemsize = b if "split_buffer_in_model_dtype" in levers else 4
        t.new("split_buffer", S * I * buffer_itemsize)
        t.new("d_pre", S * 2 * I * b)
        t.new("weighted_h", S * I * b)
        t.new("dw", S * 4)
        t.drop("split_buffer")
    else:
        t.new("d_pre", S * 2 * I * b)
        t.new("weighted_h", S * I * b)
        t.new("dw_partial", S * math.ceil(I / plan.down_backward.block_n) * 4)
        t.new("dw", S * 4)
        t.drop("dw_partial")
    if "release_pre_activation" in levers or not plan.save_pre_activation:
        t.drop("pre")
    t.new("d_down_proj", E * H * I * b)
    t.drop("grad_out_sorted", "weighted_h")
    t.new("dx_by_pair", S * H * b)
    t.new("dx", T * H * b)
    t.drop("dx_by_pair")
    if plan.sorted_hidden_states:
        t.new("x_sorted", S * H * b)
    t.new("d_gate_up_proj", E * 2 * I * H * b)
    t.drop("x_sorted")
    t.new("d_top_k_weights", S * 4)
    t.drop("dw", "d_pre", "pre")  # the backward returns: its saved and local tensors go


def _transformers_grouped_mm(t: _NamedTimeline, T, k, H, I, E, b) -> None:
    """transformers.integrations.moe.grouped_mm_experts_forward (gated, no bias) under autograd."""
    S, p = T * k, max(b, 4)  # p: bf16 rows times float32 routing weights promote to float32
    # forward; "saved" = kept by an autograd node for its backward
    t.new("expert_ids_sorted", S * 8)
    t.new("perm", S * 8)  # saved (top_k_weights[perm])
    t.new("token_of_pair", S * 8)  # perm // k, saved (hidden_states[...])
    t.new("x_sorted", S * H * b)  # saved by the gate_up grouped_mm
    t.new("w_sorted", S * 4)  # saved by the routing-weight mul
    t.temp("histc_input", S * 4)
    t.new("offsets", E * 4)
    t.new("proj", S * 2 * I * b)  # saved: its gate half by silu, its up half by the mul
    t.new("act", S * I * b)  # saved by the mul
    t.new("h", S * I * b)  # saved by the down grouped_mm
    t.new("y", S * H * b)  # saved by the routing-weight mul
    t.new("weighted", S * H * p)
    t.new("inv_perm", S * 8)  # saved (weighted[inv_perm])
    t.temp("arange", S * 8)
    t.new("weighted_unsorted", S * H * p)
    t.drop("weighted")
    t.new("summed", T * H * p)
    t.drop("weighted_unsorted")
    t.new("out", T * H * b)  # .to(dtype)
    t.drop("summed", "expert_ids_sorted")
    # backward, node by node from the last
    t.new("g_summed", T * H * p)  # ToCopy
    t.new("g_weighted_unsorted", S * H * p)  # sum's expand, then view's reshape: a copy
    t.drop("g_summed")
    t.new("g_weighted", S * H * p)  # index: zeros + index_put
    t.drop("g_weighted_unsorted", "inv_perm")
    t.new("g_y_float", S * H * p)  # mul: grad * w in float32,
    t.new("g_y", S * H * b)  # cast to y's dtype (the float32 product still referenced)
    t.temp("g_w_product", S * H * p)  # mul: grad * y, summed over H
    t.new("g_w_sorted", S * 4)
    t.drop("g_y_float", "y", "g_weighted")
    t.new("g_h", S * I * b)  # down grouped_mm
    t.new("d_down_proj", E * H * I * b)
    t.drop("h", "g_y")
    t.new("g_act", S * I * b)  # act * up
    t.new("g_up", S * I * b)
    t.drop("act", "g_h")
    t.new("g_gate", S * I * b)  # silu; the pre-activation's last saver has run
    t.drop("proj", "g_act")
    t.new("g_proj", S * 2 * I * b)  # chunk: cat of the halves' gradients
    t.drop("g_gate", "g_up")
    t.new("g_x_sorted", S * H * b)  # gate_up grouped_mm
    t.new("d_gate_up_proj", E * 2 * I * H * b)
    t.drop("x_sorted", "g_proj", "offsets")
    t.new("dx", T * H * b)  # index: zeros + index_put
    t.drop("token_of_pair", "g_x_sorted")
    t.new("d_top_k_weights", S * 4)  # top_k_weights[perm]: zeros + index_put
    t.drop("perm", "w_sorted", "g_w_sorted")


def predict_training_memory(config, num_tokens: int, backend: str, dtype=None, *, plan: LaunchPlan | None = None,
                            levers=TRITON_LEVERS) -> dict:
    """Predicted peak bytes of one `bench --backward` call of `backend` (one of
    MODELLED_TRAINING_BACKENDS; others give NaN and modelled=False).

    Returns {"total": the peak, "at_peak": {tensor name: bytes alive at the peak}, "modelled"}.
    triton: `plan` defaults to the plan the backend chooses on a GPU for a call that needs
    gradients; `levers` (a subset of TRITON_LEVERS) replays the code with only those levers on,
    so a recording made before a lever can be checked too."""
    dtype = config.dtype if dtype is None else dtype
    T, k = int(num_tokens), config.top_k
    H, I, E = config.hidden_size, config.intermediate_size, config.num_experts
    b = dtype.itemsize
    unknown = set(levers) - set(TRITON_LEVERS)
    if unknown:
        raise ValueError(f"unknown levers {sorted(unknown)}; allowed: {list(TRITON_LEVERS)}")
    timeline = _NamedTimeline()
    if backend == "triton":
        plan = plan or launch_plan(T, k, E, H, I, dtype, interpreted=False, needs_grad=True)
        _triton(timeline, T, k, H, I, E, b, plan, frozenset(levers))
    elif backend == "transformers:grouped_mm":
        _transformers_grouped_mm(timeline, T, k, H, I, E, b)
    else:
        return {"total": math.nan, "at_peak": {}, "modelled": False}
    return {"total": timeline.peak, "at_peak": timeline.at_peak, "modelled": True}


__all__ = ["MODELLED_TRAINING_BACKENDS", "TRITON_LEVERS", "predict_training_memory"]
