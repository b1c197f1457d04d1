"""Correctness on a CUDA GPU: every backend, eager launches, CUDA-graph replay and torch.compile,
against the float64 reference, with fresh random inputs and a routing change after capture.

Skipped on machines without CUDA (conftest.py). Run on a GPU with `pytest tests/test_gpu.py`.
"""
import pytest
import torch

import moe_lab
from moe_lab.backends.triton_fused import kernel_configs
from moe_lab.cuda_graph import CapturedStep, GraphCaptureError, GraphedExperts
from moe_lab.reference import reference_gradients


pytestmark = pytest.mark.gpu

TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 3e-3, torch.float32: 1e-5}
CAPTURABLE = ["batched_mm", "grouped_mm", "triton"]
SHAPES = [  # (H, I, E, k): qwen3-like fine-grained, mixtral-like coarse, and odd sizes that mask tiles
    (256, 96, 32, 8),
    (512, 1024, 8, 2),
    (208, 80, 60, 4),
]


@pytest.fixture(autouse=True)
def no_calibration_file(tmp_path, monkeypatch):
    """auto reads this machine's calibration file; these tests assume its uncalibrated defaults."""
    monkeypatch.setenv("MOE_LAB_CALIBRATION", str(tmp_path / "calibration.json"))
    moe_lab.reload_calibration()
    yield
    moe_lab.reload_calibration()


def _layer(H, I, E, k, dtype, seed=0):
    torch.manual_seed(seed)
    config = moe_lab.MoEConfig(H, I, num_experts=E, top_k=k, dtype=dtype)
    return moe_lab.Experts(config).cuda()


def _inputs(T, layer, seed):
    generator = torch.Generator().manual_seed(seed)
    config = layer.config
    hidden = torch.randn(T, config.hidden_size, generator=generator).to("cuda", config.dtype)
    index, weights = moe_lab.synthetic_routing(T, config.num_experts, config.top_k, seed=seed, device="cuda")
    return hidden, index, weights


def _check(layer, out, hidden, index, weights):
    expected = moe_lab.reference_experts_forward(layer, hidden, index, weights)
    error = moe_lab.relative_error(out, expected)
    assert error < TOLERANCE[layer.config.dtype], error


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", ["eager", "batched_mm", "grouped_mm", "triton"])
@pytest.mark.parametrize("T", [1, 7, 64, 300])
def test_every_backend_matches_reference(backend, shape, dtype, T):
    layer = _layer(*shape, dtype)
    for seed in (1, 2):  # fresh inputs each time
        hidden, index, weights = _inputs(T, layer, seed)
        with torch.no_grad():
            out = moe_lab.experts_forward(backend, layer, hidden, index, weights)
        _check(layer, out, hidden, index, weights)


@pytest.mark.parametrize("backend", CAPTURABLE)
@pytest.mark.parametrize("T", [1, 2, 16, 128])  # triton: T=1 decode kernels, the rest sorted
def test_cuda_graph_replay_follows_new_routing(backend, T):
    layer = _layer(256, 96, 32, 8, torch.bfloat16)
    graphed = GraphedExperts(layer, backend)
    for seed in (1, 2, 3):  # capture on the first, then replay with different tokens and routing
        hidden, index, weights = _inputs(T, layer, seed)
        out = graphed(hidden, index, weights).clone()
        _check(layer, out, hidden, index, weights)


@pytest.mark.parametrize("backend", CAPTURABLE)
def test_a_captured_training_step_replays_the_gradients_of_new_inputs(backend):
    layer = _layer(256, 96, 32, 8, torch.bfloat16)
    layer.set_experts_implementation(backend)
    hidden, index, weights = _inputs(128, layer, 1)
    x, w = hidden.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    upstream = torch.randn_like(hidden)
    inputs = [x, w, layer.gate_up_proj, layer.down_proj]

    def step():
        return torch.autograd.grad(layer(x, index, w), inputs, upstream)

    captured = CapturedStep(step, name=backend)
    for seed in (2, 3):  # new tokens, routing and upstream gradient written in place, as a model would
        new_hidden, new_index, new_weights = _inputs(128, layer, seed)
        with torch.no_grad():
            x.copy_(new_hidden), index.copy_(new_index), w.copy_(new_weights), upstream.normal_()
        replayed = [grad.clone() for grad in captured.replay()]
        for got, expected in zip(replayed, step()):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the same kernels on the same inputs
        expected = reference_gradients(layer, x, index, w, upstream)
        for got, name in zip(replayed, ("hidden_states", "top_k_weights", "gate_up_proj", "down_proj")):
            assert moe_lab.relative_error(got, expected[name]) < TOLERANCE[torch.bfloat16], (backend, name)


