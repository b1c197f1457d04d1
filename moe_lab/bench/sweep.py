"""Sweeps: `measure` over a grid of layer shapes, token counts, backends and dtypes -> a DataFrame.

The grid is the product of: configs x field_grid x dtypes x tokens x backends (backends vary
fastest, so the backends being compared are measured one right after the other; with rounds=R
they are measured R times over, in interleaved order: see `bench.rounds`). A grid point
that is not a valid layer (top_k > num_experts, ...) becomes a row with status "unsupported";
every other outcome is whatever `measure` reports. Nothing in the grid stops the sweep.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools

from ..backends import runnable_backends
from ..config import MoEConfig
from ..errors import ConfigError, first_line
from ..presets import get_preset
from .columns import ROW_COLUMNS, to_frame
from .measure import EXECUTIONS, PASSES, SHAPE_FIELDS, TIMING_DEFAULTS, measure_with_layer, new_row, set_time_columns
from .progress import progress_bar
from .provenance import provenance  # noqa: F401  (re-exported: bench.sweep.provenance)
from .rounds import merge_rounds, round_order
from .timing import resolve_device

#: field_grid keys that vary the routing rather than the layer.
ROUTING_FIELDS = ("distribution", "skew", "seed")
#: what measure_kwargs may hold.
MEASURE_OPTIONS = (*ROUTING_FIELDS, "measure_memory", *TIMING_DEFAULTS)


def normalize_configs(configs) -> dict[str, MoEConfig]:
    """A MoEConfig, a preset name, a dict name -> MoEConfig (or preset name), or a list of those
    -> {label: MoEConfig}; the label is the preset name, the dict key, or "" for a bare config."""
    if isinstance(configs, (MoEConfig, str)):
        configs = [configs]
    if isinstance(configs, dict):
        items = list(configs.items())
    else:
        items = [(c if isinstance(c, str) else "", c) for c in configs]
    result = {}
    for label, config in items:
        if isinstance(config, str):
            config = get_preset(config).config
        if not isinstance(config, MoEConfig):
            raise TypeError(f"expected a MoEConfig or a preset name, got {type(config).__name__}")
        key, n = label, 1
        while key in result:  # two bare configs: keep both
            key, n = f"{label}#{n}", n + 1
        result[key] = config
    return result


def _grid(field_grid: dict) -> list[dict]:
    config_fields = {f.name for f in dataclasses.fields(MoEConfig)}
    for name in field_grid:
        if name not in config_fields and name not in ROUTING_FIELDS:
            raise ValueError(f"unknown sweep field {name!r}; use MoEConfig fields {sorted(config_fields)} "
                             f"or routing fields {list(ROUTING_FIELDS)}")
    names = list(field_grid)
    values = [v if isinstance(v, (list, tuple, range)) else [v] for v in field_grid.values()]
    return [dict(zip(names, combo)) for combo in itertools.product(*values)]


def _as_list(value):
    return list(value) if isinstance(value, (list, tuple, range)) else [value]


def _unsupported_row(label, config, fields, dtype, num_tokens, backend, device, error) -> dict:
    shape = {name: fields.get(name, getattr(config, name)) for name in SHAPE_FIELDS}
    row = new_row(backend=backend, preset=label, shape=shape, num_tokens=num_tokens,
                  dtype=dtype if dtype is not None else fields.get("dtype", config.dtype), device=device,
                  distribution=fields.get("distribution", "uniform"), skew=fields.get("skew", 1.0))
    row.update(status="unsupported", reason=first_line(error))
    return row


def sweep(configs, tokens, backends=None, dtypes=None, *, device=None, progress: bool = True, ceilings=None,
          measure_kwargs: dict | None = None, executions=("eager",), rounds: int = 1, passes=("forward",),
          **field_grid):
    """Measure every grid point; return a pandas DataFrame with one row per measurement.

    configs: see `normalize_configs`. tokens: an int or a list. backends: names (default: the
    registered moe_lab backends that run compiled on `device`, i.e. not triton's CPU interpreter).
    dtypes: names or torch dtypes (default: each config's own). field_grid: any MoEConfig field -> list of values (e.g. num_experts=[8, 64], top_k=[1, 2]), plus routing
    fields distribution / skew / seed. measure_kwargs: passed to `measure` (max_seconds,
    max_reps, min_reps, warmup, measure_memory, seed, ...). executions: any of "eager", "cuda_graph" and
    "cuda_graph_back_to_back" (see `measure`), varied fastest after backends. passes: "forward" and/or "forward_backward"
    (see `measure`), varied fastest of all. `ceilings`: one `Ceilings` for all
    rows, or None to measure them once per device and dtype. Progress: a tqdm.auto bar when
    tqdm is installed. Bad arguments raise here, before anything runs; after that nothing does.
    """
    device = resolve_device(device)
    configs = normalize_configs(configs)
    tokens = [int(t) for t in _as_list(tokens)]
    backends = runnable_backends(device, interpreted=False) if backends is None else _as_list(backends)
    dtypes = [None] if dtypes is None else _as_list(dtypes)
    executions = _as_list(executions)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    unknown_executions = [e for e in executions if e not in EXECUTIONS]
    if unknown_executions:
        raise ValueError(f"unknown executions {unknown_executions}; allowed: {list(EXECUTIONS)}")
    passes = _as_list(passes)
    unknown_passes = [p for p in passes if p not in PASSES]
    if unknown_passes or not passes:
        raise ValueError(f"passes must be one or more of {list(PASSES)}, got {passes}")
    grid = _grid(field_grid)
    options = dict(measure_kwargs or {})
    unknown = set(options) - set(MEASURE_OPTIONS)
    if unknown:
        raise ValueError(f"unknown measure_kwargs {sorted(unknown)}; allowed: {list(MEASURE_OPTIONS)}")
    clash = set(options) & set(field_grid)
    if clash:
        raise ValueError(f"{sorted(clash)} given both in measure_kwargs and as a sweep field")
    timing = {name: options.pop(name) for name in TIMING_DEFAULTS if name in options}
    options["timing_options"] = timing

    total = len(configs) * len(grid) * len(dtypes) * len(tokens) * len(backends) * len(executions) * len(passes) * rounds
    bar = progress_bar(total, progress, "moe_lab sweep", "run")
    rows = []
    try:
        for label, base, fields, config, error in _layers(configs, grid):
            routing = {k: v for k, v in fields.items() if k in ROUTING_FIELDS}
            for dtype in dtypes:
                layer = None  # built by the first run that fits, reused across tokens, backends and rounds

                def measure_one(num_tokens, backend, execution, pass_, round_index):
                    nonlocal layer
                    if error is not None:
                        row = _unsupported_row(label, base, fields, dtype, num_tokens, backend, device, error)
                        row.update(execution=execution, **{"pass": pass_})
                        return row
                    # memory is measured in the first round only: it does not drift
                    round_options = options if round_index == 0 else {**options, "measure_memory": False}
                    row, built = measure_with_layer(config, num_tokens, backend, device=device, dtype=dtype,
                                                    ceilings=ceilings, preset=label, experts=layer,
                                                    execution=execution, keep_times=True, pass_=pass_, **routing,
                                                    **round_options)
                    layer = built or layer
                    return row

                for num_tokens in tokens:
                    runs = list(itertools.product(backends, executions, passes))
                    rows.extend(_in_rounds(runs, rounds, functools.partial(measure_one, num_tokens), bar))
                del layer
    finally:
        if bar is not None:
            bar.close()
    return to_frame(rows, ROW_COLUMNS)


def _in_rounds(runs: list, rounds: int, measure_one, bar) -> list[dict]:
    """Measure every (backend, execution, pass) of one point `rounds` times in interleaved order; one
    merged row each. A run that did not end "ok" is not repeated: the refusal or error is its result."""
    by_run = {run: [] for run in runs}
    for round_index in range(rounds):
        for run in round_order(runs, round_index):
            done = by_run[run]
            row = done[0] if done and done[0]["status"] != "ok" else None
            if row is None:
                row = measure_one(*run, round_index)
                done.append(row)
            _advance(bar, row)
    return [merge_rounds(by_run[run], set_time_columns) for run in runs]


def _layers(configs: dict, grid: list[dict]):
    """(label, base config, grid fields, config or None, error or None) per config x grid point."""
    for label, base in configs.items():
        for fields in grid:
            layer_fields = {k: v for k, v in fields.items() if k not in ROUTING_FIELDS}
            config = error = None
            try:
                config = base.replace(**layer_fields)
            except (ConfigError, ValueError) as invalid:  # e.g. top_k > num_experts
                error = invalid
            yield label, base, fields, config, error


def _advance(bar, row) -> None:
    if bar is None:
        return
    bar.set_postfix_str(f"{row['backend']} {row['execution']} {row['pass']} T={row['num_tokens']} {row['status']}",
                        refresh=False)
    bar.update(1)
