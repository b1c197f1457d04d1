"""Hostile inputs: each gives a clear error (or a documented result), and the kernel lives on.

docs/errors.md is the reader's version of this file. What is here and not in the other test files:

* one catalogue of hostile calls (unknown backend names in code, in the backend explorer widget
  and in a notebook parameter; top_k > experts; zero tokens; NaN/inf hidden states; batched_mm
  over its gather budget; grouped GEMM where it cannot run natively), checked in this process and
  then all over again inside a real Jupyter kernel, which must still answer `print(1 + 1)`;
* the NaN/inf contract: a non-finite value in one token's hidden state makes exactly that token's
  output non-finite and leaves every other token's output bit-identical, in every backend and
  both grouped_mm paths (torch's op and moe_lab's loop);
* 500 random layers through all three backends, each against the float64 reference and each
  also poisoned with NaN/inf (reusing tests/test_properties.py's strategies and tolerances);
* `moe-lab run` with a bad parameter name or a bad backend value, several notebooks at once;
* `make html` on notebooks written here: the page holds the figure and plotly.js (and, where a
  Chromium is installed, the figure is drawn offline); moe_lab.display's preprocessor on its own
  (figures, widget snapshots), and the FigureWidget state it relies on staying current.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_lab
from moe_lab import MoEConfig, SparseMoeBlock
from moe_lab.backends.registry import BUILTIN_BACKENDS

sys.path.insert(0, str(Path(__file__).resolve().parent))  # test_properties, also under --import-mode=importlib
from test_properties import (  # noqa: E402
    BACKENDS,
    assert_close_to_reference,
    build,
    call,
    examples,
    experts_cases,
    term_magnitude,
)

from hypothesis import event, given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
nbformat = pytest.importorskip("nbformat")


def write_backend_notebook(path: Path) -> Path:
    """A notebook whose parameters cell says `backend = "grouped_mm"`, and which uses it at once."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('backend = "grouped_mm"\nnum_tokens = 4')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [
        params,
        nbformat.v4.new_code_cell(
            "import moe_lab\n"
            "layer = moe_lab.Experts(moe_lab.MoEConfig(16, 16, 4, 2), experts_implementation=backend)\n"
            "print('built', layer.get_experts_implementation())"),
        nbformat.v4.new_code_cell("print('the cell after ran')"),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


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
VALID = ", ".join(map(repr, BUILTIN_BACKENDS))
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


# ----------------------------------------------------------------------------- 500 random layers

NON_FINITE = (math.nan, math.inf, -math.inf)


@examples(500)
@given(case=experts_cases(), poison=st.sampled_from(NON_FINITE), data=st.data())
def test_500_random_layers_every_backend_matches_reference_and_confines_nan_inf(case, poison, data):
    """For each random layer (tests/test_properties.py's strategy: T from 0, all four dtypes, skewed
    routing, odd memory layouts, three entry points; sizes rounded up to 16-byte rows half of the
    time, so both grouped_mm paths are exercised), every backend returns the
    float64 reference within the dtype's tolerance. Then one token gets a NaN or +-inf: its output
    becomes entirely non-finite and every other token's output stays bit-identical."""
    if data.draw(st.booleans(), label="16-byte rows"):  # half the layers can take torch's grouped_mm op
        case = case | dict(H=8 * math.ceil(case["H"] / 8), I=8 * math.ceil(case["I"] / 8))
    experts, x, idx, w = build(case)
    dtype, T, H = case["dtype"], x.shape[0], x.shape[1]
    reference = moe_lab.reference_experts_forward(experts, x, idx, w)
    magnitude = term_magnitude(experts, x, idx, w)
    event(f"grouped_mm path: {moe_lab.grouped_mm_path('cpu', dtype, H, case['I']).kernel}")
    for backend in BACKENDS:
        out = call(case["entry"], backend, experts, x, idx, w)
        assert_close_to_reference(out, reference, dtype, f"{backend} via {case['entry']}", magnitude)
    if T == 0:
        return
    token = data.draw(st.integers(0, T - 1), label="poisoned token")
    column = data.draw(st.integers(0, H - 1), label="poisoned column")
    clean = x.clone()  # the same layout for both runs (an expanded x has no row of its own to poison)
    bad = clean.clone()
    bad[token, column] = poison
    others = [t for t in range(T) if t != token]
    for backend in BACKENDS:
        with torch.no_grad():
            a = call(case["entry"], backend, experts, clean, idx, w)
            b = call(case["entry"], backend, experts, bad, idx, w)
        assert (~torch.isfinite(b[token])).all(), f"{backend}: {poison} in token {token} gave finite outputs"
        assert torch.equal(a[others], b[others]), f"{backend}: {poison} in token {token} changed other tokens"


