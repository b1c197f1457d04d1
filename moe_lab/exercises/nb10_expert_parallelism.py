"""Self-checks for notebook 10: the receive buffer of the sync-free (padded) expert-parallel layer, and how often a
token reaches a given rank (why the gathered layer's all-gather costs little at small EP).

With fixed capacity, every (source, destination) pair of ranks gets `capacity` rows, and a rank
receives world * capacity rows whatever the routing. Capacity that never drops a pair is the most one
source can send one destination: each of its T tokens picks k DISTINCT experts, of which at most
min(k, E / world) live on one rank. So a rank's receive buffer holds world * T * min(k, E / world) rows.

A token skips a rank when all k of its distinct experts are among the E - E/world held elsewhere: under uniform
routing that happens with probability C(E - E/world, k) / C(E, k), so it reaches the rank with 1 minus that.
"""
from __future__ import annotations

from . import as_whole_number, feedback, first_line

#: (tokens per rank T, top_k, experts E, world) -> what they test
CASES = [
    (128, 8, 256, 8),  # deepseek-v3 decode over 8 GPUs: k <= E/world
    (16, 4, 8, 4),  # k = 4 > E/world = 2: a token sends at most 2 pairs to one rank
    (10, 2, 8, 8),  # one expert per rank
]


def worst_case_rows(T: int, top_k: int, num_experts: int, world_size: int) -> int:
    return world_size * T * min(top_k, num_experts // world_size)


def check_padded_rows(fn) -> object:
    """fn(T, top_k, num_experts, world_size) -> rows in one rank's receive buffer at the capacity that never
    drops a pair. Prints and returns feedback."""
    if fn is None:
        return feedback(False, "`padded_rows` is still None: define a function of (T, top_k, num_experts, world_size)")
    for T, k, E, world in CASES:
        try:
            got, problem = as_whole_number(fn(T, k, E, world), "padded_rows(...)", "a whole number of rows")
        except Exception as error:  # a wrong answer must not stop the notebook
            return feedback(False, f"padded_rows({T}, {k}, {E}, {world}) raised {first_line(error)}")
        if problem:
            return feedback(False, problem)
        expected = worst_case_rows(T, k, E, world)
        if got == expected:
            continue
        where = f"for T={T}, top_k={k}, E={E}, world={world} you gave {got}, expected {expected}"
        if got == world * T * k:
            return feedback(False, f"{where}: a token's k experts are distinct, so at most min(k, E/world) = "
                                   f"{min(k, E // world)} of them live on one rank")
        if got == T * min(k, E // world) or got == T * k:
            return feedback(False, f"{where}: that is one source's capacity; the buffer has a block for every "
                                   f"one of the {world} sources")
        if got == T * k // world:
            return feedback(False, f"{where}: that is what uniform routing sends on average; a fixed capacity must "
                                   "hold the worst case, or pairs are dropped")
        return feedback(False, f"{where}: rows = world x capacity, capacity = T x (the most of one token's "
                               "experts on one rank)")
    return feedback(True, "world · T · min(k, E/world) rows, whatever the routing: the price of never reading the "
                          "split sizes on the host")


#: (experts E, top_k, world) -> what they test, for the gathered layer's question
REACH_CASES = [
    (128, 8, 2),  # qwen3 at EP=2: almost every token reaches the other rank
    (128, 8, 8),  # qwen3 at EP=8: a third of the tokens skip a given rank
    (8, 4, 2),  # all four experts on the other rank: 1 in C(8, 4) tokens skips this one
    (8, 6, 2),  # k > E - E/w: every token must reach every rank
]


def rank_reach(num_experts: int, top_k: int, world_size: int) -> float:
    from ..parallel.gathered import rank_hit_probability

    return rank_hit_probability(num_experts, top_k, world_size)


def check_rank_reach(fn) -> object:
    """fn(num_experts, top_k, world_size) -> the chance that a token (k distinct experts, uniform routing) has at
    least one expert on a given rank of world_size. Prints and returns feedback."""
    if fn is None:
        return feedback(False, "`rank_reach` is still None: define a function of (num_experts, top_k, world_size)")
    for E, k, world in REACH_CASES:
        try:
            got = float(fn(E, k, world))
        except Exception as error:  # a wrong answer must not stop the notebook
            return feedback(False, f"rank_reach({E}, {k}, {world}) raised {first_line(error)}")
        expected = rank_reach(E, k, world)
        if abs(got - expected) <= 1e-9:
            continue
        where = f"for E={E}, top_k={k}, world={world} you gave {got:.4f}, expected {expected:.4f}"
        if abs(got - (1 - (1 - 1 / world) ** k)) <= 1e-9:
            return feedback(False, f"{where}: that picks k experts independently, with repeats; a token's k experts "
                                   "are distinct, so count the k-subsets of experts that avoid the rank")
        if abs(got - (1 - expected)) <= 1e-9:
            return feedback(False, f"{where}: that is the chance a token has NO expert on the rank")
        if abs(got - min(1.0, k / world)) <= 1e-9:
            return feedback(False, f"{where}: k/world is how many of a token's experts a rank holds on average, "
                                   "not the chance it holds at least one")
        return feedback(False, f"{where}: a token skips a rank when all k of its experts are among the E - E/world "
                               "held elsewhere")
    return feedback(True, "1 - C(E - E/world, k) / C(E, k): at EP=2 with k=8 of 128 nearly every token reaches "
                          "the other rank, which is why sending them all costs the gathered layer so little")
