"""Measure where one experts backend overtakes another on this machine, and store it for `auto`.

`calibrate(preset)` times every candidate backend at every token count with `moe_lab.bench`'s
`measure` (same warm-up, median and refusal rules as `moe-lab bench`), takes the fastest per T and
compresses the winners into crossover rules: consecutive T with the same winner merge into one
rule (max_tokens = the largest T it won), and the last rule covers every larger T. An isolated near tie
(the backend chosen at the T before within `tie_margin` of the fastest, and the fastest again at the next T)
keeps that backend, so timing noise does not make the rules switch back and forth, while a real crossover
still switches where it starts. The entry goes
into the calibration file `auto` reads (its format: moe_lab.backends.calibration), replacing an
earlier entry for the same device, dtype, shape and pass. With `backward=True` it times training calls
(forward + backward, `measure`'s "forward_backward" pass) among the backends that give gradients: auto
reads those rules for calls that need gradients.

`moe_lab.calibrate` is this module's `calibrate` function.
"""
from __future__ import annotations

import math

import torch

from ..backends import Where, available_backends, get_spec
from ..backends.auto import Needs, unusable_reason
from ..backends.calibration import (
    SHAPE_KEYS, Calibration, calibration_path, load_calibration, reload_calibration, write_calibration,
)
from ..config import MoEConfig, resolve_dtype
from ..devices import device_name
from ..presets import get_preset
from .measure import measure_with_layer
from .provenance import git_commit, utc_now
from .roofline import Ceilings
from .timing import resolve_device

DEFAULT_TOKENS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


def candidate_backends(device, backends=None, dtype=torch.float32, *, grad: bool = False) -> list[str]:
    """The backends to time: `backends` checked, or every registered one auto could choose on
    `device` in `dtype` (not auto itself, not one that runs only through an interpreter; with `grad`, not
    one declared without autograd)."""
    where, needs = Where.of(device, resolve_dtype(dtype)), Needs(grad=grad)
    if backends is None:
        return [name for name in available_backends() if unusable_reason(get_spec(name), where, needs) is None]
    names = [backends] if isinstance(backends, str) else list(backends)
    if not names:
        raise ValueError(f"backends is empty; give names from {available_backends()}, or None for all")
    for name in names:
        reason = unusable_reason(get_spec(name), where, needs)  # unknown -> UnknownBackendError naming the registered ones
        if reason is not None:
            raise ValueError(f"cannot calibrate {name!r} on {where.device} in {str(where.dtype).removeprefix('torch.')}: "
                             f"{reason}; choose from "
                             f"{candidate_backends(where.device, dtype=where.dtype, grad=grad)}")
    return names


def sticky_winners(measurements, tie_margin: float = 0.0) -> list[tuple[int, str]]:
    """[(T, backend), ...] from measurements sorted by T ({"num_tokens", "median_ms": {backend: ms or None}}):
    the fastest at each T, except at an isolated near tie: where the backend chosen at the T before is within
    `tie_margin` (0.03: 3 %) of the fastest and is the fastest again at the next T, it stays. A change that
    holds at the next T (or at the last T) switches where it starts. T where nothing ran are left out."""
    if isinstance(tie_margin, bool) or not isinstance(tie_margin, (int, float)) or not 0 <= tie_margin < 1:
        raise ValueError(f"tie_margin must be a fraction in [0, 1), e.g. 0.03 for 3 %; got {tie_margin!r}")
    fastest = []  # (T, {backend: ms}, the fastest there), for the T where something ran
    for measured in measurements:
        ran = {name: ms for name, ms in measured["median_ms"].items() if ms is not None}
        if ran:
            fastest.append((measured["num_tokens"], ran, min(ran, key=ran.get)))
    chosen, previous = [], None
    for index, (num_tokens, ran, winner) in enumerate(fastest):
        near_tie = previous in ran and ran[previous] <= ran[winner] * (1 + tie_margin)
        back_next = index + 1 < len(fastest) and fastest[index + 1][2] == previous
        previous = previous if near_tie and back_next else winner
        chosen.append((num_tokens, previous))
    return chosen


