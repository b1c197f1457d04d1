"""Self-check for notebook 03: predict the bytes batched_mm gathers for a preset at T tokens."""
from __future__ import annotations

import itertools
import numbers

import torch

from ..backends import predict_gather_bytes
from ..config import resolve_dtype
from ..presets import get_preset
from . import feedback

#: The exercise's default question: Qwen3-30B-A3B's layer (bf16) at 64 tokens.
PRESET = "qwen3-30b-a3b"
NUM_TOKENS = 64


def _as_number(answer):
    if isinstance(answer, torch.Tensor) and answer.numel() == 1:
        answer = answer.item()
    if isinstance(answer, bool) or not isinstance(answer, numbers.Real):
        return None
    return answer


def _mistakes(answer, T, k, E, H, I, itemsize, dtype) -> list[str] | None:
    """The list of slips that turn the right formula into `answer`, or None when none does."""
    pairs = {"k": (T * k, None),
             "none": (T, f"you left out top_k: every token gathers the weights of its k={k} experts, so there "
                         f"are T*k = {T}*{k} = {T * k} (token, expert) pairs, not T = {T}"),
             "E": (T * E, f"you multiplied by num_experts={E}; batched_mm gathers one copy per (token, expert) "
                          f"pair a token actually uses: T*top_k = {T * k}, not T*E")}
    matrices = {3: None,
                2: "you counted only gate_up_proj [2I, H]; down_proj [H, I] is gathered too, so each pair costs "
                   "2I*H + H*I = 3*H*I elements (the factor 3 = 2I + I)",
                1: "you counted one [I, H] matrix per pair; gate_up_proj is [2I, H] and down_proj is [H, I]: "
                   "2I + I = 3 times H*I elements per pair (the factor 3)"}
    sizes = {itemsize: None}
    for size in (1, 2, 4, 8):
        if size not in sizes:
            sizes[size] = (f"you counted elements, not bytes: multiply by the dtype size, {dtype} has {itemsize} "
                           "bytes per element" if size == 1 else
                           f"you used {size} bytes per element; {dtype} has {itemsize} "
                           "(torch.empty((), dtype=dtype).element_size())")
    for (pair_count, why_pairs), (factor, why_matrices), (size, why_size) in itertools.product(
            pairs.values(), matrices.items(), sizes.items()):
        if answer == pair_count * factor * H * I * size:
            slips = [why for why in (why_pairs, why_matrices, why_size) if why]
            return slips or None
    return None


def check_gather_bytes(answer, preset: str = PRESET, num_tokens: int = NUM_TOKENS, dtype=None):
    """Is `answer` the number of bytes batched_mm gathers for `preset` (its own dtype unless `dtype`)
    at `num_tokens` tokens? Says which factor is missing or wrong when it is not."""
    config = get_preset(preset).config
    dtype = config.dtype if dtype is None else resolve_dtype(dtype)
    T, k, E = int(num_tokens), config.top_k, config.num_experts
    H, I = config.hidden_size, config.intermediate_size
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = predict_gather_bytes(T, k, H, I, dtype)
    formula = f"T*top_k*3*H*I*bytes = {T}*{k}*3*{H}*{I}*{itemsize}"
    if answer is None:
        return feedback(False, "replace `answer = None` with your prediction, a number of bytes (an int)")
    value = _as_number(answer)
    if value is None:
        return feedback(False, f"the answer should be a number of bytes (an int), got {type(answer).__name__}")
    if value == expected:
        return feedback(True, f"{formula} = {expected:,} bytes ({expected / 2**30:.1f} GiB) for {preset} at T={T}"
                              f" — {expected / (E * 3 * H * I * itemsize):.1f}x the whole layer's expert weights")
    if abs(value - expected / 2**30) < 0.05 * expected / 2**30:
        return feedback(False, f"that looks like GiB ({value}); give the answer in bytes, as predict_gather_bytes does")
    slips = _mistakes(value, T, k, E, H, I, itemsize, str(dtype).removeprefix("torch."))
    if slips:
        return feedback(False, "; and ".join(slips) + ".")
    ratio = value / expected
    return feedback(False, f"off by a factor of {ratio:.3g}. {preset} has T={T}, top_k={k}, H={H}, I={I}, "
                           f"{itemsize}-byte {str(dtype).removeprefix('torch.')}; the bytes are T*top_k*3*H*I*bytes")
