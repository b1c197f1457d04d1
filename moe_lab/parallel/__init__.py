"""Expert parallelism on torch.distributed: E experts spread over the ranks of a process group.

    sharding.py     which experts live on which rank (contiguous blocks of E / world)
    collectives.py  the differentiable all-to-all and the count exchange
    dispatch.py     exact split sizes: sort pairs, exchange counts (one host sync), dispatch, return, weighted sum
    dedup.py        each token once per destination rank, its experts' weighted sum on the expert's rank
    padded.py       fixed capacity per (source, destination) pair: no host sync, CUDA-graph capturable
    gathered.py     all-gather dispatch: every rank's tokens everywhere, partial sums back; no counts, no host sync
    pipelined.py    a layer's forward in chunks (exact, dedup, gathered): collectives overlap another chunk's experts
    layer.py        `ExpertParallelExperts`, the exact layer
    local.py        this rank's experts through a registered backend (its sorted_rows / partial_forward entries)
    launch.py       `run_on_ranks`: a function on N local gloo processes (tests, notebooks)
    checks.py       one rank's comparison against the single-process float64 reference

Not imported by `import moe_lab`: `import moe_lab.parallel` when you need it.
"""
from .dedup import DedupExpertParallelExperts
from .gathered import GatheredExpertParallelExperts
from .layer import PHASES, ExpertParallelExperts
from .launch import RankFailedError, run_on_ranks
from .sharding import ExpertShard

__all__ = ["PHASES", "DedupExpertParallelExperts", "ExpertParallelExperts", "ExpertShard",
           "GatheredExpertParallelExperts", "RankFailedError", "run_on_ranks"]