def rules_from_winners(winners) -> tuple[tuple[int | None, str], ...]:
    """[(T, fastest backend), ...] sorted by T -> crossover rules; the last rule covers any T.

        [(1, "b"), (8, "b"), (64, "g"), (512, "g")] -> ((8, "b"), (None, "g"))
    """
    rules: list[list] = []
    for num_tokens, backend in winners:
        if rules and rules[-1][1] == backend:
            rules[-1][0] = num_tokens
        else:
            rules.append([num_tokens, backend])
    if not rules:
        raise ValueError("no winners to turn into rules")
    rules[-1][0] = None
    return tuple((max_tokens, backend) for max_tokens, backend in rules)


def calibrate(config_or_preset, *, tokens=DEFAULT_TOKENS, backends=None, device=None, dtype=None, path=None,
              max_seconds: float = 0.2, any_shape: bool = False, seed: int = 0, preset: str = "",
              backward: bool = False, tie_margin: float = 0.03) -> Calibration:
    """Time the candidate backends at each T, write the crossover rules, return the entry.

    config_or_preset: a MoEConfig or a preset name (scale it down for a CPU: moe_lab.scale_down).
    tokens: the token counts to measure. backends: names, default `candidate_backends(device)`.
    dtype: overrides the config's. path: the calibration file (default: `calibration_path()`).
    max_seconds: timing budget per measurement. any_shape: store the entry with shape null so it
    serves every layer shape on this device and dtype (an exact-shape entry still wins).
    preset: the name recorded in the entry for a MoEConfig (e.g. the preset it was scaled down
    from). Routing is uniform (seeded). A backend that is refused, unsupported or fails at some T just
    does not compete there; its reason is kept in the entry. backward: time training calls (forward +
    backward of the hidden states, routing weights and both weights) among the backends that give gradients;
    the entry's pass is "forward_backward" and auto reads it for calls that need gradients. tie_margin: how
    much slower (a fraction) the backend chosen at the T before may be and still be kept (`sticky_winners`);
    each measurement's own fastest stays in the entry as its "winner".
    """
    config, preset = _resolve_config(config_or_preset, preset)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype) if dtype is not None else config.dtype
    config = config.replace(dtype=dtype) if dtype != config.dtype else config
    tokens = _check_tokens(tokens)
    sticky_winners([], tie_margin)  # a bad margin fails now, before minutes of measuring
    names = candidate_backends(device, backends, dtype, grad=backward)
    pass_ = "forward_backward" if backward else "forward"
    if not isinstance(max_seconds, (int, float)) or not max_seconds > 0:
        raise ValueError(f"max_seconds must be a number of seconds > 0, got {max_seconds!r}")
    target = calibration_path(path)
    reload_calibration()
    previous = load_calibration(target)  # a corrupt file fails now, before minutes of measuring

    # auto compares backends with each other, not with the roofline: skip measuring the ceilings.
    no_ceilings = Ceilings(math.nan, math.nan, str(device), str(dtype).removeprefix("torch."))
    timing = dict(max_seconds=float(max_seconds), max_reps=200)
    measurements, winners, layer = [], [], None
    for num_tokens in tokens:
        medians, skipped = {}, {}
        for name in names:
            row, built = measure_with_layer(config, num_tokens, name, device=device, seed=seed, ceilings=no_ceilings,
                                            measure_memory=False, preset=preset, experts=layer,
                                            timing_options=timing, pass_=pass_)
            layer = built or layer
            if row["status"] == "ok":
                medians[name] = row["median_ms"]
            else:
                medians[name] = None
                skipped[name] = f"{row['status']}: {row['reason']}"
        ran = {name: ms for name, ms in medians.items() if ms is not None}
        winner = min(ran, key=ran.get) if ran else None
        if winner is not None:
            winners.append((num_tokens, winner))
        measurements.append({"num_tokens": num_tokens, "winner": winner, "median_ms": medians, "skipped": skipped})
    del layer
    if not winners:
        reasons = "; ".join(f"T={m['num_tokens']} {name}: {why}" for m in measurements for name, why in m["skipped"].items())
        raise ValueError(f"no backend ran at any token count, so there is nothing to calibrate: {reasons}")

    shape = tuple(getattr(config, key) for key in SHAPE_KEYS)
    entry = Calibration(
        device_type=device.type, device_name=device_name(device), dtype=str(dtype).removeprefix("torch."),
        shape=None if any_shape else shape, rules=rules_from_winners(sticky_winners(measurements, tie_margin)),
        measurements=tuple(measurements),
        torch_version=torch.__version__, date=utc_now(), pass_=pass_,
        provenance={"measured_shape": dict(zip(SHAPE_KEYS, shape)), "preset": preset, "routing": "uniform",
                    "seed": seed, "max_seconds_per_measurement": float(max_seconds), "tie_margin": float(tie_margin),
                    "cpu_threads": torch.get_num_threads(), "moe_lab_version": _version(), "git_commit": git_commit()},
    )
    Calibration.from_json(entry.to_json(), "the new entry")  # the rules obey the format auto reads
    write_calibration(entry, target, previous)
    return entry


