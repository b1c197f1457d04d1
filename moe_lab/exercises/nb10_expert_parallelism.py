"""Self-check for notebook 10: the receive buffer of the sync-free (padded) expert-parallel layer.

With fixed capacity, every (source, destination) pair of ranks gets `capacity` rows, and a rank
receives world * capacity rows whatever the routing. Capacity that never drops a pair is the most one
source can send one destination: each of its T tokens picks k DISTINCT experts, of which at most
min(k, E / world) live on one rank. So a rank's receive buffer holds world * T * min(k, E / world) rows.
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