def test_back_to_back_timing_times_each_queued_call():
    # A GPU sleep of fixed cycles, queued 20 times: every call timed on its own, about as long as one call
    # synchronised (time_fn), and resting between calls changes nothing for work that draws no power.
    from moe_lab.bench.timing import back_to_back_ms, time_fn

    def spin():
        torch.cuda._sleep(2_000_000)

    synced = time_fn(spin, device="cuda", warmup=1, min_reps=10, max_reps=10, max_seconds=60).median_ms
    queued = back_to_back_ms(spin, 20, device="cuda")
    rested = back_to_back_ms(spin, 5, device="cuda", rest_s=0.01)
    assert queued.reps == 20 and len(queued.times_ms) == 20 and queued.min_ms > 0
    assert queued.median_ms == pytest.approx(synced, rel=0.2)
    assert rested.median_ms == pytest.approx(synced, rel=0.2)


def test_back_to_back_timing_by_time_queues_at_least_its_budget():
    from moe_lab.bench.timing import time_back_to_back, time_fn

    def spin():
        torch.cuda._sleep(2_000_000)

    synced = time_fn(spin, device="cuda", warmup=1, min_reps=10, max_reps=10, max_seconds=60).median_ms
    queued = time_back_to_back(spin, device="cuda", max_seconds=0.05, min_reps=3)
    assert queued.reps >= max(3, 0.05e3 / synced * 0.8)  # about max_seconds of timed calls
    assert queued.median_ms == pytest.approx(synced, rel=0.2)


@pytest.mark.parametrize("pass_", ["forward", "forward_backward"])
@pytest.mark.parametrize("backend", ["grouped_mm", "triton"])
def test_bench_times_graph_replays_back_to_back(backend, pass_, monkeypatch):
    # The same captured work as "cuda_graph", queued without a synchronize: a row with its own timing, correct,
    # and timed by time_back_to_back (a spy), not by time_fn's synchronized calls.
    import importlib

    from moe_lab.bench import measure

    # importlib: `moe_lab.bench.measure` as an attribute is the function the package exports, not its module.
    measure_module = importlib.import_module("moe_lab.bench.measure")

    queued = []
    real = measure_module.time_back_to_back
    monkeypatch.setattr(measure_module, "time_back_to_back",
                        lambda *args, **kwargs: queued.append(1) or real(*args, **kwargs))
    rows = {execution: measure("qwen3-30b-a3b", 512, backend, device="cuda", dtype="bfloat16",
                            execution=execution, pass_=pass_, max_seconds=0.05)
            for execution in ("cuda_graph", "cuda_graph_back_to_back")}
    looped = rows["cuda_graph_back_to_back"]
    assert looped["status"] == "ok", looped["reason"]
    assert queued == [1]  # only the back-to-back row went through it
    assert looped["execution"] == "cuda_graph_back_to_back" and looped["reps"] >= 5
    assert 0.5 < looped["median_ms"] / rows["cuda_graph"]["median_ms"] < 1.5
    assert looped["tflops"] > 0


def test_a_training_step_that_waits_on_the_host_is_refused_before_capture():
    layer = _layer(256, 96, 32, 8, torch.bfloat16)
    layer.set_experts_implementation("eager")  # reads the per-expert counts on the host
    hidden, index, weights = _inputs(16, layer, 0)
    x = hidden.clone().requires_grad_(True)
    with pytest.raises(GraphCaptureError, match="eager step cannot be captured.*waits for the GPU on the host"):
        CapturedStep(lambda: torch.autograd.grad(layer(x, index, weights).sum(), [x]), name="eager step")


def test_eager_cannot_be_captured_and_says_why():
    layer = _layer(256, 96, 32, 8, torch.bfloat16)
    with pytest.raises(GraphCaptureError, match="'eager' cannot be captured"):
        GraphedExperts(layer, "eager")(*_inputs(4, layer, 0))


