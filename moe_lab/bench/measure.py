"""One measurement of one experts backend at one shape: one tidy row, never an exception.

`measure` builds an `Experts` layer with random weights (normal, fan-in scaled — never zeros),
random hidden states and synthetic routing, then under `torch.no_grad()`:
  1. runs the backend once and compares it with the float64 reference (`rel_err`, when cheap),
  2. measures the peak extra memory of one call (`measure_peak_memory`) beside the prediction
     (`predict_memory`),
  3. times it (`time_fn`: warm-up, then median and p10/p90 of repeated calls),
  4. puts the median against FLOPs, minimum bytes and the roofline from measured ceilings.
A refusal (batched_mm over its gather budget, or a predicted footprint larger than the free
memory), an out-of-memory, an unsupported combination or any other error becomes the row's
`status` and `reason` instead of an exception, so a sweep never dies half way.
"""
from __future__ import annotations

import gc
import math

import torch

from .. import __version__
from ..backends import Where, get_batched_mm_budget
from ..config import resolve_dtype
from ..cuda_graph import CapturedStep, GraphCaptureError, GraphedExperts
from ..errors import (
    BackendCapabilityError, BackendInputError, ConfigError, GatherBudgetError, UnknownBackendError, first_line,
)
from ..modules import Experts
from ..presets import get_preset
from ..reference import reference_experts_forward, reference_gradients, relative_error
from . import implementations
from .columns import empty_row
from .inputs import build_experts, random_hidden_states, random_routing, seeded
from .memory import available_bytes, measure_peak_memory, predict_memory
from .provenance import device_name, git_commit, utc_now
from .roofline import (
    cached_ceilings, dtype_name, expert_flops, min_bytes, roofline_ms, training_flops, training_min_bytes,
)
from .rounds import format_round_medians
from .training_memory_model import predict_training_memory
from .timing import resolve_device, synchronize, time_back_to_back, time_fn

#: rel_err is computed when T*E*H*I is below this: the float64 reference is dense over all experts.
REL_ERR_MAX_WORK = 5e7
#: How the work is issued: kernel by kernel from Python ("eager"); replayed from a CUDA graph with a synchronize
#: after each replay ("cuda_graph"); or replayed back to back with none between, as a captured training or decode
#: loop runs ("cuda_graph_back_to_back": the card never idles, and an H200 lowers its clock at its power limit).
EXECUTIONS = ("eager", "cuda_graph", "cuda_graph_back_to_back")
GRAPH_EXECUTIONS = ("cuda_graph", "cuda_graph_back_to_back")
#: What is timed: the forward alone, or the forward and the backward of everything it depends on.
PASSES = ("forward", "forward_backward")
#: Refuse to run when the predicted footprint exceeds this fraction of the free memory.
MEMORY_SAFETY_FRACTION = 0.9
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_experts", "top_k")
#: `measure`'s timing defaults (shorter than `time_fn`'s: a sweep has many rows).
TIMING_DEFAULTS = dict(warmup=2, min_reps=5, max_reps=50, max_seconds=0.3)


class _Refused(Exception):
    """Not run: it would not fit (said before allocating anything)."""


