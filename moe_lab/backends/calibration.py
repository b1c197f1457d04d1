"""The calibration file `auto` reads: its format, where it lives, reading and writing it.

A calibration is a crossover table measured on one device, in one dtype, for one layer shape (or
any shape): an ordered list of rules (max_tokens, backend), the first rule with T <= max_tokens
(None: any T) naming the backend. `moe_lab.bench.calibrate` measures one and writes it here;
`moe_lab.backends.auto` reads it. This module imports nothing above the backends.

File (JSON; `$MOE_LAB_CALIBRATION`, else $XDG_CACHE_HOME or ~/.cache, /moe_lab/calibration.json):
    {"format": "moe_lab calibration", "version": 1 (2 with training entries), "entries": [
      {"device_type": "cpu", "device_name": "AMD EPYC", "dtype": "float32",
       "shape": {"num_experts": 128, "top_k": 8, "hidden_size": 64, "intermediate_size": 32},  (or null)
       "rules": [[16, "batched_mm"], [4096, "grouped_mm"], [null, "eager"]],
       "measurements": [{"num_tokens": 1, "winner": "batched_mm", "skipped": {},
                         "median_ms": {"eager": 0.375, "batched_mm": 0.141, "grouped_mm": 0.445}}, ...],
       "torch_version": "2.13.0+cpu", "date": "2026-11-26T09:10:34+00:00", "pass": "forward",
       "provenance": {"preset": "qwen3-30b-a3b", "cpu_threads": 2, "git_commit": ..., ...}}]}
An entry whose shape equals the layer's (E, k, H, I) wins over the device+dtype entry with shape
null (see `auto.crossover_table`). "pass" (absent: "forward") says what was timed: the forward alone, or
"forward_backward", a training call's forward and backward (`moe-lab calibrate --backward`); a call that
needs gradients reads the latter first, then the former.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

FORMAT_NAME = "moe_lab calibration"
#: Version 2 files may hold training entries ("pass": "forward_backward"); they are written as version 1 when
#: they hold none, so that a moe_lab from before training entries still reads them, and as 2 otherwise, which such
#: a moe_lab refuses (and `auto` there falls back to its defaults) rather than taking training rules for the forward.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
ENV_VAR = "MOE_LAB_CALIBRATION"
SHAPE_KEYS = ("num_experts", "top_k", "hidden_size", "intermediate_size")  # (E, k, H, I)
#: What an entry's measurements timed: the forward alone, or a training call's forward and backward.
PASSES = ("forward", "forward_backward")


class CalibrationError(ValueError):
    """A calibration file that cannot be read as moe_lab's format (says which file and what is expected)."""


@dataclass(frozen=True)
class Calibration:
    """One crossover table measured on one device, in one dtype, for one layer shape (or any shape)."""

    device_type: str  # "cpu", "cuda"
    device_name: str  # device_name(device): the GPU's name or the CPU model
    dtype: str  # "float32", "bfloat16", ...
    shape: tuple[int, int, int, int] | None  # (E, k, H, I) it applies to; None: any shape
    rules: tuple[tuple[int | None, str], ...]  # ((max_tokens or None, backend), ...)
    measurements: tuple[dict, ...] = ()  # per T: num_tokens, winner, median_ms {backend: ms}, skipped {backend: why}
    torch_version: str = ""
    date: str = ""
    provenance: dict = field(default_factory=dict)  # measured shape, preset, threads, moe_lab version, commit
    pass_: str = "forward"  # one of PASSES: what the measurements timed

    @property
    def key(self) -> tuple:
        """Entries with the same key replace each other in a file."""
        return self.device_type, self.device_name, self.dtype, self.shape, self.pass_

    def to_json(self) -> dict:
        return {
            "device_type": self.device_type, "device_name": self.device_name, "dtype": self.dtype,
            "shape": None if self.shape is None else dict(zip(SHAPE_KEYS, self.shape)),
            "rules": [list(rule) for rule in self.rules], "measurements": list(self.measurements),
            "torch_version": self.torch_version, "date": self.date, "pass": self.pass_,
            "provenance": dict(self.provenance),
        }

    @classmethod
    def from_json(cls, data, where: str = "calibration entry") -> "Calibration":
        if not isinstance(data, dict):
            raise CalibrationError(f"{where}: expected an object with device_type, device_name, dtype, shape, "
                                   f"rules; got {type(data).__name__}")
        missing = [key for key in ("device_type", "device_name", "dtype", "rules") if key not in data]
        if missing:
            raise CalibrationError(f"{where}: missing {missing}; an entry needs device_type, device_name, dtype, rules")
        for key in ("device_type", "device_name", "dtype"):
            if not isinstance(data[key], str) or not data[key]:
                raise CalibrationError(f"{where}: {key} must be a non-empty string, got {data[key]!r}")
        pass_ = data.get("pass", "forward")
        if pass_ not in PASSES:
            raise CalibrationError(f"{where}: pass must be one of {list(PASSES)} (absent: forward), got {pass_!r}")
        measurements = data.get("measurements") or []
        if not isinstance(measurements, list) or not all(isinstance(m, dict) for m in measurements):
            raise CalibrationError(f"{where}: measurements must be a list of objects (one per token count)")
        return cls(
            device_type=data["device_type"], device_name=data["device_name"], dtype=data["dtype"],
            shape=_parse_shape(data.get("shape"), where), rules=check_rules(data["rules"], where),
            measurements=tuple(measurements), torch_version=str(data.get("torch_version", "")),
            date=str(data.get("date", "")), provenance=dict(data.get("provenance") or {}), pass_=pass_,
        )


