"""The `moe-lab` command line.

    moe-lab info                                   what this machine supports
    moe-lab bench --preset qwen3-30b-a3b --tokens 1,16,128 [--compare-hf] [--cuda-graph] [--output data/x]
    moe-lab bench --preset qwen3-30b-a3b --tokens 8192 --backward --compare-hf --compare-liger [--cuda-graph]
    torchrun --nproc-per-node 2 -m moe_lab.cli bench --ep --preset qwen3-30b-a3b --tokens 128,8192 --output data/ep2
    moe-lab run notebooks/01_routing.ipynb -p top_k 4 --output-dir runs
    moe-lab sweep notebooks/03_bmm.ipynb --grid top_k=1,2 --grid num_tokens=16,64
    moe-lab e2e --model qwen3-30b-a3b [--layers auto] [--backends grouped_mm,moe_lab_triton] [--output data/x]
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _csv(text: str, convert=str) -> list:
    return [convert(item.strip()) for item in text.split(",") if item.strip()]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return value


def _info(args) -> int:
    from .backends import backend_capabilities, describe_backends
    from .capabilities import capabilities, format_capabilities
    from .config import resolve_dtype

    info = capabilities(args.device, probe_compile=not args.no_compile_probe)
    dtype = resolve_dtype(args.dtype) if args.dtype else None
    if args.json:
        info["backends"] = backend_capabilities(info["device"], dtype)
        print(json.dumps(info, indent=2, default=str))
    else:
        print(format_capabilities(info))
        print()
        print(describe_backends(info["device"], dtype))
    return 0


def _bench_configs(args) -> dict:
    from .config import MoEConfig
    from .presets import get_preset, scale_down

    if args.preset and args.hidden:
        raise ValueError("give either --preset or an explicit shape (--hidden/--intermediate/--experts/--top-k), not both")
    if args.hidden:
        missing = [flag for flag, value in (("--intermediate", args.intermediate), ("--experts", args.experts),
                                            ("--top-k", args.top_k)) if value is None]
        if missing:
            raise ValueError(f"an explicit shape also needs {', '.join(missing)}")
        return {"custom": MoEConfig(args.hidden, args.intermediate, num_experts=args.experts, top_k=args.top_k)}
    names = args.preset or ["qwen3-30b-a3b"]
    configs = {name: get_preset(name).config for name in names}
    if args.scale_down:
        configs = {name: scale_down(config, hidden_size=args.scale_down) for name, config in configs.items()}
    return configs


def _bench(args) -> int:
    if args.ep:
        return _bench_ep(args)
    from . import bench
    from .backends import runnable_backends
    from .bench import implementations
    from .capabilities import default_device
    from .config import resolve_dtype

    configs = _bench_configs(args)
    dtype = resolve_dtype(args.dtype) if args.dtype else None
    device = args.device
    # transformers' backends join only through --compare-hf, even if registered earlier in this process.
    backends = list(args.backends or runnable_backends(device or default_device(), interpreted=False))
    for name in backends:
        implementations.implementation(name)  # a typo is a usage error, not a table of "unsupported" rows
    ceilings = bench.measure_ceilings(device=device, dtype=dtype) if args.ceilings else None
    if args.compare_hf:
        backends += implementations.compared_names(backends)
    if args.compare_liger:
        liger = implementations.liger_names()
        if not liger:
            print("moe-lab bench: liger-kernel is not installed; Liger's fused MoE is not compared "
                  "(pip install 'moe-lab[compare]')", file=sys.stderr)
        backends += liger
    frame = bench.sweep(configs, args.tokens, backends, [dtype] if dtype else None, device=device,
                        progress=not args.quiet, ceilings=ceilings, distribution=[args.distribution or "uniform"],
                        measure_kwargs={"max_seconds": args.max_seconds},
                        executions=_executions(args), rounds=args.rounds,
                        passes=["forward_backward"] if args.backward else ["forward"])
    if args.compare_hf:
        from .bench.ratios import add_transformers_ratios

        frame = add_transformers_ratios(frame)
    compile_frame = None
    if args.compile_matrix:
        name, config = next(iter(configs.items()))
        # With --compare-hf transformers' backends are compiled too, cell for cell.
        compile_frame = bench.compile_matrix(config, args.compile_tokens or args.tokens[:2], backends,
                                             args.compile_modes or bench.COMPILE_MODES, device=device, dtype=dtype,
                                             progress=not args.quiet, max_seconds=args.max_seconds, rounds=args.rounds)
        compile_frame.insert(0, "preset", name)
        if args.compare_hf:
            from .bench.ratios import add_transformers_compile_ratios

            compile_frame = add_transformers_compile_ratios(compile_frame)
    print(_summary(frame, rounds=args.rounds > 1))
    if compile_frame is not None:
        columns = [c for c in ["mode", "backend", "num_tokens", "status", "compiled_ms", "speedup",
                               "speedup_vs_transformers", *_ROUND_RATIOS[args.rounds > 1],
                               "equal_after_routing_change"] if c in compile_frame.columns]
        print(compile_frame[columns].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.output:
        extra = {}
        if args.compare_hf:
            import transformers

            extra["transformers_version"] = transformers.__version__
        if args.compare_liger and implementations.liger_names():
            import importlib.metadata

            extra["liger_kernel_version"] = importlib.metadata.version("liger-kernel")
        print("wrote", *bench.save_results(frame, args.output, extra, ceilings=ceilings))
        if compile_frame is not None:
            print("wrote", *bench.save_results(compile_frame, f"{args.output}_compile", ceilings=ceilings))
    return 0


def _executions(args) -> list[str]:
    """Launched from Python always; replayed from a CUDA graph with --cuda-graph, back to back with --back-to-back."""
    return ["eager", *(["cuda_graph"] if args.cuda_graph else []),
            *(["cuda_graph_back_to_back"] if args.back_to_back else [])]


def _bench_ep(args) -> int:
    """Every rank of a torchrun launch runs this; rank 0 prints and writes the table."""
    import torch.distributed as dist

    from .backends import get_backend
    from .bench.ep_summary import ep_summary
    from .bench.expert_parallel import EPBenchSettings, run_ep_bench, start_process_group
    from .config import resolve_dtype

    distributions = tuple(_csv(args.distribution)) if args.distribution else ("uniform", "zipf")
    if args.backends and len(args.backends) != 1:
        raise ValueError("--ep times one backend for the local experts: give one name to --backends")
    backend = args.backends[0] if args.backends else "grouped_mm"
    get_backend(backend)  # a typo is a usage error before any process group exists
    settings = EPBenchSettings(
        tokens=tuple(args.tokens), distributions=distributions, skew=args.skew, backend=backend,
        dtype=resolve_dtype(args.dtype) if args.dtype else None, warmup=args.ep_warmup, reps=args.ep_reps,
        chunks=tuple(args.ep_chunks), padded_max_tokens=args.ep_padded_max_tokens, baseline=args.ep_baseline,
    )
    configs = _bench_configs(args)
    device = start_process_group(args.device)
    if args.ep_profile:
        return _profile_ep(args, configs, settings, device)
    save = _ep_saver(args.output, settings, device)
    try:
        rows = run_ep_bench(configs, settings, device, on_rows=save)
        if dist.get_rank() == 0:
            import pandas as pd

            summary = ep_summary(pd.DataFrame(rows))
            print(summary.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
            if args.output:
                print("wrote", args.output)
    finally:
        dist.destroy_process_group()
    return 0


def _profile_ep(args, configs, settings, device) -> int:
    """--ep-profile: one forward of each layer variant under torch.profiler at the first preset, T and routing."""
    from pathlib import Path

    import torch.distributed as dist

    from .bench.ep_profile import profile_ep_step

    name, config = next(iter(configs.items()))
    try:
        text = profile_ep_step(name, config, settings.tokens[0], settings.distributions[0], settings, device)
        if dist.get_rank() == 0:
            Path(args.ep_profile).parent.mkdir(parents=True, exist_ok=True)
            Path(args.ep_profile).write_text(text + "\n")
            print(text)
            print("wrote", args.ep_profile)
    finally:
        dist.destroy_process_group()
    return 0


def _ep_saver(output, settings, device):
    """None without --output; else a function writing the rows so far (rank 0 calls it after each preset,
    so a launch stopped part-way keeps what it measured), with the launch's size, NCCL and environment."""
    if not output:
        return None
    import pandas as pd  # needed to write the table: fail before measuring, not after
    import torch
    import torch.distributed as dist

    from .bench.results import save_results

    extra = {"world_size": dist.get_world_size(), "ep_settings": repr(settings),
             "nccl_version": ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None,
             "env": {key: os.environ.get(key) for key in EP_ENVIRONMENT}}
    return lambda rows: save_results(pd.DataFrame(rows), output, extra)


