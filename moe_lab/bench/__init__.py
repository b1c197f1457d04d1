"""Measuring experts backends on this machine: time, memory, FLOPs, roofline, sweeps, compile modes.

    timing        time_fn -> Timing (CUDA events / perf_counter, warm-up, median, p10/p90)
    memory        measure_peak_memory -> MemoryMeasurement; predict_memory (memory_model);
                  predict_training_memory (training_memory_model: one fwd+bwd, triton and transformers)
    roofline      expert_flops, min_bytes, measure_ceilings -> Ceilings, roofline_ms
    measure       measure: one backend, one shape -> one tidy row (never raises)
    sweep         sweep: a grid of shapes x tokens x backends x dtypes -> pandas DataFrame
    results       save_results / load_results: CSV + JSON provenance sidecar
    compile_matrix  compile_matrix: torch.compile modes x backends -> DataFrame
    implementations  what can be timed: moe_lab's backends by name, transformers' as "transformers:<name>"
    ratios        speed-ups over transformers' same-named backends; best_paths per regime
    calibrate     calibrate: where backends cross over on this machine, written for `auto`

pandas and tqdm are imported only inside the functions that return tables or show progress.
"""
from .calibrate import calibrate
from .columns import ROW_COLUMNS, STATUSES
from .compile_matrix import COMPILE_COLUMNS, COMPILE_MODES, COMPILE_STATUSES, compile_matrix
from .ratios import best_paths
from .measure import measure, measure_with_layer
from .memory import MemoryMeasurement, available_bytes, measure_peak_memory
from .memory_model import predict_memory
from .training_memory_model import predict_training_memory
from .provenance import provenance
from .results import load_results, save_results
from .roofline import Ceilings, cached_ceilings, expert_flops, measure_ceilings, min_bytes, roofline_ms
from .sweep import sweep
from .timing import Timing, time_fn

__all__ = [
    "COMPILE_COLUMNS", "COMPILE_MODES", "COMPILE_STATUSES", "Ceilings", "MemoryMeasurement", "ROW_COLUMNS",
    "STATUSES", "Timing", "available_bytes", "best_paths", "cached_ceilings", "calibrate", "compile_matrix", "expert_flops", "load_results",
    "measure", "measure_ceilings", "measure_peak_memory", "measure_with_layer", "min_bytes", "predict_memory", "predict_training_memory",
    "provenance", "roofline_ms", "save_results", "sweep", "time_fn",
]
