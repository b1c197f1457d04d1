"""No silent detachment: a call that needs gradients runs only a backend that can give them.

`checked_forward` is what `experts_forward` (and so every module and transformers model running a
moe_lab backend) calls. When grad mode is on and any of the hidden states, the routing weights or
the experts' parameters requires grad:
  1. a backend whose spec declares autograd "no" is refused before it runs, with the names of the
     backends that can;
  2. an output that does not require grad is refused (it would train nothing);
  3. a backend whose autograd is not declared (a user's, by default) is checked once: the output's
     autograd graph must reach every input that requires grad. A function made of differentiable
     torch ops passes; one that detaches a weight, goes through numpy or runs a kernel without a
     backward does not, and is refused with the names of the inputs it cut off.
When no gradient is needed, nothing is checked and the forward costs what it always did; an empty
output (no tokens) has nothing to differentiate and is returned as it is.
"""
from __future__ import annotations

import torch

from ..errors import BackendCapabilityError, DetachedOutputError
from . import registry
from .auto import unusable_reason
from .common import needs_grad
from .spec import BackendSpec, Where

_INPUT_NAMES = ("hidden_states", "top_k_weights", "gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")
_verified: dict[tuple, bool] = {}  # (backend forward, inputs requiring grad) -> graph reaches them all


def checked_forward(spec: BackendSpec, experts, hidden_states, top_k_index, top_k_weights, *, entry=None):
    """spec.forward (or `entry`, another of the spec's entries, e.g. its partial_forward) under the rules above."""
    forward = spec.forward if entry is None else entry
    if not needs_grad(experts, hidden_states, top_k_weights):
        return forward(experts, hidden_states, top_k_index, top_k_weights)
    ok, reason, runs = _autograd_support(spec, hidden_states.device, hidden_states.dtype)
    if runs is False:  # it cannot run here at all: let it say why in its own words
        return forward(experts, hidden_states, top_k_index, top_k_weights)
    if ok is False:
        raise BackendCapabilityError(
            f"{_named(spec, forward)} cannot give gradients ({reason}), and this call needs them (grad mode is on and "
            f"{', '.join(_requiring_grad(experts, hidden_states, top_k_weights))} require grad). Backends that can "
            f"here: {_able(hidden_states)}; or run under torch.no_grad() / torch.inference_mode() for inference")
    output = forward(experts, hidden_states, top_k_index, top_k_weights)
    if output.numel() == 0:  # no tokens: nothing to differentiate, whatever the graph looks like
        return output
    if not output.requires_grad:
        raise DetachedOutputError(
            f"{_named(spec, forward)} returned an output that does not require grad although "
            f"{', '.join(_requiring_grad(experts, hidden_states, top_k_weights))} do: training would silently "
            f"leave their .grad empty. Backends that give gradients here: {_able(hidden_states)}")
    if ok is None and not torch.compiler.is_compiling():
        _verify_reaches_inputs(spec, forward, output, experts, hidden_states, top_k_weights)
    return output


def _named(spec: BackendSpec, forward) -> str:
    """'backend NAME', or which of its entries ran when it was not the forward."""
    if forward is spec.forward:
        return f"backend {spec.name!r}"
    return f"backend {spec.name!r} (its entry {getattr(forward, '__name__', repr(forward))})"


def _autograd_support(spec: BackendSpec, device: torch.device, dtype: torch.dtype) -> tuple:
    """(ok, reason) of the backend's autograd capability, and whether it runs here at all."""
    where = Where(device, dtype)
    support = spec.supports("autograd", where)
    return support.ok, support.reason, spec.supports("runs", where).ok


def _able(hidden_states) -> str:
    where = Where(hidden_states.device, hidden_states.dtype)
    names = [name for name in registry.available_backends()
             if registry.get_spec(name).supports("autograd", where).ok is True
             and (registry.get_spec(name).dispatcher or unusable_reason(registry.get_spec(name), where) is None)]
    return ", ".join(names) if names else "none registered"


def _inputs(experts, hidden_states, top_k_weights) -> dict:
    values = {"hidden_states": hidden_states, "top_k_weights": top_k_weights}
    for name in _INPUT_NAMES[2:]:
        value = getattr(experts, name, None)
        if isinstance(value, torch.Tensor):
            values[name] = value
    return values


def _requiring_grad(experts, hidden_states, top_k_weights) -> list[str]:
    return [name for name, value in _inputs(experts, hidden_states, top_k_weights).items() if value.requires_grad]


def _verify_reaches_inputs(spec, forward, output, experts, hidden_states, top_k_weights) -> None:
    targets = {name: value for name, value in _inputs(experts, hidden_states, top_k_weights).items()
               if value.requires_grad}
    key = (forward, tuple(targets))
    if _verified.get(key):
        return
    reached = _reached(output, targets.values())
    missing = [name for name, value in targets.items() if not any(value is r for r in reached)]
    if missing:
        raise DetachedOutputError(
            f"{_named(spec, forward)} declares no autograd support and its output's autograd graph does not reach "
            f"{', '.join(missing)}: their gradients would silently stay empty. Make it out of differentiable torch "
            f"ops (no .detach(), .data, numpy or kernels without a backward), or register it with autograd=False so "
            f"it is refused up front. Backends that give gradients here: {_able(hidden_states)}")
    _verified[key] = True


def _reached(output: torch.Tensor, inputs) -> list[torch.Tensor]:
    """The tensors among `inputs` that `output`'s autograd graph leads to (a leaf through its
    AccumulateGrad node, a non-leaf through its grad_fn). The walk does not go past an input's
    grad_fn, so the graph of an upstream model is never traversed."""
    inputs = list(inputs)
    by_node = {t.grad_fn: t for t in inputs if t.grad_fn is not None}
    reached, seen, stack = [], set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in by_node:
            reached.append(by_node[node])
            continue
        variable = getattr(node, "variable", None)
        if variable is not None:
            reached.extend(t for t in inputs if t is variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return reached
