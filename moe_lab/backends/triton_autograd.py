"""Autograd for the `triton` backend: its kernels as torch custom ops with backward formulas.

A custom op is opaque to dynamo, so torch.compile(fullgraph=True) traces a training step through
it into one graph (each op's fake gives the shapes) and AOTAutograd takes the backward from
`register_autograd`; the same ops run on CPU through triton's interpreter, where the tests check
them. (`torch.library.triton_op` + `wrap_triton` would show inductor the kernels themselves, but it
would also have to trace the launchers' host-side TMA descriptors, and on CPU it cannot run at all:
nothing here could test it, and the GEMMs are all in our kernels anyway.)

    fused activation (silu, gelu, gelu_tanh, relu):
        sort -> triton_experts: gate_up + act (+ the pre-activation kept), down, the k-row sum -> out
        backward: [gate_up GEMM again if the pre-activation was not kept] -> down_backward
                  -> dX, dW_gate_up (+ bias), dW_down (+ bias), d top_k_weights
    a module's own gate (`_apply_gate`, e.g. gpt-oss's clamped SwiGLU; activation "none"):
        sort -> triton_gate_up_projection -> the gate, in torch -> triton_down_projection -> out
        torch differentiates the gate between the two ops' backward formulas.

Launched from Python on plain tensors, the ops that carry no autograd formula run their Python
bodies directly, and those with one run as a plain torch.autograd.Function with the same body and
formulas: the dispatcher's host time per call (docs/performance_notes.md) buys nothing there.
Whenever a tracer is watching — dynamo, or AOTAutograd tracing a backward formula with fake and
functional tensors (on torch versions where `torch.compiler.is_compiling()` is False by then) — they
go through the op, whose fake gives the shapes: a body would launch kernels on tensors without data.
Only first derivatives are implemented: a double backward raises instead of being silently wrong.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from torch.utils._python_dispatch import _get_current_dispatch_mode

from .common import ExpertWeights, apply_gate
from .triton_backward import (
    launch_down_backward,
    launch_down_backward_split,
    launch_input_grad,
    launch_weight_grad,
    routing_weight_grad,
    sorted_rows,
)
from .triton_launch import (
    launch_decode_down, launch_decode_gate_up, launch_down, launch_gate_up, launch_sum_over_top_k, sort_pairs,
)
from .triton_plan import KernelConfig, LaunchPlan

Tensor = torch.Tensor


def experts_forward_with_grad(experts, weights: ExpertWeights, hidden_states, top_k_index, top_k_weights,
                              activation: str, plan: LaunchPlan) -> Tensor:
    """The sorted forward through the custom ops, so autograd (and torch.compile) see its backward.
    top_k_index / top_k_weights [T, k] must be contiguous (the kernels index them as [S])."""
    num_tokens, top_k = top_k_index.shape
    expert_of_pair, routing_weights = top_k_index.reshape(-1), top_k_weights.reshape(-1)  # [S] in pair order
    plan_ints = plan.as_ints()
    sorted_pair, counts = _call(sort_pairs_op, expert_of_pair, weights.num_experts, plan.sort)
    if activation != "none":
        out, _ = _call_differentiable(experts_op, hidden_states, weights.gate_up, weights.down, weights.gate_up_bias,
                                      weights.down_bias, routing_weights, expert_of_pair, sorted_pair, counts, top_k,
                                      activation, plan_ints)
        return out
    pre = _call_differentiable(gate_up_projection_op, hidden_states, weights.gate_up, weights.gate_up_bias,
                               expert_of_pair, sorted_pair, counts, top_k, plan.gate_up.as_ints(),
                               plan_ints)  # [S, 2I]
    h = apply_gate(experts, pre)  # [S, I]
    return _call_differentiable(down_projection_op, h, weights.down, weights.down_bias, routing_weights,
                                expert_of_pair, sorted_pair, counts, num_tokens, top_k, plan_ints)


def compiled_inference_forward(experts, weights: ExpertWeights, hidden_states, top_k_index, top_k_weights,
                               activation: str, plan: LaunchPlan) -> Tensor:
    """The forward without gradients, for torch.compile: every Triton launch inside a custom op, so dynamo and
    Inductor never trace one (a traced launch broke the cudagraphs backend and Inductor's dynamic-shape and
    max-autotune compiles on the H200: docs/errors.md). The decode path is one op for a fused activation, two
    around the module's own gate; the sorted path is the training ops, nothing saved."""
    top_k = top_k_index.shape[1]
    if plan.decode:
        expert_of_pair, routing_weights = top_k_index.reshape(-1), top_k_weights.reshape(-1)  # [S] in pair order
        if activation != "none":
            return decode_op(hidden_states, weights.gate_up, weights.down, weights.gate_up_bias, weights.down_bias,
                             expert_of_pair, routing_weights, top_k, activation, plan.as_ints())
        pre = decode_gate_up_op(hidden_states, weights.gate_up, weights.gate_up_bias, expert_of_pair, top_k,
                                plan.as_ints())  # [S, 2I]
        h = apply_gate(experts, pre)  # [S, I] by the module's own formula
        return decode_down_op(h, weights.down, weights.down_bias, expert_of_pair, routing_weights, top_k,
                              plan.as_ints())  # [T, H]
    plan = dataclasses.replace(plan, save_pre_activation=False)
    return experts_forward_with_grad(experts, weights, hidden_states, top_k_index, top_k_weights, activation, plan)