#: Environment recorded with an --ep table: NCCL/symmetric-memory switches change what is measured.
EP_ENVIRONMENT = ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NCCL_ALGO", "NCCL_PROTO", "CUDA_VISIBLE_DEVICES")


_ROUND_RATIOS = {False: (), True: ("speedup_lowest_round", "speedup_highest_round")}


def _summary(frame, rounds: bool = False) -> str:
    """One line per measurement: what a person reads in a terminal; the CSV has everything."""
    columns = [c for c in ["preset", "num_tokens", "backend", "execution", "pass", "status", "median_ms",
                           "fraction_of_roofline", "peak_bytes",
                           "tflops", "speedup_vs_transformers", *_ROUND_RATIOS[rounds], "reason"]
               if c in frame.columns]
    table = frame[columns].copy()
    if "reason" in table:
        table["reason"] = table["reason"].fillna("").astype(str).str.slice(0, 60)
    return table.to_string(index=False, float_format=lambda v: f"{v:.4g}")


def _calibrate(args) -> int:
    from .backends import calibration_path
    from .bench.calibrate import DEFAULT_TOKENS, calibrate, format_calibration

    configs = _bench_configs(args)
    if len(configs) != 1:
        raise ValueError(f"calibrate measures one layer shape; got presets {list(configs)} (give one --preset)")
    (name, config), = configs.items()
    entry = calibrate(config, preset="" if name == "custom" else name, tokens=args.tokens or DEFAULT_TOKENS,
                      backends=args.backends, device=args.device, dtype=args.dtype, path=args.output,
                      max_seconds=args.max_seconds, any_shape=args.any_shape, backward=args.backward,
                      tie_margin=args.tie_margin)
    print(format_calibration(entry))
    print("wrote", calibration_path(args.output))
    return 0


