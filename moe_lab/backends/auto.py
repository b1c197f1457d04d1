"""`auto`: run whichever registered backend is fastest at this call's token count.

No backend wins everywhere: at decode (a few tokens) batched_mm's gather is cheap and it needs no
sort, at prefill grouped_mm's one grouped GEMM wins over the other two, and the fused triton kernels
win most points on a GPU but are only interpreted on a CPU. Where the crossover lies depends on the
machine, the dtype and the layer shape, so it is *measured* (`moe_lab.calibrate`, `moe-lab
calibrate`) and stored in a calibration file (moe_lab.backends.calibration); until then
`DEFAULT_CROSSOVERS` applies.

A crossover table is an ordered list of rules (max_tokens, backend): the first rule with
T <= max_tokens (None: any T) names the backend. T is `hidden_states.shape[0]`, a shape, so choosing
costs no host sync. Under torch.compile the table lookup runs once at trace time
(`torch.compiler.assume_constant_result`) and `T <= max_tokens` becomes a guard: each compiled graph
holds one backend, and a T on the other side of a crossover compiles a second graph.

auto chooses only among backends whose declared capabilities (moe_lab.backends.spec) cover what the
call needs: one that runs here (not only through an interpreter), supports autograd when gradients
are needed, compiles without a graph break under torch.compile, and can be captured while a CUDA
graph is being recorded. A rule naming a backend that cannot is skipped, and `choose_backend`'s
reason says why; auto never picks itself.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from ..compile_marks import assume_constant_result
from ..config import resolve_dtype
from ..devices import device_name
from . import calibration, registry
from .calibration import ENV_VAR, SHAPE_KEYS, CalibrationError, calibration_path, load_calibration
from .common import needs_grad
from .spec import BackendSpec, Support, Where, no, yes

AUTO = "auto"
#: What auto runs when no usable rule covers T: the first of these that can do what the call needs.
FALLBACK_ORDER = ("grouped_mm", "batched_mm", "eager")
FALLBACK_BACKEND = FALLBACK_ORDER[0]

#: Uncalibrated crossover tables per device type: (max_tokens or None, backend), first match wins.
#: The measurements behind them are in docs/performance_notes.md ("auto's defaults").
DEFAULT_CROSSOVERS: dict[str, tuple[tuple[int | None, str], ...]] = {
    "cpu": ((8, "batched_mm"), (2048, "grouped_mm"), (None, "eager")),
    "cuda": ((None, "triton"),),
}


@dataclass(frozen=True)
class Needs:
    """What a call needs of the backend that runs it."""

    grad: bool = False  # gradients must reach the inputs
    compiling: bool = False  # traced by torch.compile
    capturing: bool = False  # recorded into a CUDA graph


def unusable_reason(spec: BackendSpec, where: Where, needs: Needs = Needs()) -> str | None:
    """Why auto cannot choose `spec` at `where` for a call with `needs`, or None. Unknown (undeclared)
    capabilities do not stop it: trying is how they are found out."""
    if spec.dispatcher:
        return f"{spec.name} dispatches to other backends; auto does not choose it"
    runs = spec.supports("runs", where)
    if runs.ok is False:
        return runs.reason
    if runs.slow:
        return f"only through an interpreter here, too slow to choose ({runs.reason})"
    for needed, capability, what in ((needs.grad, "autograd", "gradients are needed"),
                                     (needs.compiling, "fullgraph", "it is being compiled"),
                                     (needs.capturing, "cuda_graph", "a CUDA graph is being captured")):
        support = spec.supports(capability, where) if needed else None
        if support is not None and support.ok is False:
            return f"{what}, and {support.reason}"
    return None


def usable_rules(rules, where: Where, needs: Needs = Needs()) -> tuple[tuple, list[str]]:
    """The rules whose backend auto can choose here, and one line per dropped rule saying why."""
    usable, skipped = [], []
    for max_tokens, name in rules:
        if name not in registry.available_backends():
            reason = "not registered"
        else:
            reason = unusable_reason(registry.get_spec(name), where, needs)
        if reason is None:
            usable.append((max_tokens, name))
        else:
            skipped.append(f"skipped {name}: {reason}")
    return tuple(usable), skipped


def fallback_backend(where: Where, needs: Needs = Needs()) -> str:
    """What auto runs when no usable rule covers T."""
    for name in FALLBACK_ORDER:
        if name in registry.available_backends() and unusable_reason(registry.get_spec(name), where, needs) is None:
            return name
    return FALLBACK_BACKEND  # it will explain itself when it cannot run


# ----------------------------------------------------------------------------- the table


def _normalize(device, dtype, shape) -> tuple[torch.device, str, tuple | None]:
    device = torch.device(device)
    dtype_name = str(resolve_dtype(dtype)).removeprefix("torch.")
    if shape is not None and all(hasattr(shape, key) for key in SHAPE_KEYS):  # a MoEConfig
        shape = tuple(getattr(shape, key) for key in SHAPE_KEYS)
    if shape is not None:
        ok = isinstance(shape, (tuple, list)) and len(shape) == 4 and all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)
        if not ok:
            raise ValueError(f"shape must be None, (num_experts, top_k, hidden_size, intermediate_size) positive ints, "
                             f"or a MoEConfig; got {shape!r}")
        shape = tuple(shape)
    return device, dtype_name, shape


def crossover_table(device, dtype, shape=None, *, path=None, grad: bool = False) -> tuple[tuple, str]:
    """(rules, source) for this device, dtype and (E, k, H, I): the exact-shape entry of the
    calibration file, else its device+dtype entry with shape null, else DEFAULT_CROSSOVERS. For a call
    that needs gradients (`grad`), entries calibrated on training calls (pass "forward_backward") come
    first, then the forward's. Raises CalibrationError for a corrupt file."""
    device, dtype_name, shape = _normalize(device, dtype, shape)
    return _table(device, dtype_name, shape, load_calibration(path), calibration_path(path), grad)


