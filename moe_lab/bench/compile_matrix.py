"""Which torch.compile modes work with which backend on this machine — found by trying each one.

For every (mode, backend, token count) cell, on one layer with random weights:
  1. run the backend uncompiled on two routings of the same shapes (the expected outputs),
  2. `torch.compile(experts, mode=...)`, time the first call (`compile_s`: tracing + codegen),
     call it twice more (CUDA-graph modes record and replay there), compare with (1),
  3. write the second routing INTO the same input tensors and call again: a compiled function
     that baked the routing in (or replays a stale CUDA graph) fails `equal_after_routing_change`,
  4. time compiled and uncompiled calls with `time_fn`.
Steps 1-3 run for every backend of one (mode, token count) first, all compiled into one dynamo
cache (the implementation name is a guard, so each backend is its own entry); step 4 then times
them in interleaved rounds (forward order, reversed, ...: `bench.rounds`), so that host-time drift
lands on every backend alike, and each row keeps its rounds' medians (`compiled_round_ms`).
`torch._dynamo.reset()` runs before and after every (mode, token count). A failure is recorded
("failed" and the error's first line), never raised; batched_mm over its gather budget is "refused".
On CPU, the CUDA-graph parts of reduce-overhead / max-autotune are skipped by inductor; whatever
happens is what the row says.

Cost: the max-autotune modes benchmark candidate kernels for every distinct matmul shape. eager
launches one matmul per expert with that expert's token count, so it has as many shapes as
distinct group sizes: on an H100, max-autotune-no-cudagraphs x eager on a 128-expert layer ran
for many minutes. Leave eager out of those modes unless you mean to wait.
"""
from __future__ import annotations

import math
import time

import torch

from .. import __version__
from ..backends import Where, runnable_backends
from ..config import resolve_dtype
from ..errors import GatherBudgetError, first_line
from ..presets import get_preset
from ..reference import relative_error
from . import implementations
from .columns import to_frame
from .inputs import build_experts, random_hidden_states, random_routing
from .progress import progress_bar
from .provenance import ROW_PROVENANCE, device_name, git_commit, utc_now
from .roofline import dtype_name
from .rounds import format_round_medians, round_order
from .timing import percentile, resolve_device, synchronize, time_fn

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
COMPILE_STATUSES = ("compiled", "failed", "refused")
COMPILE_COLUMNS = (
    "mode", "backend", "num_tokens", "status", "error", "compile_s", "compiled_ms", "uncompiled_ms", "speedup",
    "max_rel_err", "equal_to_uncompiled", "equal_after_routing_change", "rel_err", "rel_err_after_routing_change",
    "hidden_size", "intermediate_size", "num_experts", "top_k", "dtype", "device", "grouped_mm_kernel",
    *ROW_PROVENANCE, "rounds", "compiled_round_ms",
)
_FLOATS = ("compile_s", "compiled_ms", "uncompiled_ms", "speedup", "max_rel_err", "rel_err",
           "rel_err_after_routing_change")
_INTS = ("num_tokens", "hidden_size", "intermediate_size", "num_experts", "top_k", "rounds")

#: Norm-relative difference allowed between compiled and uncompiled outputs, per dtype: a few
#: roundings of the dtype's epsilon, since fusion may keep intermediates in higher precision.
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}


