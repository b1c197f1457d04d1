"""Self-check for notebook 02: predict what the per-expert loops do for a given routing."""
from __future__ import annotations


import torch

from ..routing import routing_stats
from . import as_whole_number, feedback


def _iterations_problem(answer: int, hit: int, num_tokens: int, top_k: int, num_experts: int) -> str | None:
    if answer == hit:
        return None
    if answer == num_tokens * top_k:
        return (f"eager_iterations={answer} is the number of (token, expert) pairs, T x k = {num_tokens} x {top_k}. "
                "The loop runs once per expert that received pairs, and several pairs of one expert are one "
                "iteration (one matmul pair over all its tokens)")
    if answer == num_experts:
        return (f"eager_iterations={answer} is every expert; moe_lab's eager skips the experts whose group size "
                f"is 0 (`if size == 0: continue`), and here {num_experts - hit} experts got no token")
    if answer == num_tokens:
        return (f"eager_iterations={answer} is the number of tokens; the loop is over experts, not tokens: "
                "count the distinct expert ids in top_k_index")
    return (f"eager_iterations={answer} is not it: count the distinct expert ids that appear in top_k_index "
            "(the experts hit)")


def _syncs_problem(answer: int, hit: int, num_experts: int) -> str | None:
    if answer == num_experts:
        return None
    if answer == hit:
        return (f"textbook_syncs={answer} is the experts hit, but the textbook loop cannot skip an empty expert "
                "before asking: it learns that expert e got no token from torch.where itself, so it pays one "
                "sync for every expert, hit or not")
    if answer == 1:
        return ("textbook_syncs=1 is moe_lab's eager (one .tolist() of all group sizes); the textbook loop calls "
                "torch.where(top_k_index == e) once per expert, and each call is a sync")
    if answer == 1 + 2 * hit:
        return (f"textbook_syncs={answer} = 1 + 2 x experts hit is transformers' variant (one nonzero to find the "
                "experts hit, then a comparison and a torch.where per expert hit); the loop in this notebook "
                "runs torch.where once for each of the E experts")
    return f"textbook_syncs={answer} is not it: how many times does `for expert in range(E)` call torch.where?"


def check_loop_prediction(top_k_index, num_experts: int, eager_iterations, textbook_syncs):
    """Compare the student's predictions with routing_stats for this routing."""
    stats = routing_stats(torch.as_tensor(top_k_index), num_experts)
    hit, num_tokens, top_k = stats.experts_hit, stats.num_tokens, stats.top_k
    problems = []
    iterations, error = as_whole_number(eager_iterations, "eager_iterations")
    problems.append(error or _iterations_problem(iterations, hit, num_tokens, top_k, num_experts))
    syncs, error = as_whole_number(textbook_syncs, "textbook_syncs")
    problems.append(error or _syncs_problem(syncs, hit, num_experts))
    problems = [p for p in problems if p]
    if problems:
        return feedback(False, "; ".join(problems) + ".")
    return feedback(True, (
        f"{hit} of the {num_experts} experts are hit ({stats.tokens_per_expert} pairs per expert), so moe_lab's "
        f"eager runs {hit} iterations after one sync, while the textbook loop pays {num_experts} syncs and runs "
        f"the same {hit} matmul pairs."
    ))
