"""Predicted peak memory of one experts forward, from the shapes alone.

Each built-in backend is replayed as a list of allocations and frees that mirrors its source
line by line (moe_lab/backends/*.py), with Python's rebinding rule: `y = f(y)` allocates the
new `y` before the old one is freed. The prediction is the high-water mark of that replay —
the same quantity `measure_peak_memory` measures (bytes allocated during the call, weights and
inputs excluded, output included). Library scratch space (cuBLAS/oneDNN workspaces, the float32
copies CPU kernels make of bfloat16 operands) is not modelled.

Symbols: T tokens, k top_k, S = T*k (token, expert) pairs, H hidden, I intermediate, E experts,
b the itemsize of the dtype, a the itemsize of the accumulation dtype (float32, or float64 for
float64), 8 bytes per int64 index, routing weights in float32 (as moe_lab's router gives them).
"""
from __future__ import annotations

import math

import torch

from ..backends import predict_gather_bytes

CATEGORIES = ("weights_gathered", "activations", "permutation")
MODELLED_BACKENDS = ("eager", "batched_mm", "grouped_mm")


class _Timeline:
    """Allocations by name and category; remembers what was alive at the high-water mark."""

    def __init__(self):
        self.alive: dict[str, tuple[int, str]] = {}
        self.peak = 0
        self.at_peak = dict.fromkeys(CATEGORIES, 0)

    def new(self, name: str, nbytes: int, category: str = "activations") -> None:
        """`name = <new tensor>`: the new buffer exists before an old one of that name is freed."""
        key = name
        while key in self.alive:
            key += "'"
        self.alive[key] = (int(nbytes), category)
        self._check_peak()
        if key != name:
            self.alive[name] = self.alive.pop(key)

    def temp(self, nbytes: int, category: str = "activations") -> None:
        """A temporary that is allocated and freed inside one statement."""
        self.new("~temp", nbytes, category)
        self.drop("~temp")

    def drop(self, *names: str) -> None:
        for name in names:
            self.alive.pop(name, None)

    def _check_peak(self) -> None:
        total = sum(nbytes for nbytes, _ in self.alive.values())
        if total > self.peak:
            self.peak = total
            self.at_peak = dict.fromkeys(CATEGORIES, 0)
            for nbytes, category in self.alive.values():
                self.at_peak[category] += nbytes


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _batched_mm(t: _Timeline, T, k, H, I, E, b, a, groups) -> None:
    S = T * k
    t.new("x", S * H * b)  # hidden repeated k times: [S, H, 1]
    t.new("gathered", S * 2 * I * H * b, "weights_gathered")  # gate_up_proj[expert_of_pair]
    t.new("gate_up", S * 2 * I * b)  # bmm -> [S, 2I]
    t.drop("gathered")
    t.new("act", S * I * b)  # act(gate)
    t.new("h", S * I * b)  # act(gate) * up
    t.drop("act")
    t.new("gathered", S * H * I * b, "weights_gathered")  # down_proj[expert_of_pair]
    t.new("y", S * H * b)  # bmm -> [S, H]
    t.drop("gathered")
    _weight_and_sum(t, T, S, H, b)


def _grouped_mm(t: _Timeline, T, k, H, I, E, b, a, groups) -> None:
    S = T * k
    t.new("expert_of_pair", S * 4, "permutation")  # int32 sort keys
    t.new("expert_sorted", S * 4, "permutation")  # torch.sort values
    t.new("pair_order", S * 8, "permutation")  # torch.sort indices (int64)
    t.temp(S * 8, "permutation")  # sort's scratch
    t.new("token_of_pair", S * 8, "permutation")  # pair_order // top_k (a temporary)
    t.new("x", S * H * b)  # hidden_states[pair_order // top_k]: [S, H]
    t.drop("token_of_pair")
    t.temp(S * 4, "permutation")  # the ids as float32 for a CPU histogram (CUDA's counts the int32 ids)
    t.new("counts", E * 4, "permutation")  # histc
    t.new("offsets", E * 4, "permutation")  # int32 cumsum
    t.drop("counts")
    t.new("gate_up", S * 2 * I * b)  # grouped_mm -> [S, 2I]
    t.new("act", S * I * b)
    t.new("h", S * I * b)
    t.drop("act")
    t.new("y", S * H * b)  # grouped_mm -> [S, H]
    for name in ("gate_up", "h", "offsets"):  # grouped_mm_sorted_rows returns: its intermediates go
        t.drop(name)
    t.new("sorted_row_of_pair", S * 8, "permutation")  # empty_like(pair_order)
    t.temp(S * 8, "permutation")  # arange(S) scattered into it
    t.new("y", S * H * b)  # y[sorted_row_of_pair]: un-permuted copy, the sorted y is freed
    _weight_and_sum(t, T, S, H, b)