def compile_matrix(config, tokens, backends=None, modes=COMPILE_MODES, *, device=None, dtype=None,
                   progress: bool = True, seed: int = 0, max_seconds: float = 0.2, max_reps: int = 30,
                   rounds: int = 1):
    """One row per (mode, backend, token count): does it compile, is it right, is it faster?

    `config`: a MoEConfig or preset name; `tokens`: an int or list; `backends`: default the
    registered moe_lab backends that run compiled on the device; `modes`: torch.compile modes
    ("default" means mode=None); `rounds`: interleaved timing rounds (max_seconds applies per
    round). Returns a DataFrame with the columns of `COMPILE_COLUMNS`. `max_rel_err` is the larger
    of the two comparisons (first routing, changed routing); `equal_*` are False when the cell did
    not compile.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    if isinstance(config, str):
        config = get_preset(config).config
    device = resolve_device(device)
    dtype = resolve_dtype(dtype) if dtype is not None else config.dtype
    config = config.replace(dtype=dtype)
    tokens = [int(t) for t in (tokens if isinstance(tokens, (list, tuple, range)) else [tokens])]
    backends = runnable_backends(device, interpreted=False) if backends is None else list(backends)

    experts = build_experts(config, device, seed)
    bar = progress_bar(len(modes) * len(tokens) * len(backends), progress, "moe_lab compile matrix", "cell")
    timing = dict(device=device, max_seconds=max_seconds, max_reps=max_reps)
    rows = []
    try:
        for mode in modes:
            for T in tokens:
                rows.extend(_one_mode_and_size(experts, mode, backends, T, device, dtype, seed, rounds, timing, bar))
    finally:
        if bar is not None:
            bar.close()
    return to_frame(rows, COMPILE_COLUMNS, _INTS, _FLOATS)


def _one_mode_and_size(experts, mode, backends, T, device, dtype, seed, rounds, timing, bar) -> list[dict]:
    """Compile and check every backend at (mode, T), then time the ones that compiled in rounds."""
    torch._dynamo.reset()
    rows, runners = [], {}
    for backend in backends:
        row = _new_row(experts, mode, backend, T, device, dtype)
        try:
            runners[backend] = _compile_and_check(row, experts, mode, backend, T, device, dtype, seed)
            row["status"] = "compiled"
        except GatherBudgetError as error:
            row.update(status="refused", error=first_line(error))
        except Exception as error:  # a compile failure is a result, not a crash
            row.update(status="failed", error=first_line(error))
        rows.append(row)
        if bar is not None:
            bar.set_postfix_str(f"{mode} {backend} T={T} {row['status']}", refresh=False)
            bar.update(1)
    try:
        _time_in_rounds(experts, [row for row in rows if row["backend"] in runners], runners, rounds, timing)
    except Exception as error:  # e.g. an out-of-memory while timing: the rows say so
        for row in rows:
            if row["backend"] in runners and math.isnan(row["compiled_ms"]):
                row.update(status="failed", error=f"timing: {first_line(error)}")
    del runners
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _new_row(experts, mode, backend, T, device, dtype) -> dict:
    config = experts.config
    return dict(
        mode=mode, backend=backend, num_tokens=T, status="failed", error="", equal_to_uncompiled=False,
        equal_after_routing_change=False, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_experts=config.num_experts, top_k=config.top_k,
        dtype=dtype_name(dtype), device=str(device), device_name=device_name(str(device)),
        torch_version=torch.__version__, moe_lab_version=__version__, date=utc_now(), git_commit=git_commit(),
        grouped_mm_kernel=_kernel_path(backend, Where(device, dtype, config.hidden_size, config.intermediate_size)),
        rounds=0, compiled_round_ms="", **{name: math.nan for name in _FLOATS},
    )


def _kernel_path(backend, where) -> str:
    spec = implementations.spec_of(backend)
    return spec.kernel_path(where, compiling=True) if spec.kernel_path is not None else ""


def _compile_and_check(row, experts, mode, backend, T, device, dtype, seed):
    """Steps 1-3: fill the row's compile time and errors; return (compiled call, uncompiled call)."""
    experts.set_experts_implementation(implementations.implementation(backend))
    hidden_states = random_hidden_states(T, experts.config, device, seed)
    index, weights, _ = random_routing(T, experts.config, device, seed=seed)
    index2, weights2, _ = random_routing(T, experts.config, device, seed=seed + 1)
    tolerance = TOLERANCE[dtype]

    with torch.no_grad():
        expected = experts(hidden_states, index, weights).clone()  # budget refusals surface here
        expected2 = experts(hidden_states, index2, weights2).clone()
        compiled = torch.compile(experts, mode=None if mode == "default" else mode)
        started = time.perf_counter()
        compiled(hidden_states, index, weights)
        synchronize(device)
        row["compile_s"] = time.perf_counter() - started
        for _ in range(2):  # CUDA-graph modes warm up, record, then replay
            output = compiled(hidden_states, index, weights)
        row["rel_err"] = relative_error(output, expected)
        index.copy_(index2)  # same tensors, new routing values
        weights.copy_(weights2)
        row["rel_err_after_routing_change"] = relative_error(compiled(hidden_states, index, weights), expected2)
        del output
    row["max_rel_err"] = max(row["rel_err"], row["rel_err_after_routing_change"])
    row["equal_to_uncompiled"] = bool(row["rel_err"] <= tolerance)
    row["equal_after_routing_change"] = bool(row["rel_err_after_routing_change"] <= tolerance)

    def run_compiled():
        return compiled(hidden_states, index, weights)

    def run_uncompiled():
        return experts(hidden_states, index, weights)

    return run_compiled, run_uncompiled


def _time_in_rounds(experts, rows, runners, rounds, timing) -> None:
    """Step 4: compiled and uncompiled calls of every row's backend, in interleaved rounds; the
    implementation is switched before each backend's turn (dynamo picks the entry by it)."""
    compiled_times = {row["backend"]: [] for row in rows}
    uncompiled_times = {row["backend"]: [] for row in rows}
    round_medians = {row["backend"]: [] for row in rows}
    with torch.no_grad():
        for round_index in range(rounds):
            for row in round_order(rows, round_index):
                backend = row["backend"]
                run_compiled, run_uncompiled = runners[backend]
                experts.set_experts_implementation(implementations.implementation(backend))
                compiled = time_fn(run_compiled, **timing)
                compiled_times[backend] += compiled.times_ms
                round_medians[backend].append(compiled.median_ms)
                uncompiled_times[backend] += time_fn(run_uncompiled, **timing).times_ms
    for row in rows:
        backend = row["backend"]
        row["compiled_ms"] = percentile(compiled_times[backend], 50)
        row["uncompiled_ms"] = percentile(uncompiled_times[backend], 50)
        row["speedup"] = row["uncompiled_ms"] / row["compiled_ms"] if row["compiled_ms"] > 0 else math.nan
        row["rounds"] = rounds
        row["compiled_round_ms"] = format_round_medians(round_medians[backend])