def check_rules(rules, where: str = "rules") -> tuple[tuple[int | None, str], ...]:
    """Validate a crossover table: [(max_tokens, backend), ...], max_tokens ints >= 0 strictly
    increasing, only the last may be None (any T). Returns it as a tuple of tuples."""
    expected = "a non-empty list of [max_tokens, backend] with max_tokens increasing ints >= 0, only the last null"
    if not isinstance(rules, (list, tuple)) or not rules:
        raise CalibrationError(f"{where}: rules must be {expected}; got {rules!r}")
    checked, previous = [], -1
    for index, rule in enumerate(rules):
        if not isinstance(rule, (list, tuple)) or len(rule) != 2:
            raise CalibrationError(f"{where}: rule {index} is {rule!r}; rules must be {expected}")
        max_tokens, name = rule
        if not isinstance(name, str) or not name:
            raise CalibrationError(f"{where}: rule {index} names backend {name!r}; a backend name is a string")
        if max_tokens is None:
            if index != len(rules) - 1:
                raise CalibrationError(f"{where}: rule {index} has max_tokens null but is not last; rules must be {expected}")
        elif isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= previous:
            raise CalibrationError(f"{where}: rule {index} has max_tokens {max_tokens!r} after {previous}; "
                                   f"rules must be {expected}")
        else:
            previous = max_tokens
        checked.append((max_tokens, name))
    return tuple(checked)


def _parse_shape(shape, where: str) -> tuple[int, int, int, int] | None:
    if shape is None:
        return None
    if not isinstance(shape, dict) or set(shape) != set(SHAPE_KEYS) or not all(
            isinstance(shape[key], int) and not isinstance(shape[key], bool) and shape[key] > 0 for key in SHAPE_KEYS):
        raise CalibrationError(f"{where}: shape must be null or {{{', '.join(SHAPE_KEYS)}}} with positive ints, "
                               f"got {shape!r}")
    return tuple(shape[key] for key in SHAPE_KEYS)


# ----------------------------------------------------------------------------- the file


def calibration_path(path=None) -> Path:
    """`path`, else $MOE_LAB_CALIBRATION, else $XDG_CACHE_HOME (or ~/.cache)/moe_lab/calibration.json."""
    if path is not None:
        return Path(path).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(cache, "moe_lab", "calibration.json").expanduser()


_loaded: dict[str, tuple[Calibration, ...]] = {}  # resolved path -> entries
_generation = 0  # bumped by reload_calibration: caches built from loaded files key on it


def load_calibration(path=None) -> tuple[Calibration, ...]:
    """The entries of a calibration file (none if it does not exist); cached per path until
    `reload_calibration()`. A file that is not valid JSON in this format raises CalibrationError."""
    resolved = calibration_path(path)
    key = str(resolved)
    if key not in _loaded:
        _loaded[key] = _read(resolved)
    return _loaded[key]


def reload_calibration() -> None:
    """Forget loaded files and what was decided from them: the next choice reads the file again (and
    may warn again). Graphs torch.compile already traced keep the backend they chose;
    `torch._dynamo.reset()` drops them."""
    global _generation
    _loaded.clear()
    _generation += 1


def generation() -> int:
    """Changes whenever loaded files are forgotten: a cache of decisions made from them keys on it."""
    return _generation


def _read(path: Path) -> tuple[Calibration, ...]:
    expected = (f'expected JSON {{"format": "{FORMAT_NAME}", "version": {" or ".join(map(str, READABLE_VERSIONS))}, '
                f'"entries": [...]}}')
    try:
        text = path.read_text()
    except FileNotFoundError:
        return ()
    except OSError as error:
        raise CalibrationError(f"calibration file {path} cannot be read ({error}); {expected}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise CalibrationError(f"calibration file {path} is not valid JSON ({error}); {expected}; "
                               "delete it or run `moe-lab calibrate` again") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME or data.get("version") not in READABLE_VERSIONS:
        found = {k: data.get(k) for k in ("format", "version")} if isinstance(data, dict) else type(data).__name__
        raise CalibrationError(f"calibration file {path} has {found}; {expected} "
                               "(run `moe-lab calibrate` again to rewrite it)")
    if not isinstance(data.get("entries"), list):
        raise CalibrationError(f"calibration file {path}: 'entries' must be a list; {expected}")
    entries = tuple(Calibration.from_json(entry, f"calibration file {path}, entry {index}")
                    for index, entry in enumerate(data["entries"]))
    if data["version"] == 1 and any(entry.pass_ != "forward" for entry in entries):
        raise CalibrationError(f"calibration file {path} is version 1 but holds training entries (pass "
                               "forward_backward), which only version 2 files hold; run `moe-lab calibrate` again")
    return entries


def write_calibration(entry: Calibration, path=None, existing=None) -> None:
    """Add `entry` to the calibration file, replacing one with the same device, dtype, shape and pass.
    `existing`: the file's entries if already read. Written atomically (temp file, then rename)."""
    target = calibration_path(path)
    existing = load_calibration(target) if existing is None else existing
    entries = [e for e in existing if e.key != entry.key] + [entry]
    version = FORMAT_VERSION if any(e.pass_ != "forward" for e in entries) else 1
    data = {"format": FORMAT_NAME, "version": version, "entries": [e.to_json() for e in entries]}
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(target.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(temporary, target)
    reload_calibration()  # the next choice reads what was just written