# ----------------------------------------------------------------------------- more NaN/inf

@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_one_experts_weights_reaches_exactly_its_tokens(backend):
    experts = moe_lab.Experts(MoEConfig(16, 8, num_experts=6, top_k=2), backend)
    x = torch.randn(12, 16)
    idx, w = moe_lab.synthetic_routing(12, 6, 2, seed=3)
    with torch.no_grad():
        clean = experts(x, idx, w)
        expert = int(idx[0, 0])
        experts.down_proj[expert, 5, 0] = math.nan  # one weight of one expert
        out = experts(x, idx, w)
    routed = (idx == expert).any(dim=1)
    assert torch.isnan(out[routed, 5]).all() and torch.isfinite(out[routed][:, [c for c in range(16) if c != 5]]).all()
    assert torch.equal(out[~routed], clean[~routed])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_routing_weight_poisons_only_its_token(backend):
    experts = moe_lab.Experts(MoEConfig(16, 8, num_experts=6, top_k=2), backend)
    x = torch.randn(7, 16)
    idx, w = moe_lab.synthetic_routing(7, 6, 2, seed=4)
    bad = w.clone()
    bad[3, 1] = math.nan
    with torch.no_grad():
        clean, out = experts(x, idx, w), experts(x, idx, bad)
    assert torch.isnan(out[3]).all()
    assert torch.equal(out[[0, 1, 2, 4, 5, 6]], clean[[0, 1, 2, 4, 5, 6]])


def test_nan_token_through_the_router_gets_valid_ids_and_nan_weights():
    """torch.topk over NaN scores still returns k distinct, in-range expert ids; the weights are NaN."""
    for score in ("softmax", "sigmoid"):
        block = SparseMoeBlock(MoEConfig(16, 8, num_experts=6, top_k=3, router_score=score))
        x = torch.randn(4, 16)
        x[2, 7] = math.nan
        with torch.no_grad():
            out, routing = block(x, return_router_output=True)
        ids = routing.top_k_index[2]
        assert len(set(ids.tolist())) == 3 and 0 <= int(ids.min()) and int(ids.max()) < 6
        assert torch.isnan(routing.top_k_weights[2]).all() and torch.isnan(out[2]).all()
        assert torch.isfinite(out[[0, 1, 3]]).all()


# ----------------------------------------------------------------------------- notebooks from the CLI


def test_cli_unknown_backend_value_fails_at_first_use_with_the_valid_names(notebook_path, tmp_path, capsys):
    """`-p backend nonexistent` passes the parameter check (a notebook may register its own backend
    before using the name); the notebook's first use raises UnknownBackendError, and `moe-lab run`
    says so in one line, exit code 1, pointing at the executed notebook with the traceback."""
    from moe_lab.cli import main

    out_dir = tmp_path / "runs"
    assert main(["run", str(notebook_path), "-p", "backend", "nonexistent", "--output-dir", str(out_dir), "--quiet",
                 "--kernel", "python3"]) == 1
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    assert (f"{notebook_path} failed in cell [3]: UnknownBackendError: unknown experts implementation "
            f"'nonexistent'; registered: [{VALID}]") in stderr
    assert f"with the full traceback: {out_dir / notebook_path.name}" in stderr
    executed = json.loads((out_dir / notebook_path.name).read_text())
    outputs = [o for c in executed["cells"] for o in c.get("outputs", [])]
    assert [o["ename"] for o in outputs if o["output_type"] == "error"] == ["UnknownBackendError"]
    assert not any("the cell after ran" in "".join(o.get("text", "")) for o in outputs), "execution stopped"


