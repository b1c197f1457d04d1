"""The collectives expert parallelism needs, and how their gradients flow.

`all_to_all` is torch's differentiable all-to-all (`torch.distributed._functional_collectives.
all_to_all_single_autograd`): rank r's input rows `input_splits[d]` go to rank d, and its output
holds `output_splits[s]` rows from every rank s, in rank order. Its backward is the reverse
all-to-all (the splits swapped), so gradients reach the rows on the rank that sent them.

Why this one: `torch.distributed.all_to_all_single` has no autograd (a forward through it leaves
the inputs without gradients), and `torch.distributed.nn.functional.all_to_all_single` — the older
differentiable wrapper — is deprecated in favour of this function from torch 2.14 on (a
FutureWarning per call) and was the slower of the two on gloo (docs/expert_parallelism.md).
The functional collective is also what torch.compile traces and what torchtitan's
expert parallelism uses. It returns as soon as the collective is queued; `.wait()` (done here)
makes later work wait for it on the device, not on the host.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import _functional_collectives as functional_collectives


def group_rank_and_size(group) -> tuple[int, int]:
    """(rank, world size) of this process in `group` (None: the default group), or a clear error."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group(...) first "
            "(torchrun does the environment for you), or run the function on several processes with "
            "moe_lab.parallel.run_on_ranks(fn, world_size)"
        )
    group = group if group is not None else dist.group.WORLD
    return dist.get_rank(group), dist.get_world_size(group)


def all_to_all(rows: torch.Tensor, output_splits: list[int] | None, input_splits: list[int] | None,
               group) -> torch.Tensor:
    """[sum(input_splits), ...] -> [sum(output_splits), ...]; None splits mean equal blocks of dim 0.
    Differentiable in `rows`."""
    return waited(all_to_all_async(rows, output_splits, input_splits, group))


def all_to_all_async(rows: torch.Tensor, output_splits: list[int] | None, input_splits: list[int] | None,
                     group) -> torch.Tensor:
    """The same all-to-all, not waited for: the result is a tensor that waits on its first use, so
    work queued before that use (another chunk's expert matmuls) overlaps the transfer."""
    group = group if group is not None else dist.group.WORLD
    return functional_collectives.all_to_all_single_autograd(rows.contiguous(), output_splits, input_splits, group)


def all_gather_async(rows: torch.Tensor, group) -> torch.Tensor:
    """[N, ...] on every rank -> [world*N, ...], rank s's rows in block s; not waited for (as `all_to_all_async`).
    Every rank must pass the same N. Differentiable in `rows`: the backward is a reduce-scatter of the
    gradient, so each rank gets the sum over all ranks of its own block's gradient. torch's functional
    all-gather with autograd: `all_gather_single_autograd` from torch 2.14 on, where the older name
    `all_gather_tensor_autograd` (torch 2.11's only one) is deprecated; both run on gloo too."""
    group = group if group is not None else dist.group.WORLD
    return _ALL_GATHER_AUTOGRAD(rows.contiguous(), 0, group)


_ALL_GATHER_AUTOGRAD = getattr(functional_collectives, "all_gather_single_autograd", None) or \
    functional_collectives.all_gather_tensor_autograd


def all_gather_into(gathered: torch.Tensor, rows: torch.Tensor, group) -> None:
    """torch.distributed's own all-gather of `rows` [N, ...] into `gathered` [world*N, ...] (no autograd):
    `all_gather_single` from torch 2.14 on, `all_gather_into_tensor` before."""
    _ALL_GATHER_INTO(gathered, rows.contiguous(), group=group)


_ALL_GATHER_INTO = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def waited(received: torch.Tensor) -> torch.Tensor:
    """The all-to-all's result as a plain tensor, once the device has it: work queued after this waits for
    the collective on the device (the host does not block). Kernels that take raw pointers (a Triton launch)
    must get this, not the pending result, whose storage is not there yet."""
    if isinstance(received, functional_collectives.AsyncCollectiveTensor):
        return received.wait()
    return received


def exchange_counts(counts_by_rank: torch.Tensor, group) -> torch.Tensor:
    """[world, n] counts this rank sends to each rank -> [world, n] counts each rank sent here.
    Equal blocks, so no split sizes are needed: the host never reads a device value here."""
    world = counts_by_rank.shape[0]
    received = all_to_all(counts_by_rank.reshape(-1), None, None, group)
    return received.view(world, -1)


def start_count_exchange(counts_by_rank: torch.Tensor, group):
    """Start the count exchange and return (received [world, n], work): `work.wait()` before reading
    `received`. Through `torch.distributed.all_to_all_single` into a preallocated tensor: counts need no
    gradient, so the functional collective's autograd wrapper is host time for nothing. Not waited for here,
    so work queued before `work.wait()` (gathering the rows to send) runs while the counts move."""
    sent = counts_by_rank.contiguous()
    received = torch.empty_like(sent)
    return received, dist.all_to_all_single(received, sent, group=group, async_op=True)