def _decode(x: Tensor, gate_up: Tensor, down: Tensor, gate_up_bias: Optional[Tensor], down_bias: Optional[Tensor],
            expert_of_pair: Tensor, routing_weights: Tensor, top_k: int, activation: str, plan: list[int]) -> Tensor:
    """x [T, H] -> [T, H] through the two token-major decode kernels (no sort)."""
    launch = LaunchPlan.from_ints(plan)
    h = launch_decode_gate_up(x, gate_up, gate_up_bias, expert_of_pair, top_k, activation, launch.decode_gate_up)
    return launch_decode_down(h, down, down_bias, expert_of_pair, routing_weights, top_k, launch.decode_down)


decode_op = torch.library.custom_op("moe_lab::triton_decode", _decode, mutates_args=())


@decode_op.register_fake
def _(x, gate_up, down, gate_up_bias, down_bias, expert_of_pair, routing_weights, top_k, activation, plan):
    return x.new_empty(x.shape)


def _decode_gate_up(x: Tensor, gate_up: Tensor, gate_up_bias: Optional[Tensor], expert_of_pair: Tensor, top_k: int,
                    plan: list[int]) -> Tensor:
    """x [T, H] -> pre [S, 2I] in pair order, no activation (the module's own gate follows, in torch)."""
    launch = LaunchPlan.from_ints(plan)
    return launch_decode_gate_up(x, gate_up, gate_up_bias, expert_of_pair, top_k, "none", launch.decode_gate_up)


decode_gate_up_op = torch.library.custom_op("moe_lab::triton_decode_gate_up", _decode_gate_up, mutates_args=())


@decode_gate_up_op.register_fake
def _(x, gate_up, gate_up_bias, expert_of_pair, top_k, plan):
    return x.new_empty(expert_of_pair.shape[0], gate_up.shape[1])


def _decode_down(h: Tensor, down: Tensor, down_bias: Optional[Tensor], expert_of_pair: Tensor,
                 routing_weights: Tensor, top_k: int, plan: list[int]) -> Tensor:
    """h [S, I] in pair order -> [T, H], each token's k rows weighted and summed."""
    launch = LaunchPlan.from_ints(plan)
    return launch_decode_down(h, down, down_bias, expert_of_pair, routing_weights, top_k, launch.decode_down)


decode_down_op = torch.library.custom_op("moe_lab::triton_decode_down", _decode_down, mutates_args=())


