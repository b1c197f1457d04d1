"""Notebook 11 exercise: ship a backend for four deployments, from the recorded data and the autograd probe."""
from __future__ import annotations

from . import feedback

#: name -> (what the deployment is, preset, T, execution, triton available, gradients needed)
SCENARIOS = {
    "serve_decode": ("serving qwen3-30b-a3b on an H100, decode (T=1), each step replayed from a CUDA graph",
                     "qwen3-30b-a3b", 1, "cuda_graph", True, False),
    "serve_decode_no_triton": ("the same, on a GPU where the triton kernels cannot run",
                               "qwen3-30b-a3b", 1, "cuda_graph", False, False),
    "prefill_no_triton": ("prefill of mixtral-8x7b (T=8192), kernels launched from Python, no triton",
                          "mixtral-8x7b", 8192, "eager", False, False),
    "finetune": ("fine-tuning olmoe-1b-7b on an H100, 8192 tokens per step, launched from Python",
                 "olmoe-1b-7b", 8192, "eager", True, True),
}
EXECUTION_WORDS = {"eager": "launched from Python", "cuda_graph": "replayed from a CUDA graph"}
#: Two recorded backends within this fraction of each other in every round are a tie: either answer counts.
TIE_MARGIN = 0.05


def _recorded():
    from ..recorded_tables import load_recorded

    return load_recorded("presets", execution=None)[0]


def _probe():
    """The notebook's probe (device "auto"): on the GPU where there is one, which runs triton's own kernels;
    a CPU probe there would leave triton out (its interpreter is only switched on where there is no GPU)."""
    from ..devices import default_device
    from ..lessons.nb11_choosing_a_backend import autograd_probe

    return autograd_probe(device=default_device())


def allowed(name: str, probe=None) -> dict:
    """{backend: None if it may ship in scenario `name`, else why not} over moe_lab's four backends."""
    from ..lessons.nb11_choosing_a_backend import MOE_LAB_BACKENDS

    _, _, _, _, triton, training = SCENARIOS[name]
    out = {}
    for backend in MOE_LAB_BACKENDS:
        why = None
        if backend == "triton" and not triton:
            why = "this GPU cannot run the triton kernels"
        elif training:
            probe = _probe() if probe is None else probe
            if backend in probe.index and not probe.loc[backend, "supports training"]:
                why = f"training needs gradients, and the probe says {backend} {probe.loc[backend, 'result']}"
        out[backend] = why
    return out


def best(name: str, recorded=None, probe=None) -> tuple[str, float, dict]:
    """(backend, its median ms, {backend: recorded row or None}) for scenario `name`: the fastest recorded
    row among the backends `allowed` there (training: the forward times, the only ones recorded)."""
    recorded = _recorded() if recorded is None else recorded
    _, preset, tokens, execution, _, _ = SCENARIOS[name]
    rows = recorded[(recorded["preset"] == preset) & (recorded["num_tokens"] == tokens)
                    & (recorded["execution"] == execution)]
    candidates = {b: why for b, why in allowed(name, probe).items() if why is None}
    ran = rows[rows["backend"].isin(candidates) & (rows["status"] == "ok")]
    winner = ran.loc[ran["median_ms"].idxmin()]
    return str(winner["backend"]), float(winner["median_ms"]), {b: rows[rows["backend"] == b] for b in allowed(name)}


def ties(name: str, recorded=None, probe=None) -> list[str]:
    """The allowed backends whose recorded rounds stay within TIE_MARGIN of the fastest's in every round
    (the fastest included): for scenario `name` any of them is a right answer."""
    from ..bench.live import compare

    recorded = _recorded() if recorded is None else recorded
    truth, _, rows = best(name, recorded, probe)
    _, preset, tokens, execution, _, _ = SCENARIOS[name]
    frame = recorded[(recorded["preset"] == preset) & (recorded["num_tokens"] == tokens)
                     & (recorded["execution"] == execution)]
    out = [truth]
    for backend, why in allowed(name, probe).items():
        if why is None and backend != truth and not rows[backend].empty and rows[backend]["status"].iloc[0] == "ok":
            if compare(frame, {"backend": backend}, {"backend": truth}, margin=TIE_MARGIN).verdict == "same":
                out.append(backend)
    return out


def _problem(name, answer, recorded, probe) -> str | None:
    truth, ms, rows = best(name, recorded, probe)
    if answer in ties(name, recorded, probe):
        return None
    if answer == "auto":
        return f"{name}: auto only picks one of the others per call; name the backend to ship"
    why_not = allowed(name, probe)
    if answer not in why_not:
        return f"{name}: {answer!r} is not one of moe_lab's backends {list(why_not)}"
    if why_not[answer]:
        return f"{name}: not {answer}: {why_not[answer]}"
    row = rows[answer]
    _, preset, tokens, execution, _, _ = SCENARIOS[name]
    where = f"{preset} at T={tokens}, {EXECUTION_WORDS[execution]}"
    if row.empty or row["status"].iloc[0] != "ok":
        status = "not recorded" if row.empty else f"{row['status'].iloc[0]}: {str(row['reason'].iloc[0])[:90]}"
        return f"{name}: {answer} did not run for {where} ({status})"
    return (f"{name}: {answer} took {row['median_ms'].iloc[0]:.3g} ms for {where}; another backend that may ship "
            f"there was faster ({ms:.3g} ms)")


def check_choices(answer):
    """`answer` = {scenario name: backend name} for every name of SCENARIOS."""
    if not isinstance(answer, dict) or set(answer) != set(SCENARIOS):
        return feedback(False, f"expected a dict with the keys {list(SCENARIOS)}, got {answer!r}")
    unfilled = [k for k, v in answer.items() if not isinstance(v, str)]
    if unfilled:
        return feedback(False, f"fill in a backend name (a string) for {unfilled}")
    recorded, probe = _recorded(), _probe()
    problems = [p for p in (_problem(k, answer[k], recorded, probe) for k in SCENARIOS) if p]
    if problems:
        return feedback(False, "; ".join(problems))
    parts = []
    for k in SCENARIOS:
        backend, ms, _ = best(k, recorded, probe)
        tied = [b for b in ties(k, recorded, probe) if b != backend]
        parts.append(f"{k}: {backend} ({ms:.3g} ms" + (f"; {', '.join(tied)} within {TIE_MARGIN:.0%} in every "
                                                          "round: a tie)" if tied else ")"))
    summary = ", ".join(parts)
    return feedback(True, summary + ". Each is the fastest recorded backend among those the deployment allows; "
                             "for training the recorded times are forward only, so re-check with backward timings")
