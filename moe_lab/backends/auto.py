"""`auto`: run whichever registered backend is fastest at this call's token count.

No backend wins everywhere: at decode (a few tokens) batched_mm's gather is cheap and it needs no
sort, at prefill grouped_mm's one grouped GEMM wins over the other two, and the fused triton kernels
win most points on a GPU but are only interpreted on a CPU. Where the crossover lies depends on the
machine, the dtype and the layer shape, so it is *measured* (`moe_lab.calibrate`, `moe-lab
calibrate`) and stored in a JSON file; until then `DEFAULT_CROSSOVERS` applies.

A crossover table is an ordered list of rules (max_tokens, backend): the first rule with
T <= max_tokens (None: any T) names the backend. T is `hidden_states.shape[0]`, a shape, so choosing
costs no host sync. Under torch.compile the table lookup runs once at trace time
(`torch.compiler.assume_constant_result`) and `T <= max_tokens` becomes a guard: each compiled graph
holds one backend, and a T on the other side of a crossover compiles a second graph.

Calibration file (JSON; `$MOE_LAB_CALIBRATION`, else $XDG_CACHE_HOME or ~/.cache, /moe_lab/calibration.json),
here with the first row of the CPU run DEFAULT_CROSSOVERS quotes:
    {"format": "moe_lab calibration", "version": 1, "entries": [
      {"device_type": "cpu", "device_name": "AMD EPYC", "dtype": "float32",
       "shape": {"num_experts": 128, "top_k": 8, "hidden_size": 64, "intermediate_size": 32},  (or null)
       "rules": [[16, "batched_mm"], [4096, "grouped_mm"], [null, "eager"]],
       "measurements": [{"num_tokens": 1, "winner": "batched_mm", "skipped": {},
                         "median_ms": {"eager": 0.375, "batched_mm": 0.141, "grouped_mm": 0.445}}, ...],
       "torch_version": "2.13.0+cpu", "date": "2026-11-26T09:10:34+00:00",
       "provenance": {"preset": "qwen3-30b-a3b", "cpu_threads": 2, "git_commit": ..., ...}}]}
An entry whose shape equals the layer's (E, k, H, I) wins over the device+dtype entry with
shape null; with neither, the device type's default applies. A table naming a backend that is not
registered or cannot run here skips that rule (the reason goes into `why`); auto never picks itself.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import resolve_dtype
from ..devices import device_name

AUTO = "auto"
TRITON_DTYPES = ("bfloat16", "float16", "float32")
FALLBACK_BACKEND = "grouped_mm"  # what auto runs when no usable rule covers T
FORMAT_NAME = "moe_lab calibration"
FORMAT_VERSION = 1
ENV_VAR = "MOE_LAB_CALIBRATION"
SHAPE_KEYS = ("num_experts", "top_k", "hidden_size", "intermediate_size")  # (E, k, H, I)

#: Uncalibrated crossover tables per device type: (max_tokens or None, backend), first match wins.
DEFAULT_CROSSOVERS: dict[str, tuple[tuple[int | None, str], ...]] = {
    # CPU, float32, measured on the dev machine (2-core "AMD EPYC" VM, torch 2.13.0+cpu) with
    #   moe-lab calibrate --preset qwen3-30b-a3b --scale-down 64 --device cpu --dtype float32 \
    #       --max-seconds 0.3 --output /tmp/cpu.json          (E=128, k=8, H=64, I=32)
    # medians in ms, eager / batched_mm / grouped_mm, torch's default 2 threads (two quiet runs):
    #   T=8     2.02/0.38/0.57   2.16/0.55/0.59      T=16    3.25/0.67/0.72   3.54/0.68/0.76
    #   T=2048  10.4/186/5.93    19.2/202/9.92       T=4096  13.6/374/20.3    25.4/381/16.2
    #   T=8192  19.4/956/107     38.1/768/55.4
    # and with OMP_NUM_THREADS=1: T=8 2.12/0.72/0.63, T=16 3.20/1.41/0.76, T=2048 10.7/322/7.93,
    # T=4096 15.6/634/15.6, T=8192 26.1/1293/60.0. batched_mm wins to T=16 on 2 threads but only to
    # T=4 on one; a crossover at 8 costs at most ~15% on either. eager (one matmul per expert; on a
    # CPU its host read is free) beats grouped_mm at T=8192 in every run; 4096 is a toss-up.
    "cpu": ((8, "batched_mm"), (2048, "grouped_mm"), (None, "eager")),
    # CUDA: the triton backend at every T. In the recorded H100 run (data/h100_bf16_compare_hf_*,
    # bf16, six presets x T = 1..8192) it was the fastest of eager/batched_mm/grouped_mm/triton at
    # all 30 points, launched and graph-replayed alike (the run before its prefill TMA tiles: 27,
    # grouped_mm taking mixtral at T >= 1024 and deepseek-v3 at T = 8192). Launched from Python at
    # T <= 16 the margins are CPU noise; `moe-lab calibrate` measures them on the user's machine.
    # grouped_mm (the fallback) runs where triton cannot: no triton, or float64.
    "cuda": ((None, "triton"),),
}


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

    @property
    def key(self) -> tuple:
        """Entries with the same key replace each other in a file."""
        return self.device_type, self.device_name, self.dtype, self.shape

    def to_json(self) -> dict:
        return {
            "device_type": self.device_type, "device_name": self.device_name, "dtype": self.dtype,
            "shape": None if self.shape is None else dict(zip(SHAPE_KEYS, self.shape)),
            "rules": [list(rule) for rule in self.rules], "measurements": list(self.measurements),
            "torch_version": self.torch_version, "date": self.date, "provenance": dict(self.provenance),
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
        measurements = data.get("measurements") or []
        if not isinstance(measurements, list) or not all(isinstance(m, dict) for m in measurements):
            raise CalibrationError(f"{where}: measurements must be a list of objects (one per token count)")
        return cls(
            device_type=data["device_type"], device_name=data["device_name"], dtype=data["dtype"],
            shape=_parse_shape(data.get("shape"), where), rules=check_rules(data["rules"], where),
            measurements=tuple(measurements), torch_version=str(data.get("torch_version", "")),
            date=str(data.get("date", "")), provenance=dict(data.get("provenance") or {}),
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
_forward_decisions: dict[tuple, tuple] = {}  # (env value, device, dtype, shape) -> usable rules
_warned: set[str] = set()  # files the forward path has already warned about


def load_calibration(path=None) -> tuple[Calibration, ...]:
    """The entries of a calibration file (none if it does not exist); cached per path until
    `reload_calibration()`. A file that is not valid JSON in this format raises CalibrationError."""
    resolved = calibration_path(path)
    key = str(resolved)
    if key not in _loaded:
        _loaded[key] = _read(resolved)
    return _loaded[key]


def reload_calibration() -> None:
    """Forget loaded files and decisions: the next choice reads the file again (and may warn again).
    Graphs torch.compile already traced keep the backend they chose; `torch._dynamo.reset()` drops them."""
    _loaded.clear()
    _forward_decisions.clear()
    _warned.clear()


def _read(path: Path) -> tuple[Calibration, ...]:
    expected = f'expected JSON {{"format": "{FORMAT_NAME}", "version": {FORMAT_VERSION}, "entries": [...]}}'
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
    if not isinstance(data, dict) or data.get("format") != FORMAT_NAME or data.get("version") != FORMAT_VERSION:
        found = {k: data.get(k) for k in ("format", "version")} if isinstance(data, dict) else type(data).__name__
        raise CalibrationError(f"calibration file {path} has {found}; {expected} "
                               "(run `moe-lab calibrate` again to rewrite it)")
    if not isinstance(data.get("entries"), list):
        raise CalibrationError(f"calibration file {path}: 'entries' must be a list; {expected}")
    return tuple(Calibration.from_json(entry, f"calibration file {path}, entry {index}")
                 for index, entry in enumerate(data["entries"]))


# ----------------------------------------------------------------------------- choosing


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


def crossover_table(device, dtype, shape=None, *, path=None) -> tuple[tuple, str]:
    """(rules, source) for this device, dtype and (E, k, H, I): the exact-shape entry of the
    calibration file, else its device+dtype entry with shape null, else DEFAULT_CROSSOVERS.
    Raises CalibrationError for a corrupt file."""
    device, dtype_name, shape = _normalize(device, dtype, shape)
    return _table(device, dtype_name, shape, load_calibration(path), calibration_path(path))


def _table(device: torch.device, dtype_name: str, shape, entries, path) -> tuple[tuple, str]:
    try:
        name = device_name(device)
    except (AssertionError, RuntimeError) as error:  # e.g. asking about "cuda" on a machine without one
        rules = DEFAULT_CROSSOVERS.get(device.type, ((None, FALLBACK_BACKEND),))
        return rules, f"uncalibrated default for {device.type} (no {device} here to match calibrations: {error})"
    mine = [e for e in entries if e.device_type == device.type and e.device_name == name and e.dtype == dtype_name]
    for wanted in ([shape, None] if shape is not None else [None]):
        for entry in mine:
            if entry.shape == wanted:
                scope = "" if wanted is None else " for E={},k={},H={},I={}".format(*wanted)
                return entry.rules, f"calibrated on {entry.device_name} {entry.date[:10]}{scope}"
    rules = DEFAULT_CROSSOVERS.get(device.type, ((None, FALLBACK_BACKEND),))
    if not entries and not Path(path).exists():
        note = f"no calibration file at {path}"
    else:
        note = (f"{path} has {dtype_name} entries for {name!r} at other shapes only" if mine
                else f"no {dtype_name} entry for {name!r} in {path}")
    return rules, f"uncalibrated default for {device.type} ({note})"


def unusable_reason(backend: str, device, compiling: bool = False, dtype=None) -> str | None:
    """Why auto cannot run `backend` on `device` in `dtype` (under torch.compile if `compiling`), or None."""
    from . import registry  # registry imports this module: look it up at call time

    device = torch.device(device)
    if backend == AUTO:
        return "auto cannot choose itself"
    if backend not in registry.available_backends():
        return "not registered"
    if backend == "triton" and device.type != "cuda":
        return f"triton is chosen on CUDA only, not on {device.type}"
    if backend == "triton" and not _triton_available(device):
        return f"triton_available({device}) is False"
    if backend == "triton" and dtype is not None and str(dtype).removeprefix("torch.") not in TRITON_DTYPES:
        return f"the triton kernels take {'/'.join(TRITON_DTYPES)}, not {str(dtype).removeprefix('torch.')}"
    if backend == "eager" and compiling:
        return "eager breaks the torch.compile graph (it reads per-expert token counts on the host)"
    return None


def usable_rules(rules, device, compiling: bool = False, dtype=None) -> tuple[tuple, list[str]]:
    """The rules whose backend can run here, and one line per dropped rule saying why."""
    usable, skipped = [], []
    for max_tokens, backend in rules:
        reason = unusable_reason(backend, device, compiling, dtype)
        if reason is None:
            usable.append((max_tokens, backend))
        else:
            skipped.append(f"skipped {backend}: {reason}")
    return tuple(usable), skipped


def _triton_available(device) -> bool:
    try:
        from . import triton_available
    except ImportError:  # the triton backend is not part of this build of moe_lab
        return False
    return bool(triton_available(device))


def pick(rules, num_tokens) -> str:
    """The backend of the first rule with num_tokens <= max_tokens (None: any); FALLBACK_BACKEND if none.
    Works on a torch.compile SymInt too: each comparison becomes a guard."""
    for max_tokens, backend in rules:
        if max_tokens is None or num_tokens <= max_tokens:
            return backend
    return FALLBACK_BACKEND


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


def choose_backend(num_tokens: int, device, dtype, shape=None, *, path=None,
                   compiling: bool = False) -> tuple[str, str]:
    """(backend, why) that `auto` runs for `num_tokens` tokens on this device and dtype, for a layer
    of `shape` (E, k, H, I) or a MoEConfig (None: the device+dtype entry only), in eager mode or
    (compiling=True) inside torch.compile. A corrupt calibration file raises CalibrationError (a
    ValueError) naming it."""
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise ValueError(f"num_tokens must be an int >= 0, got {num_tokens!r}")
    device, dtype_name, shape = _normalize(device, dtype, shape)
    rules, source = _table(device, dtype_name, shape, load_calibration(path), calibration_path(path))
    usable, skipped = usable_rules(rules, device, compiling, dtype_name)
    backend = pick(usable, num_tokens)
    why = f"{source}: {_explain(usable, num_tokens, backend)}"
    return backend, why + "".join(f"; {line}" for line in skipped)


# ----------------------------------------------------------------------------- the backend


@torch.compiler.assume_constant_result
def _forward_rules(device: torch.device, dtype: torch.dtype, shape: tuple, compiling: bool) -> tuple:
    """Usable rules for a forward call; a constant under torch.compile (runs once, at trace time).
    A corrupt file warns once and the defaults apply: a model forward must not die on a cache file."""
    from . import registry  # registry imports this module: look it up at call time

    # Registered names are part of the key: registering or removing a backend can change the choice.
    key = (os.environ.get(ENV_VAR), device, dtype, shape, compiling, tuple(registry.available_backends()))
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
        rules, _ = _table(device, dtype_name, shape, entries, path)
        _forward_decisions[key] = usable_rules(rules, device, compiling, dtype)[0]
    return _forward_decisions[key]


def auto_experts_forward(experts, hidden_states, top_k_index, top_k_weights):
    """Run the backend `choose_backend` names for T = hidden_states.shape[0] tokens."""
    from . import registry  # registry imports this module: look it up at call time

    # (E, k, H, I) from shapes alone; I from down_proj's volume E*H*I, which is the same whether it is
    # stored [E, H, I] or transposed. (expert_weights() costs ~5 us per call on an nn.Module.)
    num_experts, hidden = experts.gate_up_proj.shape[0], hidden_states.shape[1]
    shape = (int(num_experts), int(top_k_index.shape[1]), int(hidden),
             int(experts.down_proj.numel() // (num_experts * hidden)))
    rules = _forward_rules(hidden_states.device, hidden_states.dtype, shape, torch.compiler.is_compiling())
    backend = pick(rules, hidden_states.shape[0])
    return registry.get_backend(backend)(experts, hidden_states, top_k_index, top_k_weights)