@decode_down_op.register_fake
def _(h, down, down_bias, expert_of_pair, routing_weights, top_k, plan):
    return h.new_empty(expert_of_pair.shape[0] // top_k, down.shape[1])


def _call(op, *args):
    """The custom op while anything traces (opaque, with a fake for the shapes), its Python body otherwise."""
    return op(*args) if _tracing(args) else _BODIES[op](*args)


def _call_differentiable(op, *args):
    """An op with a backward formula: the custom op while anything traces; otherwise the same body and
    formulas as a plain torch.autograd.Function, which skips the dispatcher's Python layers around a
    custom op (argument defaults, the aliasing check, the autograd wrapper): host time that a layer
    launched from Python pays before its kernels can start (docs/performance_notes.md)."""
    return op(*args) if _tracing(args) else _EAGER_FUNCTIONS[op].apply(*args)


def _autograd_function(name: str, body, setup_context, backward) -> type:
    """A torch.autograd.Function running `body` forward and `backward` back, with the op's setup_context."""
    def forward(ctx, *inputs):
        output = body(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                   "backward": staticmethod(backward)})


_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def _tracing(args) -> bool:
    """Whether these arguments are being traced rather than computed: dynamo (is_compiling), a
    dispatch mode such as make_fx's proxy or fake mode, or tensors that are not plain ones (the
    fake and functional tensors AOTAutograd hands a backward formula while it traces it)."""
    if torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None:
        return True
    return any(isinstance(arg, torch.Tensor) and type(arg) not in _PLAIN_TENSORS for arg in args)


def _refuse_double_backward():
    if torch.is_grad_enabled():
        raise NotImplementedError("the triton backend's backward is not itself differentiable (create_graph=True): "
                                  "use the grouped_mm or eager backend for higher-order gradients")


# ---------------------------------------------------------------------------------------------
# The sort: no gradient, an op so that dynamo does not trace the kernel's launch
# ---------------------------------------------------------------------------------------------

def _sort_pairs(expert_of_pair: Tensor, num_experts: int, method: str) -> tuple[Tensor, Tensor]:
    return sort_pairs(expert_of_pair, num_experts, method=method)  # int32 both, whichever the method


sort_pairs_op = torch.library.custom_op("moe_lab::triton_sort_pairs", _sort_pairs, mutates_args=())


@sort_pairs_op.register_fake
def _(expert_of_pair, num_experts, method):
    return (expert_of_pair.new_empty(expert_of_pair.shape[0], dtype=torch.int32),
            expert_of_pair.new_empty(num_experts, dtype=torch.int32))


# ---------------------------------------------------------------------------------------------
# Fused activation: the whole layer in one op
# ---------------------------------------------------------------------------------------------

def _experts(x: Tensor, gate_up: Tensor, down: Tensor, gate_up_bias: Optional[Tensor], down_bias: Optional[Tensor],
             routing_weights: Tensor, expert_of_pair: Tensor, sorted_pair: Tensor, counts: Tensor, top_k: int,
             activation: str, plan: list[int]) -> tuple[Tensor, Tensor]:
    """-> (out [T, H], the pre-activation [S, 2I] kept for the backward, or [0, 2I] when it is recomputed)."""
    launch = LaunchPlan.from_ints(plan)
    if launch.save_pre_activation:
        h, pre = launch_gate_up(x, gate_up, gate_up_bias, sorted_pair, counts, top_k, activation, launch.gate_up,
                                save_pre=True)  # [S, I], [S, 2I]
    else:
        h = launch_gate_up(x, gate_up, gate_up_bias, sorted_pair, counts, top_k, activation, launch.gate_up)
        pre = x.new_empty(0, gate_up.shape[1])
    y = launch_down(h, down, down_bias, routing_weights, sorted_pair, counts, launch.down)  # [S, H]
    return launch_sum_over_top_k(y, expert_of_pair, x.shape[0], top_k, gate_up.shape[0]), pre