def _parameters(pairs) -> dict:
    from .notebook_runner import parse_value

    return {name: parse_value(value) for name, value in pairs or []}


def _run(args) -> int:
    from pathlib import Path

    from papermill.exceptions import PapermillExecutionError

    from .notebook_runner import check_parameters, error_summary, run_notebook

    parameters = _parameters(args.parameters)
    for notebook in args.notebooks:  # refuse a bad name or type for any notebook before running one
        check_parameters(notebook, parameters)
    for notebook in args.notebooks:
        try:
            output = run_notebook(notebook, args.output_dir, parameters, kernel_name=args.kernel,
                                  progress=not args.quiet)
        except PapermillExecutionError as error:  # the notebook's own error, in one line
            print(f"moe-lab run: {notebook} failed in cell [{error.exec_count}]: {error_summary(error)}\n"
                  f"  the executed notebook, with the full traceback: {Path(args.output_dir) / Path(notebook).name}",
                  file=sys.stderr)
            return 1
        print("executed", notebook, "->", output)
    return 0


def _sweep(args) -> int:
    from pathlib import Path

    from .notebook_runner import parse_value, sweep_notebook

    grid = {}
    for item in args.grid:
        name, sep, values = item.partition("=")
        if not sep or not values:
            raise ValueError(f"--grid takes name=v1,v2,..., got {item!r}")
        grid[name] = [parse_value(value) for value in _csv(values)]
    frame = sweep_notebook(args.notebook, grid, args.output_dir, _parameters(args.parameters), kernel_name=args.kernel)
    csv_path = Path(args.output_dir) / f"{Path(args.notebook).stem}_sweep.csv"
    frame.to_csv(csv_path, index=False)
    print(frame.to_string(index=False))
    print("wrote", csv_path)
    return 0 if (frame["status"] == "ok").all() else 1


