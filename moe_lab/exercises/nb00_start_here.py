"""Self-check for notebook 00: count the expert parameters of a real MoE layer."""
from __future__ import annotations


from ..presets import get_preset
from . import as_whole_number, feedback


def _diagnose(answer: int, per_expert: int, count: int, what: str, H: int, I: int, E: int, k: int,
              shared: int) -> str | None:
    """`count` experts of `per_expert` parameters each is right; else say which term is off."""
    right = count * per_expert
    if answer == right:
        return None
    name = f"{what}={answer:,}"
    if answer == count * 2 * H * I:
        return (f"{name} counts two of each expert's three matrices: gate_up_proj holds 2·I·H (gate and up), "
                f"down_proj another H·I")
    if answer == count * H * I:
        return f"{name} counts one H·I matrix per expert; each expert has three (gate, up and down)"
    if answer == 2 * right:
        return f"{name} is twice the answer: bytes in bf16 (2 per parameter)? count parameters"
    if what == "active_expert_params" and answer == E * per_expert:
        return f"{name} counts every expert; one token runs only its top_k={k} experts"
    if answer == per_expert:
        return f"{name} is one expert (3·H·I = {per_expert:,}); multiply by the number of experts ({count})"
    if what == "total_expert_params" and answer == k * per_expert:
        return f"{name} counts only the top_k={k} experts a token uses; the layer holds all E={E}"
    if shared and answer == right + 3 * H * shared:
        return f"{name} includes the shared expert (3·H·{shared}); count the routed experts only"
    if answer == right + E * H:
        return f"{name} includes the router (E·H); count the experts' matrices only"
    return (f"{name} is off by {answer - right:+,}; per expert: gate_up_proj [2I, H] + down_proj [H, I], "
            f"with H={H}, I={I}")


def check_expert_parameters(preset: str, total_expert_params, active_expert_params):
    """Routed-expert parameters of one layer of `preset`, and those one token uses."""
    config = get_preset(preset).config
    H, I, E, k = config.hidden_size, config.intermediate_size, config.num_experts, config.top_k
    shared = config.shared_expert_intermediate_size
    per_expert = 3 * H * I
    problems = []
    for name, value, count in (("total_expert_params", total_expert_params, E),
                               ("active_expert_params", active_expert_params, k)):
        answer, error = as_whole_number(value, name, "a formula of H, I, E and k")
        problems.append(error or _diagnose(answer, per_expert, count, name, H, I, E, k, shared))
    problems = [p for p in problems if p]
    if problems:
        return feedback(False, "; ".join(problems) + ".")
    return feedback(True, (
        f"{preset}: E·3·H·I = {E * per_expert:,} expert parameters per layer, of which a token uses "
        f"k·3·H·I = {k * per_expert:,} ({k}/{E} = {k / E:.1%})."
    ))
