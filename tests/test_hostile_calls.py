"""Hostile calls: each gives a clear error (or a documented result), and a Jupyter kernel lives on.

docs/errors.md is the reader's version of this file: one catalogue of hostile calls (unknown
backend names in code, in the backend explorer widget and in a notebook parameter; top_k > experts;
zero tokens; NaN/inf hidden states; batched_mm over its gather budget; grouped GEMM where it cannot
run natively), checked in this process and then all over again inside a real Jupyter kernel, which
must still answer `print(1 + 1)`. NaN/inf confinement in depth: tests/test_nonfinite_inputs.py;
`moe-lab run` errors: tests/test_cli_run_errors.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import moe_lab
from moe_lab.backends import builtin_backends

sys.path.insert(0, str(Path(__file__).resolve().parent))  # notebook_cases, also under --import-mode=importlib
from notebook_cases import write_backend_notebook  # noqa: E402

# ----------------------------------------------------------------------------- the catalogue
# Each entry: (name, code, expected). `code` runs after PRELUDE and sets `result` or raises.
# expected = ("raises", exception type name, [message fragments])
#          | ("returns", [fragments of repr(result)]).
# The same strings run in this process and in a Jupyter kernel.

PRELUDE = '''
import math, torch, moe_lab
from moe_lab import bench
from moe_lab.notebook_runner import check_parameters
torch.manual_seed(0)
cfg = moe_lab.MoEConfig(16, 16, num_experts=4, top_k=2)
experts = moe_lab.Experts(cfg, "eager")
x = torch.randn(5, 16)
idx, w = moe_lab.synthetic_routing(5, 4, 2, seed=0)
BUILTINS = ("eager", "batched_mm", "grouped_mm")
FAST = dict(device="cpu", max_seconds=0.01, max_reps=3, min_reps=1, warmup=0,
            ceilings=bench.Ceilings(copy_GBps=10.0, matmul_TFLOPs=0.1, device="cpu", dtype="float32"))

def poisoned(backend, value, dtype=torch.float32, H=16, I=16, token=2):
    """(token's output all non-finite, every other token bit-identical to the clean run)."""
    layer = moe_lab.Experts(cfg.replace(hidden_size=H, intermediate_size=I, dtype=dtype), backend)
    clean = torch.randn(5, H).to(dtype)
    bad = clean.clone()
    bad[token, H // 2] = value
    with torch.no_grad():
        a, b = layer(clean, idx, w), layer(bad, idx, w)
    rows = [t for t in range(5) if t != token]
    return bool((~torch.isfinite(b[token])).all()), torch.equal(a[rows], b[rows])

def grouped_case(dtype, H, I):
    """(kernel, reason, output matches the float64 reference) for grouped_mm at this dtype/shape on CPU."""
    layer = moe_lab.Experts(moe_lab.MoEConfig(H, I, num_experts=4, top_k=2, dtype=dtype), "grouped_mm")
    h = torch.randn(6, H).to(dtype)
    i, ww = moe_lab.synthetic_routing(6, 4, 2, distribution="zipf", seed=1)
    path = moe_lab.grouped_mm_path(h.device, dtype, H, I)
    with torch.no_grad():
        err = moe_lab.relative_error(layer(h, i, ww), moe_lab.reference_experts_forward(layer, h, i, ww))
    tolerance = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 1e-2}[dtype]
    return path.kernel, path.reason, err < tolerance

def explorer(**kwargs):
    from moe_lab.widgets import backend_explorer
    return backend_explorer(cfg, tokens=(4, 8), **FAST, **kwargs)

def _hostile(name, code):
    scope = dict(globals())
    try:
        exec(code, scope)
    except Exception as error:
        text = " | ".join(str(error).strip().splitlines())
        print(f"HOSTILE {name} RAISED {type(error).__name__}: {text}")
    else:
        print(f"HOSTILE {name} RETURNED {scope.get('result')!r}")
'''

# The built-in names as the registry lists them in a fresh process (where the CLI test's kernel runs).
VALID = ", ".join(map(repr, builtin_backends()))
UNKNOWN = ["unknown experts implementation", VALID]

CATALOGUE = [
    # -- unknown backend names: in code ...
    ("unknown_backend_lookup", 'result = moe_lab.get_backend("nonexistent")',
     ("raises", "UnknownBackendError", ["'nonexistent'", *UNKNOWN])),
    ("unknown_backend_layer", 'result = moe_lab.SparseMoeBlock(cfg, experts_implementation="Grouped_MM")',
     ("raises", "UnknownBackendError", ["'Grouped_MM'", *UNKNOWN])),
    ("unknown_backend_switch",
     'try:\n    experts.set_experts_implementation("bmm")\n'
     'finally:\n    assert experts.get_experts_implementation() == "eager"',
     ("raises", "UnknownBackendError", ["'bmm'", *UNKNOWN])),
    ("unknown_backend_forward", 'result = moe_lab.experts_forward("flash", experts, x, idx, w)',
     ("raises", "UnknownBackendError", ["'flash'", *UNKNOWN])),
    ("unknown_backend_measure", 'result = bench.measure(cfg, 4, "nonexistent", **FAST)["reason"]',
     ("returns", ["UnknownBackendError", VALID])),
    # ... and in the backend explorer: the status line says why, nothing escapes.
    ("widget_unknown_backend_option",
     'e = explorer(backends=["nonexistent", "eager"])\n'
     'result = (e.rows[-1]["status"], e.status.value)',
     ("returns", ["'unsupported'", "nonexistent", "UnknownBackendError: unknown experts implementation"])),
    ("widget_unknown_backend_then_a_good_one",
     'e = explorer(measure_on_start=False)\n'
     'e.controls["backend"].options = [*e.controls["backend"].options, "typo_mm"]\n'
     'e.controls["backend"].value = "typo_mm"\n'
     'bad = (e.rows[-1]["status"], "UnknownBackendError" in e.status.value)\n'
     'e.controls["backend"].value = "eager"\n'
     'result = bad, e.rows[-1]["status"], e.rows[-2]["backend"]',
     ("returns", ["(('unsupported', True), 'ok', 'typo_mm')"])),
    ("widget_backend_unregistered_meanwhile",
     'moe_lab.register("tmp_backend", moe_lab.backends.eager_experts_forward)\n'
     'e = explorer(measure_on_start=False)\n'
     'e.controls["backend"].value = "tmp_backend"\n'
     'moe_lab.unregister("tmp_backend")\n'
     'result = e.measure()["status"], e.status.value',
     ("returns", ["'unsupported'", "tmp_backend", "UnknownBackendError"])),
    ("widget_dropdown_value_not_an_option",  # ipywidgets' own check: the dropdown keeps its value
     'e = explorer(measure_on_start=False)\n'
     'try:\n    e.controls["backend"].value = "flash"\n'
     'finally:\n    assert e.controls["backend"].value == "grouped_mm" and e.rows == []',
     ("raises", "TraitError", ["Invalid selection: value not found"])),
    ("widget_no_backends", 'result = explorer(backends=[])',
     ("raises", "ValueError", ["backends= is empty", VALID])),
    # -- top_k > number of experts, wherever it can be said
    ("top_k_gt_experts_config", "result = moe_lab.MoEConfig(16, 16, num_experts=4, top_k=5)",
     ("raises", "ConfigError", ["top_k=5 must be between 1 and num_experts=4"])),
    ("top_k_gt_experts_route", "result = moe_lab.route(torch.randn(3, 4), 5)",
     ("raises", "ConfigError", ["top_k=5 must be between 1 and the number of experts (4)"])),
    ("top_k_gt_experts_synthetic", "result = moe_lab.synthetic_routing(8, 4, 5)",
     ("raises", "ConfigError", ["top_k=5 must be between 1 and num_experts=4"])),
    ("top_k_gt_experts_forward", "result = experts(x, torch.zeros(5, 5, dtype=torch.long), torch.ones(5, 5))",
     ("raises", "BackendInputError", ["top_k=5 exceeds the number of experts (4)"])),
    ("top_k_gt_experts_replace", "result = cfg.replace(top_k=9)",
     ("raises", "ConfigError", ["top_k=9 must be between 1 and num_experts=4"])),
    # -- zero tokens: empty outputs, an "ok" measurement
    ("zero_tokens_backends",
     "result = [tuple(moe_lab.experts_forward(b, experts, x[:0], idx[:0], w[:0]).shape) for b in BUILTINS]",
     ("returns", ["[(0, 16), (0, 16), (0, 16)]"])),
    ("zero_tokens_block",
     "block = moe_lab.SparseMoeBlock(cfg.replace(shared_expert_intermediate_size=8))\n"
     "out, routing = block(torch.randn(2, 0, 16), return_router_output=True)\n"
     "result = tuple(block(torch.randn(0, 16)).shape), tuple(out.shape), tuple(routing.top_k_index.shape)",
     ("returns", ["((0, 16), (2, 0, 16), (0, 2))"])),
    ("zero_tokens_measure",
     "rows = [bench.measure(cfg, 0, b, **FAST) for b in BUILTINS]\n"
     "result = [(r['status'], r['flops'], r['rel_err']) for r in rows]",
     ("returns", ["[('ok', 0, 0.0), ('ok', 0, 0.0), ('ok', 0, 0.0)]"])),
    # -- NaN / inf in one token: that token's output only (see docs/errors.md)
    ("nan_inf_one_token_float32",  # grouped_mm: torch's grouped_mm op
     "result = sorted({poisoned(b, v) for b in BUILTINS for v in (math.nan, math.inf, -math.inf)})",
     ("returns", ["[(True, True)]"])),
    ("nan_inf_one_token_triton",  # the fused kernels (interpreted on CPU): 5 tokens is the sorted path
     "result = sorted({poisoned('triton', v) for v in (math.nan, math.inf, -math.inf)})",
     ("returns", ["[(True, True)]"])),
    ("nan_inf_one_token_float64_unaligned",  # grouped_mm: moe_lab's loop
     "result = sorted({poisoned(b, v, torch.float64, H=13, I=7) for b in BUILTINS for v in (math.nan, math.inf)})",
     ("returns", ["[(True, True)]"])),
    ("nan_one_token_block",
     "block = moe_lab.SparseMoeBlock(cfg.replace(shared_expert_intermediate_size=8))\n"
     "bad = x.clone(); bad[1, 0] = math.nan\n"
     "with torch.no_grad():\n    clean, out = block(x), block(bad)\n"
     "others = [0, 2, 3, 4]\n"
     "result = (bool(torch.isnan(out[1]).all()), bool(torch.isfinite(out[others]).all()),\n"
     "          torch.allclose(out[others], clean[others], rtol=1e-5, atol=1e-6))",
     ("returns", ["(True, True, True)"])),
    # -- batched_mm over its gather budget: refused before allocating
    ("batched_mm_over_budget",
     "with moe_lab.batched_mm_budget(1000):\n    result = moe_lab.experts_forward('batched_mm', experts, x, idx, w)",
     ("raises", "GatherBudgetError", ["would gather 30.0 KiB (30,720 bytes)", "over its budget of 1000 B",
                                      "grouped_mm", "set_batched_mm_budget"])),
    ("batched_mm_over_budget_measure",
     "with moe_lab.batched_mm_budget(1000):\n    row = bench.measure(cfg, 5, 'batched_mm', **FAST)\n"
     "result = row['status'], row['reason']",
     ("returns", ["'refused'", "GatherBudgetError: batched_mm would gather"])),
    # -- grouped GEMM where torch's op cannot run natively: the path says why, the output is right
    ("grouped_mm_float64", "result = grouped_case(torch.float64, 16, 16)",
     ("returns", ["'moe_lab loop'", "not torch.float64", "True)"])),
    ("grouped_mm_unaligned", "result = grouped_case(torch.float32, 13, 7)",
     ("returns", ["'moe_lab loop'", "hidden_size=13 x 4 bytes is not a multiple of 16 bytes", "True)"])),
    ("grouped_mm_bf16_unaligned_intermediate", "result = grouped_case(torch.bfloat16, 16, 12)",
     ("returns", ["'moe_lab loop'", "intermediate_size=12 x 2 bytes", "True)"])),
    ("grouped_mm_on_cpu", "result = grouped_case(torch.float32, 16, 16)",
     ("returns", ["grouped_mm'", "on cpu, torch's grouped_mm is a per-group matmul loop", "True)"])),
    # -- a misspelled notebook parameter (the CLI's exit code 2 is tested below and in test_notebook_runner)
    ("notebook_misspelled_parameter", "result = check_parameters(NOTEBOOK, {'backedn': 'eager'})",
     ("raises", "NotebookParameterError", ["has no parameter(s) ['backedn']", 'backend (default "grouped_mm")',
                                           "num_tokens (default 4)"])),
    ("notebook_backend_value_unchecked_until_used",  # any str passes here; the notebook's first use refuses
     "result = check_parameters(NOTEBOOK, {'backend': 'nonexistent'})",
     ("returns", ["{'backend': 'nonexistent'}"])),
]
if not torch.cuda.is_available():
    CATALOGUE.append(
        ("grouped_mm_path_without_cuda", "result = moe_lab.grouped_mm_path('cuda', torch.bfloat16, 64, 64)",
         ("raises", "ValueError", ["no CUDA device cuda here", "compute capability"])))


def check_line(name: str, line: str | None, expected) -> str | None:
    """None if the printed line matches `expected`, else what is wrong."""
    if line is None:
        return f"{name}: printed nothing"
    if expected[0] == "raises":
        _, type_name, fragments = expected
        head = f"HOSTILE {name} RAISED {type_name}: "
        if not line.startswith(head):
            return f"{name}: expected {type_name}, got {line!r}"
    else:
        _, fragments = expected
        if not line.startswith(f"HOSTILE {name} RETURNED "):
            return f"{name}: expected a result, got {line!r}"
    missing = [f for f in fragments if f not in line]
    return f"{name}: {missing} not in {line!r}" if missing else None


@pytest.fixture(scope="module")
def notebook_path(tmp_path_factory):
    return write_backend_notebook(tmp_path_factory.mktemp("hostile") / "backend_param.ipynb")


@pytest.fixture(scope="module")
def prelude_scope(notebook_path):
    pytest.importorskip("ipywidgets")
    scope = {"__name__": "hostile_prelude", "NOTEBOOK": str(notebook_path)}
    exec(PRELUDE, scope)
    return scope


@pytest.mark.parametrize("name, code, expected", CATALOGUE, ids=[entry[0] for entry in CATALOGUE])
def test_hostile_call(prelude_scope, name, code, expected, capsys):
    prelude_scope["_hostile"](name, code)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("HOSTILE ")]
    problem = check_line(name, lines[-1] if lines else None, expected)
    assert problem is None, problem
    assert "tmp_backend" not in moe_lab.available_backends()


def test_hostile_calls_leave_a_real_kernel_alive(notebook_path):
    """Every catalogue entry inside one Jupyter kernel, each caught and printed; then 1 + 1."""
    manager = pytest.importorskip("jupyter_client.manager")
    km, kc = manager.start_new_kernel(kernel_name="python3", startup_timeout=120)
    try:
        def run(code: str, timeout: float = 120) -> tuple[str, dict]:
            out = []

            def hook(msg):
                if msg["msg_type"] == "stream":
                    out.append(msg["content"]["text"])
                elif msg["msg_type"] == "error":
                    out.append(f"ERROR {msg['content']['ename']}: {msg['content']['evalue']}")

            reply = kc.execute_interactive(code, output_hook=hook, timeout=timeout)
            return "".join(out), reply["content"]

        text, reply = run(f"NOTEBOOK = {str(notebook_path)!r}\n" + PRELUDE)
        assert reply["status"] == "ok", text
        problems = []
        for name, code, expected in CATALOGUE:
            text, reply = run(f"_hostile({name!r}, {code!r})")
            if reply["status"] != "ok":
                problems.append(f"{name}: the cell itself failed: {text}")
                continue
            lines = [ln for ln in text.splitlines() if ln.startswith("HOSTILE ")]
            problem = check_line(name, lines[-1] if lines else None, expected)
            if problem:
                problems.append(problem)
        assert not problems, "\n".join(problems)
        text, reply = run("print(1 + 1)", timeout=30)
        assert reply["status"] == "ok" and text.strip() == "2", "the kernel did not survive"
        assert km.is_alive()
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)
    assert not km.is_alive()