experts_op = torch.library.custom_op("moe_lab::triton_experts", _experts, mutates_args=())


@experts_op.register_fake
def _(x, gate_up, down, gate_up_bias, down_bias, routing_weights, expert_of_pair, sorted_pair, counts, top_k,
      activation, plan):
    kept_rows = sorted_pair.shape[0] if LaunchPlan.from_ints(plan).save_pre_activation else 0
    return x.new_empty(x.shape), x.new_empty(kept_rows, gate_up.shape[1])


def _experts_setup_context(ctx, inputs, output):
    x, gate_up, down, gate_up_bias, down_bias, routing_weights, expert_of_pair, sorted_pair, counts = inputs[:9]
    ctx.top_k, ctx.activation, ctx.plan = inputs[9:]
    pre = output[1]
    ctx.mark_non_differentiable(pre)
    ctx.set_materialize_grads(False)  # no zeros for the pre-activation's (never used) gradient
    # Saved tensors live until the backward returns. Unless saved-tensor hooks (offloading,
    # checkpointing) must see it, the pre-activation [S, 2I] rides in a list the backward empties,
    # so it is freed once d_pre exists, before the weight gradients are allocated (the backward's
    # peak). A second backward through a retained graph finds the list empty and recomputes it.
    keep = LaunchPlan.from_ints(ctx.plan).save_pre_activation
    hooked = keep and _saved_tensors_hooks_active()
    ctx.kept_pre_activation = [pre] if keep and not hooked else []
    ctx.save_for_backward(x, gate_up, down, gate_up_bias, down_bias, routing_weights, expert_of_pair, sorted_pair,
                          counts, *([pre] if hooked else []))


def _saved_tensors_hooks_active() -> bool:
    """Whether a `torch.autograd.graph.saved_tensors_hooks` context would see what is saved now
    (torch's own checkpoint asks the same private function; assume yes where it is missing)."""
    top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top_hooks is None or top_hooks(False) is not None


def _experts_backward(ctx, grad_out, _grad_pre):
    if grad_out is None:
        return (None,) * 12
    _refuse_double_backward()
    saved = ctx.saved_tensors
    x, gate_up, down, gate_up_bias, down_bias, routing_weights, expert_of_pair, sorted_pair, counts = saved[:9]
    needs_x, needs_gate_up, needs_down, needs_gate_up_bias, needs_down_bias, needs_routing = ctx.needs_input_grad[:6]
    plan, top_k = LaunchPlan.from_ints(ctx.plan), ctx.top_k
    grad_out = grad_out.contiguous()  # whatever layout the graph hands over: the kernels index rows and TMA tiles
    # [S, 2I]: saved through the hooks, or taken out of the list (then only referenced here), or None
    pre = saved[9] if len(saved) > 9 else ctx.kept_pre_activation.pop() if ctx.kept_pre_activation else None
    if pre is None:  # recompute: the gate_up GEMM again, without the activation
        pre = _call(gate_up_projection_op, x, gate_up, gate_up_bias, expert_of_pair, sorted_pair, counts, top_k,
                    plan.gate_up.as_ints(), ctx.plan)
    # the token of each sorted row [S], once for both gathers into sorted order
    token_of_row = sorted_pair // top_k if plan.sorted_grad_out or plan.sorted_hidden_states else None
    grad_out_sorted = sorted_rows(grad_out, sorted_pair, top_k, token_of_row) if plan.sorted_grad_out else None
    d_pre, weighted_h, dw = _call(down_backward_op, grad_out, down, routing_weights, pre, sorted_pair, counts, top_k,
                                  ctx.activation, plan.down_backward.as_ints(), grad_out_sorted,
                                  plan.split_down_backward)
    del pre
    # dW_down first, so the sorted dout is released before dX and dW_gate_up allocate theirs
    d_down, d_down_bias = _down_grads(grad_out, grad_out_sorted, weighted_h, routing_weights, down, down_bias,
                                      sorted_pair, counts, top_k, plan, needs_down, needs_down_bias)
    del grad_out_sorted, weighted_h
    dx, d_gate_up, d_gate_up_bias = _gate_up_grads(d_pre, x, gate_up, gate_up_bias, expert_of_pair, sorted_pair,
                                                   counts, top_k, plan, needs_x, needs_gate_up, needs_gate_up_bias,
                                                   token_of_row)
    d_routing = (routing_weight_grad(dw, grad_out, down_bias, expert_of_pair, top_k, routing_weights.dtype)
                 if needs_routing else None)
    return (dx, d_gate_up, d_down, d_gate_up_bias, d_down_bias, d_routing) + (None,) * 6


