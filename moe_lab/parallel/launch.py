"""Run a function on several local processes joined in a gloo group, and get each rank's result back.

For tests and notebooks on a CPU: `run_on_ranks(fn, 4, *args)` starts 4 processes, joins them in a
gloo process group (a FileStore in a temporary folder: no port to pick, nothing to collide with),
calls `fn(*args)` on each, and returns the 4 return values in rank order. On GPUs launch with
`torchrun` instead (moe-lab bench --ep).

Processes come from a "forkserver" that imported torch (and dynamo) and moe_lab once, so a launch costs a fork,
not a fresh interpreter importing torch (seconds per rank on a small machine); NCCL ranks (one GPU
each, for the GPU tests) start fresh interpreters instead, since CUDA does not survive a fork. A rank that raises
stops the others at once and its traceback is raised here as `RankFailedError`; a launch that runs
past `timeout_s` is stopped and raises `TimeoutError`, naming what each rank last reported through
`report_progress` (which check a rank was in when it hung). `fn` must be importable by name (a function
defined in a module, not in a notebook cell), as for any multiprocessing start method but fork.
"""
from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
import traceback
from pathlib import Path

import torch

#: Where a spawned rank learns its place: set in the child before `fn` runs.
_RANK_ENV = "MOE_LAB_RANK"
#: The launch's folder, where `report_progress` appends a rank's lines.
_FOLDER_ENV = "MOE_LAB_RANKS_FOLDER"


def report_progress(text: str) -> None:
    """Inside a rank started by `run_on_ranks`: note what it is doing now (one line, flushed), so a launch
    that times out says where each rank was. Elsewhere it does nothing."""
    folder, rank = os.environ.get(_FOLDER_ENV), os.environ.get(_RANK_ENV)
    if folder and rank is not None:
        with open(Path(folder, f"progress{rank}.txt"), "a") as handle:
            handle.write(f"{time.monotonic():.1f} {text}\n")


class RankFailedError(RuntimeError):
    """A rank raised: carries its rank and traceback text."""

    def __init__(self, rank: int, text: str):
        self.rank, self.text = rank, text
        super().__init__(f"rank {rank} failed:\n{text}")


def _context(backend: str):
    methods = multiprocessing.get_all_start_methods()
    # NCCL ranks start fresh interpreters: `import moe_lab` asks torch.cuda.is_available(), which initialises
    # the CUDA driver, and a process forked after that cannot use CUDA.
    if backend == "nccl" or "forkserver" not in methods:  # also Windows: only spawn
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # torch._dynamo too: torch's functional collectives import it on a rank's first all-to-all (~2 s a rank on a
    # small machine), and `import moe_lab` no longer does
    context.set_forkserver_preload(["torch", "torch._dynamo", "moe_lab", "moe_lab.parallel"])
    return context


def _rank_main(fn, args, rank: int, world_size: int, folder: str, threads: int, backend: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads)
    os.environ[_RANK_ENV], os.environ[_FOLDER_ENV] = str(rank), folder
    result_path, error_path = Path(folder, f"result{rank}.pt"), Path(folder, f"error{rank}.txt")
    try:
        store = dist.FileStore(str(Path(folder, "store")), world_size)
        device = None
        if backend == "nccl":  # rank r on GPU r
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, device_id=device)
        result = fn(*args)
        dist.barrier()  # no rank tears the group down while another is still inside a collective
    except BaseException:  # noqa: BLE001 (everything goes back to the parent, then the process exits 1)
        # Written before anything else happens: the peers fail only after this rank's exit, so the
        # first traceback on disk is the cause.
        error_path.write_text(traceback.format_exc())
        os._exit(1)
    dist.destroy_process_group()
    torch.save(result, result_path)


def run_on_ranks(fn, world_size: int, *args, timeout_s: float = 120.0, threads_per_rank: int = 1,
                 backend: str = "gloo") -> list:
    """[fn(*args) on rank 0, ..., on rank world_size - 1], each run inside a process group of
    `world_size` local processes (torch.distributed.get_rank() says which rank a call is).
    backend "gloo": CPU processes; "nccl": rank r on GPU r (the GPU tests)."""
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive integer, got {world_size!r}")
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' (CPU) or 'nccl' (one GPU per rank), got {backend!r}")
    if backend == "nccl" and world_size > torch.cuda.device_count():
        raise ValueError(f"nccl with {world_size} ranks needs {world_size} GPUs; this machine has "
                         f"{torch.cuda.device_count()}")
    context = _context(backend)
    with tempfile.TemporaryDirectory(prefix="moe_lab_ranks_") as folder:
        processes = [context.Process(target=_rank_main, args=(fn, args, rank, world_size, folder, threads_per_rank, backend),
                                     daemon=True) for rank in range(world_size)]
        for process in processes:
            process.start()
        try:
            _wait_for(processes, folder, timeout_s)
        finally:
            for process in processes:  # only ours, by handle; no-op for those that finished
                if process.is_alive():
                    process.terminate()
                process.join(timeout=5)
        return [torch.load(Path(folder, f"result{rank}.pt"), weights_only=False) for rank in range(world_size)]


def _wait_for(processes, folder: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        if any(process.exitcode not in (None, 0) for process in processes):
            raise _first_failure(processes, folder)
        if all(process.exitcode == 0 for process in processes):
            return
        if time.monotonic() > deadline:
            waiting = [rank for rank, process in enumerate(processes) if process.exitcode is None]
            raise TimeoutError(f"ranks {waiting} of {len(processes)} were still running after {timeout_s:.0f} s "
                               "(a rank stuck in a collective another rank never joined?); they were stopped. "
                               f"Last reported: {_last_progress(folder, waiting, time.monotonic())}")
        time.sleep(0.02)


def _last_progress(folder: str, ranks, now: float) -> str:
    """Each rank's last `report_progress` line and how long ago it was written."""
    said = []
    for rank in ranks:
        path = Path(folder, f"progress{rank}.txt")
        lines = path.read_text().splitlines() if path.exists() else []
        if lines:
            stamp, _, text = lines[-1].partition(" ")
            said.append(f"rank {rank}: {text!r} ({now - float(stamp):.0f} s ago)")
        else:
            said.append(f"rank {rank}: nothing")
    return "; ".join(said)


def _first_failure(processes, folder: str) -> RankFailedError:
    """The rank that failed first (its traceback file is the oldest): the others usually fail only
    because their peer left in the middle of a collective."""
    time.sleep(0.2)  # let a rank that is failing right now finish writing its traceback
    written = sorted((path.stat().st_mtime_ns, int(path.stem.removeprefix("error")), path)
                     for path in Path(folder).glob("error*.txt"))
    if written:
        _, rank, path = written[0]
        return RankFailedError(rank, path.read_text())
    rank = next(rank for rank, process in enumerate(processes) if process.exitcode not in (None, 0))
    return RankFailedError(rank, f"exited with code {processes[rank].exitcode} (killed? out of memory?)")
