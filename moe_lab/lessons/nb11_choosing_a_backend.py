"""Notebook 11: which backend to ship, derived from the recorded data and from what this machine can do.

Regimes are bins of the recorded token counts (decode, small batch, medium, prefill) and of the size of
one expert (3·H·I parameters: many small experts, or few large ones). For each regime the recorded H100
tables give the fastest backend, launched from Python and replayed from a CUDA graph, with triton and
without it (a GPU where the fused kernels cannot run). Training asks one more thing of a backend, that
gradients flow: `autograd_probe` finds out by trying, against a float64 reference, on this machine.
"""
from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import torch

from ..config import MoEConfig
from ..errors import first_line
from ..modules import Experts
from ..parameters import Device, Dtype, Float, Int, IntList, Parameters, Str
from ..presets import PRESETS
from ..reference import reference_experts_forward

MOE_LAB_BACKENDS = ("eager", "batched_mm", "grouped_mm", "triton")
#: (largest T, regime): the recorded token counts 1, 16, 128, 1024, 8192 fall one or two per bin.
REGIMES = ((1, "decode"), (16, "small batch"), (1024, "medium"), (None, "prefill"))
#: An expert with fewer parameters (3·H·I) than this counts as small: qwen3, olmoe and qwen1.5 have
#: 5-9 million, gpt-oss, deepseek-v3 and mixtral 25-176 million.
SMALL_EXPERT_PARAMS = 10_000_000
EXECUTIONS = {"eager": "launched", "cuda_graph": "CUDA graph"}

PARAMETERS = Parameters(
    device=Device(),
    preset=Str(choices=lambda: list(PRESETS)),
    hidden_size=Int(min=16, max=1024, multiple_of=16,
                    help="the scaled-down layer's H for the live calibration; a multiple of 16"),
    dtype=Dtype(),
    calibrate_tokens=IntList(min=1, max=8192, max_len=10, help="token counts the live calibration measures"),
    max_seconds=Float(positive=True, max=2.0, help="timing budget per calibration measurement, in seconds"),
)


def _span(values, unit: str = "") -> str:
    low, high = f"{min(values):.2f}", f"{max(values):.2f}"
    return f"{low}{unit}" if low == high else f"{low}–{high}{unit}"


def regime(num_tokens: int) -> str:
    for largest, name in REGIMES:
        if largest is None or num_tokens <= largest:
            return name
    raise AssertionError("the last regime takes any T")


def expert_size(row) -> str:
    params = 3 * int(row["hidden_size"]) * int(row["intermediate_size"])
    return "small experts" if params < SMALL_EXPERT_PARAMS else "large experts"


