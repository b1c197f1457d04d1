"""End to end: a whole transformers MoE model through `generate`, one experts backend at a time.

For one model (a config shipped in moe_lab.hf.configs at full size or with fewer layers, a tiny
random model, or a checkpoint), every experts implementation asked for — transformers' own
("eager", "grouped_mm", "batched_mm") and moe_lab's ("moe_lab_triton", ...) — is measured on the
same weights:

    prefill  time of generate's prefill of 1 x P tokens (P in `prefill_tokens`), uncompiled as
             generate runs it
    decode   tokens/s at batch B (B in `decode_batches`) after a `decode_context`-token prompt,
             uncompiled ("eager") and compiled (`executions`, e.g. "compile:reduce-overhead": CUDA
             graphs); the median step time over all steps of all rounds
             (a backend that refuses the B x P-token prompt, batched_mm over its gather budget, has the
             prompt's prefill run as the reference, the way transformers switches grouped_mm to batched_mm
             for decoding; `prefill_experts` and `reason` say so)
    check    logits of one prompt under each implementation vs the reference (`reference`), every
             experts module's output on the inputs it had in the reference's run (`experts_rel_err`, the
             worst module: the backend alone, where a deep bf16 model's logits drift apart from rounding
             that grows layer by layer, transformers' own implementations included), and the greedy
             tokens of the decode runs vs the reference's (a refusal on the check's prompt leaves the
             other cases to run: "logits not checked")
    profile  the experts' and attention's share of an uncompiled decode step (module hooks), and
             the experts' share of any step by removal (the `no_experts` baseline row)

"grouped_mm" is what transformers' generate does with it: recent releases switch it to
"batched_mm" for the decode steps on GPUs (the row's `decode_experts` column says what ran);
"grouped_mm:pinned" keeps grouped_mm for the decode steps too.

Timing: the StepClock's CUDA events (perf_counter on CPU), one untimed warm-up generate per
implementation and shape (compilation happens there), then `rounds` interleaved rounds (A B C,
C B A, ...: bench.rounds). Peak memory: `torch.cuda.max_memory_allocated` during the timed
generate, weights included (CPU: not measured). `cudagraph_skips`: how many graphs torch compiled for that
backend and execution (any batch: a dynamic-shape graph serves several) that it runs without CUDA graphs,
by torch's own counter; 0 is "from CUDA graphs", NaN an uncompiled row. A time budget (`deadline_s`) skips what would not
fit and says so in the rows ("skipped"); `on_rows` is called with the table after every group, so
a caller can write partial results.
"""
from __future__ import annotations

import contextlib
import math
import time
import traceback
from dataclasses import dataclass, field

import torch

from .. import __version__
from ..errors import GatherBudgetError
from ..reference import relative_error
from .compile_matrix import TOLERANCE
from .e2e_generate import EAGER, check_execution, random_prompt, timed_generate
from .e2e_profile import NO_EXPERTS, PartTimer, no_experts_registered
from .provenance import device_name, git_commit, utc_now
from .rounds import format_round_medians, round_order
from .timing import percentile, resolve_device

PINNED_SUFFIX = ":pinned"
TRANSFORMERS_IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")
E2E_COLUMNS = (
    "model", "layers", "full_layers", "weights", "dtype", "backend", "library", "execution", "phase", "batch",
    "prompt_tokens", "new_tokens", "status", "reason", "prefill_ms", "step_ms", "p10_ms", "p90_ms", "tokens_per_s",
    "steps", "rounds", "round_medians_ms", "peak_bytes", "prefill_experts", "decode_experts", "tokens_equal",
    "logits_rel_err", "logits_within_tolerance", "experts_rel_err", "experts_within_tolerance", "experts_share",
    "attention_share", "experts_share_by_removal",
    "cudagraph_skips", "device", "device_name", "torch_version", "transformers_version", "moe_lab_version", "date", "git_commit",
)
_FLOATS = ("prefill_ms", "step_ms", "p10_ms", "p90_ms", "tokens_per_s", "steps", "rounds", "peak_bytes",
           "logits_rel_err", "experts_rel_err", "experts_share", "attention_share", "experts_share_by_removal",
           "cudagraph_skips")
