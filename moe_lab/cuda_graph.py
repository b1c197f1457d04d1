"""Replay an experts forward from a CUDA graph: the decode path without per-kernel launch cost.

At decode (T = 1..16) a backend's GPU work is tens of microseconds while launching its ~6-15
kernels from Python costs about as much again; a CUDA graph records the launches once and replays
them with one call. That only works for a forward that never waits for a GPU number on the host. Each backend's spec
declares whether it can be captured (`moe_lab.describe_backends()`: batched_mm, grouped_mm on its
fused kernel and triton can, eager — it reads the per-expert counts — cannot); one declared "no"
is refused before anything runs, with the spec's reason, and every other one is run once under
torch's sync debug mode before capture, so an undeclared backend that waits is refused too.

    graphed = GraphedExperts(experts)              # the module's current backend, or backend="triton"
    out = graphed(hidden, top_k_index, top_k_weights)   # first call per shape captures; then replays

Each call copies the inputs into the graph's static buffers, so new routing (a different
top_k_index) is honoured on every replay. The returned tensor IS the graph's output buffer and is
overwritten by the next call with the same shapes: `.clone()` it to keep it. `replay()` reruns the
last graph on whatever its buffers hold — the layer's cost inside a whole-model graph, where the
previous layer writes those buffers itself (that is what `moe-lab bench --cuda-graph` times).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .backends import BackendSpec, Where, available_backends, check_inputs, checked_forward, get_spec
from .errors import first_line


class GraphCaptureError(RuntimeError):
    """The backend's forward cannot be recorded in a CUDA graph (it syncs with the host, or no CUDA)."""


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    hidden_states: torch.Tensor  # [T, H] static input
    top_k_index: torch.Tensor  # [T, k]
    top_k_weights: torch.Tensor  # [T, k]
    output: torch.Tensor  # [T, H] static output


class GraphedExperts:
    """`experts` run through one CUDA graph per input shape (at most `max_graphs`, oldest dropped)."""

    def __init__(self, experts, backend: str | None = None, *, warmup: int = 2, max_graphs: int = 16):
        self.experts = experts
        self.backend = backend if backend is not None else experts.get_experts_implementation()
        # A registered name (unknown -> UnknownBackendError now, not at capture) or an unregistered spec.
        self.spec = self.backend if isinstance(self.backend, BackendSpec) else get_spec(self.backend)
        self.warmup = warmup
        self.max_graphs = max_graphs
        self._graphs: dict[tuple, _Captured] = {}
        self._pool = None
        self._last: _Captured | None = None

    def __call__(self, hidden_states, top_k_index, top_k_weights) -> torch.Tensor:
        key = (tuple(hidden_states.shape), hidden_states.dtype, tuple(top_k_index.shape), top_k_index.dtype,
               top_k_weights.dtype, hidden_states.device)
        captured = self._graphs.get(key)
        if captured is None:
            captured = self._capture(hidden_states, top_k_index, top_k_weights)
            if len(self._graphs) >= self.max_graphs:
                self._graphs.pop(next(iter(self._graphs)))
            self._graphs[key] = captured
        captured.hidden_states.copy_(hidden_states)
        captured.top_k_index.copy_(top_k_index)
        captured.top_k_weights.copy_(top_k_weights)
        captured.graph.replay()
        self._last = captured
        return captured.output

    def replay(self) -> torch.Tensor:
        """Replay the most recently used graph on the inputs already in its buffers (no copies)."""
        if self._last is None:
            raise RuntimeError("nothing captured yet: call the GraphedExperts with inputs first")
        self._last.graph.replay()
        return self._last.output

    def _forward(self, hidden_states, top_k_index, top_k_weights):
        check_inputs(self.experts, hidden_states, top_k_index, top_k_weights)
        return checked_forward(self.spec, self.experts, hidden_states, top_k_index, top_k_weights)

    def _capture(self, hidden_states, top_k_index, top_k_weights) -> _Captured:
        if hidden_states.device.type != "cuda":
            raise GraphCaptureError(f"CUDA graphs need CUDA tensors; hidden_states is on {hidden_states.device}")
        where = Where(hidden_states.device, hidden_states.dtype, hidden_states.shape[1],
                      self.experts.down_proj.numel() // (self.experts.gate_up_proj.shape[0] * hidden_states.shape[1]))
        declared = self.spec.supports("cuda_graph", where)
        if declared.ok is False:
            raise GraphCaptureError(f"backend {self.spec.name!r} cannot be captured in a CUDA graph: {declared.reason}. "
                                    f"{_capturable(hidden_states, where)}")
        static = [t.clone() for t in (hidden_states, top_k_index, top_k_weights)]
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()  # one memory pool for every shape's graph

        def forward():
            with torch.no_grad():
                return self._forward(*static)

        try:
            captured = CapturedStep(forward, warmup=self.warmup, name=f"backend {self.spec.name!r}", pool=self._pool)
        except GraphCaptureError as error:
            raise GraphCaptureError(f"{error}. {_capturable(static[0])}") from error.__cause__
        return _Captured(captured.graph, *static, captured.outputs)


def _capturable(hidden_states, where: Where | None = None) -> str:
    """Which registered backends declare that they can be captured here (asked, not listed by hand)."""
    where = where or Where(hidden_states.device, hidden_states.dtype)
    names = [name for name in available_backends() if get_spec(name).supports("cuda_graph", where).ok is True]
    return f"Backends that can be captured here: {', '.join(names) if names else 'none'}"


class CapturedStep:
    """A whole step, any no-argument callable (e.g. a layer's forward and `torch.autograd.grad` of it:
    a training step's layer), recorded in one CUDA graph and replayed.

        captured = CapturedStep(step)      # checks that `step` never waits on the host, warms up, captures
        grads = captured.replay()          # reruns the recorded kernels; returns the captured call's result

    What `step` reads must stay where it was at capture (a model writes new inputs into those tensors
    in place), and what `replay` returns is the graph's own buffers, overwritten by the next replay.
    A step that waits for the GPU on the host (a count read with .item() or .tolist()) is refused
    before capture, under torch's sync debug mode: a capture that failed half way would leave the CUDA
    RNG in capture state and break later random ops in the process. Any other failure of the capture is
    a GraphCaptureError too; an error of the step's own first run (out of memory, a bug) propagates as
    it is. `pool` (torch.cuda.graph_pool_handle()) shares one memory pool between graphs."""

    def __init__(self, step, *, warmup: int = 3, name: str = "step", pool=None):
        self.step, self.name = step, name
        if not torch.cuda.is_available():
            raise GraphCaptureError(f"{name}: CUDA graphs need a CUDA device; this machine has none")
        # Warm-up on a side stream, as torch.cuda.graph requires: lazy inits (cuBLAS handles,
        # Triton compilation) must not happen during capture.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            previous = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("error")
            try:
                step()
            except RuntimeError as error:
                if "synchroniz" not in str(error):  # an out-of-memory or a bug of the step's own: as it is
                    raise
                raise GraphCaptureError(f"{name} cannot be captured in a CUDA graph: it waits for the GPU on the "
                                        f"host ({first_line(error)})") from None
            finally:
                torch.cuda.set_sync_debug_mode(previous)
            for _ in range(warmup):  # lazy initialisation (compiles, handles, allocator pools) before capture
                step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph, pool=pool):
                self.outputs = step()
        except Exception as error:
            torch.cuda.synchronize()
            raise GraphCaptureError(f"{name} cannot be captured in a CUDA graph: {first_line(error)}") from error

    def replay(self):
        self.graph.replay()
        return self.outputs