def _eager(t: _Timeline, T, k, H, I, E, b, a, groups) -> None:
    S = T * k
    t.new("pair_order", S * 8, "permutation")  # argsort
    t.temp(2 * S * 8, "permutation")  # argsort's scratch
    t.new("token_of_pair", S * 8, "permutation")
    t.new("weight_of_pair", S * 4, "permutation")
    t.new("group_sizes", E * 8, "permutation")
    t.temp(S * 8, "permutation")  # ones for the scatter-add count
    t.new("output", T * H * a)  # zeros, accumulated in place
    for n in groups:  # one iteration per expert that received tokens; buffers rebind
        if n == 0:
            continue
        t.new("x", n * H * b)
        t.new("gate_up", n * 2 * I * b)
        t.new("act", n * I * b)
        t.new("h", n * I * b)
        t.drop("act")
        t.new("y", n * H * b)
        t.drop("h")
        if a != b:
            t.new("y_acc", n * H * a)
        if a != 4:
            t.new("w_acc", n * a)
        t.new("y", n * H * a)  # y.to(acc) * weight
        t.drop("y_acc", "w_acc")
    if a != b:
        t.new("out", T * H * b)  # output.to(dtype)


def _weight_and_sum(t: _Timeline, T, S, H, b) -> None:
    """y * weights.to(dtype); view(T, k, H).sum(1), all in the model dtype (common.sum_over_top_k)."""
    if b != 4:
        t.new("w_cast", S * b)  # float32 routing weights cast to the model dtype
    t.new("y", S * H * b)
    t.drop("w_cast")
    if S != T:  # top_k = 1: the weighted rows are the output (a view), nothing is summed
        t.new("sum", T * H * b)


_MODELS = {"eager": _eager, "batched_mm": _batched_mm, "grouped_mm": _grouped_mm}


def balanced_groups(num_pairs: int, num_experts: int) -> list[int]:
    """Tokens per expert when `num_pairs` (token, expert) pairs are spread as evenly as possible."""
    base, extra = divmod(num_pairs, num_experts)
    return [base + (1 if e < extra else 0) for e in range(num_experts)]


def predict_memory(config, num_tokens: int, backend: str, dtype=None, *, tokens_per_expert=None) -> dict:
    """Predicted extra bytes of one forward of `backend`, in the categories of the spec.

    Returns a dict:
      weights_gathered  bytes of expert weights batched_mm gathers over the whole forward
                        (moe_lab.predict_gather_bytes, what its budget checks); 0 otherwise.
                        Its two gathers are not alive together, so this is not all in `total`.
      activations       activation bytes alive at the predicted peak ([S, 2I], [S, I], [S, H], output)
      permutation       sort/index/offset bytes alive at the predicted peak
      weights_gathered_at_peak  gathered weight bytes alive at the peak (batched_mm)
      total             the predicted peak = activations + permutation + weights_gathered_at_peak
      parameters        bytes of the expert weights themselves (resident, not part of `total`)
      modelled          False for backends without a model (then the byte counts are NaN)
    `tokens_per_expert` (list of E counts) matters for eager only (its buffers are per expert);
    default: the T*k pairs spread evenly over the experts.
    """
    dtype = config.dtype if dtype is None else dtype
    dtype = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype).removeprefix("torch."))
    T, k = int(num_tokens), config.top_k
    H, I, E = config.hidden_size, config.intermediate_size, config.num_experts
    b = _itemsize(dtype)
    a = _itemsize(torch.promote_types(dtype, torch.float32))
    result = {
        "weights_gathered": predict_gather_bytes(T, k, H, I, dtype) if backend == "batched_mm" else 0,
        "parameters": E * 3 * H * I * b,
    }
    model = _MODELS.get(backend)
    if model is None:
        nan = math.nan
        result.update(activations=nan, permutation=nan, weights_gathered_at_peak=nan, total=nan, modelled=False)
        return result
    groups = list(tokens_per_expert) if tokens_per_expert is not None else balanced_groups(T * k, E)
    timeline = _Timeline()
    model(timeline, T, k, H, I, E, b, a, groups)
    result.update(
        activations=timeline.at_peak["activations"],
        permutation=timeline.at_peak["permutation"],
        weights_gathered_at_peak=timeline.at_peak["weights_gathered"],
        total=timeline.peak,
        modelled=True,
    )
    return result