def _e2e(args) -> int:
    from .bench.e2e import E2EPlan
    from .bench.e2e_run import default_backends, record_e2e
    from .bench.timing import resolve_device
    from .config import resolve_dtype

    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    backends = args.backends or default_backends(device)
    if any(name.startswith("moe_lab_") for name in backends):
        from .hf import register_with_transformers

        register_with_transformers()
    plan = E2EPlan(backends=backends, prefill_tokens=tuple(args.prefill), decode_batches=tuple(args.batches),
                   decode_context=args.context, new_tokens=args.new_tokens, executions=tuple(args.executions),
                   compiled_backends=args.compiled_backends, decode_backends=args.decode_backends,
                   compiled_first=args.compiled_first, priority_batches=tuple(args.priority_batches),
                   rounds=args.rounds, reference=args.reference,
                   profile=not args.no_profile, deadline_s=args.budget_s)
    layers = args.layers if args.layers == "auto" else _positive_int(args.layers)
    frame = record_e2e(args.model, plan, device=device, dtype=dtype, layers=layers, pretrained=args.pretrained,
                       output=args.output, progress=not args.quiet)
    columns = ["backend", "execution", "phase", "batch", "prompt_tokens", "status", "prefill_ms", "step_ms",
               "tokens_per_s", "decode_experts", "tokens_equal", "logits_rel_err", "experts_share",
               "experts_share_by_removal", "cudagraph_skips"]
    print(frame[columns].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.output:
        print("wrote", args.output)
    return 0 if frame["status"].isin(["ok", "skipped"]).all() else 1


def _add_shape_arguments(command, preset_help: str) -> None:
    """--preset or an explicit --hidden/--intermediate/--experts/--top-k, and --scale-down (`_bench_configs`)."""
    command.add_argument("--preset", action="append", help=preset_help)
    command.add_argument("--hidden", type=int, help="explicit shape: hidden size H")
    command.add_argument("--intermediate", type=int, help="explicit shape: per-expert intermediate size I")
    command.add_argument("--experts", type=int, help="explicit shape: number of experts E")
    command.add_argument("--top-k", type=int, help="explicit shape: experts per token")
    command.add_argument("--scale-down", type=int, metavar="H", help="shrink presets to hidden size H (CPU runs)")


def build_parser() -> argparse.ArgumentParser:
    from .backends import available_backends

    parser = argparse.ArgumentParser(prog="moe-lab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="device, torch, grouped GEMM path per dtype, triton, torch.compile, "
                                             "and what every backend can do here")
    info.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    info.add_argument("--dtype", default=None,
                      help="dtype the backends' capabilities are asked for (default: bfloat16 on CUDA, float32 on CPU)")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--no-compile-probe", action="store_true", help="skip the torch.compile check (saves seconds)")
    info.set_defaults(handler=_info)

    bench = commands.add_parser("bench", help="time backends on preset or explicit shapes")
    _add_shape_arguments(bench, "a preset name (repeatable); default qwen3-30b-a3b")
    bench.add_argument("--tokens", type=lambda s: _csv(s, int), default=[1, 16, 128], help="comma list, e.g. 1,16,128")
    bench.add_argument("--backends", type=_csv, default=None,
                       help=f"comma list from {available_backends()} (default: all)")
    bench.add_argument("--dtype", default=None, help="bfloat16, float16, float32 (default: bf16 on GPU, fp32 on CPU)")
    bench.add_argument("--device", default=None)
    bench.add_argument("--distribution", default=None,
                       help="routing: uniform, zipf or single (default uniform; with --ep a comma list, default uniform,zipf)")
    bench.add_argument("--skew", type=float, default=1.0, help="Zipf exponent of --distribution zipf (--ep)")
    bench.add_argument("--ep", action="store_true",
                       help="expert parallelism: run under torchrun (torchrun --nproc-per-node N -m moe_lab.cli bench --ep ...); "
                            "each rank holds E/N experts; per-rank phases, all-to-all bandwidth, a 1-GPU baseline")
    bench.add_argument("--ep-chunks", type=lambda s: _csv(s, int), default=[2, 4],
                       help="--ep: chunk counts of the overlapped (pipelined) forwards of every layer, e.g. 2,4")
    bench.add_argument("--ep-reps", type=_positive_int, default=10, help="--ep: timed calls per variant")
    bench.add_argument("--ep-warmup", type=int, default=3, help="--ep: untimed calls first")
    bench.add_argument("--ep-padded-max-tokens", type=int, default=1024,
                       help="--ep: time the padded (sync-free) layer up to this many tokens per rank")
    bench.add_argument("--ep-profile", metavar="PATH",
                       help="--ep: instead of timing, profile one forward of the exact, dedup and gathered layers "
                            "(and dedup and gathered in 2 chunks) at the first --preset, --tokens and --distribution, "
                            "and write a text summary (top kernels, GPU idle gaps) to PATH")
    bench.add_argument("--no-ep-baseline", dest="ep_baseline", action="store_false",
                       help="--ep: skip the single-GPU layer on rank 0")
    bench.add_argument("--max-seconds", type=float, default=0.3, help="time budget per measurement (per round)")
    bench.add_argument("--rounds", type=_positive_int, default=1,
                       help="measure every point's backends this many times, interleaved (A B B A ...), "
                            "and report each ratio's lowest and highest round (default 1)")
    bench.add_argument("--no-ceilings", dest="ceilings", action="store_false", help="skip measure_ceilings()")
    bench.add_argument("--compare-hf", action="store_true", help="also time transformers' own backends, same process")
    bench.add_argument("--compare-liger", action="store_true",
                       help="also time Liger-Kernel's fused MoE when it is installed (CUDA; the compare extra)")
    bench.add_argument("--backward", action="store_true",
                       help="time forward + backward (gradients of hidden states, routing weights, both weights; "
                            "FLOPs counted 3x the forward's) instead of the forward alone")
    bench.add_argument("--cuda-graph", action="store_true",
                       help="also time every backend replayed from a CUDA graph (CUDA only): the forward "
                            "(the decode path), or with --backward the whole forward + backward step")
    bench.add_argument("--back-to-back", action="store_true",
                       help="also time the CUDA-graph replays queued back to back, no synchronize between (CUDA only): "
                            "what a captured training or decode loop gets once the card is at its power limit")
    bench.add_argument("--compile-matrix", action="store_true", help="also run the torch.compile mode matrix (first config)")
    bench.add_argument("--compile-tokens", type=lambda s: _csv(s, int), default=None,
                       help="token counts for the compile matrix (default: the first two of --tokens)")
    bench.add_argument("--compile-modes", type=_csv, default=None,
                       help="comma list of torch.compile modes (default: all four)")
    bench.add_argument("--output", help="write OUTPUT.csv + OUTPUT.json (provenance)")
    bench.add_argument("--quiet", action="store_true", help="no progress bars")
    bench.set_defaults(handler=_bench)

    calibrate = commands.add_parser("calibrate", help="measure where backends cross over; the table auto uses")
    _add_shape_arguments(calibrate, "a preset name; default qwen3-30b-a3b")
    calibrate.add_argument("--tokens", type=lambda s: _csv(s, int), default=None,
                           help="comma list of token counts (default 1,2,4,...,8192)")
    calibrate.add_argument("--backends", type=_csv, default=None,
                           help="comma list (default: every registered backend that runs here, except auto)")
    calibrate.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    calibrate.add_argument("--dtype", default=None, help="bfloat16, float16, float32 (default: the preset's)")
    calibrate.add_argument("--output", default=None,
                           help="calibration file (default: $MOE_LAB_CALIBRATION or ~/.cache/moe_lab/calibration.json)")
    calibrate.add_argument("--max-seconds", type=float, default=0.2, help="time budget per measurement")
    calibrate.add_argument("--any-shape", action="store_true",
                           help="store the rules for every layer shape on this device and dtype")
    calibrate.add_argument("--backward", action="store_true",
                           help="time training calls (forward + backward) among the backends that give gradients: "
                                "the rules auto uses for calls that need gradients")
    calibrate.add_argument("--tie-margin", type=float, default=0.03,
                           help="an isolated flip (the backend chosen at the token count before within this fraction "
                                "of the fastest, and fastest again at the next) keeps that backend (default 0.03)")
    calibrate.set_defaults(handler=_calibrate)

    run = commands.add_parser("run", help="execute notebooks headless with papermill")
    run.add_argument("notebooks", nargs="+")
    run.add_argument("-p", "--parameter", dest="parameters", nargs=2, action="append", metavar=("NAME", "VALUE"))
    run.add_argument("--output-dir", default="runs")
    run.add_argument("--kernel", default=None, help="kernel name (default: the notebook's)")
    run.add_argument("--quiet", action="store_true")
    run.set_defaults(handler=_run)

    sweep = commands.add_parser("sweep", help="one notebook x a parameter grid -> executed notebooks + one CSV")
    sweep.add_argument("notebook")
    sweep.add_argument("--grid", action="append", required=True, metavar="NAME=V1,V2")
    sweep.add_argument("-p", "--parameter", dest="parameters", nargs=2, action="append", metavar=("NAME", "VALUE"))
    sweep.add_argument("--output-dir", default="runs/sweep")
    sweep.add_argument("--kernel", default=None)
    sweep.set_defaults(handler=_sweep)
    e2e = commands.add_parser("e2e", help="a whole model through transformers' generate: prefill, decode tokens/s, "
                                          "checks and profile, per experts backend")
    e2e.add_argument("--model", required=True,
                     help="a config shipped with moe_lab (qwen3-30b-a3b, qwen1.5-moe-a2.7b, olmoe-1b-7b, mixtral-8x7b, "
                          "gpt-oss-20b, deepseek-v3, qwen3-vl-30b-a3b), tiny:<family> (e.g. tiny:qwen3_moe), or with "
                          "--pretrained a checkpoint (Hub name or folder)")
    e2e.add_argument("--pretrained", action="store_true", help="load the checkpoint's weights with from_pretrained")
    e2e.add_argument("--layers", default="auto",
                     help="decoder layers to build: auto (all if they fit, else as many as fit) or a number")
    e2e.add_argument("--backends", type=_csv, default=None,
                     help="transformers experts implementations: eager, grouped_mm, grouped_mm:pinned (no decode "
                          "switch), batched_mm, moe_lab_<backend>, no_experts (default: all that run here)")
    e2e.add_argument("--compiled-backends", type=_csv, default=None,
                     help="the backends timed compiled (default: all but transformers' eager)")
    e2e.add_argument("--decode-backends", type=_csv, default=None,
                     help="the backends timed in uncompiled decode (default: all of --backends)")
    e2e.add_argument("--compiled-first", action="store_true",
                     help="run the compiled decode groups before the uncompiled ones (for a tight --budget-s)")
    e2e.add_argument("--priority-batches", type=lambda s: _csv(s, int), default=[],
                     help="with --compiled-first: these decode batches (compiled, then uncompiled) before the others")
    e2e.add_argument("--reference", default="grouped_mm:pinned", help="the backend outputs are compared with")
    e2e.add_argument("--prefill", type=lambda s: _csv(s, int), default=[512, 4096], help="prompt lengths (batch 1)")
    e2e.add_argument("--batches", type=lambda s: _csv(s, int), default=[1, 8, 64], help="decode batch sizes")
    e2e.add_argument("--context", type=int, default=128, help="prompt length before the decode steps")
    e2e.add_argument("--new-tokens", type=int, default=32, help="decode steps per generate call")
    e2e.add_argument("--executions", type=_csv, default=["eager", "compile:reduce-overhead"],
                     help="eager and/or compile:<mode> (default, reduce-overhead, max-autotune, "
                          "max-autotune-no-cudagraphs) or compile:cudagraphs (dynamo + CUDA graphs, no Inductor)")
    e2e.add_argument("--rounds", type=_positive_int, default=2, help="interleaved timing rounds")
    e2e.add_argument("--budget-s", type=float, default=None, help="skip (and say so) what would start after this")
    e2e.add_argument("--no-profile", action="store_true", help="skip the hook profile of an uncompiled decode")
    e2e.add_argument("--device", default=None)
    e2e.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    e2e.add_argument("--output", help="write OUTPUT.csv + OUTPUT.json (provenance), also after every group")
    e2e.add_argument("--quiet", action="store_true")
    e2e.set_defaults(handler=_e2e)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, FileNotFoundError) as error:  # bad input: say what is wrong, no traceback
        print(f"moe-lab {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
