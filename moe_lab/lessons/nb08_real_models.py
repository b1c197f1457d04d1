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


# --------------------------------------------------------------------------------------------
# End to end: a recorded run of a full-size model (data/<card>_bf16_e2e_<model>.*)
# --------------------------------------------------------------------------------------------

def recorded_run_summary(table, provenance: dict) -> str:
    """Two sentences from the table itself: where and at which commit it ran, how many cases ran, failed
    (by status) and were skipped by the time budget."""
    from ..recorded_tables import recorded_label

    cases = table[table["phase"] != "profile"]
    counts = cases["status"].value_counts()
    failed = ", ".join(f"{counts[s]} {s}" for s in ("error", "oom", "refused", "unsupported") if s in counts)
    commit = str(provenance.get("git_commit", "?"))[:7]
    return (f"{provenance.get('model', '?')}, recorded on {recorded_label(provenance)} at commit {commit}: "
            f"{counts.get('ok', 0)} of {len(cases)} cases measured, {failed or 'none failed'}, "
            f"{counts.get('skipped', 0)} skipped (time budget).")


def _case_labels(rows) -> list[str]:
    """"prefill B=1 P=4096", "decode compile:cudagraphs B=8 P=128", "decode(hooks) B=1 P=128" (the profile)."""
    return [f"{phase} {execution} B={batch} P={prompt}".replace(" eager", "").replace("profile", "decode(hooks)")
            for phase, execution, batch, prompt in
            zip(rows["phase"], rows["execution"], rows["batch"], rows["prompt_tokens"])]


def recorded_times(table):
    """What ran: ms per prefill (uncompiled) or per decode step, backend (rows) x case (columns)."""
    ran = table[(table["status"] == "ok")].copy()
    ran["case"] = _case_labels(ran)
    ran["ms"] = ran["prefill_ms"].where(ran["phase"] == "prefill", ran["step_ms"])
    pivot = ran.pivot(index="backend", columns="case", values="ms")
    return pivot.reindex([b for b in table["backend"].unique() if b in pivot.index])


def recorded_failures(table, width: int = 110):
    """What did not run, one line per (backend, status, reason): the cases it covers and the reason, cut to `width`."""
    failed = table[table["status"].isin(["error", "oom", "refused", "unsupported"])].copy()
    failed["case"] = _case_labels(failed)
    failed["reason"] = failed["reason"].fillna("").str.slice(0, width)
    grouped = failed.groupby(["backend", "status", "reason"], sort=False)["case"].agg(lambda c: ", ".join(c))
    return grouped.reset_index()[["backend", "status", "case", "reason"]]
