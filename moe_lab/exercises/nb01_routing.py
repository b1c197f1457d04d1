"""Self-check for notebook 01: top-k routing with renormalisation, written by hand."""
from __future__ import annotations

import torch

from ..routing import route
from . import feedback

#: (tokens, experts, top_k, logits dtype) of the cases a student's `my_route` is run on.
CASES = ((7, 8, 2, torch.float32), (5, 16, 4, torch.float32), (6, 8, 3, torch.bfloat16))


def _case_logits(num_tokens: int, num_experts: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (2.0 * torch.randn(num_tokens, num_experts, generator=generator)).to(dtype)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return a.shape == b.shape and bool(torch.allclose(a.double(), b.double(), rtol=tol, atol=tol))


def _diagnose(result, logits: torch.Tensor, k: int) -> str | None:
    """None when `result` is right for these logits, else what is wrong."""
    T, E = logits.shape
    where = f"for logits of shape [T={T}, E={E}] ({str(logits.dtype).removeprefix('torch.')}) and k={k}"
    if not (isinstance(result, (tuple, list)) and len(result) == 2
            and all(isinstance(t, torch.Tensor) for t in result)):
        return (f"my_route must return a tuple (top_k_index, top_k_weights) of two tensors; it returned "
                f"{type(result).__name__} {where}")
    index, weights = result
    if tuple(index.shape) != (T, k):
        hint = " (that is every expert: keep only the k best with torch.topk(scores, k, dim=-1))" \
            if tuple(index.shape) == (T, E) else (" (transposed?)" if tuple(index.shape) == (k, T) else "")
        return f"top_k_index has shape {tuple(index.shape)}, expected [T, k] = {(T, k)}{hint} {where}"
    if index.dtype != torch.int64:
        return (f"top_k_index has dtype {index.dtype}; expert ids are int64, which is what torch.topk returns "
                f"(did you convert the indices, or return the values instead of the indices?) {where}")
    if tuple(weights.shape) != (T, k):
        return f"top_k_weights has shape {tuple(weights.shape)}, expected [T, k] = {(T, k)} {where}"
    expected = route(logits, k)
    mine = torch.sort(index, dim=-1).values
    want = torch.sort(expected.top_k_index, dim=-1).values
    if not torch.equal(mine, want):
        t = int((mine != want).any(dim=-1).nonzero()[0])
        lowest = torch.sort(torch.topk(logits.float(), k, dim=-1, largest=False).indices, dim=-1).values
        hint = " — those are the k LOWEST scores (torch.topk picks the largest by default)" \
            if torch.equal(mine, lowest) else ""
        return (f"token {t} is routed to experts {mine[t].tolist()}, but its {k} highest scores are experts "
                f"{want[t].tolist()}{hint} {where}")
    if weights.dtype != torch.float32:
        return (f"top_k_weights has dtype {weights.dtype}; compute the scores in float32 (logits.float()) "
                f"whatever the model dtype, as moe_lab.route does {where}")
    scores = expected.scores.gather(-1, index)  # softmax probabilities of the student's experts, float32
    want_weights = scores / scores.sum(-1, keepdim=True)  # in the student's order of experts
    raw = logits.float().gather(-1, index)
    if _close(weights, want_weights):
        return None
    if _close(weights, scores):
        return (f"forgot the renormalisation: your weights are the softmax probabilities of the chosen experts "
                f"and sum to {float(weights[0].sum()):.3f} for token 0, not 1; divide them by their sum over "
                f"the k picked experts {where}")
    if _close(weights, raw) or _close(weights, raw / raw.sum(-1, keepdim=True)):
        return f"forgot the softmax: your weights are (normalised) raw logits, which can be negative {where}"
    if _close(weights, want_weights, tol=2e-2):
        return (f"almost: the weights are off by up to {float((weights - want_weights).abs().max()):.1e}; was the "
                f"softmax computed in {str(logits.dtype).removeprefix('torch.')}? convert the logits to float32 "
                f"first {where}")
    return (f"the experts are right but the weights are not: token 0 got "
            f"{[round(w, 3) for w in weights[0].tolist()]}, expected {[round(w, 3) for w in want_weights[0].tolist()]} "
            f"(softmax over all E experts, keep the k picked, divide by their sum) {where}")


def check_my_route(my_route) -> "feedback":
    """Run `my_route(logits, k)` on a few logits (float32 and bf16) and compare with moe_lab.route."""
    if not callable(my_route):
        return feedback(False, f"pass your function itself (check_my_route(my_route)), got {type(my_route).__name__}")
    for seed, (T, E, k, dtype) in enumerate(CASES):
        logits = _case_logits(T, E, dtype, seed)
        original = logits.clone()
        try:
            result = my_route(logits, k)
        except Exception as error:  # a student's bug must not stop the notebook
            first = str(error).strip().splitlines()[0] if str(error).strip() else ""
            return feedback(False, f"my_route raised {type(error).__name__}: {first} (logits [T={T}, E={E}], k={k})")
        if not torch.equal(logits, original):
            return feedback(False, "my_route changed the logits in place; compute new tensors instead")
        problem = _diagnose(result, logits, k)
        if problem is not None:
            return feedback(False, problem)
    shapes = ", ".join(f"[{T}, {E}] k={k} {str(d).removeprefix('torch.')}" for T, E, k, d in CASES)
    return feedback(True, f"my_route picks the same experts with the same weights as moe_lab.route on {shapes}.")