def _table(device: torch.device, dtype_name: str, shape, entries, path, grad: bool = False) -> tuple[tuple, str]:
    try:
        name = device_name(device)
    except (AssertionError, RuntimeError) as error:  # e.g. asking about "cuda" on a machine without one
        rules = DEFAULT_CROSSOVERS.get(device.type, ((None, FALLBACK_BACKEND),))
        return rules, f"uncalibrated default for {device.type} (no {device} here to match calibrations: {error})"
    mine = [e for e in entries if e.device_type == device.type and e.device_name == name and e.dtype == dtype_name]
    passes = ("forward_backward", "forward") if grad else ("forward",)
    for pass_ in passes:
        for wanted in ([shape, None] if shape is not None else [None]):
            for entry in mine:
                if entry.shape == wanted and entry.pass_ == pass_:
                    scope = "" if wanted is None else " for E={},k={},H={},I={}".format(*wanted)
                    timed = " on training calls" if pass_ == "forward_backward" else ""
                    return entry.rules, f"calibrated{timed} on {entry.device_name} {entry.date[:10]}{scope}"
    rules = DEFAULT_CROSSOVERS.get(device.type, ((None, FALLBACK_BACKEND),))
    if not entries and not Path(path).exists():
        note = f"no calibration file at {path}"
    else:
        if not mine:
            note = f"no {dtype_name} entry for {name!r} in {path}"
        elif any(e.pass_ in passes for e in mine):
            note = f"{path} has {dtype_name} entries for {name!r} at other shapes only"
        else:
            note = f"{path} has {dtype_name} entries for {name!r} for training calls only (this call needs no gradients)"
    return rules, f"uncalibrated default for {device.type} ({note})"


def pick(rules, num_tokens, fallback: str = FALLBACK_BACKEND) -> str:
    """The backend of the first rule with num_tokens <= max_tokens (None: any); `fallback` if none.
    Works on a torch.compile SymInt too: each comparison becomes a guard."""
    for max_tokens, backend in rules:
        if max_tokens is None or num_tokens <= max_tokens:
            return backend
    return fallback


def _explain(rules, num_tokens: int, backend: str) -> str:
    previous = None
    for max_tokens, name in rules:
        if max_tokens is None or num_tokens <= max_tokens:
            if max_tokens is not None:
                return f"T={num_tokens} <= {max_tokens} -> {backend}"
            return f"T={num_tokens} > {previous} -> {backend}" if previous is not None else \
                f"T={num_tokens}, any T -> {backend}"
        previous = max_tokens
    return f"T={num_tokens} > {previous}, no rule covers it -> {backend} (fallback)"


def choose_backend(num_tokens: int, device, dtype, shape=None, *, path=None, compiling: bool = False,
                   grad: bool = False, capturing: bool = False) -> tuple[str, str]:
    """(backend, why) that `auto` runs for `num_tokens` tokens on this device and dtype, for a layer
    of `shape` (E, k, H, I) or a MoEConfig (None: the device+dtype entry only), for a call that needs
    gradients (`grad`), is traced by torch.compile (`compiling`) or recorded in a CUDA graph
    (`capturing`). A corrupt calibration file raises CalibrationError (a ValueError) naming it."""
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
    device, dtype_name, shape = _normalize(device, dtype, shape)
    rules, source = _table(device, dtype_name, shape, load_calibration(path), calibration_path(path), grad)
    where, needs = _where(device, dtype_name, shape), Needs(grad=grad, compiling=compiling, capturing=capturing)
    usable, skipped = usable_rules(rules, where, needs)
    backend = pick(usable, num_tokens, fallback_backend(where, needs))
    why = f"{source}: {_explain(usable, num_tokens, backend)}"
    return backend, why + "".join(f"; {line}" for line in skipped)


