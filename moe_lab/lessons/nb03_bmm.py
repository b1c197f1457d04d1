"""Notebook 03 (bmm batching): its parameters, the live claims it checks, and the recorded T=1 reading."""
from __future__ import annotations

from ..bench.live import check_claim, claims_markdown
from ..parameters import Device, Dtype, Float, Int, IntList, Parameters, Rule, Str
from ..presets import PRESETS
from .figures import Prose

PARAMETERS = Parameters(
    device=Device(), dtype=Dtype(), preset=Str(choices=lambda: list(PRESETS)),
    hidden_size=Int(min=16, max=1024, multiple_of=16, help="scale_down keeps rows 16-byte aligned"),
    num_experts=Int(min=1, max=256), top_k=Int(min=1, max=256), num_tokens=Int(min=1, max=64),
    token_counts=IntList(min=1, max=4096, max_len=8), gather_budget_bytes=Int(min=1),
    seed=Int(min=0), max_seconds=Float(positive=True, max=10),
    rules=[Rule(lambda p: p["top_k"] <= p["num_experts"],
                "top_k={top_k} must be at most num_experts={num_experts}: each token picks top_k distinct experts")],
)


def live_claims(live) -> Prose:
    """Where batched_mm wins and where it explodes, checked on this notebook's live table."""
    ran = live[(live["backend"] == "batched_mm") & (live["status"] == "ok")]
    if ran.empty:
        return Prose("batched_mm ran at no token count here (every point was refused): nothing to compare.")
    few, most = int(ran["num_tokens"].min()), int(ran["num_tokens"].max())
    claims = [check_claim(live, f"at T={few} batched_mm (one gather, one bmm, no loop) was faster than grouped_mm",
                          {"backend": "batched_mm", "num_tokens": few}, {"backend": "grouped_mm", "num_tokens": few},
                          expect="faster")]
    if most != few:
        claims.append(check_claim(
            live, f"at T={most}, the most tokens it was allowed, batched_mm (T·k weight copies) was slower than grouped_mm",
            {"backend": "batched_mm", "num_tokens": most}, {"backend": "grouped_mm", "num_tokens": most},
            expect="slower"))
    return Prose(claims_markdown(claims))


def recorded_t1_reading(recorded) -> Prose:
    """Which of batched_mm and grouped_mm was faster at T=1 per preset, beside the bytes of a token's k experts."""
    from ..presets import get_preset

    at_one = recorded[recorded["num_tokens"] == 1].pivot(index="preset", columns="backend", values="median_ms")
    sizes = {name: get_preset(name).config for name in at_one.index}
    per_token = {name: c.top_k * 3 * c.hidden_size * c.intermediate_size * 2 / 2**20 for name, c in sizes.items()}
    won = sorted((n for n in at_one.index if at_one.loc[n, "batched_mm"] < at_one.loc[n, "grouped_mm"]), key=per_token.get)
    lost = sorted((n for n in at_one.index if n not in won), key=per_token.get)

    def listing(names):
        return ", ".join(f"{n} ({per_token[n]:.0f} MiB)" for n in names) or "none"

    return Prose(f"At T=1, batched_mm was faster than grouped_mm on {listing(won)} and slower on {listing(lost)} — "
                 "in parentheses, the bf16 bytes of the k experts one token uses, which batched_mm copies and "
                 "grouped_mm reads in place.")
