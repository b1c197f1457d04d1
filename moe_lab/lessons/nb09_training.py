"""Notebook 09 (training): a tiny MoE language model that learns on a CPU in seconds, with any backend.

The corpus is a Markov chain over a small vocabulary: each token has a few likely successors, so
the best possible next-token loss is the chain's entropy, well below log(vocab), and a model that
learns shows it. The model is embedding -> MoE blocks with residuals -> norm -> head: the experts
must learn the transitions, and the router which expert handles which token.

Everything is seeded: the same seed gives the same initial weights and the same batches whatever
the backend, so two backends' loss curves differ only by floating-point rounding.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..backends import available_backends
from ..config import MoEConfig
from ..modules import SparseMoeBlock
from ..parameters import Device, Dtype, Int, Parameters, Rule, StrList
from ..routing import load_balancing_loss, tokens_per_expert

PARAMETERS = Parameters(
    device=Device(), dtype=Dtype(), num_experts=Int(min=1, max=64), top_k=Int(min=1, max=64),
    hidden_size=Int(min=8, max=512), intermediate_size=Int(min=8, max=1024), num_tokens=Int(min=1, max=4096),
    train_steps=Int(min=1, max=2000), train_backends=StrList(choices=available_backends), seed=Int(min=0),
    rules=[Rule(lambda p: p["top_k"] <= p["num_experts"],
                "top_k={top_k} must be at most num_experts={num_experts}: each token picks top_k distinct experts")],
)


def markov_corpus(vocab_size: int = 48, length: int = 20_000, successors: int = 3, seed: int = 0) -> torch.Tensor:
    """[length] token ids from a random Markov chain where each token is followed by one of
    `successors` tokens (chosen per token), with probabilities 0.6, 0.3, 0.1-ish."""
    generator = torch.Generator().manual_seed(seed)
    nexts = torch.stack([torch.randperm(vocab_size, generator=generator)[:successors] for _ in range(vocab_size)])
    probabilities = torch.softmax(torch.linspace(1.5, -0.5, successors), dim=0)  # [successors]
    choices = torch.multinomial(probabilities, length, replacement=True, generator=generator)  # [length]
    tokens = torch.empty(length, dtype=torch.long)
    tokens[0] = 0
    for position in range(1, length):
        tokens[position] = nexts[tokens[position - 1], choices[position]]
    return tokens


def chain_entropy(successors: int = 3) -> float:
    """The best achievable next-token loss (nats) on `markov_corpus`: the entropy of one step."""
    probabilities = torch.softmax(torch.linspace(1.5, -0.5, successors), dim=0)
    return float(-(probabilities * probabilities.log()).sum())


def sorted_activations(experts, hidden_states: torch.Tensor, top_k_index: torch.Tensor):
    """(h [S, I], order [S]): each (token, expert) pair's activation act(gate) * up, rows grouped by
    expert (a stable sort of the pairs: order[r] is the pair id token * k + slot of row r)."""
    from ..backends import apply_gate, expert_weights

    top_k = top_k_index.shape[1]
    order = torch.argsort(top_k_index.reshape(-1), stable=True)  # [S]
    expert_of_row = top_k_index.reshape(-1)[order]  # [S]
    weights = expert_weights(experts)  # gate_up [E, 2I, H]
    x_rows = hidden_states[order // top_k]  # [S, H]
    pre = torch.einsum("sh,soh->so", x_rows, weights.gate_up[expert_of_row])  # [S, 2I]
    return apply_gate(experts, pre), order


class TinyMoELM(nn.Module):
    """input_ids [B, S] -> logits [B, S, V]: embedding, `num_layers` x (x + MoE(x)), RMS norm, head."""

    def __init__(self, vocab_size: int, config: MoEConfig, num_layers: int = 2, experts_implementation: str = "eager"):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, config.hidden_size, dtype=config.dtype)
        self.blocks = nn.ModuleList([SparseMoeBlock(config, experts_implementation) for _ in range(num_layers)])
        self.norm = nn.RMSNorm(config.hidden_size, dtype=config.dtype)
        self.head = nn.Linear(config.hidden_size, vocab_size, bias=False, dtype=config.dtype)
        self.routings = []  # the last forward's RouterOutput per block (for the auxiliary loss and usage)

    def set_experts_implementation(self, name: str) -> None:
        for block in self.blocks:
            block.set_experts_implementation(name)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)  # [B, S, H]
        self.routings = []
        for block in self.blocks:
            update, routing = block(x, return_router_output=True)
            x = x + update
            self.routings.append(routing)
        return self.head(self.norm(x))  # [B, S, V]


@dataclass
class TrainingHistory:
    backend: str
    loss: list[float] = field(default_factory=list)  # next-token cross-entropy per step (nats)
    aux_loss: list[float] = field(default_factory=list)  # load-balancing loss per step (1 = even)
    usage: list[list[float]] = field(default_factory=list)  # per step: first block's share of picks per expert
    seconds: float = 0.0


def batches(corpus: torch.Tensor, batch_size: int, seq_len: int, steps: int, seed: int):
    """`steps` (inputs [B, S], targets [B, S]) windows of the corpus, the same for every backend."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, corpus.numel() - seq_len - 1, (batch_size,), generator=generator)
        windows = torch.stack([corpus[s:s + seq_len + 1] for s in starts.tolist()])  # [B, S + 1]
        yield windows[:, :-1], windows[:, 1:]