def format_calibration(entry: Calibration) -> str:
    """A terminal table: T, winner, each backend's median ms ("-": did not run), then the rules."""
    names = list(dict.fromkeys(name for m in entry.measurements for name in m["median_ms"]))
    header = ["T", "winner", *(f"{name} ms" for name in names)]
    rows = [[str(m["num_tokens"]), m["winner"] or "-",
             *(f"{m['median_ms'][n]:.4g}" if m["median_ms"].get(n) is not None else "-" for n in names)]
            for m in entry.measurements]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths)) for row in [header, *rows]]
    for m in entry.measurements:
        lines += [f"  T={m['num_tokens']} {name} not timed: {why}" for name, why in m["skipped"].items()]
    scope = "any shape" if entry.shape is None else "E={},k={},H={},I={}".format(*entry.shape)
    calls = ", training calls" if entry.pass_ == "forward_backward" else ""
    margin = entry.provenance.get("tie_margin") or 0
    ties = f" (an isolated flip within {margin:.0%} of the fastest keeps the backend before)" if margin else ""
    lines.append(f"rules ({entry.device_name}, {entry.dtype}, {scope}{calls}): {describe_rules(entry.rules)}{ties}")
    return "\n".join(lines)


def describe_rules(rules) -> str:
    """((16, "batched_mm"), (None, "grouped_mm")) -> "T <= 16 -> batched_mm; T > 16 -> grouped_mm"."""
    parts, previous = [], None
    for max_tokens, backend in rules:
        if max_tokens is not None:
            parts.append(f"T <= {max_tokens} -> {backend}")
        else:
            parts.append(f"T > {previous} -> {backend}" if previous is not None else f"any T -> {backend}")
        previous = max_tokens
    return "; ".join(parts)


def _resolve_config(config_or_preset, label: str) -> tuple[MoEConfig, str]:
    if isinstance(config_or_preset, str):
        return get_preset(config_or_preset).config, label or config_or_preset
    if not isinstance(config_or_preset, MoEConfig):
        raise TypeError(f"expected a MoEConfig or a preset name, got {type(config_or_preset).__name__}")
    return config_or_preset, label


def _check_tokens(tokens) -> list[int]:
    values = [tokens] if isinstance(tokens, int) else list(tokens)
    if not values or any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in values):
        raise ValueError(f"tokens must be one or more ints >= 1, e.g. {DEFAULT_TOKENS[:5]}; got {tokens!r}")
    return sorted(set(values))


def _version() -> str:
    from .. import __version__

    return __version__
