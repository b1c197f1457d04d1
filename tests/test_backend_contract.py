"""The backend contract: each backend declares what it can do, and every consumer asks.

Built-in specs, `describe_backends`, capabilities declared at `register`, the guard that refuses a
backend without gradients when a call needs them (and an output detached from its inputs), and
`auto` choosing only among backends whose capabilities cover the call.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import moe_lab
from moe_lab.backends import CAPABILITIES, Support, Where

sys.path.insert(0, str(Path(__file__).resolve().parent))  # backend_cases, also under --import-mode=importlib
from backend_cases import MATMUL_BACKENDS, make_case  # noqa: E402

CPU = Where.of("cpu", torch.float32)


@pytest.fixture
def registered():
    """Register user backends for one test; all removed afterwards."""
    names = []

    def register(name, fn, **capabilities):
        moe_lab.register(name, fn, **capabilities)
        names.append(name)
        return name

    yield register
    for name in names:
        if name in moe_lab.available_backends():
            moe_lab.unregister(name)


def eager_copy(experts, hidden_states, top_k_index, top_k_weights):
    """A user backend made of torch ops."""
    return moe_lab.backends.eager_experts_forward(experts, hidden_states, top_k_index, top_k_weights)


def detaching(experts, hidden_states, top_k_index, top_k_weights):
    """A user backend whose output is cut off from every input (as a kernel without a backward is)."""
    with torch.no_grad():
        return moe_lab.backends.eager_experts_forward(experts, hidden_states, top_k_index, top_k_weights)


def detaching_weights(experts, hidden_states, top_k_index, top_k_weights):
    """A user backend that differentiates the hidden states but not the experts' weights."""

    class Frozen:
        gate_up_proj, down_proj = experts.gate_up_proj.detach(), experts.down_proj.detach()
        act_fn, num_experts = experts.act_fn, experts.num_experts

    return moe_lab.backends.eager_experts_forward(Frozen, hidden_states, top_k_index, top_k_weights)


# ----------------------------------------------------------------------------- declarations


def test_every_builtin_declares_every_capability_with_a_reason():
    for name in moe_lab.backends.builtin_backends():
        spec = moe_lab.get_spec(name)
        assert spec.builtin and spec.name == name and spec.summary
        for capability, support in spec.table(CPU).items():
            assert isinstance(support, Support) and support.ok in (True, False) and support.reason, (name, capability)


def test_what_the_builtins_declare_on_a_cpu():
    table = {name: moe_lab.get_spec(name).table(CPU) for name in moe_lab.available_backends()}
    assert all(table[name]["autograd"].ok for name in MATMUL_BACKENDS)
    assert table["eager"]["fullgraph"].ok is False and ".tolist()" in table["eager"]["fullgraph"].reason
    assert table["eager"]["sync_free"].ok is False
    assert table["batched_mm"]["sync_free"].ok and table["batched_mm"]["fullgraph"].ok
    # On a CPU torch's grouped_mm is a per-group loop: it reads the offsets on the host.
    assert table["grouped_mm"]["sync_free"].ok is False and "on the host" in table["grouped_mm"]["sync_free"].reason
    # A backend that runs on this CPU is refused CUDA graphs for want of a CUDA device; one that does not run here
    # (triton on a machine with a GPU: its interpreter is only switched on where there is none) says that first.
    for name, capabilities in table.items():
        graph = capabilities["cuda_graph"]
        expected = "CUDA device" if capabilities["runs"].ok else "does not run here"
        assert graph.ok is False and expected in graph.reason, (name, graph.reason)
    assert moe_lab.get_spec("auto").dispatcher and not moe_lab.get_spec("eager").dispatcher
    if moe_lab.triton_status("cpu")[0]:
        assert table["triton"]["runs"].slow  # the interpreter: correct, not for timing


def test_capabilities_depend_on_where():
    grouped = moe_lab.get_spec("grouped_mm")
    # torch.compile traces torch's grouped_mm for bf16; other dtypes run moe_lab's loop as one custom op.
    assert "traces" in grouped.supports("fullgraph", Where.of("cpu", torch.bfloat16, 64, 32)).reason
    assert "custom op" in grouped.supports("fullgraph", Where.of("cpu", torch.float64, 64, 32)).reason
    if not torch.cuda.is_available():
        missing = grouped.supports("autograd", Where.of("cuda", torch.bfloat16))
        assert missing.ok is False and "no CUDA device" in missing.reason
    with pytest.raises(ValueError, match="unknown capability 'speed'"):
        grouped.supports("speed", CPU)


def test_describe_backends_prints_every_backend_and_capability_with_reasons():
    text = moe_lab.describe_backends("cpu", torch.float32)
    for name in moe_lab.available_backends():
        assert f"\n{name}: " in text
    header = next(line for line in text.splitlines() if line.startswith("backend "))
    assert header.split() == ["backend", *CAPABILITIES]
    assert moe_lab.get_spec("eager").supports("fullgraph", CPU).reason in text
    rows = moe_lab.backend_capabilities("cpu", torch.float32)
    assert [row["backend"] for row in rows] == moe_lab.available_backends()
    assert rows[0]["autograd"] == {"ok": True, "reason": moe_lab.get_spec("eager").supports("autograd", CPU).reason}