def expert_sizes():
    """Each preset's experts: E, k, parameters per expert and the class it falls in."""
    import pandas as pd

    rows = []
    for name, preset in PRESETS.items():
        c = preset.config
        rows.append({"preset": name, "E": c.num_experts, "k": c.top_k, "H": c.hidden_size, "I": c.intermediate_size,
                     "params per expert (M)": round(3 * c.hidden_size * c.intermediate_size / 1e6, 1),
                     "class": expert_size({"hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size})})
    return pd.DataFrame(rows).set_index("preset")


# ----------------------------------------------------------------------------- the recorded decision


def winners(recorded, backends=MOE_LAB_BACKENDS):
    """Per (execution, preset, T): the fastest of `backends` that ran, the runner-up, and the margin
    (runner-up's median / the winner's); `recorded` holds both executions (`load_recorded(..., execution=None)`)."""
    import pandas as pd

    ok = recorded[recorded["backend"].isin(backends) & (recorded["status"] == "ok")]
    rows = []
    for (execution, preset, tokens), group in ok.groupby(["execution", "preset", "num_tokens"], sort=False):
        ranked = group.sort_values("median_ms")
        first = ranked.iloc[0]
        second = ranked.iloc[1] if len(ranked) > 1 else None
        rows.append({"execution": EXECUTIONS.get(execution, execution), "preset": preset, "num_tokens": tokens,
                     "regime": regime(int(tokens)), "experts": expert_size(first), "winner": first["backend"],
                     "runner_up": None if second is None else second["backend"],
                     "margin": math.nan if second is None else second["median_ms"] / first["median_ms"]})
    return pd.DataFrame(rows)


def decision_table(recorded, backends=MOE_LAB_BACKENDS):
    """One row per (execution, experts, regime): the backend that won most points, "n/m" points won,
    and its margin over the runner-up (lowest–highest) at the points it won."""
    import pandas as pd

    won = winners(recorded, backends)
    order = {name: i for i, (_, name) in enumerate(REGIMES)}
    rows = []
    for (execution, experts, name), group in won.groupby(["execution", "experts", "regime"], sort=False):
        counts = group["winner"].value_counts()
        best = counts.index[0]
        margins = group.loc[group["winner"] == best, "margin"].dropna()
        rows.append({"execution": execution, "experts": experts, "regime": name, "_order": order[name],
                     "ship": best, "points won": f"{counts.iloc[0]}/{len(group)}",
                     "others won": ", ".join(f"{b} {n}" for b, n in counts.iloc[1:].items()) or "—",
                     "margin over runner-up": _span(margins, "x") if len(margins) else "nothing else ran",
                     "_closest": margins.min() if len(margins) else math.nan})
    table = pd.DataFrame(rows).sort_values(["execution", "experts", "_order"], kind="stable")
    table = table.drop(columns="_order").set_index(["execution", "experts", "regime"])
    table.attrs["closest"] = table.pop("_closest").to_dict()  # for rule_lines: a near tie is not a reason
    return table


#: A winner whose margin over the runner-up falls below this at some point it won is a near tie there.
NEAR_TIE = 1.05


def rule_lines(table) -> list[str]:
    """The decision table folded into rules: regimes that ship the same backend are merged."""
    closest = table.attrs.get("closest", {})

    def pick(key, backend):
        near = closest.get(key, math.nan)
        return f"{backend} (a near tie: {near:.2f}x)" if near < NEAR_TIE else backend

    if table["ship"].nunique() == 1 and not any(v < NEAR_TIE for v in closest.values()):
        return [f"{table['ship'].iloc[0]} in every regime, launched or from a CUDA graph, small or large experts"]
    lines = []
    for (execution, experts), group in table.groupby(level=[0, 1], sort=False):
        picks = {key[2]: pick(key, backend) for key, backend in group["ship"].items()}
        if len(set(picks.values())) == 1:
            lines.append(f"{execution}, {experts}: {next(iter(picks.values()))} at every T")
        else:
            lines.append(f"{execution}, {experts}: " + "; ".join(f"{r} -> {b}" for r, b in picks.items()))
    return lines


# ----------------------------------------------------------------------------- CUDA graphs and compile


def graph_and_compile(recorded, compiled):
    """Per backend: could it be replayed from a CUDA graph in the recorded run (and why not), and did
    each recorded torch.compile mode compile it and stay correct after the routing changed."""
    import pandas as pd

    graph = recorded[(recorded["execution"] == "cuda_graph") & recorded["backend"].isin(MOE_LAB_BACKENDS)]
    rows = []
    for backend in MOE_LAB_BACKENDS:
        mine = graph[graph["backend"] == backend]
        unsupported = mine[mine["status"] == "unsupported"]
        row = {"backend": backend, "CUDA graph": (_counted(mine, "ok", "replayed") if not len(unsupported) else
                                                  "cannot be captured: " + _why(unsupported["reason"].iloc[0]))}
        for mode, group in compiled[compiled["backend"] == backend].groupby("mode", sort=False):
            good = group[(group["status"] == "compiled") & group["equal_after_routing_change"].astype(bool)]
            row[f"compile {mode}"] = _counted(group.assign(status=group["status"].where(
                ~group.index.isin(good.index), "correct")), "correct", "correct") + (
                f", {_span(good['speedup'], 'x')} of uncompiled" if len(good) else "")
        rows.append(row)
    return pd.DataFrame(rows).set_index("backend").fillna("not recorded")


def _counted(rows, good: str, word: str) -> str:
    """"replayed at 10/30 points (20 refused)"."""
    others = rows.loc[rows["status"] != good, "status"].value_counts()
    rest = ", ".join(f"{n} {status}" for status, n in others.items())
    return f"{word} at {int((rows['status'] == good).sum())}/{len(rows)} points" + (f" ({rest})" if rest else "")


def _why(reason: str) -> str:
    """The reason of a refusal, without the exception's name and the advice after it."""
    return first_line(reason).split(" (")[0].split(". ")[0].rsplit(": ", 1)[-1]


# ----------------------------------------------------------------------------- training: gradients


def _probe_config() -> MoEConfig:
    return MoEConfig(hidden_size=32, intermediate_size=16, num_experts=4, top_k=2, dtype="float32")


def _check_gradients(backend: str, device) -> str:
    """Run `backend` with grad on a tiny layer, and compare each gradient it gives along a random
    direction with a central difference of the float64 reference (which shares no code with it)."""
    torch.manual_seed(0)
    config = _probe_config()
    experts = Experts(config, experts_implementation=backend).to(device)
    generator = torch.Generator().manual_seed(1)
    T, E, k = 6, config.num_experts, config.top_k
    hidden = torch.randn(T, config.hidden_size, generator=generator).to(device).requires_grad_(True)
    index = torch.stack([torch.randperm(E, generator=generator)[:k] for _ in range(T)]).to(device)
    weights = torch.rand(T, k, generator=generator).softmax(-1).to(device).requires_grad_(True)
    cotangent = torch.randn(T, config.hidden_size, generator=generator).to(device)
    try:
        out = experts(hidden, index, weights)
    except Exception as error:  # a backend that cannot differentiate should say so: that is a fine answer
        return f"refuses: {first_line(error)}"
    if not out.requires_grad:
        return "detaches: its output has no grad_fn, so training would silently lose the gradients"
    leaves = {"hidden_states": hidden, "gate_up_proj": experts.gate_up_proj, "down_proj": experts.down_proj,
              "top_k_weights": weights}
    grads = torch.autograd.grad((out * cotangent).sum(), list(leaves.values()), allow_unused=True)

    def loss(**replaced):  # float64, dense, no autograd: the reference detaches what it reads
        values = {name: tensor.detach().double() for name, tensor in leaves.items()}
        values.update(replaced)
        layer = SimpleNamespace(gate_up_proj=values["gate_up_proj"], down_proj=values["down_proj"],
                                act_fn=experts.act_fn)
        y = reference_experts_forward(layer, values["hidden_states"], index, values["top_k_weights"])
        return float((y * cotangent.double()).sum())

    for (name, tensor), grad in zip(leaves.items(), grads):
        if grad is None:
            return f"drops the gradient of {name}"
        direction = torch.randn(tensor.shape, generator=generator, dtype=torch.float64).to(device)
        base, step = tensor.detach().double(), 1e-4
        numeric = (loss(**{name: base + step * direction}) - loss(**{name: base - step * direction})) / (2 * step)
        analytic = float((grad.double() * direction).sum())
        error = abs(analytic - numeric) / max(abs(numeric), 1e-6)
        if error > 1e-3:
            return f"wrong gradient for {name}: {analytic:.4g} along a random direction, the reference {numeric:.4g}"
    return "gradients match the float64 reference"


@functools.lru_cache(maxsize=None)
def _probe_cached(backends: tuple, device: str) -> tuple:
    return tuple((b, _check_gradients(b, torch.device(device))) for b in backends)


def autograd_probe(backends=None, device="cpu"):
    """Per backend: does a training step get the right gradients through it, on `device`, today?

    Found by trying, not from a table: a tiny float32 layer with grad on the hidden states, both weight
    tensors and the routing weights; each gradient is compared along a random direction with a central
    difference of the float64 reference. The answer is one of "gradients match the float64 reference",
    "refuses: <its error>" (a backend that cannot differentiate and says so), "detaches: ..." (it runs but
    the gradients are lost), "drops the gradient of <tensor>" or "wrong gradient for <tensor>: ...".
    `backends` default: every moe_lab backend that runs on `device` (triton interpreted on a CPU).
    Beside each answer, what the backend's spec declares (`declares autograd`): the probe checks the
    declaration, it does not replace it."""
    import pandas as pd

    from ..backends import Where, get_spec, runnable_backends

    device = torch.device(device)
    names = tuple(backends or [b for b in runnable_backends(device) if not get_spec(b).dispatcher])
    where = Where(device, _probe_config().dtype)
    rows = [{"backend": b, "declares autograd": get_spec(b).supports("autograd", where).word,
             "supports training": answer == "gradients match the float64 reference", "result": answer}
            for b, answer in _probe_cached(names, str(device))]
    return pd.DataFrame(rows).set_index("backend")


def trainable(probe) -> list[str]:
    """The backends of `autograd_probe` whose gradients were right."""
    return [b for b, ok in probe["supports training"].items() if ok]


def decision_markdown(with_triton, without_triton, probe, label: str) -> str:
    """The curriculum's decision rule as Markdown, assembled from the two decision tables (recorded on
    `label`) and the autograd probe run here: nothing in it is typed by hand."""
    train = trainable(probe)
    lost = [f"{b} ({probe.loc[b, 'result'].split(':')[0]})" for b in probe.index if b not in train]
    lines = [f"From the recorded tables ({label}) and the gradient probe on this machine:", ""]
    lines.append("- **Inference, triton available**:")
    lines += [f"    - {line}" for line in rule_lines(with_triton)]
    lines.append("- **Inference, no triton** (another GPU, float64, a build without triton):")
    lines += [f"    - {line}" for line in rule_lines(without_triton)]
    lines.append("- **CUDA graphs**: eager cannot be captured (it reads the token counts on the host); every rule above "
                 "under \"CUDA graph\" already leaves it out.")
    lines.append(f"- **Training**: only backends whose gradients are right may run the step: {', '.join(train)}"
                 + (f"; not {', '.join(lost)}" if lost else "") + ". Among those, the fastest forward in the tables "
                 "above is the starting point; the forward+backward times on a GPU are in notebook 09.")
    lines.append("- **Not an H100, or not these shapes**: measure — `moe-lab calibrate` writes the crossovers of "
                 "this machine where `auto` reads them.")
    return "\n".join(lines)


def auto_training_note(probe, tokens=(1, 8192)) -> str:
    """Markdown: which backends trained in `probe`, and what `auto` runs on a CUDA GPU (bf16) at `tokens` for a
    training step (it only chooses backends that declare autograd) and whether that trained here. With a CUDA GPU
    here, auto is asked (its calibration, if any, included); without one, what runs there cannot be asked here (a
    backend that needs the GPU answers "does not run"), so the uncalibrated rules for CUDA say what it runs."""
    from ..backends import choose_backend
    from ..backends.auto import DEFAULT_CROSSOVERS, pick

    trains = trainable(probe)
    if torch.cuda.is_available():
        on_gpu = {t: choose_backend(t, "cuda", "bfloat16", grad=True)[0] for t in tokens}
        where = "on this machine's CUDA GPU it runs"
    else:
        on_gpu = {t: pick(DEFAULT_CROSSOVERS["cuda"], t) for t in tokens}
        where = "on a CUDA GPU, uncalibrated, its rules name"
    picks = ", ".join(f"{b} at T={t}" for t, b in on_gpu.items())
    if set(on_gpu.values()) <= set(trains):
        verdict = "which trains correctly here too"
    else:
        verdict = "which does **not** train correctly here: for training, name a backend from this list"
    return (f"Trains correctly here: **{', '.join(trains) or 'none'}**. For a step that needs gradients, `auto` "
            f"chooses only among backends that declare autograd; {where} {picks}, {verdict}.")