def measure(config, num_tokens: int, backend: str, *, device=None, dtype=None, distribution: str = "uniform",
            skew: float = 1.0, seed: int = 0, ceilings=None, measure_memory: bool = True,
            max_seconds: float = 0.3, max_reps: int = 50, warmup: int = 2, min_reps: int = 5,
            preset: str = "", experts: Experts | None = None, execution: str = "eager",
            pass_: str = "forward") -> dict:
    """Measure `backend` on a `config` layer (a MoEConfig or a preset name) at `num_tokens` tokens.

    `dtype` overrides the config's dtype; `ceilings` (a `Ceilings`) defaults to ones measured once
    per device and dtype in this process; `experts` lets a caller reuse one built layer (same
    config, device and dtype) across calls — its implementation is switched to `backend`.
    `execution="cuda_graph"` times replays of a CUDA graph of the forward
    (`moe_lab.cuda_graph.GraphedExperts.replay`: inputs already in the graph's buffers, as inside a
    model-wide graph) instead of kernel launches from Python, each replay followed by a synchronize;
    `"cuda_graph_back_to_back"` the same replays queued one after another for `max_seconds` after as long a
    warm-up queue (`timing.time_back_to_back`), the regime of a loop that never lets the card idle. `pass_="forward_backward"` times one
    forward and the backward to the hidden states, the routing weights and both weight tensors
    (`torch.autograd.grad` with a random upstream gradient: a training step's layer); its FLOPs are
    3x the forward's, `rel_err` is the worst of the gradients' against float64, and the peak memory
    is that of the whole step. Both together replay that whole step from one CUDA graph
    (`moe_lab.cuda_graph.CapturedStep`), as a training loop captured whole runs it.
    Returns a dict with the columns of `columns.ROW_COLUMNS`. Only a bad argument (an unknown
    preset name) raises; every outcome of running the layer is a row.
    """
    row, _ = measure_with_layer(
        config, num_tokens, backend, device=device, dtype=dtype, distribution=distribution, skew=skew, seed=seed,
        ceilings=ceilings, measure_memory=measure_memory, preset=preset, experts=experts, execution=execution,
        timing_options=dict(warmup=warmup, min_reps=min_reps, max_reps=max_reps, max_seconds=max_seconds),
        pass_=pass_,
    )
    return row


def new_row(*, backend, preset, shape: dict, num_tokens, dtype, device, distribution="uniform", skew=1.0,
            execution="eager", pass_="forward") -> dict:
    """A row with the request and provenance filled in and status "error" until something better is known."""
    row = empty_row()
    row.update(
        backend=str(backend), execution=str(execution), preset=preset or "", num_tokens=int(num_tokens), dtype=_dtype_label(dtype),
        device=str(device), distribution=str(distribution), skew=float(skew), status="error", **{"pass": str(pass_)},
        device_name=_safe_device_name(device), torch_version=torch.__version__, moe_lab_version=__version__,
        date=utc_now(), git_commit=git_commit(), **{name: _as_int(shape[name]) for name in SHAPE_FIELDS},
    )
    return row


def measure_with_layer(config, num_tokens, backend, *, device=None, dtype=None, distribution="uniform",
                       skew=1.0, seed=0, ceilings=None, measure_memory=True, preset="", experts=None,
                       timing_options=None, execution="eager", keep_times=False,
                       pass_="forward") -> tuple[dict, Experts | None]:
    """`measure`, also returning the `Experts` layer it ran (None unless the row is "ok"), for reuse.
    keep_times=True leaves every repetition's time in the row under "_times_ms" (for `rounds.merge_rounds`)."""
    if isinstance(config, str):
        preset = preset or config
        config = get_preset(config).config
    device = resolve_device(device)
    row = new_row(backend=backend, preset=preset, shape={n: getattr(config, n) for n in SHAPE_FIELDS},
                  num_tokens=num_tokens, dtype=dtype if dtype is not None else config.dtype, device=device,
                  distribution=distribution, skew=skew, execution=execution, pass_=pass_)
    layer, oom = None, False
    try:
        layer, times = _run(row, config, int(num_tokens), backend, device, dtype, distribution, skew, seed, ceilings,
                            measure_memory, {**TIMING_DEFAULTS, **(timing_options or {})}, experts, execution, pass_)
        row["status"] = "ok"
        if keep_times:
            row["_times_ms"] = times
    except (GatherBudgetError, _Refused) as error:
        row.update(status="refused", reason=first_line(error))
    except torch.cuda.OutOfMemoryError as error:
        row.update(status="oom", reason=first_line(error))
        oom = True
    except (ConfigError, BackendInputError, BackendCapabilityError, UnknownBackendError, NotImplementedError,
            GraphCaptureError) as error:
        row.update(status="unsupported", reason=first_line(error))
    except RuntimeError as error:
        oom = _is_cpu_oom(error)
        row.update(status="oom" if oom else "error", reason=first_line(error))
    except Exception as error:  # a measurement reports, it does not raise
        row.update(status="error", reason=first_line(error))
    # The exception (and the frames holding its tensors) is gone here, so memory can be returned.
    if oom:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row, layer


