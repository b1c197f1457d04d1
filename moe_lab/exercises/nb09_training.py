"""Self-check for notebook 09: write the gradient of one expert's down_proj by hand.

For the rows of expert e (sorted pairs p with token t(p) and routing weight w_p):
    y_p = w_p * (down_proj[e] @ h_p)        out[t] = sum over t's pairs of y_p
so with the upstream gradient dout [T, H]:
    d down_proj[e] = sum_p  w_p * dout[t(p)] (outer) h_p   =   (w[:, None] * dout_rows)^T @ h_rows   -> [H, I]
"""
from __future__ import annotations

import torch

from . import feedback, first_line


def _case(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    rows, hidden, inter = 7, 10, 6
    h_rows = torch.randn(rows, inter, generator=generator, dtype=torch.float64)  # [n, I]
    dout_rows = torch.randn(rows, hidden, generator=generator, dtype=torch.float64)  # [n, H]
    w_rows = torch.rand(rows, generator=generator, dtype=torch.float64) + 0.1  # [n]
    return h_rows, dout_rows, w_rows


def _expected(h_rows, dout_rows, w_rows) -> torch.Tensor:
    """What autograd gives for d down_proj[e], computed through the forward itself."""
    down = torch.zeros(dout_rows.shape[1], h_rows.shape[1], dtype=torch.float64, requires_grad=True)  # [H, I]
    y = w_rows[:, None] * (h_rows @ down.T)  # [n, H]
    (grad,) = torch.autograd.grad(y, down, dout_rows)
    return grad


def check_down_proj_gradient(fn) -> object:
    """fn(h_rows [n, I], dout_rows [n, H], w_rows [n]) -> d down_proj[e] [H, I]. Prints and returns feedback."""
    if fn is None:
        return feedback(False, "`down_proj_gradient` is still None: define a function of (h_rows, dout_rows, w_rows)")
    h_rows, dout_rows, w_rows = _case()
    try:
        got = fn(h_rows, dout_rows, w_rows)
    except Exception as error:  # a wrong answer must not stop the notebook
        return feedback(False, f"calling it raised {first_line(error)}")
    if not isinstance(got, torch.Tensor):
        return feedback(False, f"it returned {type(got).__name__}; return a tensor [H, I] = [10, 6]")
    expected = _expected(h_rows, dout_rows, w_rows)
    if tuple(got.shape) == tuple(expected.T.shape) and got.shape != expected.shape:
        return feedback(False, f"the shape is {tuple(got.shape)} = [I, H]: down_proj[e] is stored [H, I] "
                               "(out x in), so its gradient is dout^T @ h, not h^T @ dout")
    if tuple(got.shape) != tuple(expected.shape):
        return feedback(False, f"the shape is {tuple(got.shape)}; d down_proj[e] has down_proj[e]'s shape [H, I] = "
                               f"{tuple(expected.shape)}")
    got = got.detach().to(torch.float64)
    if torch.allclose(got, expected, rtol=1e-9, atol=1e-12):
        return feedback(True, "d down_proj[e] = (w * dout_rows)^T @ h_rows: a GEMM whose reduction runs over the "
                              "expert's rows — which is why the backward sorts pairs by expert, like the forward")
    unweighted = dout_rows.T @ h_rows
    if torch.allclose(got, unweighted, rtol=1e-9, atol=1e-12):
        return feedback(False, "the routing weight is missing: each row's contribution to y was scaled by w_p, so "
                               "its gradient is too (w[:, None] * dout_rows)")
    if torch.allclose(got, (w_rows[:, None] ** 2 * dout_rows).T @ h_rows, rtol=1e-9, atol=1e-12):
        return feedback(False, "the routing weight is applied twice: scale dout_rows by w once")
    if torch.allclose(got, expected / len(w_rows), rtol=1e-9, atol=1e-12):
        return feedback(False, "that is the mean over rows; the gradient is the sum of every row's outer product")
    return feedback(False, "the values differ from autograd's: d down_proj[e] = sum over the expert's rows of "
                           "w_p * outer(dout[t(p)], h_p)")