def build_model(backend: str, vocab_size: int = 48, seed: int = 0, config: MoEConfig | None = None) -> TinyMoELM:
    config = config or MoEConfig(hidden_size=32, intermediate_size=48, num_experts=8, top_k=2)  # I != H/2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TinyMoELM(vocab_size, config, experts_implementation=backend)


def train(backend: str, corpus: torch.Tensor, *, steps: int = 200, batch_size: int = 8, seq_len: int = 32,
          learning_rate: float = 3e-3, aux_weight: float = 0.01, seed: int = 0,
          config: MoEConfig | None = None) -> TrainingHistory:
    """Train a fresh `build_model(backend, seed=seed, config=config)` with AdamW on `corpus` (the
    loss plus `aux_weight` x the load-balancing loss); return its history."""
    import time

    model = build_model(backend, vocab_size=int(corpus.max()) + 1, seed=seed, config=config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate)
    history = TrainingHistory(backend)
    started = time.perf_counter()
    for inputs, targets in batches(corpus, batch_size, seq_len, steps, seed):
        logits = model(inputs)  # [B, S, V]
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        aux = torch.stack([load_balancing_loss(routing) for routing in model.routings]).mean()
        optimizer.zero_grad(set_to_none=True)
        (loss + aux_weight * aux).backward()
        optimizer.step()
        counts = tokens_per_expert(model.routings[0].top_k_index, model.routings[0].scores.shape[1]).float()
        history.loss.append(float(loss.detach()))
        history.aux_loss.append(float(aux.detach()))
        history.usage.append((counts / counts.sum()).tolist())
    history.seconds = time.perf_counter() - started
    return history


#: What the recorded same-run table names each implementation, and its column here.
RECORDED_IMPLEMENTATIONS = {"triton": "moe_lab triton", "grouped_mm": "moe_lab grouped_mm",
                            "transformers:grouped_mm": "transformers grouped_mm", "liger:fused_moe": "Liger fused_moe"}


def recorded_training_steps():
    """(DataFrame, label): one row per recorded (preset, T) training step of one MoE layer — forward and
    the backward of the hidden states, both weights and the routing weights, launched, bf16 — with the ms of
    moe_lab's triton and grouped_mm, transformers' grouped_mm and Liger's fused MoE (NaN where Liger was not
    run or refused the layer), all timed in interleaved rounds in one process on one card; then the best
    moe_lab path's TFLOP/s (3x the forward's FLOPs), its speed-up over transformers and over Liger, and the peak
    memory (GiB, weights and gradients included) of triton and transformers. `label` names the card, torch, date."""
    import pandas as pd

    from ..recorded_tables import load_recorded, recorded_label

    frame, provenance = load_recorded("backward")
    frame = frame[frame["status"] == "ok"]
    ms = frame.pivot_table(index=["preset", "num_tokens"], columns="backend", values="median_ms")
    tflops = frame.pivot_table(index=["preset", "num_tokens"], columns="backend", values="tflops")
    peak = frame.pivot_table(index=["preset", "num_tokens"], columns="backend", values="peak_bytes") / 2**30
    table = pd.DataFrame(index=ms.index)
    for backend, column in RECORDED_IMPLEMENTATIONS.items():
        table[f"{column} ms"] = ms[backend] if backend in ms else float("nan")
    ours = ms[["triton", "grouped_mm"]]
    best = ours.idxmin(axis=1)
    table["best moe_lab"] = best
    table["its TFLOP/s"] = [tflops.loc[key, name] for key, name in best.items()]
    table["× transformers"] = ms["transformers:grouped_mm"] / ours.min(axis=1)
    table["× Liger"] = (ms["liger:fused_moe"] / ours.min(axis=1)) if "liger:fused_moe" in ms else float("nan")
    table["triton peak GiB"] = peak["triton"]
    table["transformers peak GiB"] = peak["transformers:grouped_mm"]
    table = table.reset_index().rename(columns={"num_tokens": "T"})
    label = recorded_label(provenance, dates=frame["date"])
    if frame["date"].str[:10].nunique() > 1:
        label += " (each point's implementations in one run)"
    return table, label