def _where(device: torch.device, dtype_name: str, shape) -> Where:
    hidden, inter = (shape[2], shape[3]) if shape is not None else (None, None)
    return Where(device, resolve_dtype(dtype_name), hidden, inter)


# ----------------------------------------------------------------------------- the backend

_forward_decisions: dict[tuple, tuple] = {}  # (file generation, env, device, dtype, shape, needs, names) -> rules
_warned: set[str] = set()  # files the forward path has already warned about


@assume_constant_result
def _forward_rules(device: torch.device, dtype: torch.dtype, shape: tuple, grad: bool, compiling: bool,
                   capturing: bool) -> tuple:
    """(usable rules, fallback) for a forward call; a constant under torch.compile (runs once, at
    trace time). A corrupt file warns once and the defaults apply: a model forward must not die on a
    cache file."""
    # Registered names are part of the key: registering or removing a backend can change the choice.
    key = (calibration.generation(), os.environ.get(ENV_VAR), device, dtype, shape, grad, compiling, capturing,
           tuple(registry.available_backends()))
    if key not in _forward_decisions:
        dtype_name = str(dtype).removeprefix("torch.")
        path = calibration_path()
        try:
            entries = load_calibration(path)
        except CalibrationError as error:
            if str(path) not in _warned:
                _warned.add(str(path))
                warnings.warn(f"moe_lab auto backend ignores a calibration file: {error}; using the "
                              "uncalibrated defaults", RuntimeWarning, stacklevel=2)
            entries = ()
        rules, _ = _table(device, dtype_name, shape, entries, path, grad)
        where, needs = Where(device, dtype, shape[2], shape[3]), Needs(grad, compiling, capturing)
        _forward_decisions[key] = (usable_rules(rules, where, needs)[0], fallback_backend(where, needs))
    return _forward_decisions[key]


def auto_choice(experts, hidden_states, top_k: int, grad: bool) -> str:
    """The backend auto runs for a call of T = hidden_states.shape[0] tokens with `top_k` slots, needing
    gradients or not (`BackendSpec.chooses`): `choose_backend`'s answer, from shapes alone."""
    # (E, k, H, I) from shapes alone; I from down_proj's volume E*H*I, which is the same whether it is
    # stored [E, H, I] or transposed. (expert_weights() costs ~5 us per call on an nn.Module.)
    num_experts, hidden = experts.gate_up_proj.shape[0], hidden_states.shape[1]
    shape = (int(num_experts), int(top_k), int(hidden), int(experts.down_proj.numel() // (num_experts * hidden)))
    compiling = torch.compiler.is_compiling()
    capturing = hidden_states.is_cuda and not compiling and torch.cuda.is_current_stream_capturing()
    rules, fallback = _forward_rules(hidden_states.device, hidden_states.dtype, shape, grad, compiling, capturing)
    return pick(rules, hidden_states.shape[0], fallback)


def auto_experts_forward(experts, hidden_states, top_k_index, top_k_weights):
    """Run the backend `choose_backend` names for T = hidden_states.shape[0] tokens."""
    backend = auto_choice(experts, hidden_states, top_k_index.shape[1],
                          needs_grad(experts, hidden_states, top_k_weights))
    return registry.get_backend(backend)(experts, hidden_states, top_k_index, top_k_weights)


def _chooses_among(capability: str):
    def answer(where: Where) -> Support:
        able = [name for name in registry.available_backends()
                if unusable_reason(registry.get_spec(name), where) is None
                and registry.get_spec(name).supports(capability, where).ok is not False]
        if not able:
            return no(f"no registered backend here can ({capability})")
        return yes(f"chooses only among the backends that can here: {', '.join(able)}")
    return answer


SPEC = BackendSpec(
    name=AUTO,
    forward=auto_experts_forward,
    summary="runs the backend the crossover table names for this call's token count (calibrated or default)",
    runs=yes("dispatches to a registered backend that runs here"),
    autograd=_chooses_among("autograd"),
    cuda_graph=_chooses_among("cuda_graph"),
    fullgraph=_chooses_among("fullgraph"),
    sync_free=yes("choosing reads only shapes; under a CUDA graph capture it chooses a capturable backend"),
    dispatcher=True,
    builtin=True,
    chooses=auto_choice,
)
