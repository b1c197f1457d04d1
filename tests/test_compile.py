"""torch.compile on CPU: which experts backends trace into one graph, and why eager cannot.

- batched_mm and grouped_mm compile with `fullgraph=True` (inductor, inference) in float32 and
  bfloat16, match the float64 reference, and keep matching when the routing tensors get new values
  of the same shape — without recompiling: the routing is data, not part of the graph's guards.
- grouped_mm picks its grouped matmul at trace time: under compile, float32 goes through moe_lab's
  custom op `moe_lab::grouped_matmul_loop` (opaque to dynamo, so still one graph) and bfloat16
  through torch's grouped_mm op. The traced graphs are inspected to show it.
- eager needs the per-expert token counts as Python ints (`group_sizes.tolist()`), a data-dependent
  host read: `fullgraph=True` fails, `torch._dynamo.explain` reports the graph break at that line,
  and plain `torch.compile` (graph breaks allowed) still computes the right thing.

Tiny sizes (H=32, I=16, E=4, k=2, T=8) keep compilation the dominant cost: ~30 s on 2 CPU cores.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import moe_lab
from moe_lab import Experts, MoEConfig, reference_experts_forward, relative_error, synthetic_routing
from moe_lab.backends import eager_experts_forward

H, I, E, K, T = 32, 16, 4, 2, 8

# Relative error over the whole [T, H] output vs the float64 reference (see test_properties.py for
# the derivation): float32 ~6e-8 per rounding, a handful of roundings -> 1e-5 is generous;
# bfloat16 has 8 significand bits, 2^-8 ~ 4e-3 per rounding, a few roundings -> 3e-2. Inductor may
# fuse and reorder (e.g. keep an intermediate in float32), which moves results within these bounds.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 3e-2}

DATA_DEPENDENT = re.compile(r"data[- ]dependent|tolist|\.item|_local_scalar_dense", re.IGNORECASE)


@pytest.fixture(scope="module", autouse=True)
def inductor_usable():
    """Skip the file (not fail it) where inductor cannot build CPU kernels, e.g. no C++ compiler."""
    torch._dynamo.reset()
    try:
        compiled = torch.compile(lambda x: torch.nn.functional.silu(x) * 2.0, fullgraph=True)
        x = torch.randn(4, 4)
        torch.testing.assert_close(compiled(x), torch.nn.functional.silu(x) * 2.0)
    except Exception as error:  # noqa: BLE001 - any failure here means "cannot test compile here"
        pytest.skip(f"torch.compile (inductor, CPU) is not usable here: {type(error).__name__}: {error}")
    finally:
        torch._dynamo.reset()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test starts with empty dynamo caches and counters, and leaves none behind."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


def make_experts(backend: str, dtype: torch.dtype, seed: int = 0) -> Experts:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Experts(MoEConfig(H, I, E, K, dtype=dtype), experts_implementation=backend).eval()


def hidden(dtype: torch.dtype, seed: int, tokens: int = T) -> torch.Tensor:
    return torch.randn(tokens, H, generator=torch.Generator().manual_seed(seed)).to(dtype)


def routings():
    """Routing tensors of one shape [T, k] with different values: balanced, skewed, all on
    expert 0 and 1 (so experts 2-3 get nothing), and shuffled token order."""
    yield synthetic_routing(T, E, K, distribution="uniform", seed=1)
    yield synthetic_routing(T, E, K, distribution="zipf", skew=3.0, seed=2)
    yield synthetic_routing(T, E, K, distribution="single", seed=3)
    idx, w = synthetic_routing(T, E, K, distribution="uniform", seed=4)
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(4))
    yield idx[perm].flip(1).contiguous(), w[perm].flip(1).contiguous()


def assert_matches_reference(out, experts, x, idx, w, dtype, what=""):
    assert out.shape == (x.shape[0], H) and out.dtype == dtype, what
    rel = relative_error(out, reference_experts_forward(experts, x, idx, w))
    assert rel <= RTOL[dtype], f"{what}: relative error {rel:.3e} > {RTOL[dtype]:.0e}"


# ----------------------------------------------------------------------------- sync-free backends


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("backend", ["batched_mm", "grouped_mm"])
def test_fullgraph_compile_matches_reference_without_recompiling(backend, dtype):
    experts = make_experts(backend, dtype)
    compiled = torch.compile(experts, fullgraph=True)  # Experts.forward: input checks + backend
    routing = list(routings())
    x = hidden(dtype, seed=0)
    idx, w = routing[0]

    with torch.no_grad():
        uncompiled = experts(x, idx, w)
        out = compiled(x, idx, w)  # compiles here; fullgraph=True: any graph break raises
    assert_matches_reference(uncompiled, experts, x, idx, w, dtype, "uncompiled")
    assert_matches_reference(out, experts, x, idx, w, dtype, "compiled")
    agreement = relative_error(out, uncompiled)
    assert agreement <= 2 * RTOL[dtype], f"compiled vs uncompiled: {agreement:.3e}"
    assert counters["stats"]["unique_graphs"] == 1

    # New routing values (and new hidden states) of the same shapes: the compiled graph is reused
    # as is. error_on_recompile turns any recompilation into an exception.
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for step, (idx, w) in enumerate(routing[1:], start=1):
            x = hidden(dtype, seed=step)
            out = compiled(x, idx, w)
            assert_matches_reference(out, experts, x, idx, w, dtype, f"compiled, routing #{step}")
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def _record_graphs():
    """A dynamo backend that keeps each traced FX graph and runs it unoptimised (cheap: no inductor)."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return graphs, backend