experts_op.register_autograd(_experts_backward, setup_context=_experts_setup_context)


# ---------------------------------------------------------------------------------------------
# A module's own gate: two ops with torch's gate between them
# ---------------------------------------------------------------------------------------------

def _gate_up_projection(x: Tensor, gate_up: Tensor, gate_up_bias: Optional[Tensor], expert_of_pair: Tensor,
                        sorted_pair: Tensor, counts: Tensor, top_k: int, config: list[int], plan: list[int]) -> Tensor:
    """x [T, H] -> pre [S, 2I] = x[token] @ gate_up[e]^T (+ bias), sorted rows, no activation."""
    return launch_gate_up(x, gate_up, gate_up_bias, sorted_pair, counts, top_k, "none", KernelConfig.from_ints(config))


gate_up_projection_op = torch.library.custom_op("moe_lab::triton_gate_up_projection", _gate_up_projection,
                                                mutates_args=())


@gate_up_projection_op.register_fake
def _(x, gate_up, gate_up_bias, expert_of_pair, sorted_pair, counts, top_k, config, plan):
    return x.new_empty(sorted_pair.shape[0], gate_up.shape[1])


def _gate_up_projection_setup_context(ctx, inputs, output):
    x, gate_up, gate_up_bias, expert_of_pair, sorted_pair, counts, ctx.top_k, _, ctx.plan = inputs
    ctx.save_for_backward(x, gate_up, gate_up_bias, expert_of_pair, sorted_pair, counts)


def _gate_up_projection_backward(ctx, d_pre):
    _refuse_double_backward()
    x, gate_up, gate_up_bias, expert_of_pair, sorted_pair, counts = ctx.saved_tensors
    needs_x, needs_gate_up, needs_bias = ctx.needs_input_grad[:3]
    grads = _gate_up_grads(d_pre.contiguous(), x, gate_up, gate_up_bias, expert_of_pair, sorted_pair, counts,
                           ctx.top_k, LaunchPlan.from_ints(ctx.plan), needs_x, needs_gate_up, needs_bias)
    return grads + (None,) * 6


gate_up_projection_op.register_autograd(_gate_up_projection_backward, setup_context=_gate_up_projection_setup_context)


def _down_projection(h: Tensor, down: Tensor, down_bias: Optional[Tensor], routing_weights: Tensor,
                     expert_of_pair: Tensor, sorted_pair: Tensor, counts: Tensor, num_tokens: int, top_k: int,
                     plan: list[int]) -> Tensor:
    """h [S, I] sorted rows -> out [T, H]: down, times the routing weights, each token's k rows summed."""
    y = launch_down(h, down, down_bias, routing_weights, sorted_pair, counts, LaunchPlan.from_ints(plan).down)
    return launch_sum_over_top_k(y, expert_of_pair, num_tokens, top_k, down.shape[0])


down_projection_op = torch.library.custom_op("moe_lab::triton_down_projection", _down_projection, mutates_args=())


@down_projection_op.register_fake
def _(h, down, down_bias, routing_weights, expert_of_pair, sorted_pair, counts, num_tokens, top_k, plan):
    return h.new_empty(num_tokens, down.shape[1])


