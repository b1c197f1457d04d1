"""Where a decode step's time goes: experts, attention, the rest — two ways.

1. Hooks (uncompiled runs only): forward pre/post hooks on every experts module and every attention
   module mark the time (CUDA events, or perf_counter on CPU) around each call during the decode
   steps; their sums over the step times give each part's share. An uncompiled decode step is
   mostly host time (Python launching kernels), so this is the share of wall time, launch cost
   included, which is what an uncompiled step costs.
2. Removal (any execution, CUDA graphs included, where hooks cannot run): the same generate with
   the experts replaced by a function that returns zeros (`NO_EXPERTS`, registered in transformers'
   experts registry for the run only). Router, shared expert, attention and the rest still run; the
   experts' share of a backend's step is 1 - step(no experts) / step(backend).
"""
from __future__ import annotations

import contextlib

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

from ..hf.models import named_experts_modules
from .e2e_generate import elapsed_ms, time_mark

NO_EXPERTS = "no_experts"


def _no_experts_forward(experts, hidden_states, top_k_index, top_k_weights):
    # [T, H] -> zeros [T, H]: the MoE block's routing and shared expert still run around it.
    return torch.zeros_like(hidden_states)


_no_experts_forward.__name__ = "no_experts_forward"


@contextlib.contextmanager
def no_experts_registered():
    """Register `NO_EXPERTS` in transformers' experts registry for the duration (removed afterwards)."""
    mapping = type(ALL_EXPERTS_FUNCTIONS)._global_mapping
    if NO_EXPERTS in mapping and mapping[NO_EXPERTS] is not _no_experts_forward:
        raise ValueError(f"transformers' experts registry already has an entry {NO_EXPERTS!r}")
    type(ALL_EXPERTS_FUNCTIONS).register(NO_EXPERTS, _no_experts_forward)
    try:
        yield NO_EXPERTS
    finally:
        mapping.pop(NO_EXPERTS, None)


def attention_modules(model):
    """(name, module) of the attention block of every decoder layer (`...self_attn`)."""
    return [(name, module) for name, module in model.named_modules() if name.endswith(".self_attn")]


class PartTimer:
    """Hooks that sum the time spent inside the experts and attention modules during decode steps."""

    PARTS = ("experts", "attention")

    def __init__(self, model, device: torch.device):
        self.device = device
        self.active = False
        self.spans: dict[str, list] = {part: [] for part in self.PARTS}
        self._open: dict[int, object] = {}
        self._handles = []
        modules = {"experts": [m for _, m in named_experts_modules(model)],
                   "attention": [m for _, m in attention_modules(model)]}
        for part, found in modules.items():
            for module in found:
                self._handles.append(module.register_forward_pre_hook(self._enter))
                self._handles.append(module.register_forward_hook(self._leave(part)))
        self.counts = {part: len(found) for part, found in modules.items()}

    def _enter(self, module, args):
        if self.active:
            self._open[id(module)] = time_mark(self.device)

    def _leave(self, part):
        def hook(module, args, output):
            start = self._open.pop(id(module), None)
            if self.active and start is not None:
                self.spans[part].append((start, time_mark(self.device)))
        return hook

    def on_step(self, step: int) -> None:
        """StepClock listener: on from the end of the prefill (step 0) on."""
        self.active = True

    def totals_ms(self) -> dict[str, float]:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return {part: sum(elapsed_ms(a, b) for a, b in spans) for part, spans in self.spans.items()}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
