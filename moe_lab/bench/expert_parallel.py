"""`moe-lab bench --ep`: the expert-parallel layer timed on every rank of a torchrun launch.

Per preset, tokens per rank T and routing (uniform, or Zipf-skewed so the first rank's experts get
most pairs), each rank records one row per variant:

    exact            ExpertParallelExperts: count_exchange / dispatch / expert_compute / combine (CUDA events)
    dedup            DedupExpertParallelExperts (each token once per destination rank), the same phases
    pipelined_<n>    the same forward in n chunks, all-to-alls overlapping the experts (parallel/pipelined.py)
    dedup_pipelined_<n>  the dedup layer's forward in n chunks, the same way
    padded           the sync-free fixed-capacity layer (T <= padded_max_tokens: decode sizes)
    gathered         GatheredExpertParallelExperts: all-gather dispatch, no counts, no host sync (dispatch /
                     expert_compute / combine)
    gathered_pipelined_<n>  its forward in n chunks (no sync at all: the host queues every chunk ahead)
    padded_graph     the padded layer replayed from a CUDA graph (CUDA only; measured after everything else)
    one_device_graph rank 0 only: the whole layer on one GPU replayed from a CUDA graph, beside the replayed layers
    gathered_graph, gathered_pipelined_<n>_graph   the gathered layer (plain, chunked) replayed from a CUDA graph,
                     at every T: no Python between its kernels
    dispatch_all_to_all  the exact layer's dispatch all-to-all alone, its real split sizes
    nccl_all_to_all  an all-to-all of the same bytes in equal blocks: what the library does on this machine
    dedup_dispatch_all_to_all, dedup_nccl_all_to_all   the same two for the dedup layer's token rows
    gathered_dispatch_all_gather  the gathered layer's all-gather of [T, H] (the functional collective it uses)
    gathered_nccl_all_gather      torch.distributed's all-gather of the same bytes: the library's own
    one_device       rank 0 only: the whole layer (all E experts) on one GPU, rank 0's T tokens and routing
                     (its world_size is the launch's, so each launch is compared with its own baseline)

Times are medians over `reps` calls after `warmup`, every call started together on all ranks (a
device sync and a barrier first); the layer variants of a point (exact, dedup, pipelined, padded) are
interleaved call by call (A B C, C B A, ...), so drift during a run does not land on one of them; a
rank's time includes waiting for slower ranks inside the
collectives — that is what skew costs. FLOPs are the useful expert FLOPs of a rank's own tokens
(bench.roofline.expert_flops), so per-GPU TFLOP/s compares directly with the single-GPU row.
Inputs are random (never zeros), weights built on the device, each rank only its block.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..config import MoEConfig
from ..errors import first_line
from ..modules import Experts
from ..parallel.collectives import all_to_all
from ..parallel.dedup import DedupExpertParallelExperts, plan_token_dispatch
from ..parallel.collectives import all_gather_async, all_gather_into, waited
from ..parallel.dispatch import plan_exact, sort_pairs
from ..parallel.gathered import GatheredExpertParallelExperts
from ..parallel.layer import PHASES, ExpertParallelExperts
from ..parallel.padded import PaddedExpertParallelExperts
from ..parallel.pipelined import pipelined_dedup_forward, pipelined_forward, pipelined_gathered_forward
from ..routing import synthetic_routing
from .phase_timer import PhaseTimer
from .provenance import ROW_PROVENANCE, provenance
from .rounds import round_order
from .roofline import expert_flops
from .timing import percentile

EP_COLUMNS = (
    "preset", "variant", "world_size", "rank", "num_tokens", "distribution", "skew", "backend", "dtype",
    "hidden_size", "intermediate_size", "num_experts", "top_k", "status", "reason",
    *(f"{phase}_ms" for phase in PHASES), "median_ms", "p10_ms", "p90_ms", "reps",
    "pairs_sent", "pairs_received", "rows_sent", "rows_received", "bytes_off_rank", "a2a_GBps", "capacity", "flops", "tflops", "tokens_per_s",
    "device", *ROW_PROVENANCE,
)


@dataclass(frozen=True)
class EPBenchSettings:
    tokens: tuple[int, ...] = (128, 8192)  # per rank
    distributions: tuple[str, ...] = ("uniform", "zipf")
    skew: float = 1.0  # the Zipf exponent of the skewed routing
    backend: str = "grouped_mm"
    dtype: torch.dtype | None = None  # None: bf16 on CUDA, float32 on CPU
    warmup: int = 3
    reps: int = 10
    chunks: tuple[int, ...] = (2, 4)
    padded_max_tokens: int = 1024
    cuda_graph: bool = True
    baseline: bool = True
    seed: int = 0
    progress: bool = True  # rank 0 prints a line per measurement (a long GPU run's log)


@contextlib.contextmanager
def seeded(device: torch.device, seed: int):
    """torch.manual_seed(seed) inside, the RNG state of the CPU and of THIS rank's GPU restored after
    (bench.inputs.seeded forks every visible GPU's: from each of N ranks, a context on every GPU)."""
    with torch.random.fork_rng(devices=[device.index if device.index is not None else 0] if device.type == "cuda"
                               else []):
        torch.manual_seed(seed)
        yield


def start_process_group(device: str | None = None) -> torch.device:
    """Join torchrun's group (env RANK/WORLD_SIZE/LOCAL_RANK) or, outside torchrun, a group of one.
    NCCL on CUDA (this rank's GPU: LOCAL_RANK), gloo on CPU."""
    use_cuda = torch.cuda.is_available() if device is None else torch.device(device).type == "cuda"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    target = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(target)
    if not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if "RANK" in os.environ:
            dist.init_process_group(backend, device_id=target if use_cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return target


def run_ep_bench(configs: dict[str, MoEConfig], settings: EPBenchSettings, device: torch.device,
                 on_rows=None) -> list[dict]:
    """Every rank's rows (on every rank). `on_rows(rows)` is called on rank 0 after each preset with
    all rows so far, so a run stopped part-way keeps what it measured. CUDA-graph replays come last,
    after every preset: a capture that fails can leave the device unusable for what follows."""
    rows = []
    dtype = settings.dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    configs = {name: config.replace(dtype=dtype) for name, config in configs.items()}
    parts = [(name, config, _bench_preset) for name, config in configs.items()]
    if settings.cuda_graph and device.type == "cuda":
        parts += [(name, config, _graph_preset) for name, config in configs.items()]
    for name, config, part in parts:
        mine = part(name, config, settings, device)
        every = [None] * dist.get_world_size()
        dist.all_gather_object(every, mine)
        rows += [row for rank_rows in every for row in rank_rows]
        if on_rows is not None and dist.get_rank() == 0:
            on_rows(rows)
    return rows


def _bench_preset(name, config, settings, device) -> list[dict]:
    rank, world = dist.get_rank(), dist.get_world_size()
    with seeded(device, settings.seed + rank):
        layer = ExpertParallelExperts(config, experts_implementation=settings.backend, device=device)
    whole = None
    if settings.baseline and rank == 0:
        with seeded(device, settings.seed), torch.device(device):
            whole = Experts(config, settings.backend)  # all E experts on rank 0's GPU
    rows = []
    for T in settings.tokens:
        for distribution in settings.distributions:
            base = _base_row(name, config, settings, device, T, distribution, world, rank)
            inputs = _inputs(config, T, distribution, settings, device, rank)
            with torch.no_grad():
                rows += _bench_point(layer, whole, inputs, base, settings, device)
            if settings.progress:
                _report(rows, base)
    del layer, whole
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _inputs(config, T, distribution, settings, device, rank):
    with seeded(device, settings.seed + 100 + rank):
        x = torch.randn(T, config.hidden_size, device=device, dtype=config.dtype)
    index, weights = synthetic_routing(T, config.num_experts, config.top_k, distribution=distribution,
                                       skew=settings.skew, seed=settings.seed + 1000 * (rank + 1))
    return x, index.to(device), weights.to(device)


def _bench_point(layer, whole, inputs, base, settings, device) -> list[dict]:
    x, index, weights = inputs
    T = x.shape[0]
    pairs = sort_pairs(index, layer.num_experts)
    plan = plan_exact(pairs, layer.shard, layer.group)  # split sizes of this point, for the all-to-all rows
    dedup = DedupExpertParallelExperts(layer.config, layer.group, local=layer.local)  # the same weights
    [(token_plan, token_rows, _)] = plan_token_dispatch(x, index, weights, layer.shard, layer.group)
    gathered = GatheredExpertParallelExperts(layer.config, layer.group, tokens_per_rank=T, local=layer.local)
    variants = [("exact", layer, lambda: layer(x, index, weights)), ("dedup", dedup, lambda: dedup(x, index, weights)),
                ("gathered", gathered, lambda: gathered(x, index, weights))]
    for chunks in settings.chunks:
        variants.append((f"pipelined_{chunks}", layer,
                         lambda n=chunks: pipelined_forward(layer, x, index, weights, chunks=n)))
        variants.append((f"dedup_pipelined_{chunks}", dedup,
                         lambda n=chunks: pipelined_dedup_forward(dedup, x, index, weights, chunks=n)))
        variants.append((f"gathered_pipelined_{chunks}", gathered,
                         lambda n=chunks: pipelined_gathered_forward(gathered, x, index, weights, chunks=n)))
    if T <= settings.padded_max_tokens:
        padded = PaddedExpertParallelExperts(layer.config, layer.group, settings.backend, tokens_per_rank=T,
                                             local=layer.local)
        variants.append(("padded", padded, lambda: padded(x, index, weights)))
    entries = [(base | {"variant": name} | ({"capacity": module.capacity} if name == "padded" else {}),
                lambda timer, module=module, call=call: _with_hook(module, timer, call))
               for name, module, call in variants]
    rows = _measure_interleaved(entries, settings, device)
    world = layer.shard.world_size
    for row in rows:
        if row["variant"].startswith("gathered"):  # every token to every rank (its own copy included), all back
            row["rows_sent"], row["rows_received"] = T * world, T * world
        elif row["variant"].startswith("dedup"):
            row["rows_sent"], row["rows_received"] = sum(token_plan.send_rows), sum(token_plan.receive_rows)
        else:
            row["rows_sent"], row["rows_received"] = T * layer.config.top_k, sum(plan.receive_splits)
    rows += _all_to_all_rows(layer, x[pairs.token_of_sorted], plan.send_splits, plan.receive_splits, base, settings,
                             device, prefix="")
    rows += _all_to_all_rows(layer, token_rows, token_plan.send_rows, token_plan.receive_rows, base, settings, device,
                             prefix="dedup_")
    rows += _all_gather_rows(layer, x, base, settings, device)
    if settings.baseline:
        rows.append(_one_device_row(whole, inputs, base, settings, device))
    rows = [row for row in rows if row is not None]
    for row in rows:
        _derive(row, layer)
        row["pairs_received"] = sum(plan.receive_splits) if row["variant"] != "one_device" else math.nan
    return rows


def _graph_preset(name, config, settings, device) -> list[dict]:
    """The sync-free layers replayed from a CUDA graph: the padded one at every T up to padded_max_tokens, the
    gathered one (plain and in each chunk count) at every T."""
    rank, world = dist.get_rank(), dist.get_world_size()
    with seeded(device, settings.seed + rank):
        layer = ExpertParallelExperts(config, experts_implementation=settings.backend, device=device)
    whole = None
    if settings.baseline and rank == 0:  # the one-GPU layer replayed too: replays compared with replays
        with seeded(device, settings.seed), torch.device(device):
            whole = Experts(config, settings.backend)
    rows = []
    for T in settings.tokens:
        for distribution in settings.distributions:
            base = _base_row(name, config, settings, device, T, distribution, world, rank)
            x, index, weights = _inputs(config, T, distribution, settings, device, rank)
            calls = []
            if T <= settings.padded_max_tokens:
                padded = PaddedExpertParallelExperts(config, None, settings.backend, tokens_per_rank=T,
                                                     local=layer.local)
                calls.append((base | {"variant": "padded_graph", "capacity": padded.capacity},
                              lambda padded=padded: padded(x, index, weights)))
            gathered = GatheredExpertParallelExperts(config, None, tokens_per_rank=T, local=layer.local)
            calls.append((base | {"variant": "gathered_graph"}, lambda: gathered(x, index, weights)))
            calls += [(base | {"variant": f"gathered_pipelined_{n}_graph"},
                       lambda n=n: pipelined_gathered_forward(gathered, x, index, weights, chunks=n))
                      for n in settings.chunks]
            for row, call in calls:
                with torch.no_grad():
                    try:
                        row = _measure_replay(row, call, settings, device)
                    except Exception as error:  # noqa: BLE001 (a refusal becomes a row, the run goes on)
                        row = row | {"status": "error", "reason": first_line(error)}
                _derive(row, layer)
                rows.append(row | {"rows_sent": T * world, "rows_received": T * world}
                            if row["variant"].startswith("gathered") else row)
            if whole is not None:
                with torch.no_grad():
                    row = _measure_replay(base | {"variant": "one_device_graph"},
                                          lambda: whole(x, index, weights), settings, device, together=False)
                _derive(row, layer)
                rows.append(row)
            dist.barrier()
            if settings.progress:
                _report(rows, base)
    return rows


def _measure_replay(row, call, settings, device, together: bool = True) -> dict:
    """Capture `call` in a CUDA graph and time its replays; the graph (and its memory pool) dies on return."""
    graph = _capture(call, device)
    return _measure(row, lambda timer: graph.replay(), settings, device, together=together)


def _with_hook(layer, timer, call):
    layer.phase_hook = timer.mark
    try:
        call()
    finally:
        layer.phase_hook = None


def _capture(call, device):
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            call()
    torch.cuda.current_stream(device).wait_stream(stream)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    torch.cuda.synchronize(device)
    return graph


def _all_to_all_rows(layer, rows_sorted, send_splits, receive_splits, base, settings, device, prefix) -> list[dict]:
    """A dispatch's own all-to-all (its real split sizes), and an equal-block all-to-all of the same bytes.
    rows_sorted [N, H]: this rank's rows grouped by destination, as the dispatch sends them."""
    x = rows_sorted
    world, rank = layer.shard.world_size, layer.shard.rank
    off_rank = rows_sorted.shape[0] - send_splits[rank]
    dispatch = _measure(base | {"variant": f"{prefix}dispatch_all_to_all"},
                        lambda timer: all_to_all(rows_sorted, receive_splits, send_splits, layer.group),
                        settings, device)
    dispatch["bytes_off_rank"] = off_rank * x.shape[1] * x.element_size()
    # Equal blocks must be the same size on every rank: the mean of the ranks' rows (the same bytes in all; the
    # exact layer's T*k rows are equal on every rank anyway, the dedup layer's depend on the routing).
    total_rows = torch.tensor([rows_sorted.shape[0]], device=device)
    dist.all_reduce(total_rows, group=layer.group)
    per_rank = max(1, math.ceil(int(total_rows) / world / world))
    with seeded(device, settings.seed + 7):
        equal = torch.randn(per_rank * world, x.shape[1], device=device, dtype=x.dtype)  # [world * mean N/world, H]
    library_name = "nccl_all_to_all" if device.type == "cuda" else "gloo_all_to_all"
    library = _measure(base | {"variant": f"{prefix}{library_name}"},
                       lambda timer: all_to_all(equal, None, None, layer.group), settings, device)
    library["bytes_off_rank"] = (world - 1) * per_rank * x.shape[1] * x.element_size()
    for row in (dispatch, library):
        ms = row.get("median_ms", math.nan)
        row["a2a_GBps"] = row["bytes_off_rank"] / (ms * 1e6) if world > 1 and ms and ms > 0 else math.nan
        row["rows_sent"], row["rows_received"] = rows_sorted.shape[0], sum(receive_splits)
    return [dispatch, library]


def _all_gather_rows(layer, x, base, settings, device) -> list[dict]:
    """The gathered layer's dispatch all-gather of x [T, H] as it runs it (the functional collective), and the
    library's own all-gather of the same bytes (into a buffer allocated once)."""
    world = layer.shard.world_size
    gathered = torch.empty(world * x.shape[0], x.shape[1], device=device, dtype=x.dtype)  # [w*T, H]
    library_name = "nccl_all_gather" if device.type == "cuda" else "gloo_all_gather"
    rows = [_measure(base | {"variant": "gathered_dispatch_all_gather"},
                     lambda timer: waited(all_gather_async(x, layer.group)), settings, device),
            _measure(base | {"variant": f"gathered_{library_name}"},
                     lambda timer: all_gather_into(gathered, x, layer.group),
                     settings, device)]
    for row in rows:
        row["bytes_off_rank"] = (world - 1) * x.shape[0] * x.shape[1] * x.element_size()
        ms = row.get("median_ms", math.nan)
        row["a2a_GBps"] = row["bytes_off_rank"] / (ms * 1e6) if world > 1 and ms and ms > 0 else math.nan
        row["rows_sent"], row["rows_received"] = x.shape[0] * world, x.shape[0] * world
    return rows


def _one_device_row(whole, inputs, base, settings, device) -> dict:
    """Rank 0 times the whole layer alone (the other ranks wait); a row on rank 0 only."""
    row = base | {"variant": "one_device"}  # world_size stays the launch's: the baseline of THIS launch
    if whole is not None:
        x, index, weights = inputs
        row = _measure(row, lambda timer: whole(x, index, weights), settings, device, together=False)
    dist.barrier()
    return row if whole is not None else None


def _measure_interleaved(entries, settings, device) -> list[dict]:
    """`_measure` for several (row, call) at once, call by call: every entry's warm-up, then each repetition
    runs every entry once, in order and reversed on alternate repetitions (rounds.round_order)."""
    timer = PhaseTimer(device)
    samples = [{} for _ in entries]
    failed = [None] * len(entries)
    for i in range(settings.warmup + settings.reps):
        for j in round_order(range(len(entries)), i):
            if failed[j] is not None:
                continue
            _start_together(device)
            try:
                timer.start()
                entries[j][1](timer)
                timer.stop()
                phases = timer.phases_ms()
            except Exception as error:  # noqa: BLE001 (the same on every rank: a collective either runs or not)
                failed[j] = first_line(error)
                continue
            if i >= settings.warmup:
                for key, value in phases.items():
                    samples[j].setdefault(key, []).append(value)
    return [row | {"status": "error", "reason": failed[j]} if failed[j] is not None else _summarize(row, samples[j])
            for j, (row, _) in enumerate(entries)]


def _summarize(row: dict, samples: dict) -> dict:
    totals = samples["total"]
    row = row | {"status": "ok", "median_ms": percentile(totals, 50), "p10_ms": percentile(totals, 10),
                 "p90_ms": percentile(totals, 90), "reps": len(totals)}
    for phase in PHASES:
        if phase in samples:
            row[f"{phase}_ms"] = percentile(samples[phase], 50)
    return row


def _measure(row: dict, call, settings, device, together: bool = True) -> dict:
    """Median (and p10/p90 of the total) of each phase over settings.reps calls after the warm-up."""
    timer = PhaseTimer(device)
    samples: dict[str, list[float]] = {}
    try:
        for i in range(settings.warmup + settings.reps):
            _start_together(device) if together else _sync(device)
            timer.start()
            call(timer)
            timer.stop()
            phases = timer.phases_ms()
            if i >= settings.warmup:
                for key, value in phases.items():
                    samples.setdefault(key, []).append(value)
    except Exception as error:  # noqa: BLE001
        return row | {"status": "error", "reason": first_line(error)}
    return _summarize(row, samples)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _start_together(device):
    _sync(device)
    dist.barrier()
    _sync(device)


def _base_row(name, config, settings, device, T, distribution, world, rank) -> dict:
    info = provenance(device)
    row = {column: math.nan for column in EP_COLUMNS}
    row.update({
        "preset": name, "world_size": world, "rank": rank, "num_tokens": T, "distribution": distribution,
        "skew": settings.skew if distribution == "zipf" else 0.0, "backend": settings.backend,
        "dtype": str(config.dtype).removeprefix("torch."), "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_experts": config.num_experts, "top_k": config.top_k,
        "status": "", "reason": "", "device": str(device),
    })
    row.update({key: info[key] for key in ROW_PROVENANCE})
    return row


def _derive(row, layer) -> None:
    if row is None:
        return
    config = layer.config
    T = row["num_tokens"]
    row["pairs_sent"] = T * config.top_k if row["variant"] != "one_device" else math.nan
    row["flops"] = float(expert_flops(T, config.top_k, config.hidden_size, config.intermediate_size))
    ms = row.get("median_ms", math.nan)
    if not row["variant"].endswith(("all_to_all", "all_gather")) and ms and ms > 0:
        row["tflops"] = row["flops"] / (ms * 1e9)
        row["tokens_per_s"] = T / (ms * 1e-3)


def _report(rows, base) -> None:
    if base["rank"] != 0:
        return
    for row in rows:
        if row is not None and row["num_tokens"] == base["num_tokens"] and row["distribution"] == base["distribution"] \
                and row["preset"] == base["preset"]:
            timing = f"{row['median_ms']:.3f} ms" if row["status"] == "ok" else f"{row['status']}: {row['reason']}"
            print(f"[ep rank 0/{base['world_size']}] {row['preset']} T={row['num_tokens']} {row['distribution']} "
                  f"{row['variant']}: {timing}", flush=True)


def measure_on_local_ranks(config: MoEConfig, tokens_per_rank: int, world_size: int, *, skew: float = 0.0,
                           backend: str = "grouped_mm", reps: int = 5):
    """The exact layer's phases on `world_size` local gloo processes (moe_lab.parallel.run_on_ranks), with
    the whole layer on rank 0 alone beside it: a DataFrame of every rank's rows (notebook 10, its widget)."""
    import pandas as pd

    from ..parallel import run_on_ranks

    settings = EPBenchSettings(tokens=(tokens_per_rank,), distributions=("zipf" if skew > 0 else "uniform",),
                               skew=skew, backend=backend, warmup=1, reps=reps, chunks=(), padded_max_tokens=0,
                               progress=False)
    every_rank = run_on_ranks(_run_on_cpu_rank, world_size, {"live": config}, settings)
    return pd.DataFrame(every_rank[0])  # every rank holds all ranks' rows


def _run_on_cpu_rank(configs, settings):
    return run_ep_bench(configs, settings, torch.device("cpu"))