def describe_recorded_training_steps(steps) -> str:
    """What the recorded table says, in a sentence per comparison, computed from it: how often and by how much
    the best moe_lab path beats transformers' grouped_mm and Liger, and where triton's peak memory is above
    transformers'."""
    def ratio_sentence(column, other):
        ran = steps[steps[column].notna()]
        if ran.empty:
            return f"{other} was not run."
        wins = ran[ran[column] > 1]
        return (f"The best moe_lab path was faster than {other} at {len(wins)} of {len(ran)} points "
                f"({ran[column].min():.2f}–{ran[column].max():.2f}×).")

    over = steps[steps["triton peak GiB"] > steps["transformers peak GiB"]]
    memory = ("triton's peak memory was at or below transformers' at every point." if over.empty else
              f"triton's peak memory was above transformers' at {len(over)} of {len(steps)} points: " + ", ".join(
                  f"{r['preset']} T={r['T']} (+{(r['triton peak GiB'] - r['transformers peak GiB']) * 1024:.0f} MiB)"
                  for _, r in over.iterrows()) + ".")
    return " ".join([ratio_sentence("× transformers", "transformers' grouped_mm"),
                     ratio_sentence("× Liger", "Liger's fused MoE"), memory, describe_memory_rerecord(),
                     describe_host_rerecord(), describe_graph_rerecord()])


def describe_power_state(presets=("qwen3-30b-a3b", "qwen1.5-moe-a2.7b")) -> str:
    """A sentence per recorded preset on what the card's power limit does to a step (tools/step_power_state.py),
    computed from the recording: triton's and transformers' grouped_mm's step replayed back to back (as a training
    loop runs it) against the same step with the card rested before each replay, and the SM clock in each."""
    import statistics

    from ..recorded_tables import load_power_state, recorded_label

    sentences = []
    for preset in presets:
        run = load_power_state(preset)
        summary, blocks = run["summary"], run["blocks"]

        def clock(name, mode):
            clocks = [b["clocks"]["median_clock_mhz"] for b in blocks
                      if b["implementation"] == name and b["mode"] == mode and b.get("clocks", {}).get("busy")]
            return f"{statistics.median(clocks):.0f} MHz" if clocks else "clock not sampled"

        def compare(name):
            steady, rested = summary[name]["back_to_back"], summary[name]["rested"]
            slower = steady["median_ms"] / rested["median_ms"] - 1
            return (f"{name} {steady['median_ms']:.2f} ms back to back ({steady['tflops']:.0f} TFLOP/s, "
                    f"{clock(name, 'back_to_back')}) against {rested['median_ms']:.2f} ms rested "
                    f"({rested['tflops']:.0f} TFLOP/s, {clock(name, 'rested')}), {slower:+.1%}")

        sentences.append(f"{preset}, T={run['tokens']}: " + "; ".join(compare(name) for name in summary) + ".")
    return (f"Recorded on {recorded_label(run['provenance'])} (commit {run['provenance'].get('git_commit', '?')[:7]}); "
            f"in parentheses the TFLOP/s and the median SM clock while it ran. " + " ".join(sentences))


def describe_back_to_back() -> str:
    """A sentence on the bench's synchronized replays against the same replays queued back to back (recorded set
    "backward_back_to_back", `moe-lab bench --back-to-back`), computed from the recording: the ratio of the two for
    every implementation, how often the card was at its power cap while the timings ran, and triton's TFLOP/s and
    speed-up over transformers' grouped_mm back to back."""
    from ..recorded_tables import load_recorded, recorded_label

    frame, provenance = load_recorded("backward_back_to_back", execution=None)
    ok = frame[frame["status"] == "ok"]
    ms = ok.pivot_table(index=["preset", "backend"], columns="execution", values="median_ms")
    looped_over_synced = (ms["cuda_graph_back_to_back"] / ms["cuda_graph"]).dropna()
    looped = ok[ok["execution"] == "cuda_graph_back_to_back"]
    per_preset = looped.pivot_table(index="preset", columns="backend", values="median_ms")
    over_transformers = per_preset["transformers:grouped_mm"] / per_preset["triton"]
    tflops = looped[looped["backend"] == "triton"]["tflops"]
    clocks = provenance.get("clocks_over_500_W", {}).values()
    capped, heavy = sum(c["power_capped"] for c in clocks), sum(c["samples_over_500_W"] for c in clocks)
    cap = (f"the power cap was active in {capped} of the {heavy} clock samples drawing over 500 W while they ran"
           if heavy else "the clock was not sampled")
    return (f"Recorded on {recorded_label(provenance)} (commit {provenance.get('git_commit', '?')[:7]}, "
            f"{over_transformers.size} presets at T={int(looped['num_tokens'].max())}), each step's replays also "
            f"queued back to back after as long an untimed queue (`moe-lab bench --back-to-back`): every "
            f"implementation's back-to-back time was "
            f"{looped_over_synced.min():.3f}–{looped_over_synced.max():.3f}× its synchronized replay's ({cap}). So "
            f"the synchronize after each replay hardly rests the card: the replayed rows are what a captured training "
            f"loop gets, on a card at its power limit. Back to back, triton ran at {tflops.min():.0f}–{tflops.max():.0f}"
            f" TFLOP/s, {over_transformers.min():.2f}–{over_transformers.max():.2f}× transformers' grouped_mm.")