_INTS = ("layers", "full_layers", "batch", "prompt_tokens", "new_tokens")


def library_of(backend: str) -> str:
    if backend == NO_EXPERTS:
        return "baseline"
    return "moe_lab" if backend.startswith("moe_lab_") else "transformers"


def implementation_of(backend: str) -> str:
    """"grouped_mm:pinned" -> "grouped_mm" (the name the model is set to)."""
    return backend.removesuffix(PINNED_SUFFIX)


@contextlib.contextmanager
def _decode_switch_disabled(model, backend: str):
    """For "<name>:pinned": generate's grouped_mm -> batched_mm decode switch turned off for this call."""
    if not backend.endswith(PINNED_SUFFIX) or not hasattr(model, "_optimize_model_for_decode"):
        yield
        return
    model._optimize_model_for_decode = contextlib.nullcontext  # instance attribute shadows the method
    try:
        yield
    finally:
        del model._optimize_model_for_decode


@contextlib.contextmanager
def _prefill_under(model, implementation: str | None):
    """generate's prefill under `implementation`, its decode steps under the model's current one, through the
    hook transformers' own grouped_mm -> batched_mm decode switch uses. For a decode row whose backend refuses the
    prompt (batched_mm's gather budget at B x P tokens) but fits the steps; the row's prefill_experts says so."""
    if implementation is None or not hasattr(model, "_optimize_model_for_decode"):
        yield
        return
    decode = model.get_experts_implementation()

    @contextlib.contextmanager
    def switch_for_decode():
        model.set_experts_implementation(decode)
        try:
            yield
        finally:
            model.set_experts_implementation(implementation)

    shadowed = vars(model).get("_optimize_model_for_decode")  # a ":pinned" backend's, if any
    model.set_experts_implementation(implementation)
    model._optimize_model_for_decode = switch_for_decode  # instance attribute shadows the method
    try:
        yield
    finally:
        if shadowed is None:
            del model._optimize_model_for_decode
        else:
            model._optimize_model_for_decode = shadowed
        model.set_experts_implementation(decode)