def test_cli_misspelled_parameter_refused_before_any_notebook_runs(notebook_path, tmp_path, capsys):
    """Several notebooks: a name that one of them lacks is refused before the first one runs
    (tests/test_notebook_runner.py checks the exit code of the installed command itself)."""
    from moe_lab.cli import main

    other = tmp_path / "other.ipynb"
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("top_k = 2")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("print(top_k)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, other)
    out_dir = tmp_path / "runs"
    assert main(["run", str(notebook_path), str(other), "-p", "backend", "eager", "--output-dir", str(out_dir)]) == 2
    stderr = capsys.readouterr().err
    assert "other.ipynb has no parameter(s) ['backend']; its parameters are: top_k (default 2)" in stderr
    assert not out_dir.exists(), "nothing is executed, not even the notebook that has `backend`"
    assert main(["run", str(tmp_path / "missing.ipynb"), "--output-dir", str(out_dir)]) == 2
    assert "No such file or directory" in capsys.readouterr().err


def test_failed_cell_summary_for_sweeps_and_the_cli():
    """A sweep row's `error` is the cell's exception, not the first line of papermill's banner."""
    from papermill.exceptions import PapermillExecutionError

    from moe_lab.notebook_runner import error_summary

    error = PapermillExecutionError(1, 3, "layer = ...", "UnknownBackendError",
                                    "unknown experts implementation 'x'; registered: [...]\nmore", [])
    assert str(error).strip().splitlines()[0].startswith("----"), "what the sweep used to report"
    assert error_summary(error) == "UnknownBackendError: unknown experts implementation 'x'; registered: [...]"
    assert error_summary(ValueError("first\nsecond")) == "first" and error_summary(KeyError()) == "KeyError"


# ----------------------------------------------------------------------------- make html


def _plot_notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("num_tokens = 64")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [
        nbformat.v4.new_markdown_cell("# A plot for `make html`"),
        params,
        nbformat.v4.new_code_cell(
            "import moe_lab, moe_lab.plots\n"
            "idx, _ = moe_lab.synthetic_routing(num_tokens, 8, 2, distribution='zipf', seed=0)\n"
            "moe_lab.plots.routing_histogram(idx, 8)"),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)
    return path


def _chromium() -> str | None:
    return os.environ.get("MOE_LAB_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser") \
        or shutil.which("google-chrome")


def test_make_html_renders_the_plot_offline(tmp_path):
    """`make html` on two notebooks written here: one is executed into runs/, the other already has a
    newer executed copy there, which is reused; both pages carry their figure and plotly.js."""
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    import plotly.graph_objects as go

    fresh = _plot_notebook(tmp_path / "nb" / "tiny_plot.ipynb")
    reused = _plot_notebook(tmp_path / "nb" / "reused_plot.ipynb")
    runs, pages = tmp_path / "runs", tmp_path / "html"
    executed = nbformat.read(reused, as_version=4)  # an executed copy, made without a kernel
    figure = go.Figure(go.Bar(x=[0, 1, 2], y=[5, 1, 2]), layout_title_text="Reused figure").to_plotly_json()
    executed.cells[-1].outputs = [nbformat.v4.new_output(
        "display_data", data={"application/vnd.plotly.v1+json": figure, "text/plain": "Figure()"})]
    runs.mkdir()
    nbformat.write(executed, runs / "reused_plot.ipynb")
    os.utime(reused, (0, 0))  # the notebook is older than its executed copy

    venv = Path(sys.executable).parent.parent
    # -o: never (re)install the venv from a test; VENV: the one running this test.
    command = ["make", "-C", str(ROOT), "--no-print-directory", "html", f"VENV={venv}", "-o", str(venv / ".installed"),
               f"NOTEBOOKS={fresh} {reused}", f"RUNS_DIR={runs}", f"HTML_DIR={pages}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"reusing {runs / 'reused_plot.ipynb'}" in result.stdout
    assert f"reusing {runs / 'tiny_plot.ipynb'}" not in result.stdout

    run = json.loads((runs / "tiny_plot.ipynb").read_text())
    mimes = [m for c in run["cells"] for o in c.get("outputs", []) for m in o.get("data", {})]
    assert "application/vnd.plotly.v1+json" in mimes and "text/html" not in mimes, \
        "runs/ keeps plotly's own mimetype; the HTML is made at conversion time"
    for name, title in (("tiny_plot", "Tokens per expert"), ("reused_plot", "Reused figure")):
        page = (pages / f"{name}.html").read_text()
        assert page.count('class="plotly-graph-div"') == 1, f"{name}: the figure's div"
        assert page.count("* plotly.js v") == 1, f"{name}: plotly.js embedded once, inline"
        assert not re.findall(r'<script[^>]*src="[^"]*plotly', page) and title in page
        size = len(page.encode())
        assert 3e6 < size < 8e6, f"{name}: {size} bytes; plotly.js is ~4.8 MB, the rest is small"

    chromium = _chromium()
    if chromium is None:
        return  # the drawing check below needs a browser; the page content is checked above
    dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
                          "--dump-dom", (pages / "tiny_plot.html").as_uri()],
                         capture_output=True, text=True, timeout=120).stdout
    assert dom.count('class="main-svg"') >= 2, "plotly drew the figure (offline: no network is used)"
    assert dom.count('class="point"') == 8, "one bar per expert"