def test_grouped_mm_path_under_compile():
    # The decision itself, as grouped_mm_path() states it for these sizes.
    fp32 = moe_lab.grouped_mm_path("cpu", torch.float32, H, I, compiling=True)
    assert fp32.kernel == "moe_lab loop" and not fp32.uses_torch_op, fp32
    assert "bfloat16" in fp32.reason
    bf16 = moe_lab.grouped_mm_path("cpu", torch.bfloat16, H, I, compiling=True)
    assert bf16.uses_torch_op and bf16.kernel in ("torch.nn.functional.grouped_mm", "torch._grouped_mm"), bf16
    # Outside compile, float32 with 16-byte rows runs torch's op (the CPU kernel exists since 2.9).
    assert moe_lab.grouped_mm_path("cpu", torch.float32, H, I, compiling=False).uses_torch_op
    # compiling=None asks torch.compiler.is_compiling(): False here, in plain Python.
    assert moe_lab.grouped_mm_path("cpu", torch.float32, H, I) == \
        moe_lab.grouped_mm_path("cpu", torch.float32, H, I, compiling=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_grouped_mm_traced_graph_uses_the_stated_kernel(dtype):
    """What dynamo actually records matches grouped_mm_path(..., compiling=True)."""
    experts = make_experts("grouped_mm", dtype)
    graphs, recorder = _record_graphs()
    compiled = torch.compile(experts, backend=recorder, fullgraph=True)
    x, (idx, w) = hidden(dtype, seed=0), next(routings())
    with torch.no_grad():
        out = compiled(x, idx, w)
    assert_matches_reference(out, experts, x, idx, w, dtype, "recorded graph")
    assert len(graphs) == 1
    code = graphs[0].code
    uses_custom_op = "grouped_matmul_loop" in code
    uses_torch_op = re.search(r"\bgrouped_mm\b|_grouped_mm", code) is not None
    path = moe_lab.grouped_mm_path("cpu", dtype, H, I, compiling=True)
    if dtype == torch.float32:
        assert path.kernel == "moe_lab loop"
        assert uses_custom_op and not uses_torch_op, code
        assert code.count("grouped_matmul_loop") >= 2  # gate_up and down projections
    else:
        assert path.uses_torch_op
        assert uses_torch_op and not uses_custom_op, code


# ----------------------------------------------------------------------------- eager: graph breaks


def test_eager_fullgraph_compile_raises_on_the_data_dependent_loop():
    experts = make_experts("eager", torch.float32)
    x, (idx, w) = hidden(torch.float32, seed=0), next(routings())
    compiled = torch.compile(eager_experts_forward, fullgraph=True)
    with torch.no_grad(), pytest.raises(Exception) as info:
        compiled(experts, x, idx, w)
    error = info.value
    # Broad on purpose: torch versions differ in which class they raise here (Unsupported for the
    # `.tolist()` graph break, UserError/GuardOnDataDependentSymNode for the `if size == 0` guard on
    # the unbacked count that follows it), but it is a dynamo error about data-dependent values —
    # never a moe_lab ValueError and never a wrong answer.
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    assert isinstance(error, (torch._dynamo.exc.TorchDynamoException, GuardOnDataDependentSymNode)), \
        f"{type(error).__mro__}: {error}"
    assert not isinstance(error, ValueError)
    message = str(error)
    assert DATA_DEPENDENT.search(message), message
    assert "eager" in message, "the error should point into moe_lab/backends/eager.py"


def test_eager_explain_reports_the_host_sync_graph_break():
    experts = make_experts("eager", torch.float32)
    x, (idx, w) = hidden(torch.float32, seed=0), next(routings())
    with torch.no_grad():
        explanation = torch._dynamo.explain(experts)(x, idx, w)
    assert explanation.graph_break_count >= 1
    assert explanation.graph_count >= 2  # the code before the break and the code after it
    reasons = [brk.reason for brk in explanation.break_reasons]
    assert reasons and all(r.strip() for r in reasons)
    assert any(DATA_DEPENDENT.search(r) for r in reasons), reasons
    # The break is the `group_sizes.tolist()` line that eager.py marks as its one HOST SYNC.
    frames = [frame for brk in explanation.break_reasons for frame in brk.user_stack]
    assert any(frame.filename.endswith("eager.py") and "tolist" in (frame.line or "") for frame in frames), \
        [(f.filename, f.lineno, f.line) for f in frames]


def test_eager_compiles_with_graph_breaks_and_stays_correct():
    experts = make_experts("eager", torch.float32)
    compiled = torch.compile(experts)  # fullgraph=False: dynamo splits at the break and falls back
    with torch.no_grad():
        # Two routings with different per-expert counts: the Python loop after the break is guarded
        # on those counts, so the second call may recompile; either way the answer must be right.
        for step, (idx, w) in enumerate(list(routings())[:2]):
            x = hidden(torch.float32, seed=step)
            out = compiled(x, idx, w)
            assert_matches_reference(out, experts, x, idx, w, torch.float32, f"eager compiled, routing #{step}")
    assert counters["stats"]["unique_graphs"] >= 2  # at least one break: more than one graph


def test_grouped_mm_with_one_expert_compiles_with_dynamic_shapes():
    # A one-expert layer's offsets are its count: Inductor's cumsum rewrite failed on a one-element
    # cumsum of a symbolic size ("int() argument ... not 'Node'") under dynamic=True.
    experts = Experts(MoEConfig(32, 16, num_experts=1, top_k=1, dtype=torch.bfloat16), "grouped_mm")
    compiled = torch.compile(experts, dynamic=True)
    with torch.no_grad():
        for tokens in (5, 9):  # two sizes, one graph with a symbolic T
            x = torch.randn(tokens, 32).to(torch.bfloat16)
            index, weights = moe_lab.synthetic_routing(tokens, 1, 1)
            assert_matches_reference(compiled(x, index, weights), experts, x, index, weights, torch.bfloat16,
                                     f"E=1, T={tokens}")


# ----------------------------------------------------------------------------- marks set without dynamo loaded


def test_the_constant_result_mark_is_the_one_torch_sets():
    # moe_lab marks its constant functions itself while torch._dynamo is not loaded (importing it is about half
    # of `import moe_lab`); a torch that marks them another way must fail here, not break every compiled graph.
    from moe_lab.compile_marks import mark_constant_result

    def ours():
        return 1

    def torchs():
        return 1

    assert mark_constant_result(ours) is ours
    assert torch.compiler.assume_constant_result(torchs) is torchs
    assert vars(ours) == vars(torchs) != {}


def test_import_moe_lab_leaves_dynamo_unloaded_and_the_marks_set():
    code = ("import sys, moe_lab\n"
            "from moe_lab.backends import auto, triton_launch\n"
            "from moe_lab.compile_marks import CONSTANT_RESULT_MARK\n"
            "marked = getattr(moe_lab.devices.cuda_device_facts, CONSTANT_RESULT_MARK, False)\n"
            "print('torch._dynamo' in sys.modules, marked)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["False", "True"], done.stdout + done.stderr[-2000:]