@dataclass
class E2EPlan:
    """What to measure. Backends are transformers experts implementation names (plus ":pinned")."""

    backends: list
    prefill_tokens: tuple = (512, 4096)
    decode_batches: tuple = (1, 8, 64)
    decode_context: int = 128
    new_tokens: int = 32
    executions: tuple = (EAGER, "compile:reduce-overhead")
    compiled_backends: list | None = None  # default: every backend except transformers' "eager"
    decode_backends: list | None = None  # uncompiled decode; default: every backend (the loops are slow at B=64)
    compiled_first: bool = False  # decode: every compiled group before the uncompiled ones (a tight budget)
    priority_batches: tuple = ()  # decode: these batches' groups before the others (with compiled_first)
    rounds: int = 2
    reference: str = "grouped_mm:pinned"
    check_tokens: int = 64
    profile: bool = True
    deadline_s: float | None = None  # seconds from the start of run_e2e
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        for execution in self.executions:
            check_execution(execution)
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds must be an integer >= 1, got {self.rounds!r}")
        for name in ("new_tokens", "decode_context", "check_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if self.new_tokens < 2:
            raise ValueError("new_tokens must be >= 2: a decode step is the time between two new tokens")


#: The dtypes whose tolerance tells a wrong experts module from a right one on the same inputs. In bf16 (3e-2) a module
#: 1 % off passes while two right implementations differ by a few 1e-3; there `experts_rel_err` is reported for a
#: person to read beside transformers' own implementations' in the same run, and not judged.
EXPERTS_JUDGED_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class OutputCheck:
    """One backend's outputs against the reference's on the check prompt: the logits, and the worst experts module's
    output on the inputs it had in the reference's run (NaN: not checked; `error` says why)."""

    logits_rel_err: float = math.nan
    experts_rel_err: float = math.nan
    error: str = ""  # why the logits were not checked
    experts_error: str = ""  # why the experts modules were not rerun


@contextlib.contextmanager
def _recorded_experts_calls(model):
    """Collects (module, args, kwargs, output) of every experts module call inside the block, inputs and output
    copied, so each module can be run again on exactly what it saw."""
    from ..hf.models import experts_modules

    calls = []

    def record(module, args, kwargs, output):
        if torch.is_tensor(output):
            copy = lambda value: value.detach().clone() if torch.is_tensor(value) else value  # noqa: E731
            calls.append((module, tuple(copy(a) for a in args), {k: copy(v) for k, v in kwargs.items()},
                          output.detach().clone()))

    handles = [module.register_forward_hook(record, with_kwargs=True) for module in experts_modules(model)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


class _Runner:
    def __init__(self, built, plan: E2EPlan, on_rows, progress):
        self.built, self.model, self.plan = built, built.model, plan
        self.device = resolve_device(next(self.model.parameters()).device)
        self.dtype = next(self.model.parameters()).dtype
        self.started = time.monotonic()
        self.rows: list[dict] = []
        self.on_rows, self.progress = on_rows, progress
        self.tokens: dict = {}  # (execution, batch, backend) -> the last decode's new tokens [B, N]
        self.cudagraph_skips: dict = {}  # (execution, backend) -> graphs compiled to run without CUDA graphs
        self.prefill_under: dict = {}  # (execution, batch, backend) -> the implementation its decode's prefill ran
        self.compiled = set()

    # ---- bookkeeping -------------------------------------------------------------------------
    def say(self, text: str) -> None:
        if self.progress:
            print(f"[e2e {time.monotonic() - self.started:6.1f}s] {text}", flush=True)

    def time_left(self) -> float:
        if self.plan.deadline_s is None:
            return math.inf
        return self.plan.deadline_s - (time.monotonic() - self.started)

    def new_row(self, backend, execution, phase, batch, prompt_tokens, new_tokens) -> dict:
        import transformers

        row = {name: math.nan for name in _FLOATS}
        row.update(
            model=self.built.name, layers=self.built.layers, full_layers=self.built.full_layers,
            weights=self.built.weights, dtype=str(self.dtype).removeprefix("torch."), backend=backend,
            library=library_of(backend), execution=execution, phase=phase, batch=batch,
            prompt_tokens=prompt_tokens, new_tokens=new_tokens, status="ok", reason="", prefill_experts="",
            decode_experts="", tokens_equal="", logits_within_tolerance="", experts_within_tolerance="",
            round_medians_ms="",
            device=str(self.device), device_name=device_name(str(self.device)), torch_version=torch.__version__,
            transformers_version=transformers.__version__, moe_lab_version=__version__, date=utc_now(),
            git_commit=git_commit(),
        )
        return row

    def publish(self) -> None:
        self.compare_tokens()
        for row in self.rows:  # a graph compiled at one batch serves others (dynamic shapes): count per backend
            key = (row["execution"], row["backend"])
            if key in self.cudagraph_skips:
                row["cudagraph_skips"] = float(self.cudagraph_skips[key])
        if self.on_rows is not None:
            self.on_rows(self.frame())

    def frame(self):
        from .columns import to_frame

        return to_frame(self.rows, E2E_COLUMNS, _INTS, _FLOATS)

    def fail(self, row: dict, error: BaseException) -> None:
        oom = isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()
        status = "refused" if isinstance(error, GatherBudgetError) else "oom" if oom else "error"
        row.update(status=status, reason=error_text(error))
        if status == "error" and self.progress:  # the row keeps one line; the log keeps the whole story
            self.say("".join(traceback.format_exception(error)[-12:]).rstrip())
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # ---- one generate ------------------------------------------------------------------------
    def generate(self, backend, input_ids, new_tokens, execution, listeners=(), prefill_under=None):
        """One timed generate under `backend` (its prefill under `prefill_under` when given). torch counts each
        compiled graph it decides to run without CUDA graphs (when it compiles it, not when it runs it); those
        counts are kept per (execution, backend)."""
        from torch._dynamo.utils import counters

        self.model.set_experts_implementation(implementation_of(backend))
        skips_before = counters["inductor"]["cudagraph_skips"]
        with _decode_switch_disabled(self.model, backend), _prefill_under(self.model, prefill_under):
            if self.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.device)
            tokens, timing = timed_generate(self.model, input_ids, new_tokens, execution, listeners)
            peak = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else math.nan
        if execution != EAGER:
            key = (execution, backend)
            self.cudagraph_skips[key] = (self.cudagraph_skips.get(key, 0)
                                         + counters["inductor"]["cudagraph_skips"] - skips_before)
        return tokens, timing, peak

    # ---- checks ------------------------------------------------------------------------------
    def check_logits(self) -> dict:
        """{backend: OutputCheck}: the prompt's logits vs the reference's, and every experts module's output on
        the inputs it had in the reference's run vs the reference's output there (the worst module; the reference's
        own value is that rerun of itself, 0 for a deterministic backend)."""
        prompt = random_prompt(self.model, 1, self.plan.check_tokens, self.device, self.plan.seed)
        results, expected, calls = {}, None, []
        with torch.no_grad():
            for backend in [self.plan.reference] + [b for b in self.plan.backends if b != self.plan.reference]:
                if backend == NO_EXPERTS:
                    continue
                try:
                    self.model.set_experts_implementation(implementation_of(backend))
                    if expected is None:
                        with _recorded_experts_calls(self.model) as calls:
                            expected = self.model(input_ids=prompt, use_cache=False).logits.float()
                        logits = expected
                    else:
                        logits = self.model(input_ids=prompt, use_cache=False).logits.float()
                except Exception as error:  # noqa: BLE001 - a backend that cannot run says why in its rows
                    results[backend] = OutputCheck(error=error_text(error))
                    continue
                try:
                    worst = max((relative_error(module(*args, **kwargs), output)
                                 for module, args, kwargs, output in calls), default=math.nan)
                    results[backend] = OutputCheck(relative_error(logits, expected), worst)
                except Exception as error:  # noqa: BLE001 - the logits stand; the module rerun says why it failed
                    results[backend] = OutputCheck(relative_error(logits, expected), experts_error=error_text(error))
        return results

    # ---- groups of measurements --------------------------------------------------------------
    def run_group(self, backends, execution, phase, batch, prompt_tokens, new_tokens, logits_check):
        """Warm up every backend at one shape (compiling there), then time them in interleaved rounds."""
        input_ids = random_prompt(self.model, batch, prompt_tokens, self.device, self.plan.seed)
        rows = {backend: self.new_row(backend, execution, phase, batch, prompt_tokens, new_tokens)
                for backend in backends}
        self.rows.extend(rows.values())
        if execution != EAGER:
            # Each (backend, batch) is a compile of the same frame, model.__call__: over a whole run they pass dynamo's
            # recompile limit (8), past which it runs the frame uncompiled without a word. A group starts afresh.
            torch._dynamo.reset()
        ready = []
        for backend in backends:
            if self._warm_up(rows[backend], input_ids, logits_check):
                ready.append(backend)
            elif execution != EAGER and rows[backend]["status"] in ("error", "oom"):
                # the failure reset dynamo (see _warm_up), dropping the graphs compiled before it: compile those again
                ready = [done for done in ready if self._warm_up(rows[done], input_ids, logits_check)]
        times, medians = self._time_rounds(rows, ready, input_ids)
        for backend in ready:
            self._finish_row(rows[backend], times[backend], medians[backend], logits_check)
        if phase == "decode":
            self._shares_by_removal(rows)
        self.publish()
        return rows

    def _warm_up(self, row, input_ids, logits_check) -> bool:
        """One untimed generate (a compiled execution compiles here); False when the case cannot run."""
        backend = row["backend"]
        check = logits_check.get(backend, OutputCheck())
        tolerance = TOLERANCE.get(self.dtype, 3e-2)
        row.update(logits_rel_err=check.logits_rel_err, experts_rel_err=check.experts_rel_err)
        if not math.isnan(check.logits_rel_err):
            row["logits_within_tolerance"] = str(bool(check.logits_rel_err <= tolerance))
        if not math.isnan(check.experts_rel_err) and self.dtype in EXPERTS_JUDGED_DTYPES:
            row["experts_within_tolerance"] = str(bool(check.experts_rel_err <= tolerance))
        if self.time_left() <= 0:
            row.update(status="skipped", reason="time budget spent before this case")
            return False
        began = time.monotonic()
        key = (row["execution"], row["batch"], backend)
        try:
            try:
                self.generate(backend, input_ids, row["new_tokens"], row["execution"])
            except GatherBudgetError as refused:
                if row["phase"] != "decode" or backend == self.plan.reference:
                    raise
                # the B x P-token prompt is over the budget, the decode steps may not be: prefill as the reference
                self.prefill_under[key] = implementation_of(self.plan.reference)
                self.generate(backend, input_ids, row["new_tokens"], row["execution"],
                              prefill_under=self.prefill_under[key])
                self.say(f"{backend} B={row['batch']}: the prompt's prefill under {self.prefill_under[key]} "
                         f"({error_text(refused, 100)})")
            row["reason"] = "warmed up, not timed yet"  # what a run stopped from outside leaves
        except Exception as error:  # noqa: BLE001 - a failure is a row, the run goes on
            self.fail(row, error)
            if row["execution"] != EAGER and row["status"] in ("error", "oom"):
                # A compile that failed half-way can leave dynamo's caches and the CUDA-graph trees in a state that
                # fails every later compile with a bare AssertionError (seen on the H200): start afresh (run_group
                # compiles again the backends warmed before this one). Only here, where compiles happen: a reset
                # during the timed rounds would put compiles inside the others' timings.
                torch._dynamo.reset()
        self.say(f"{row['phase']} {row['execution']} {backend} B={row['batch']} P={row['prompt_tokens']}: "
                 f"{'warm-up' if row['status'] == 'ok' else row['status']} {time.monotonic() - began:.1f}s "
                 f"{row['reason'][:120] if row['status'] != 'ok' else ''}")
        self.publish()  # a run stopped from outside keeps what it has
        return row["status"] == "ok"

    def _time_rounds(self, rows, ready, input_ids):
        """Each ready backend once per round, in round_order; the samples (prefill or step ms) and round medians."""
        times = {backend: [] for backend in ready}
        medians = {backend: [] for backend in ready}
        for round_index in range(self.plan.rounds):
            for backend in round_order(ready, round_index):
                row = rows[backend]
                if row["status"] != "ok" or (round_index > 0 and self.time_left() <= 0):
                    continue  # past the budget: fewer rounds for everyone; `rounds` says how many
                prefill_under = self.prefill_under.get((row["execution"], row["batch"], backend))
                try:
                    tokens, timing, peak = self.generate(backend, input_ids, row["new_tokens"], row["execution"],
                                                         prefill_under=prefill_under)
                except Exception as error:  # noqa: BLE001
                    self.fail(row, error)
                    continue
                sample = [timing.prefill_ms] if row["phase"] == "prefill" else timing.step_ms
                times[backend] += sample
                medians[backend].append(percentile(sample, 50))
                row.update(prefill_experts=timing.prefill_implementation, decode_experts=timing.decode_implementation,
                           peak_bytes=peak if math.isnan(row["peak_bytes"]) else max(row["peak_bytes"], peak))
                if row["phase"] == "decode":
                    self.tokens[(row["execution"], row["batch"], backend)] = tokens
        return times, medians

    def _finish_row(self, row, times, medians, logits_check) -> None:
        if row["status"] != "ok":
            return
        if not times:
            row.update(status="skipped", reason="time budget spent before timing")
            return
        # a backend refused on the check's prompt (over a gather budget) can still run these shapes
        check = logits_check.get(row["backend"], OutputCheck())
        prefill_under = self.prefill_under.get((row["execution"], row["batch"], row["backend"]))
        notes = [f"prompt's prefill under {prefill_under} (refused by this backend)"] if prefill_under else []
        notes += [f"logits not checked: {check.error}"] if check.error else []
        notes += [f"experts modules not rerun: {check.experts_error}"] if check.experts_error else []
        median = percentile(times, 50)
        row.update(reason="; ".join(notes)[:300],
                   p10_ms=percentile(times, 10), p90_ms=percentile(times, 90), steps=len(times),
                   rounds=len(medians), round_medians_ms=format_round_medians(medians))
        if row["phase"] == "prefill":
            row["prefill_ms"] = median
        else:
            row.update(step_ms=median, tokens_per_s=row["batch"] * 1e3 / median)

    def compare_tokens(self) -> None:
        """Greedy tokens of every decode row vs the reference's at the same batch: in the same execution
        when the reference ran there, else in the uncompiled run."""
        for row in self.rows:
            key = (row["execution"], row["batch"], row["backend"])
            if row["phase"] != "decode" or row["backend"] == NO_EXPERTS or key not in self.tokens:
                continue
            reference = self.tokens.get((row["execution"], row["batch"], self.plan.reference),
                                        self.tokens.get((EAGER, row["batch"], self.plan.reference)))
            if reference is not None:
                row["tokens_equal"] = str(bool(torch.equal(self.tokens[key], reference)))

    def skip_group(self, backends, execution, batch, reason) -> None:
        for backend in backends:
            row = self.new_row(backend, execution, "decode", batch, self.plan.decode_context, self.plan.new_tokens)
            row.update(status="skipped", reason=reason)
            self.rows.append(row)
        self.publish()

    def _shares_by_removal(self, rows) -> None:
        baseline = rows.get(NO_EXPERTS)
        if baseline is None or baseline["status"] != "ok" or math.isnan(baseline["step_ms"]):
            return
        for backend, row in rows.items():
            if backend != NO_EXPERTS and row["status"] == "ok" and not math.isnan(row["step_ms"]):
                row["experts_share_by_removal"] = 1.0 - baseline["step_ms"] / row["step_ms"]

    def profile(self, backends, batch) -> None:
        """Hooks on an uncompiled decode at `batch`: experts' and attention's share of the step, per backend."""
        input_ids = random_prompt(self.model, batch, self.plan.decode_context, self.device, self.plan.seed)
        for backend in backends:
            if backend == NO_EXPERTS or self.time_left() <= 0:
                continue
            row = self.new_row(backend, EAGER, "profile", batch, self.plan.decode_context, self.plan.new_tokens)
            self.rows.append(row)
            timer = PartTimer(self.model, self.device)
            try:
                try:
                    _, timing, _ = self.generate(backend, input_ids, self.plan.new_tokens, EAGER, [timer.on_step])
                except GatherBudgetError:  # the prompt, not the steps: prefill as the reference (see _warm_up)
                    timer.remove()
                    timer = PartTimer(self.model, self.device)
                    prefill_under = implementation_of(self.plan.reference)
                    _, timing, _ = self.generate(backend, input_ids, self.plan.new_tokens, EAGER, [timer.on_step],
                                                 prefill_under=prefill_under)
                    row["reason"] = f"prompt's prefill under {prefill_under} (refused by this backend)"
                totals, step_total = timer.totals_ms(), sum(timing.step_ms)
                row.update(step_ms=percentile(timing.step_ms, 50), steps=len(timing.step_ms), rounds=1,
                           experts_share=totals["experts"] / step_total,
                           attention_share=totals["attention"] / step_total,
                           decode_experts=timing.decode_implementation, prefill_experts=timing.prefill_implementation)
            except Exception as error:  # noqa: BLE001
                self.fail(row, error)
            finally:
                timer.remove()
        self.publish()


def error_text(error: BaseException, limit: int = 300) -> str:
    """"Type: message" on one line, as much of it as fits a CSV cell: torch's compile errors put the cause on
    the second line ("backend='cudagraphs' raised:" / "AssertionError: ..."), which the first line alone loses.
    An error without a message (a bare `assert`) says where it was raised instead."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines:
        return (f"{type(error).__name__}: " + " ".join(lines))[:limit]
    frames = traceback.extract_tb(error.__traceback__)
    where = f" at {'/'.join(frames[-1].filename.split('/')[-2:])}:{frames[-1].lineno} ({frames[-1].name})" if frames else ""
    return (type(error).__name__ + where)[:limit]


def run_e2e(built, plan: E2EPlan, *, on_rows=None, progress: bool = True):
    """Measure `built` (a moe_lab.hf.build.BuiltModel) as `plan` says; return the rows as a DataFrame
    (columns `E2E_COLUMNS`). Never raises for a backend that fails: its rows say why."""
    runner = _Runner(built, plan, on_rows, progress)
    runner.say(built.describe())
    snapshot = built.model.get_experts_implementation()
    limits = _raise_recompile_limits()
    try:
        with no_experts_registered():
            logits_check = runner.check_logits()
            runner.say("logits (experts modules) vs " + plan.reference + ": " + ", ".join(
                f"{b} {c.logits_rel_err:.2e} ({c.experts_rel_err:.2e})" if not c.error else f"{b} {c.error[:60]}"
                for b, c in logits_check.items()))
            measured = [b for b in plan.backends if b != NO_EXPERTS]
            for tokens in plan.prefill_tokens:
                runner.run_group(measured, EAGER, "prefill", 1, tokens, 1, logits_check)
            if plan.profile:  # cheap (one uncompiled generate per backend): before the long decode groups
                runner.profile(measured, plan.decode_batches[0])
            failed_everywhere = set()
            for execution, batch in decode_groups(plan):
                if execution == EAGER:
                    backends = plan.decode_backends or plan.backends
                else:
                    backends = plan.compiled_backends or [b for b in plan.backends if b != "eager"]
                if execution in failed_everywhere:
                    runner.skip_group(backends, execution, batch, f"{execution} failed for every backend at an "
                                                                 "earlier batch")
                    continue
                rows = runner.run_group(backends, execution, "decode", batch, plan.decode_context,
                                        plan.new_tokens, logits_check)
                if all(row["status"] in ("error", "oom") for row in rows.values()):
                    failed_everywhere.add(execution)  # e.g. a compile mode this model cannot take
            runner.publish()
    finally:
        built.model.set_experts_implementation(snapshot)
        _restore_recompile_limits(limits)
    return runner.frame()


def decode_groups(plan: E2EPlan) -> list[tuple[str, int]]:
    """(execution, batch) in the order they run: by execution then batch, compiled ones first if asked."""
    groups = [(execution, batch) for execution in plan.executions for batch in plan.decode_batches]
    if plan.compiled_first:  # stable sorts: executions and batches keep their order otherwise
        groups.sort(key=lambda group: group[0] == EAGER)
        groups.sort(key=lambda group: group[1] not in plan.priority_batches)
    return groups


def _raise_recompile_limits() -> dict:
    # Every backend x batch is its own compiled entry of the same forward (the implementation name and
    # the shapes are guards); dynamo's default limit of 8 entries per function would fall back to eager.
    import torch._dynamo.config as dynamo_config

    saved = {}
    for name in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                 "accumulated_recompile_limit"):
        if hasattr(dynamo_config, name):
            saved[name] = getattr(dynamo_config, name)
            setattr(dynamo_config, name, max(saved[name], 256))
    return saved


def _restore_recompile_limits(saved: dict) -> None:
    import torch._dynamo.config as dynamo_config

    for name, value in saved.items():
        setattr(dynamo_config, name, value)