def _run(row, config, T, backend, device, dtype, distribution, skew, seed, ceilings, measure_memory,
         timing_options, experts, execution, pass_) -> tuple[Experts, list[float]]:
    """Fill `row` step by step; return the layer and the repetitions' times (ms). Raise on anything
    that stops the measurement."""
    dtype = resolve_dtype(dtype) if dtype is not None else config.dtype
    if dtype != config.dtype:
        config = config.replace(dtype=dtype)
    row["dtype"] = dtype_name(dtype)
    spec = implementations.spec_of(backend)  # unknown name -> UnknownBackendError, before anything is allocated
    if execution not in EXECUTIONS:
        raise ConfigError(f"unknown execution {execution!r}; allowed: {list(EXECUTIONS)}")
    if pass_ not in PASSES:
        raise ConfigError(f"unknown pass {pass_!r}; allowed: {list(PASSES)}")
    backward = pass_ == "forward_backward"
    if backward:
        support = spec.supports("autograd", Where(device, dtype))
        if support.ok is False:
            raise BackendCapabilityError(f"{backend} has no backward: {support.reason}")
    E, k, H, I = config.num_experts, config.top_k, config.hidden_size, config.intermediate_size

    top_k_index, top_k_weights, groups = random_routing(T, config, device, distribution=distribution, skew=skew,
                                                        seed=seed)
    row["experts_hit"] = sum(1 for n in groups if n)
    predicted = predict_memory(config, T, backend, dtype, tokens_per_expert=groups)
    if backward:  # the training model replays triton and transformers' grouped_mm as they run on a GPU
        training = (predict_training_memory(config, T, backend, dtype) if torch.device(device).type == "cuda"
                    else {"total": math.nan, "modelled": False})
        predicted = {**predicted, "total": training["total"], "modelled": training["modelled"]}
    row.update(
        predicted_bytes=predicted["total"], predicted_gather_bytes=predicted["weights_gathered"],
        flops=(training_flops if backward else expert_flops)(T, k, H, I),
        min_bytes=(training_min_bytes if backward else min_bytes)(config, T, row["experts_hit"], dtype),
    )
    if ceilings is None:
        ceilings = cached_ceilings(str(device), dtype_name(dtype))
    row.update(roofline_ms=roofline_ms(row["flops"], row["min_bytes"], ceilings),
               ceiling_copy_GBps=ceilings.copy_GBps, ceiling_matmul_TFLOPs=ceilings.matmul_TFLOPs)
    if spec.kernel_path is not None:
        row["grouped_mm_kernel"] = spec.kernel_path(Where(device, dtype, H, I))
    over_budget = predicted["weights_gathered"] > get_batched_mm_budget()
    if not over_budget:  # a gathering backend over its budget refuses by itself, with its own message
        _check_fits(predicted, 0 if experts is not None else predicted["parameters"], T, H, dtype, device)

    if experts is None:
        experts = build_experts(config, device, seed)
    experts.set_experts_implementation(implementations.implementation(backend))
    hidden_states = random_hidden_states(T, config, device, seed)

    def call():
        return experts(hidden_states, top_k_index, top_k_weights)

    if backward:
        call, check = training_step(experts, hidden_states, top_k_index, top_k_weights, seed)
    graphed_execution = execution in GRAPH_EXECUTIONS
    if graphed_execution and backward:
        if torch.device(device).type != "cuda":
            raise GraphCaptureError(f"CUDA graphs need a CUDA device; this is {device}")
        with torch.enable_grad():
            captured = CapturedStep(call, name=f"{backend}'s forward + backward")
        measure_memory = False  # replays allocate nothing: the graph's pool was sized at capture
        call = captured.replay  # the whole training step's layer, its inputs and upstream gradient in place
    elif graphed_execution:
        graphed = GraphedExperts(experts, implementations.implementation(backend))
        graphed(hidden_states, top_k_index, top_k_weights)  # capture, and load these inputs
        measure_memory = False  # replays allocate nothing: the graph's pool was sized at capture

        def call():  # noqa: F811  the replay alone: inside a model-wide graph the inputs are written in place
            return graphed.replay()

    with torch.enable_grad() if backward else torch.no_grad():
        output = call()
        synchronize(device)
        if T * E * H * I < REL_ERR_MAX_WORK:
            if backward:
                row["rel_err"] = check(output)
            else:
                expected = reference_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
                row["rel_err"] = relative_error(output, expected)
                del expected
        del output
        if measure_memory:
            _measure_memory(row, call, device)
        if execution == "cuda_graph_back_to_back":
            timing = time_back_to_back(call, device=device, max_seconds=timing_options["max_seconds"],
                                       min_reps=timing_options["min_reps"])
        else:
            timing = time_fn(call, device=device, **timing_options)
    row.update(p10_ms=timing.p10_ms, p90_ms=timing.p90_ms, reps=timing.reps, rounds=1,
               round_medians_ms=format_round_medians([timing.median_ms]))
    set_time_columns(row, timing.median_ms)
    return experts, timing.times_ms