def describe_memory_rerecord() -> str:
    """A sentence on the re-recorded memory points (recorded set "backward_memory"), computed from them: at how
    many of them triton's peak is at or below transformers' after the fix, and by how much."""
    from ..recorded_tables import load_recorded

    frame, provenance = load_recorded("backward_memory")
    peak = frame[frame["status"] == "ok"].pivot_table(index=["preset", "num_tokens"], columns="backend",
                                                      values="peak_bytes")
    margin_mib = (peak["triton"] - peak["transformers:grouped_mm"]) / 2**20
    under = margin_mib[margin_mib <= 0]
    return (f"Re-recorded after the backward stopped holding the saved pre-activation beside the weight gradients "
            f"(and kept its split buffer in bf16), at commit {provenance.get('git_commit', '?')[:7]}: triton's peak "
            f"was at or below transformers' at {len(under)} of {len(margin_mib)} of those points "
            f"({margin_mib.max():+.0f} to {margin_mib.min():+.0f} MiB).")


def describe_host_rerecord() -> str:
    """A sentence on the goal points re-recorded after the host-time levers (recorded set "backward_host"),
    computed from them: at T=8192, the range of triton's speed-up over transformers' grouped_mm and over Liger,
    and of its TFLOP/s, all from the same runs."""
    from ..recorded_tables import load_recorded

    frame, provenance = load_recorded("backward_host")
    ok = frame[(frame["status"] == "ok") & (frame["num_tokens"] == 8192)]
    ms = ok.pivot_table(index="preset", columns="backend", values="median_ms")
    tflops = ok[ok["backend"] == "triton"].set_index("preset")["tflops"]
    over_transformers = ms["transformers:grouped_mm"] / ms["triton"]
    over_liger = ms["liger:fused_moe"] / ms["triton"]
    return (f"Re-recorded at T=8192 after the triton backend stopped paying host time for a sort of ~12 launches "
            f"and the custom op's dispatcher (commit {provenance.get('git_commit', '?')[:7]}, {len(ms)} presets): "
            f"triton was {over_transformers.min():.2f}–{over_transformers.max():.2f}× transformers' grouped_mm and "
            f"{over_liger.min():.2f}–{over_liger.max():.2f}× Liger's fused MoE, at {tflops.min():.0f}–"
            f"{tflops.max():.0f} TFLOP/s.")


def describe_graph_rerecord() -> str:
    """A sentence on the goal points recorded with each implementation's whole step also replayed from one CUDA
    graph (recorded set "backward_graph"), computed from them: triton's TFLOP/s replayed and launched in the same
    runs, its speed-up over transformers' grouped_mm replayed the same way, and what could not be captured, why."""
    from ..recorded_tables import load_recorded

    frame, provenance = load_recorded("backward_graph", execution=None)
    ok = frame[(frame["status"] == "ok") & (frame["num_tokens"] == 8192)]
    triton = ok[ok["backend"] == "triton"].pivot_table(index="preset", columns="execution", values="tflops")
    replayed = ok[ok["execution"] == "cuda_graph"].pivot_table(index="preset", columns="backend", values="median_ms")
    over_transformers = replayed["transformers:grouped_mm"] / replayed["triton"]
    refused = frame[(frame["execution"] == "cuda_graph") & (frame["status"] != "ok")]
    why = "; ".join(sorted({f"{row['backend']}: " + str(row["reason"]).split("cannot be captured in a CUDA graph: ")[-1]
                            for _, row in refused.iterrows()}))
    return (f"Each whole step replayed from one CUDA graph as well (commit {provenance.get('git_commit', '?')[:7]}, "
            f"{len(triton)} presets at T=8192): triton at {triton['cuda_graph'].min():.0f}–"
            f"{triton['cuda_graph'].max():.0f} TFLOP/s replayed ({triton['eager'].min():.0f}–{triton['eager'].max():.0f} "
            f"launched, same runs), {over_transformers.min():.2f}–{over_transformers.max():.2f}× transformers' "
            f"grouped_mm replayed the same way" + (f"; not capturable: {why}." if why else "."))