def _down_projection_setup_context(ctx, inputs, output):
    h, down, down_bias, routing_weights, expert_of_pair, sorted_pair, counts, _, ctx.top_k, ctx.plan = inputs
    ctx.save_for_backward(h, down, down_bias, routing_weights, expert_of_pair, sorted_pair, counts)


def _down_projection_backward(ctx, grad_out):
    _refuse_double_backward()
    h, down, down_bias, routing_weights, expert_of_pair, sorted_pair, counts = ctx.saved_tensors
    needs_h, needs_down, needs_bias, needs_routing = ctx.needs_input_grad[:4]
    plan, top_k = LaunchPlan.from_ints(ctx.plan), ctx.top_k
    grad_out = grad_out.contiguous()
    grad_out_sorted = sorted_rows(grad_out, sorted_pair, top_k) if plan.sorted_grad_out else None  # [S, H]
    dh, weighted_h, dw = _call(down_backward_op, grad_out, down, routing_weights, h, sorted_pair, counts, top_k, "none",
                               plan.down_backward.as_ints(), grad_out_sorted, plan.split_down_backward)
    d_down, d_bias = _down_grads(grad_out, grad_out_sorted, weighted_h, routing_weights, down, down_bias, sorted_pair,
                                 counts, top_k, plan, needs_down, needs_bias)
    d_routing = (routing_weight_grad(dw, grad_out, down_bias, expert_of_pair, top_k, routing_weights.dtype)
                 if needs_routing else None)
    return (dh if needs_h else None, d_down, d_bias, d_routing) + (None,) * 6


down_projection_op.register_autograd(_down_projection_backward, setup_context=_down_projection_setup_context)


# ---------------------------------------------------------------------------------------------
# The backward steps, as ops (no autograd of their own)
# ---------------------------------------------------------------------------------------------

