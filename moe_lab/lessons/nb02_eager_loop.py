"""Helpers of notebook 02 (the eager loop): its parameters, the textbook loop, a host-sync counter,
source excerpts, the recorded per-expert cost table and what it says, and the live claims checked."""
from __future__ import annotations

import contextlib
import inspect
import warnings
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..backends.common import accumulation_dtype, apply_gate, expert_weights
from ..bench.live import Ratio, check_claim, claims_markdown
from ..parameters import Device, Dtype, Int, IntList, Parameters, Rule, Str
from ..presets import PRESETS
from .figures import Prose

PARAMETERS = Parameters(
    device=Device(), dtype=Dtype(), preset=Str(choices=lambda: list(PRESETS)),
    hidden_size=Int(min=16, max=1024, multiple_of=16, help="scale_down keeps rows 16-byte aligned"),
    num_experts=Int(min=1, max=256), top_k=Int(min=1, max=256), num_tokens=Int(min=1, max=4096),
    sweep_experts=IntList(min=1, max=256, max_len=6), sweep_tokens=IntList(min=1, max=4096, max_len=8),
    seed=Int(min=0),
    rules=[Rule(lambda p: p["top_k"] <= p["num_experts"],
                "top_k={top_k} must be at most num_experts={num_experts}: each token picks top_k distinct experts"),
           Rule(lambda p: p["top_k"] <= min(p["sweep_experts"]),
                "every sweep_experts value must be at least top_k={top_k}, got {sweep_experts}")],
)


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


def _change(before: float, after: float) -> str:
    """"grew by 60 %", "fell by 28 %" or "stayed within 10 %"."""
    change = after / before - 1
    if abs(change) <= 0.10:
        return "stayed within 10 %"
    return f"{'grew' if change > 0 else 'fell'} by {abs(change) * 100:.0f} %"


def recorded_reading(recorded, presets=("qwen3-30b-a3b", "deepseek-v3", "mixtral-8x7b")) -> Prose:
    """What the recorded eager / grouped_mm plot says, in words computed from the table."""
    ok = recorded[(recorded["status"] == "ok") & recorded["preset"].isin(presets)]
    ms = ok.pivot_table(index=["preset", "num_tokens"], columns="backend", values="median_ms")
    hit = ok[ok["backend"] == "eager"].set_index(["preset", "num_tokens"])["experts_hit"]
    at_one = (ms["eager"] / ms["grouped_mm"]).xs(1, level="num_tokens")
    fine = [p for p in presets if p != "mixtral-8x7b"]
    climbs = "; ".join(f"{p}: {int(hit[p, 16])} experts, {ms.loc[(p, 16), 'eager']:.2f} ms" for p in fine)
    first = fine[0]
    flat = " and ".join(f"{p}'s time {_change(ms.loc[(p, 128), 'eager'], ms.loc[(p, 8192), 'eager'])}" for p in fine)
    per_expert = (ms["eager"] / hit).xs("mixtral-8x7b", level="preset") if "mixtral-8x7b" in presets else None
    text = (
        f"Read the plot from the left: at T=1 both backends touch only k experts, and eager was "
        f"{at_one.min():.1f} to {at_one.max():.1f} times slower than grouped_mm ({at_one.idxmax()} the most, "
        f"{at_one.idxmin()} the least). From T=16 on, eager climbs with the experts hit ({climbs}), while "
        f"grouped_mm, one kernel per projection for all experts, stays far below ({first}: "
        f"{ms.loc[(first, 16), 'grouped_mm']:.2f} ms at T=16, {ms.loc[(first, 8192), 'grouped_mm']:.2f} ms at "
        f"T=8192). Once every expert is hit, eager no longer follows the tokens: from T=128 to T=8192 — 64 times "
        f"the tokens — {flat}."
    )
    if per_expert is not None:
        small = per_expert.drop(8192)
        text += (f" Mixtral's eight large experts are the exception at T=8192: {per_expert[8192]:.2f} ms per expert "
                 f"hit against {small.min():.2f}–{small.max():.2f} ms at smaller T — there the matmuls themselves "
                 "dominate.")
    return Prose(text)


def live_claims(live, same_tokens) -> Prose:
    """The lesson's claims about the eager loop, checked on the live tables of this notebook (see
    `moe_lab.bench.live`): each says yes, no, or that the machine was too noisy to tell."""
    tokens = int(live["num_tokens"].max())
    rows = live[live["num_tokens"] == tokens].set_index(["backend", "num_experts"])
    few, many = int(live["num_experts"].min()), int(live["num_experts"].max())
    claims = []
    if few != many:
        eager_many, eager_few = ({"backend": "eager", "num_experts": e, "num_tokens": tokens} for e in (many, few))
        grouped_many, grouped_few = ({"backend": "grouped_mm", "num_experts": e, "num_tokens": tokens}
                                     for e in (many, few))
        hits = {e: int(rows.loc[("eager", e), "experts_hit"]) for e in (few, many)}
        claims.append(check_claim(live, f"eager took longer with {hits[many]} experts hit (E={many}) than with "
                                        f"{hits[few]} (E={few}), both at T={tokens}", eager_many, eager_few,
                                  expect="slower"))
        claims.append(check_claim(live, f"going from E={few} to E={many} at T={tokens} slowed eager more than "
                                        "grouped_mm", Ratio(eager_many, eager_few), Ratio(grouped_many, grouped_few),
                                  expect="slower"))
    by_routing = same_tokens.set_index("distribution")["experts_hit"]
    claims.append(check_claim(
        same_tokens, f"with the same {int(same_tokens['num_tokens'].iloc[0])} tokens, eager took longer when uniform "
                     f"routing hit {int(by_routing['uniform'])} experts than when single routing hit "
                     f"{int(by_routing['single'])}",
        {"distribution": "uniform"}, {"distribution": "single"}, expect="slower"))
    return Prose(claims_markdown(claims))