def training_step(experts, hidden_states, top_k_index, top_k_weights, seed):
    """(call, check): call runs the layer and returns the gradients of <output, G> with respect to
    the hidden states, the routing weights and both weight tensors (no .grad accumulates); check
    gives the worst relative error of those gradients against the float64 reference."""
    x = hidden_states.detach().requires_grad_(True)
    w = top_k_weights.detach().requires_grad_(True)
    parameters = [experts.gate_up_proj, experts.down_proj]
    for parameter in parameters:
        parameter.requires_grad_(True)
    with seeded(hidden_states.device, seed + 2):
        upstream = torch.randn_like(hidden_states)  # [T, H], never zeros
    inputs = [x, w, *parameters]

    def call():
        output = experts(x, top_k_index, w)
        return torch.autograd.grad(output, inputs, upstream)

    def check(grads) -> float:
        expected = reference_gradients(experts, x, top_k_index, w, upstream)
        names = ("hidden_states", "top_k_weights", "gate_up_proj", "down_proj")
        return max(relative_error(got, expected[name]) for name, got in zip(names, grads))

    return call, check


def set_time_columns(row: dict, median_ms: float) -> None:
    """The median and what follows from it: TFLOP/s, GB/s and the fraction of the roofline."""
    seconds = median_ms / 1e3
    row.update(
        median_ms=median_ms,
        tflops=row["flops"] / seconds / 1e12 if seconds > 0 else math.nan,
        gbps=row["min_bytes"] / seconds / 1e9 if seconds > 0 else math.nan,
        fraction_of_roofline=row["roofline_ms"] / median_ms if median_ms > 0 else math.nan,
    )


def _measure_memory(row, call, device) -> None:
    try:
        measurement = measure_peak_memory(call, device, warmup=0)  # `call` already ran: warm
    except Exception as error:  # the CPU method uses the profiler's semi-private event tree
        if _is_cpu_oom(error):
            raise
        row["memory_method"] = f"not measured: {first_line(error)}"  # e.g. another profiler is running
        return
    row.update(peak_bytes=measurement.peak_bytes, memory_method=measurement.method)


def _check_fits(predicted, parameter_bytes, T, H, dtype, device) -> None:
    """Raise _Refused when weights + inputs + the predicted peak exceed the free memory."""
    if not predicted["modelled"]:
        return
    free = available_bytes(device)
    if free is None:
        return
    itemsize = dtype.itemsize  # bytes per element, no tensor allocated
    need = parameter_bytes + T * H * itemsize + predicted["total"]
    if need > MEMORY_SAFETY_FRACTION * free:
        raise _Refused(
            f"predicted {need / 2**30:.2f} GiB (weights {parameter_bytes / 2**30:.2f} GiB + peak "
            f"{predicted['total'] / 2**30:.2f} GiB) exceeds {MEMORY_SAFETY_FRACTION:.0%} of the "
            f"{free / 2**30:.2f} GiB free on {device}; not run"
        )


def _is_cpu_oom(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, torch.cuda.OutOfMemoryError) or "can't allocate memory" in text \
        or "out of memory" in text.lower()


def _as_int(value) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return -1  # an invalid grid value; the row's reason says what was wrong


def _dtype_label(dtype) -> str:
    try:
        return dtype_name(resolve_dtype(dtype))
    except (ConfigError, AttributeError, TypeError):
        return str(dtype)


def _safe_device_name(device) -> str:
    try:
        return device_name(str(device))
    except Exception:  # e.g. a CUDA device on a machine without one: the row says so in `reason`
        return "unknown"

