"""Helpers of notebook 02 (the eager loop): the textbook loop, a host-sync counter, source excerpts,
and the recorded per-expert cost table."""
from __future__ import annotations

import contextlib
import inspect
import warnings
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..backends.common import accumulation_dtype, apply_gate, expert_weights


def textbook_loop_forward(experts, hidden_states, top_k_index, top_k_weights):
    """The per-expert loop as usually written: ask every expert which tokens it got.

    `torch.where(top_k_index == e)` returns tensors whose length depends on the data, so on a GPU
    the host must wait for the answer before it can continue: one host sync per expert, E in
    all, including the experts that got no token (the host only learns that after the sync).
    """
    weights = expert_weights(experts)  # gate_up [E, 2I, H], down [E, H, I]
    output = torch.zeros(hidden_states.shape, dtype=accumulation_dtype(hidden_states.dtype),
                         device=hidden_states.device)  # [T, H]
    for expert in range(weights.num_experts):
        token, slot = torch.where(top_k_index == expert)  # HOST SYNC: [n] each, n known only after it
        if token.numel() == 0:
            continue
        gate_up = hidden_states[token] @ weights.gate_up[expert].T  # [n, H] @ [H, 2I] -> [n, 2I]
        y = apply_gate(experts, gate_up) @ weights.down[expert].T  # [n, I] @ [I, H] -> [n, H]
        y = y.to(output.dtype) * top_k_weights[token, slot, None].to(output.dtype)  # routing weight
        output.index_add_(0, token, y)  # add each row to its token
    return output.to(hidden_states.dtype)


# ----------------------------------------------------------------------------- counting host syncs

#: aten ops whose result the host must wait for: a data-dependent shape or a Python scalar.
SYNC_OPS = {"nonzero": "nonzero / torch.where", "_local_scalar_dense": ".item() / int() / bool()",
            "is_nonzero": "bool(tensor)", "equal": "torch.equal", "masked_select": "boolean-mask indexing",
            "unique": "torch.unique", "_unique2": "torch.unique", "unique_consecutive": "torch.unique_consecutive"}


class _SyncPointCounter(TorchDispatchMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts
        self.quiet = 0  # > 0 inside .tolist(), which is counted once as a whole

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.quiet:
            if name in SYNC_OPS:
                self.counts[SYNC_OPS[name]] += 1
            elif name in ("_to_copy", "copy_") and _device_to_host(func, args, kwargs or {}):
                self.counts["copy to the host"] += 1
        return func(*args, **(kwargs or {}))


def _device_to_host(func, args, kwargs) -> bool:
    source = args[1] if func.overloadpacket.__name__ == "copy_" else args[0]
    target = args[0].device if func.overloadpacket.__name__ == "copy_" else kwargs.get("device")
    return isinstance(source, torch.Tensor) and source.device.type != "cpu" and target is not None \
        and torch.device(target).type == "cpu"


@contextlib.contextmanager
def _counting_tolist(mode: _SyncPointCounter):
    # On a CPU tensor .tolist() reads memory directly without dispatching an op, so it is wrapped.
    had_own = "tolist" in torch.Tensor.__dict__
    original = torch.Tensor.tolist

    def tolist(self):
        mode.counts[".tolist()"] += 1
        mode.quiet += 1
        try:
            return original(self)
        finally:
            mode.quiet -= 1

    torch.Tensor.tolist = tolist
    try:
        yield
    finally:
        if had_own:
            torch.Tensor.tolist = original
        else:
            del torch.Tensor.tolist


def count_sync_points(fn, *args, **kwargs):
    """Run `fn(*args, **kwargs)` and count the operations that make the host wait for the device.

    Returns (result, Counter {what: how many}). The count is structural — it is the same on a CPU,
    where nothing actually waits, and on a GPU, where each one is a host-device synchronisation:
    data-dependent shapes (nonzero, torch.where with one argument, boolean masks), Python scalars
    (.item(), int(t), if t: ...), `.tolist()` and copies from the device to the host.
    """
    counts: Counter = Counter()
    mode = _SyncPointCounter(counts)
    with torch.no_grad(), mode, _counting_tolist(mode):
        result = fn(*args, **kwargs)
    return result, counts


class _OpCounter(TorchDispatchMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def count_ops(fn, *args, **kwargs):
    """Run `fn(*args, **kwargs)`; return (result, Counter {aten op name: calls}), e.g. counts["mm"]."""
    counts: Counter = Counter()
    with torch.no_grad(), _OpCounter(counts):
        result = fn(*args, **kwargs)
    return result, counts


def cuda_sync_count(fn, *args, **kwargs) -> int | None:
    """On CUDA tensors, the syncs torch itself reports (torch.cuda.set_sync_debug_mode); None elsewhere."""
    if not torch.cuda.is_available():
        return None
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    return sum("synchroniz" in str(w.message) for w in caught)


def source_excerpt(fn, start: str, end: str | None = None) -> str:
    """The lines of `fn`'s source from the first line containing `start` to the next containing `end`."""
    lines = inspect.getsource(fn).splitlines()
    first = next(i for i, line in enumerate(lines) if start in line)
    last = next((i for i in range(first + 1, len(lines)) if end is not None and end in lines[i]), len(lines) - 1)
    return "\n".join(lines[first:last + 1])


# ----------------------------------------------------------------------------- recorded numbers


def per_expert_cost_table(recorded, presets=None, backend: str = "eager") -> str:
    """Recorded `backend` latency per preset and token count, and the same divided by experts hit."""
    rows = recorded[(recorded["backend"] == backend) & (recorded["status"] == "ok")]
    if presets is not None:
        rows = rows[rows["preset"].isin(presets)]
    tokens = sorted(int(t) for t in rows["num_tokens"].unique())
    lines = [f"{'preset':<19}{'':<16}" + "".join(f"{f'T={t}':>9}" for t in tokens)]
    for preset, sub in rows.groupby("preset", sort=False):
        sub = sub.set_index("num_tokens")
        hit = [int(sub.loc[t, "experts_hit"]) for t in tokens]
        ms = [float(sub.loc[t, "median_ms"]) for t in tokens]
        lines.append(f"{preset:<19}{'experts hit':<16}" + "".join(f"{h:>9}" for h in hit))
        lines.append(f"{'':<19}{backend + ' ms':<16}" + "".join(f"{m:>9.2f}" for m in ms))
        lines.append(f"{'':<19}{'ms / expert hit':<16}" + "".join(f"{m / h:>9.3f}" for m, h in zip(ms, hit)))
    return "\n".join(lines)
