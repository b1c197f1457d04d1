"""One transformers `generate` call, timed step by step, with the experts implementation it ran.

A `StepClock` is a logits processor: `generate` calls it once per new token, after that token's
forward was queued, so consecutive calls bracket one decode step (forward, greedy pick, the stop
check) and the first call marks the end of the prefill. On CUDA it records an event (no host sync
added: the times are the stream's); on CPU it reads `time.perf_counter`. It also notes which
experts implementation the model was set to at each step: transformers' `generate` may switch
"grouped_mm" to "batched_mm" for the decode steps (recent releases do on GPUs), and the row says so.

    tokens, timing = timed_generate(model, input_ids, new_tokens=32, execution="compile:reduce-overhead")
    timing.prefill_ms, timing.step_ms, timing.decode_implementation

Executions: "eager" (no compile) or "compile:<mode>" (transformers compiles the decode forward
with `CompileConfig(mode=<mode>)`; "compile:default" is mode=None), or "compile:cudagraphs"
(`CompileConfig(backend="cudagraphs")`: dynamo captures the forward and replays it from CUDA graphs
without Inductor's code generation, which compiles a 48-layer model in a fraction of the time).
The prefill always runs uncompiled: that is how `generate` does it. The cache is transformers'
static cache in all of them.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import transformers

EAGER = "eager"
COMPILE_PREFIX = "compile:"
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: torch.compile backends other than Inductor, as "compile:<backend>".
COMPILE_BACKENDS = ("cudagraphs",)


def check_execution(execution: str) -> str:
    modes = [COMPILE_PREFIX + mode for mode in COMPILE_MODES + COMPILE_BACKENDS]
    if execution != EAGER and execution not in modes:
        raise ValueError(f"unknown execution {execution!r}; use {EAGER!r} or one of {modes}")
    return execution


def compile_mode(execution: str) -> str | None:
    """"compile:reduce-overhead" -> "reduce-overhead"; "compile:default", "compile:cudagraphs", "eager" -> None."""
    mode = check_execution(execution).removeprefix(COMPILE_PREFIX) if execution != EAGER else None
    return None if mode in ("default", *COMPILE_BACKENDS) else mode


def uses_cuda_graphs(execution: str) -> bool:
    """Does this execution replay the compiled forward from CUDA graphs (where torch does not skip them)?"""
    return execution in (COMPILE_PREFIX + "reduce-overhead", COMPILE_PREFIX + "max-autotune",
                         COMPILE_PREFIX + "cudagraphs")


def compile_backend(execution: str) -> str:
    """"compile:cudagraphs" -> "cudagraphs"; any other execution -> "inductor"."""
    name = check_execution(execution).removeprefix(COMPILE_PREFIX)
    return name if name in COMPILE_BACKENDS else "inductor"


def time_mark(device: torch.device):
    """A point in time as the device sees it: a recorded CUDA event (no sync), or perf_counter on a CPU."""
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


def elapsed_ms(start, end) -> float:
    """Milliseconds between two `time_mark`s (CUDA events must have completed)."""
    if isinstance(start, float):
        return (end - start) * 1e3
    return start.elapsed_time(end)


class StepClock(transformers.LogitsProcessor):
    """Marks the time of every `generate` step without synchronising; read after generate returns."""

    def __init__(self, model, device: torch.device):
        self.model = model
        self.device = device
        self.marks: list = []
        self.implementations: list = []
        self.listeners: list = []  # called with the step index (0 = end of prefill), e.g. profile hooks


    def start(self) -> None:
        # generate runs the prefill before any switch for decoding: what is set now is what the prefill runs
        self.marks = [time_mark(self.device)]
        self.implementations = [self.model.get_experts_implementation()]

    def __call__(self, input_ids, scores):
        self.marks.append(time_mark(self.device))
        self.implementations.append(self.model.get_experts_implementation())
        for listener in self.listeners:
            listener(len(self.marks) - 2)
        return scores

    def milliseconds(self) -> list[float]:
        """[prefill, step 1, step 2, ...] in milliseconds (after the device finished)."""
        if self.device.type == "cuda":
            self.marks[-1].synchronize()
        return [elapsed_ms(a, b) for a, b in zip(self.marks, self.marks[1:])]


@dataclass(frozen=True)
class GenerateTiming:
    prefill_ms: float
    step_ms: list = field(repr=False)  # one per decode step
    prefill_implementation: str
    decode_implementation: str


def _implementation_text(value) -> str:
    # get_experts_implementation() is a dict keyed by sub-config ("" for the model's own config).
    if isinstance(value, dict):
        values = sorted(set(map(str, value.values())))
        return values[0] if len(values) == 1 else " ".join(f"{k or 'model'}={v}" for k, v in sorted(value.items()))
    return str(value)


def generation_config(model, new_tokens: int, execution: str, device: torch.device):
    """Greedy, exactly `new_tokens` tokens (no end-of-sequence stop), static cache, compiled or not."""
    config = transformers.GenerationConfig(
        do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, cache_implementation="static",
        eos_token_id=None, pad_token_id=0, bos_token_id=getattr(model.generation_config, "bos_token_id", None),
    )
    if execution == EAGER:
        config.disable_compile = True
    else:
        compile_config = transformers.CompileConfig(fullgraph=False, mode=compile_mode(execution),
                                                    backend=compile_backend(execution))
        if device.type != "cuda":
            compile_config._compile_all_devices = True  # transformers compiles on GPUs only unless told
        config.compile_config = compile_config
    return config


def timed_generate(model, input_ids: torch.Tensor, new_tokens: int, execution: str = EAGER,
                   clock_listeners=()) -> tuple[torch.Tensor, GenerateTiming]:
    """Greedy-generate `new_tokens` tokens after `input_ids` [B, P]; return the new tokens [B, N] and the timing."""
    device = input_ids.device
    clock = StepClock(model, device)
    clock.listeners.extend(clock_listeners)
    config = generation_config(model, new_tokens, execution, device)
    attention_mask = torch.ones_like(input_ids)
    with torch.no_grad():
        clock.start()
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                logits_processor=transformers.LogitsProcessorList([clock]))
    times = clock.milliseconds()
    implementations = [_implementation_text(value) for value in clock.implementations]
    # implementations: [at the start (the prefill's), after the prefill, after each decode step]
    timing = GenerateTiming(prefill_ms=times[0], step_ms=times[1:], prefill_implementation=implementations[0],
                            decode_implementation=implementations[-1] if len(implementations) > 2 else "")
    return output[:, input_ids.shape[1]:], timing


def random_prompt(model, batch: int, tokens: int, device, seed: int = 0) -> torch.Tensor:
    """Random token ids [batch, tokens] (ids 3.. vocab-1: clear of the usual special tokens)."""
    vocab = model.config.get_text_config().vocab_size
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(3, vocab, (batch, tokens), generator=generator).to(device)
