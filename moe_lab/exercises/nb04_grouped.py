"""Self-check for notebook 04: the int32 group offsets of a grouped GEMM, computed by hand."""
from __future__ import annotations

import torch

from . import feedback

#: The exercise's routing: 4 tokens, top_k=2, 6 experts; experts 2 and 4 receive no token.
EXERCISE_INDEX = ((3, 0), (1, 3), (3, 5), (0, 1))
NUM_EXPERTS = 6


def exercise_routing() -> tuple[torch.Tensor, int]:
    """(top_k_index [4, 2] int64, num_experts) of the exercise."""
    return torch.tensor(EXERCISE_INDEX, dtype=torch.int64), NUM_EXPERTS


def _running_sum(values) -> list[int]:
    total, out = 0, []
    for v in values:
        total += v
        out.append(total)
    return out


def check_offsets(answer, top_k_index=None, num_experts: int | None = None):
    """Is `answer` the int32 offsets tensor of `top_k_index` (default: the exercise's routing)?"""
    if top_k_index is None:
        top_k_index, num_experts = exercise_routing()
    top_k_index = torch.as_tensor(top_k_index)
    E = int(num_experts if num_experts is not None else int(top_k_index.max()) + 1)
    S = top_k_index.numel()
    counts = [int((top_k_index == e).sum()) for e in range(E)]
    expected = _running_sum(counts)
    if answer is None:
        return feedback(False, "replace `answer = None` with your offsets, e.g. torch.tensor([...], dtype=torch.int32)")
    dtype = answer.dtype if isinstance(answer, torch.Tensor) else None
    if isinstance(answer, torch.Tensor):
        if answer.dim() != 1:
            return feedback(False, f"offsets are a 1-D tensor of E={E} entries, got shape {tuple(answer.shape)}")
        if answer.dtype.is_floating_point:
            return feedback(False, f"offsets are integers (int32), got {answer.dtype}")
        values = answer.tolist()
    elif isinstance(answer, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in answer):
        values = list(answer)
    else:
        return feedback(False, f"give a 1-D torch.int32 tensor (or a list of ints), got {type(answer).__name__}")

    if values == expected:
        if dtype == torch.int32:
            return feedback(True, f"tokens per expert {counts} -> offsets {expected} (int32): group e is rows "
                                  "offsets[e-1]:offsets[e] of the sorted pairs; empty experts repeat the offset")
        if dtype is None:
            return feedback(False, f"the values {values} are right; grouped_mm takes them as a tensor of dtype "
                                   "int32: torch.tensor(answer, dtype=torch.int32)")
        return feedback(False, f"the values are right but the dtype is {dtype}: torch's grouped_mm requires int32 "
                               "offsets (torch.cumsum(counts, 0) gives int64; pass dtype=torch.int32)")
    if values == [0] + expected[:-1]:
        return feedback(False, f"off by one group: these are the START of each group; grouped_mm wants the END "
                               f"(inclusive cumsum), so offsets[0] = tokens of expert 0 and the last entry is "
                               f"T*k = {S}")
    if values == [0] + expected:
        return feedback(False, f"drop the leading 0: one entry per expert (E={E}), each the END of that expert's "
                               "group; the start of group 0 is implicitly 0")
    nonempty = _running_sum(c for c in counts if c)
    empty = [e for e, c in enumerate(counts) if c == 0]
    if empty and values == nonempty:
        return feedback(False, f"expert(s) {empty} received no pair but still need an entry: an empty group repeats "
                               f"the previous offset, so there are E={E} entries")
    if values == counts:
        return feedback(False, "these are the tokens per expert; the offsets are their running sum (torch.cumsum)")
    if len(values) != E:
        return feedback(False, f"offsets have one entry per expert: E={E} entries, got {len(values)}")
    if values[-1] != S:
        return feedback(False, f"the last offset must be T*k = {S}: every (token, expert) pair is in some group")
    wrong = next(e for e in range(E) if values[e] != expected[e])
    return feedback(False, f"entry {wrong} (expert {wrong}) is {values[wrong]}; count the pairs routed to experts "
                           f"0..{wrong} (top_k_index == e, over all tokens and slots)")