def test_an_undeclared_backend_that_waits_is_refused_by_trying_it():
    # A user backend says nothing about CUDA graphs: GraphedExperts finds out by running it once under
    # torch's sync debug mode (CapturedStep), refuses it before capture, and names the backends that can.
    def syncing(experts, hidden_states, top_k_index, top_k_weights):
        int(top_k_index.max())  # a device value read on the host
        return moe_lab.experts_forward("grouped_mm", experts, hidden_states, top_k_index, top_k_weights)

    moe_lab.register("test_syncing", syncing)
    try:
        layer = _layer(256, 96, 32, 8, torch.bfloat16)
        with pytest.raises(GraphCaptureError, match="backend 'test_syncing' cannot be captured in a CUDA graph: it "
                                                    "waits for the GPU on the host .*can be captured here: .*triton"):
            GraphedExperts(layer, "test_syncing")(*_inputs(4, layer, 0))
        graphed = GraphedExperts(layer, "grouped_mm")  # the process's CUDA state is still usable
        hidden, index, weights = _inputs(4, layer, 1)
        _check(layer, graphed(hidden, index, weights).clone(), hidden, index, weights)
    finally:
        moe_lab.unregister("test_syncing")


@pytest.mark.parametrize("T", [1, 16])
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("backend", CAPTURABLE)
def test_compiled_backend_follows_new_routing(backend, mode, T):
    torch._dynamo.reset()
    layer = _layer(256, 96, 32, 8, torch.bfloat16)
    layer.set_experts_implementation(backend)
    compiled = torch.compile(layer, mode=mode)
    for seed in (1, 2, 3):
        hidden, index, weights = _inputs(T, layer, seed)
        with torch.no_grad():
            out = compiled(hidden, index, weights).clone()
        _check(layer, out, hidden, index, weights)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape, T", [((512, 1024, 8, 2), 2048), ((208, 80, 60, 4), 8192)])  # ~500 rows per expert
def test_triton_prefill_tma_tiles_launched_replayed_and_compiled(shape, T, dtype):
    # Prefill-sized groups take the TMA configs; the small T of the tests above never reach them.
    H, I, E, k = shape
    assert all(config.tma for config in kernel_configs(T * k / E, interpreted=False, itemsize=dtype.itemsize))
    layer = _layer(*shape, dtype)
    layer.set_experts_implementation("triton")
    graphed = GraphedExperts(layer, "triton")
    torch._dynamo.reset()
    compiled = torch.compile(layer)
    for seed in (1, 2):
        hidden, index, weights = _inputs(T, layer, seed)
        with torch.no_grad():
            for run in (layer, graphed, compiled):
                _check(layer, run(hidden, index, weights).clone(), hidden, index, weights)


