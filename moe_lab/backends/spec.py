"""What an experts backend can do, declared once next to its code: `BackendSpec`.

Every consumer (`auto`, `runnable_backends`, `GraphedExperts`, the bench, the widgets, the
compile matrix, `moe-lab info`) asks a backend's spec instead of knowing backend names. A spec
answers five questions for a device, a dtype and (where it matters) a layer shape, each with a
reason a person can read:

    runs        does it run here at all (and is that only an interpreter, too slow to time)?
    autograd    does its output carry gradients to hidden states, weights and routing weights?
    cuda_graph  can its forward be recorded in a CUDA graph and replayed?
    fullgraph   does torch.compile(fullgraph=True) trace it without a graph break?
    sync_free   does it never wait for the device on the host (no GPU number read by Python)?

A built-in backend declares each answer as a `Support` or as a function of `Where`. A user's
backend (`moe_lab.register`) may declare them too; what it leaves out is `unknown`, and the
consumers then find out by trying: `GraphedExperts` runs it once with torch's sync debug mode
before capturing, and the first call that needs gradients checks that the output's autograd graph
reaches every input that requires grad (`moe_lab.backends.autograd_check`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import resolve_dtype
from ..devices import cuda_device_facts

CAPABILITIES = ("runs", "autograd", "cuda_graph", "fullgraph", "sync_free")

#: One line per capability: what the question means (for `describe_backends` and the docs).
CAPABILITY_MEANING = {
    "runs": "runs on this device and dtype",
    "autograd": "its output carries gradients to hidden states, both weight tensors and the routing weights",
    "cuda_graph": "its forward can be captured in a CUDA graph and replayed",
    "fullgraph": "torch.compile(fullgraph=True) traces it without a graph break",
    "sync_free": "never waits for the device on the host (reads no device value in Python)",
}


@dataclass(frozen=True)
class Support:
    """One answer: `ok` True (yes), False (no) or None (not declared: found out by trying), and why.

    `slow` marks "runs, but only through an interpreter": correct, far too slow to time."""

    ok: bool | None
    reason: str
    slow: bool = False

    def __bool__(self) -> bool:
        return self.ok is True

    @property
    def word(self) -> str:
        return {True: "yes", False: "no", None: "unknown"}[self.ok]


def yes(reason: str, *, slow: bool = False) -> Support:
    return Support(True, reason, slow)


def no(reason: str) -> Support:
    return Support(False, reason)


def unknown(reason: str = "not declared; found out by trying") -> Support:
    return Support(None, reason)


@dataclass(frozen=True)
class Where:
    """The situation a capability is asked about: device and dtype, and the layer's H and I where a
    backend's path depends on them (grouped_mm's 16-byte row rule). None: not known, the common case."""

    device: torch.device
    dtype: torch.dtype
    hidden_size: int | None = None
    intermediate_size: int | None = None

    @classmethod
    def of(cls, device, dtype, hidden_size: int | None = None, intermediate_size: int | None = None) -> "Where":
        """From a device or its name and a dtype or its name ("bfloat16", "bf16", torch.bfloat16)."""
        return cls(torch.device(device), resolve_dtype(dtype), hidden_size, intermediate_size)


Declared = Support | Callable[[Where], Support]


@dataclass(frozen=True)
class BackendSpec:
    """A backend: its forward function and what it can do.

    forward(experts, hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H].
    Each capability is a `Support` or a function `Where -> Support`. `dispatcher` marks a backend
    that runs another one (auto), so choosing among backends never picks it. `builtin` backends
    cannot be replaced without overwrite=True nor removed."""

    name: str
    forward: Callable
    summary: str
    runs: Declared
    autograd: Declared
    cuda_graph: Declared
    fullgraph: Declared
    sync_free: Declared
    dispatcher: bool = False
    builtin: bool = False
    #: kernel_path(where, compiling) -> which kernel path it runs there (grouped_mm: torch's grouped GEMM
    #: or moe_lab's loop), for result rows; None when a backend has one path.
    kernel_path: Callable[..., str] | None = None
    #: sorted_rows(experts, rows [R, H] grouped by expert (expert 0's rows first), counts [E] int device tensor
    #: summing to R) -> [R, H]: each row through its group's expert, unweighted. The entry for callers whose rows
    #: already arrive grouped (expert parallelism's receivers), so the backend skips its own sort, gather and
    #: un-permute. None: the backend has no such entry; callers use `forward` with top_k = 1 instead.
    sorted_rows: Callable | None = None
    #: partial_forward(experts, hidden_states [N, H], top_k_index [N, k], top_k_weights [N, k]) -> [N, H]: the
    #: forward where an id >= experts.num_experts means "this expert is not here": that slot contributes nothing
    #: and costs nothing (expert parallelism: moe_lab's all-gather layer, whose rows carry every rank's experts,
    #: and transformers' own, whose sentinel ids are the same). Its gradients are the backend's: `autograd`
    #: answers for it too, and the checked entry (`checked_forward(..., entry=...)`) holds it to that. None: no
    #: entry; callers clamp the ids, zero their weights and run `forward`, computing the absent slots for nothing.
    partial_forward: Callable | None = None
    #: For a dispatcher: chooses(experts, hidden_states [T, H], top_k, grad) -> the name of the backend it runs for
    #: a call of T tokens with top_k slots that needs gradients (grad) or not. Callers of the other entries ask it
    #: (`resolve_spec`), so a dispatcher's call runs its choice's `sorted_rows` or `partial_forward` too.
    chooses: Callable | None = None

    def supports(self, capability: str, where: Where) -> Support:
        """The answer for `capability` (one of CAPABILITIES) at `where`. A backend that does not run
        there supports nothing else there, and CUDA graphs need a CUDA device, whatever is declared."""
        if capability not in CAPABILITIES:
            raise ValueError(f"unknown capability {capability!r}; capabilities are {list(CAPABILITIES)}")
        missing = _missing_device(where.device)
        runs = no(missing) if missing else _answer(self.runs, where)
        if capability == "runs" or runs.ok is False:
            return runs if capability == "runs" else no(f"does not run here: {runs.reason}")
        if capability == "cuda_graph" and where.device.type != "cuda":
            return no(f"CUDA graphs need a CUDA device, not {where.device.type}")
        return _answer(getattr(self, capability), where)

    def table(self, where: Where) -> dict[str, Support]:
        """{capability: Support} for every capability at `where`."""
        return {capability: self.supports(capability, where) for capability in CAPABILITIES}


def _missing_device(device: torch.device) -> str | None:
    """Why `device` does not exist on this machine, or None (a property of the machine, not of a backend)."""
    if device.type == "cuda":
        count, major, _ = cuda_device_facts(device.index or 0)
        if major < 0:
            return f"no CUDA device {device} here (torch.cuda.device_count() = {count})"
    return None


def _answer(declared: Declared, where: Where) -> Support:
    return declared(where) if callable(declared) else declared
