"""Notebook 08 (real models): its parameters."""
from __future__ import annotations

from ..parameters import Device, Dtype, Int, Parameters, Str

#: The families `moe_lab.hf.tiny_transformers_model` builds (moe_lab.hf.FAMILIES + EXTRA_FAMILIES); asked
#: when the check runs, so the notebook's own "transformers is optional" path still gets a clear message.


def _families() -> list[str]:
    try:
        from ..hf import EXTRA_FAMILIES, FAMILIES
    except ImportError:  # transformers missing: any family name is moot, the sections are skipped
        return ["qwen2_moe", "mixtral", "qwen3_moe", "olmoe", "gpt_oss"]
    return list(FAMILIES + EXTRA_FAMILIES)


PARAMETERS = Parameters(
    device=Device(), dtype=Dtype(), family=Str(choices=_families),
    num_tokens=Int(min=1, max=120, help="the tiny models have 128 positions; the two-backbone model adds 6 patches"),
    seed=Int(min=0),
)


# --------------------------------------------------------------------------------------------
# End to end: the notebook's tiny model through generate
# --------------------------------------------------------------------------------------------

#: transformers' grouped_mm without generate's decode switch (the reference), its batched_mm, two of
#: moe_lab's backends, and the model with its experts removed (what the rest of a step costs).
E2E_BACKENDS = ("grouped_mm:pinned", "batched_mm", "moe_lab_grouped_mm", "moe_lab_batched_mm", "no_experts")


def live_generate_table(model, *, batches=(1, 4), prompt_tokens: int = 16, new_tokens: int = 8, rounds: int = 5,
                        backends=E2E_BACKENDS):
    """`moe_lab.bench.e2e.run_e2e` on a tiny model in this process: one torch thread, uncompiled, every
    backend timed in `rounds` interleaved rounds, outputs checked against the first backend."""
    from ..bench.e2e import E2EPlan, run_e2e
    from ..bench.live import single_threaded
    from ..hf.build import BuiltModel

    layers = model.config.get_text_config().num_hidden_layers
    built = BuiltModel(model, f"tiny:{model.config.model_type}", layers, layers, "random")
    plan = E2EPlan(backends=list(backends), prefill_tokens=(prompt_tokens,), decode_batches=tuple(batches),
                   decode_context=prompt_tokens, new_tokens=new_tokens, executions=("eager",), rounds=rounds,
                   reference=backends[0], check_tokens=prompt_tokens)
    with single_threaded(1):
        return run_e2e(built, plan, progress=False)


def tokens_per_second_table(table):
    """Decode tokens/s per backend (rows) and batch (columns) as "median (p10–p90)" of the step times."""
    decode = table[(table["phase"] == "decode") & (table["status"] == "ok")].copy()
    # a slow step (p90) is few tokens/s: the range turns around
    decode["cell"] = [f"{b * 1e3 / m:,.0f} ({b * 1e3 / p90:,.0f}–{b * 1e3 / p10:,.0f})"
                      for b, m, p10, p90 in zip(decode["batch"], decode["step_ms"], decode["p10_ms"], decode["p90_ms"])]
    pivot = decode.pivot(index="backend", columns="batch", values="cell")
    pivot.columns = [f"batch {b}" for b in pivot.columns]
    return pivot.reindex([b for b in table["backend"].unique() if b in pivot.index])


def generate_verdict(table, a: str, b: str, batch: int) -> str:
    """Is backend `a`'s decode step faster than `b`'s at `batch`, in every round? (moe_lab.bench.live.compare)"""
    from ..bench.live import compare

    def selector(backend):
        return {"backend": backend, "phase": "decode", "batch": batch, "execution": "eager"}

    return f"{a} vs {b}, decode step at batch {batch}: {compare(table, selector(a), selector(b)).summary()}"