def test_register_takes_capabilities_and_defaults_to_unknown(registered):
    registered("test_declared", eager_copy, autograd=True, cuda_graph=False,
               fullgraph=lambda where: Support(where.dtype == torch.bfloat16, "bf16 only, say"))
    spec = moe_lab.get_spec("test_declared")
    assert spec.supports("autograd", CPU).ok is True and spec.supports("autograd", CPU).reason == "declared by its author"
    assert spec.supports("fullgraph", CPU).ok is False
    assert spec.supports("fullgraph", Where.of("cpu", torch.bfloat16)).ok is True
    assert spec.summary == "A user backend made of torch ops." and not spec.builtin
    registered("test_undeclared", eager_copy)
    table = moe_lab.get_spec("test_undeclared").table(CPU)
    assert table["autograd"].ok is None and "first call that needs gradients" in table["autograd"].reason
    assert table["runs"].ok is None and "test_undeclared" in moe_lab.runnable_backends("cpu")
    with pytest.raises(TypeError, match=r"unknown capabilities \['fast'\]"):
        moe_lab.register("test_bad", eager_copy, fast=True)
    with pytest.raises(TypeError, match="takes True, False, None, a Support or a function"):
        moe_lab.register("test_bad", eager_copy, autograd="yes")


def test_runnable_backends_asks_the_specs(registered):
    registered("test_gpu_only", eager_copy, runs=lambda where: Support(where.device.type == "cuda", "CUDA only"))
    assert "test_gpu_only" not in moe_lab.runnable_backends("cpu")
    assert set(MATMUL_BACKENDS) <= set(moe_lab.runnable_backends("cpu", interpreted=False))


# ----------------------------------------------------------------------------- no silent detachment


def test_a_backend_without_autograd_is_refused_when_gradients_are_needed(registered):
    registered("test_no_grad", detaching, autograd=False)
    experts, x, idx, w = make_case()
    experts.set_experts_implementation("test_no_grad")
    with pytest.raises(moe_lab.BackendCapabilityError) as info:
        experts(x, idx, w)  # the weights are parameters: they require grad
    message = str(info.value)
    assert "'test_no_grad' cannot give gradients (declared by its author)" in message
    assert "gate_up_proj, down_proj require grad" in message
    assert all(name in message for name in MATMUL_BACKENDS) and "torch.no_grad()" in message
    with torch.no_grad():  # inference is fine
        assert experts(x, idx, w).shape == x.shape
    frozen = make_case()[0].requires_grad_(False)
    frozen.set_experts_implementation("test_no_grad")
    assert frozen(x, idx, w).shape == x.shape  # nothing requires grad: nothing to refuse
    with pytest.raises(moe_lab.BackendCapabilityError, match="top_k_weights require grad"):
        frozen(x, idx, w.clone().requires_grad_(True))  # the router learns through the routing weights


def test_an_undeclared_backend_that_detaches_is_caught_on_its_first_gradient_call(registered):
    experts, x, idx, w = make_case()
    registered("test_detaching", detaching)
    experts.set_experts_implementation("test_detaching")
    with pytest.raises(moe_lab.DetachedOutputError, match="does not require grad although gate_up_proj, down_proj"):
        experts(x, idx, w)
    registered("test_half_detached", detaching_weights)
    experts.set_experts_implementation("test_half_detached")
    with pytest.raises(moe_lab.DetachedOutputError, match="does not reach gate_up_proj, down_proj"):
        experts(x.requires_grad_(True), idx, w)
    # Declared "yes" but detached anyway: the output check still refuses it.
    registered("test_lying", detaching, autograd=True)
    experts.set_experts_implementation("test_lying")
    with pytest.raises(moe_lab.DetachedOutputError):
        experts(x, idx, w)
    # Made of torch ops and undeclared: checked once, then runs.
    registered("test_torch_ops", eager_copy)
    experts.set_experts_implementation("test_torch_ops")
    experts(x, idx, w).sum().backward()
    assert experts.down_proj.grad is not None and x.grad is not None


def test_zero_tokens_have_nothing_to_differentiate():
    experts, x, idx, w = make_case(T=0)
    for backend in MATMUL_BACKENDS:
        experts.set_experts_implementation(backend)
        assert experts(x, idx, w).shape == (0, x.shape[1])


def test_auto_chooses_only_backends_that_can_give_gradients(registered, tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_LAB_CALIBRATION", str(tmp_path / "calibration.json"))
    moe_lab.reload_calibration()
    registered("test_no_grad", detaching, autograd=False)
    from moe_lab.backends.calibration import Calibration, write_calibration
    from moe_lab.devices import device_name

    E, k, H, I = 6, 2, 64, 24
    write_calibration(Calibration("cpu", device_name("cpu"), "float32", (E, k, H, I),
                                  ((None, "test_no_grad"),)))
    try:
        assert moe_lab.choose_backend(8, "cpu", torch.float32, (E, k, H, I))[0] == "test_no_grad"
        name, why = moe_lab.choose_backend(8, "cpu", torch.float32, (E, k, H, I), grad=True)
        assert name == "grouped_mm" and "skipped test_no_grad: gradients are needed, and declared by its author" in why
        experts, x, idx, w = make_case(T=8)
        experts.set_experts_implementation("auto")
        experts(x, idx, w).sum().backward()  # auto ran grouped_mm: the weights have gradients
        assert experts.gate_up_proj.grad is not None
        with torch.no_grad():
            experts(x, idx, w)  # and test_no_grad, where no gradient is needed
    finally:
        moe_lab.reload_calibration()


def test_graphed_experts_holds_the_backends_spec_and_refuses_cpu_tensors():
    # The refusal of a backend whose spec says "no capture" needs CUDA tensors to be reached:
    # tests/test_gpu.py::test_eager_cannot_be_captured_and_says_why.
    experts, x, idx, w = make_case()
    graphed = moe_lab.GraphedExperts(experts, "eager")
    assert graphed.spec is moe_lab.get_spec("eager")
    with pytest.raises(moe_lab.GraphCaptureError, match="CUDA tensors"):
        graphed(x, idx, w)