def _down_backward(grad_out: Tensor, down: Tensor, routing_weights: Tensor, saved: Tensor, sorted_pair: Tensor,
                   counts: Tensor, top_k: int, activation: str, config: list[int],
                   grad_out_sorted: Optional[Tensor], split: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> (d_pre, weighted_h, d top_k_weights without the down bias's term); `split` (with
    grad_out_sorted) runs it as the GEMM and the streaming activation backward."""
    config = KernelConfig.from_ints(config)
    if split:
        return launch_down_backward_split(grad_out_sorted, down, routing_weights, saved, sorted_pair, counts, top_k,
                                          activation, config)
    return launch_down_backward(grad_out, down, routing_weights, saved, sorted_pair, counts, top_k, activation,
                                config, grad_out_sorted=grad_out_sorted)


down_backward_op = torch.library.custom_op("moe_lab::triton_down_backward", _down_backward, mutates_args=())


@down_backward_op.register_fake
def _(grad_out, down, routing_weights, saved, sorted_pair, counts, top_k, activation, config, grad_out_sorted, split):
    num_pairs, inter = sorted_pair.shape[0], down.shape[2]
    width = 2 * inter if activation != "none" else inter
    return (grad_out.new_empty(num_pairs, width), grad_out.new_empty(num_pairs, inter),
            grad_out.new_empty(num_pairs, dtype=torch.float32))


def _input_grad(d_pre: Tensor, gate_up: Tensor, expert_of_pair: Tensor, sorted_pair: Tensor, counts: Tensor,
                num_tokens: int, top_k: int, config: list[int]) -> Tensor:
    return launch_input_grad(d_pre, gate_up, expert_of_pair, sorted_pair, counts, num_tokens, top_k,
                             KernelConfig.from_ints(config))


input_grad_op = torch.library.custom_op("moe_lab::triton_input_grad", _input_grad, mutates_args=())


@input_grad_op.register_fake
def _(d_pre, gate_up, expert_of_pair, sorted_pair, counts, num_tokens, top_k, config):
    return d_pre.new_empty(num_tokens, gate_up.shape[2])


def _weight_grad(left: Tensor, right: Tensor, like: Tensor, bias_like: Optional[Tensor], row_scale: Optional[Tensor],
                 sorted_pair: Tensor, counts: Tensor, top_k: int, left_by_token: bool, right_by_token: bool,
                 config: list[int]) -> tuple[Tensor, Tensor]:
    """-> (gradient shaped and strided like `like`, bias gradient like `bias_like` or an empty tensor)."""
    grad, bias_grad = launch_weight_grad(left, right, like, bias_like, row_scale, sorted_pair, counts, top_k,
                                         left_by_token=left_by_token, right_by_token=right_by_token,
                                         config=KernelConfig.from_ints(config))
    return grad, bias_grad if bias_grad is not None else like.new_empty(0)


weight_grad_op = torch.library.custom_op("moe_lab::triton_weight_grad", _weight_grad, mutates_args=())


@weight_grad_op.register_fake
def _(left, right, like, bias_like, row_scale, sorted_pair, counts, top_k, left_by_token, right_by_token, config):
    return torch.empty_like(like), (torch.empty_like(bias_like) if bias_like is not None else like.new_empty(0))


_EAGER_FUNCTIONS = {
    experts_op: _autograd_function("TritonExperts", _experts, _experts_setup_context, _experts_backward),
    gate_up_projection_op: _autograd_function("TritonGateUpProjection", _gate_up_projection,
                                              _gate_up_projection_setup_context, _gate_up_projection_backward),
    down_projection_op: _autograd_function("TritonDownProjection", _down_projection, _down_projection_setup_context,
                                           _down_projection_backward),
}
_BODIES = {sort_pairs_op: _sort_pairs, gate_up_projection_op: _gate_up_projection, down_backward_op: _down_backward,
           input_grad_op: _input_grad, weight_grad_op: _weight_grad}


def _gate_up_grads(d_pre, x, gate_up, gate_up_bias, expert_of_pair, sorted_pair, counts, top_k, plan: LaunchPlan,
                   needs_x, needs_weight, needs_bias, token_of_row=None):
    """d_pre [S, 2I] -> (dX [T, H], dW_gate_up, d gate_up_bias), None where not needed."""
    dx = (_call(input_grad_op, d_pre, gate_up, expert_of_pair, sorted_pair, counts, x.shape[0], top_k,
                plan.gate_up_input_grad.as_ints()) if needs_x else None)
    if not (needs_weight or needs_bias):
        return dx, None, None
    x_rows, by_token = x, True  # [T, H] read at each sorted row's token, or gathered once: [S, H]
    if plan.sorted_hidden_states:
        x_rows, by_token = sorted_rows(x, sorted_pair, top_k, token_of_row), False
    d_weight, d_bias = _call(weight_grad_op, d_pre, x_rows, gate_up, gate_up_bias if needs_bias else None, None,
                             sorted_pair, counts, top_k, False, by_token, plan.gate_up_weight_grad.as_ints())
    return dx, (d_weight if needs_weight else None), (d_bias if needs_bias else None)


def _down_grads(grad_out, grad_out_sorted, weighted_h, routing_weights, down, down_bias, sorted_pair, counts, top_k,
                plan: LaunchPlan, needs_weight, needs_bias):
    """dout [T, H] (or its sorted rows [S, H]), weighted_h [S, I] -> (dW_down, d down_bias), None where not needed."""
    if not (needs_weight or needs_bias):
        return None, None
    by_token = grad_out_sorted is None
    d_weight, d_bias = _call(weight_grad_op, grad_out if by_token else grad_out_sorted, weighted_h, down,
                             down_bias if needs_bias else None, routing_weights if needs_bias else None, sorted_pair,
                             counts, top_k, by_token, False, plan.down_weight_grad.as_ints())
    return (d_weight if needs_weight else None), (d_bias if needs_bias else None)