def test_make_html_without_notebooks_says_so(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    venv = Path(sys.executable).parent.parent
    result = subprocess.run(["make", "-C", str(ROOT), "--no-print-directory", "html", f"VENV={venv}",
                             "-o", str(venv / ".installed"), "NOTEBOOKS=", f"HTML_DIR={tmp_path / 'html'}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "nothing to render" in result.stdout, result.stdout + result.stderr
    assert not (tmp_path / "html").exists()


def test_html_preprocessor_figures_and_widget_snapshot():
    """Without a kernel: plotly outputs gain text/html (plotly.js in the first only); a saved widget
    becomes a static snapshot of its state, and the widget state leaves the page."""
    pytest.importorskip("nbconvert")
    from moe_lab.display import PlotlyHTMLPreprocessor

    figure = {"data": [{"type": "bar", "x": [0, 1], "y": [3, 4]}], "layout": {"title": {"text": "two bars"}}}
    plotly_output = {"output_type": "display_data", "metadata": {}, "data": {
        "application/vnd.plotly.v1+json": figure, "text/plain": "Figure()"}}

    def model(name, **state):
        return {"model_name": name, "model_module": "@jupyter-widgets/controls", "model_module_version": "2.0.0",
                "state": state}

    state = {
        "box": model("VBoxModel", children=["IPY_MODEL_html", "IPY_MODEL_fig", "IPY_MODEL_slider",
                                            "IPY_MODEL_drop", "IPY_MODEL_button"]),
        "html": model("HTMLModel", value="<b>status</b>: ok", description=""),
        "fig": model("AnyModel", _widget_data=[{"type": "scatter", "y": [1, 2]}],
                     _widget_layout={"title": {"text": "widget figure"}}, _esm="x" * 1000),
        "slider": model("IntSliderModel", value=4, description="top_k"),
        "drop": model("DropdownModel", index=1, _options_labels=["eager", "grouped_mm"], description="backend"),
        "button": model("ButtonModel", description="measure"),
    }
    widget_output = {"output_type": "display_data", "metadata": {}, "data": {
        "application/vnd.jupyter.widget-view+json": {"model_id": "box", "version_major": 2, "version_minor": 0},
        "text/plain": "BackendExplorer(...)"}}
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("fig", outputs=[nbformat.from_dict(plotly_output)]),
                nbformat.v4.new_code_cell("w", outputs=[nbformat.from_dict(widget_output)]),
                nbformat.v4.new_code_cell("fig", outputs=[nbformat.from_dict(plotly_output)])]
    nb.metadata["widgets"] = {"application/vnd.jupyter.widget-state+json": {"state": state, "version_major": 2,
                                                                             "version_minor": 0}}
    nb, _ = PlotlyHTMLPreprocessor().preprocess(nb, {})

    htmls = [o["data"]["text/html"] for c in nb.cells for o in c.outputs]
    assert ["* plotly.js v" in h for h in htmls] == [True, False, False], "plotly.js once, in the first figure"
    assert all('class="plotly-graph-div"' in h for h in htmls)
    snapshot = htmls[1]
    assert "application/vnd.jupyter.widget-view+json" not in nb.cells[1].outputs[0]["data"]
    for text in ("<b>status</b>: ok", "widget figure", "top_k: 4", "backend: grouped_mm", "static snapshot"):
        assert text in snapshot, text
    assert "measure" not in snapshot, "buttons do nothing on a static page"
    assert "widgets" not in nb.metadata, "no widget state (megabytes of plotly.js per FigureWidget) in the page"


def test_figure_widget_saved_state_follows_updates():
    """What nbclient saves for a FigureWidget (and the HTML snapshot shows) is `_widget_data` /
    `_widget_layout`; plotly sets them only on creation, so moe_lab's widgets keep them current."""
    pytest.importorskip("ipywidgets")
    from moe_lab.widgets import backend_explorer

    def fake_measure(config, num_tokens, backend, **kwargs):
        return dict(backend=backend, num_tokens=num_tokens, status="ok", median_ms=0.01 * num_tokens * config.top_k,
                    num_experts=config.num_experts, top_k=config.top_k, dtype="float32")

    explorer = backend_explorer(MoEConfig(16, 16, num_experts=4, top_k=2), measure_fn=fake_measure, tokens=(8, 16))
    explorer.controls["num_tokens"].value = 8
    explorer.controls["top_k"].value = 3
    latency = explorer.figures["latency"]
    saved = latency._widget_data
    # the explorer draws the current setting (k=3) only, one line per backend: the saved state follows
    assert [t.get("name") for t in saved] == [t.name for t in latency.data] == ["grouped_mm"]
    assert list(saved[0]["x"]) == [8] and list(saved[0]["y"]) == pytest.approx([0.24])
    assert latency._widget_layout["title"]["text"] == latency.layout.title.text