@pytest.mark.parametrize("T", [1, 12])
def test_triton_with_bias_transposed_layout_and_custom_gate(T):
    hf = pytest.importorskip("moe_lab.hf")
    pytest.importorskip("transformers")
    model = hf.tiny_transformers_model("gpt_oss", dtype=torch.bfloat16).cuda()
    experts = next(hf.experts_modules(model))
    assert experts.has_bias and experts.is_transposed and hasattr(experts, "_apply_gate")
    hidden = torch.randn(T, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
    k = model.config.num_experts_per_tok
    index, weights = moe_lab.synthetic_routing(T, experts.num_experts, k, seed=0, device="cuda")
    with torch.no_grad():
        out = moe_lab.experts_forward("triton", experts, hidden, index, weights)
    expected = moe_lab.reference_experts_forward(experts, hidden, index, weights)
    assert moe_lab.relative_error(out, expected) < 3e-2


@pytest.mark.parametrize("backend", [name for name in moe_lab.backends.builtin_backends()
                                     if moe_lab.backends.get_spec(name).partial_forward is not None] + ["auto"])
def test_partial_entries_give_absent_experts_nothing_forward_and_backward(backend):
    # Expert parallelism's ids of other ranks' experts (>= E): with every uninitialised buffer NaN, a row nobody
    # wrote reaching the output or dX would show. (tools/partial_training_ab.py captures the same step in a graph.)
    # auto has no entry of its own and runs that of the backend it chooses on the GPU.
    import torch.utils.deterministic as deterministic

    from moe_lab.backends import resolve_spec
    from moe_lab.parallel.local import run_partial_experts

    layer = _layer(256, 96, 32, 8, torch.bfloat16)
    layer.set_experts_implementation(backend)
    hidden, index, weights = _inputs(96, layer, 4)
    index = torch.where(torch.rand(index.shape, device="cuda") < 0.5, index, torch.full_like(index, 32))
    index[0] = 35  # no expert here, an id past E
    x, w = hidden.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    upstream = torch.randn_like(hidden)
    inputs = [x, w, layer.gate_up_proj, layer.down_proj]
    assert resolve_spec(backend, layer, x, 8, True).partial_forward is not None

    def step():
        output = run_partial_experts(layer, x, index, w)
        return (output,) + torch.autograd.grad(output, inputs, upstream)

    saved = torch.are_deterministic_algorithms_enabled(), deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    deterministic.fill_uninitialized_memory = True
    try:
        got = step()
    finally:
        torch.use_deterministic_algorithms(saved[0])
        deterministic.fill_uninitialized_memory = saved[1]
    absent = index >= 32
    masked_index, masked_weights = index.masked_fill(absent, 0), w.detach().masked_fill(absent, 0)
    expected = reference_gradients(layer, x, masked_index, masked_weights, upstream)
    expected["top_k_weights"] = expected["top_k_weights"].masked_fill(absent, 0)
    reference = moe_lab.reference_experts_forward(layer, x, masked_index, masked_weights)
    assert moe_lab.relative_error(got[0], reference) < TOLERANCE[torch.bfloat16], backend
    assert torch.all(got[0][0] == 0) and torch.all(got[1][0] == 0)  # output and dX of the token with none
    for value, name in zip(got[1:], ("hidden_states", "top_k_weights", "gate_up_proj", "down_proj")):
        assert moe_lab.relative_error(value, expected[name]) < TOLERANCE[torch.bfloat16], (backend, name)
    assert torch.all(got[2][absent] == 0)


@pytest.mark.parametrize("backend", [name for name in moe_lab.backends.builtin_backends()
                                     if moe_lab.backends.get_spec(name).partial_forward is not None] + ["auto"])
def test_a_captured_partial_training_step_replays_the_gradients_of_new_inputs(backend):
    # The expert-parallel rank's step through the partial entry waits on nothing: it is captured once and replays
    # the gradients of new rows, ids (absent ones among them) and weights written in place.
    from moe_lab.parallel.local import run_partial_experts

    layer = _layer(256, 96, 32, 8, torch.bfloat16)
    layer.set_experts_implementation(backend)

    def partial_inputs(seed):
        hidden, index, weights = _inputs(96, layer, seed)
        absent = torch.rand(index.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(seed)) < 0.5
        return hidden, index.masked_fill(absent, 32), weights

    hidden, index, weights = partial_inputs(1)
    x, w = hidden.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    upstream = torch.randn_like(hidden)
    inputs = [x, w, layer.gate_up_proj, layer.down_proj]

    def step():
        return torch.autograd.grad(run_partial_experts(layer, x, index, w), inputs, upstream)

    captured = CapturedStep(step, name=f"{backend}'s partial step")
    for seed in (2, 3):
        new_hidden, new_index, new_weights = partial_inputs(seed)
        with torch.no_grad():
            x.copy_(new_hidden), index.copy_(new_index), w.copy_(new_weights), upstream.normal_()
        replayed = [grad.clone() for grad in captured.replay()]
        for got, expected in zip(replayed, step()):
            torch.testing.assert_close(got, expected, rtol=0, atol=0)  # the same kernels on the same inputs
        absent = index >= 32
        expected = reference_gradients(layer, x, index.masked_fill(absent, 0), w.detach().masked_fill(absent, 0),
                                       upstream)
        expected["top_k_weights"] = expected["top_k_weights"].masked_fill(absent, 0)
        for got, name in zip(replayed, ("hidden_states", "top_k_weights", "gate_up_proj", "down_proj")):
            assert moe_lab.relative_error(got, expected[name]) < TOLERANCE[torch.bfloat16], (backend, name)
        assert torch.all(replayed[1][absent] == 0)
