"""The triton backend's backward on CPU, through triton's interpreter: every gradient against float64.

Gradients of <out, grad_out> for the hidden states, both weights, the routing weights and (where a
module has them) both biases, with transposed layouts and a module's own gate; in float32 and
bfloat16 with tolerances derived from the dtype and the reduction length (triton_grad_reference.py)
— tight enough that a low-precision computation of the same sums fails them. Tiny sizes: the
interpreter runs every program in numpy.
"""
import contextlib
import dataclasses

import pytest
import torch
from torch._dynamo.utils import counters

import moe_lab
from moe_lab.backends.common import expert_weights
from moe_lab.backends.triton_fused import LaunchPlan, backward_configs, launch_plan, triton_experts_forward, triton_path
from moe_lab.backends.triton_launch import interpreting
from moe_lab.lessons.tolerances import reference_tolerance

from triton_device import triton_device_or_skip
from triton_grad_reference import backend_gradients, gradient_tolerance, reference_gradients, rounding_unit

DEVICE = triton_device_or_skip()
TRUNCATING = interpreting()  # the interpreter rounds float32 to bfloat16 by truncation


def _layer(H=32, I=48, E=4, k=2, dtype=torch.float32, activation="silu", seed=0):
    torch.manual_seed(seed)
    config = moe_lab.MoEConfig(H, I, num_experts=E, top_k=k, dtype=dtype, activation=activation)
    return moe_lab.Experts(config, experts_implementation="triton").to(DEVICE)


def _inputs(layer, T, seed=0, distribution="uniform"):
    config = layer.config
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, config.hidden_size, generator=generator).to(DEVICE, config.dtype)
    grad_out = torch.randn(T, config.hidden_size, generator=generator).to(DEVICE, config.dtype)
    index, weights = moe_lab.synthetic_routing(T, config.num_experts, config.top_k, seed=seed, device=DEVICE,
                                               distribution=distribution)
    return hidden, index, weights, grad_out


def _check_gradients(experts, hidden, index, weights, grad_out, *, own_gate=False, plan=None, partial=False):
    """Every gradient of the triton backend within its tolerance of the float64 one; returns the errors.
    `partial`: through its partial_forward entry, where ids >= num_experts are absent; the output is checked too."""
    expected = reference_gradients(experts, hidden, index, weights, grad_out)
    out, got = backend_gradients("triton", experts, hidden, index, weights, grad_out, plan=plan, partial=partial)
    assert out.grad_fn is not None
    if partial:
        absent = index >= experts.num_experts
        reference = moe_lab.reference_experts_forward(experts, hidden, index.masked_fill(absent, 0),
                                                      weights.masked_fill(absent, 0))
        assert moe_lab.relative_error(out, reference) <= reference_tolerance(hidden.dtype)
    num_pairs, hidden_size = index.numel(), hidden.shape[1]
    reduction = max(num_pairs, hidden_size, experts.gate_up_proj.shape[-2], experts.gate_up_proj.shape[-1])
    errors = {}
    for name, reference in expected.items():
        assert got[name] is not None, f"no gradient for {name}"
        assert got[name].shape == reference.shape and got[name].dtype == _dtype_of(name, experts, weights)
        errors[name] = moe_lab.relative_error(got[name], reference)
        tolerance = gradient_tolerance(name, hidden.dtype, reduction, truncating=TRUNCATING, own_gate=own_gate)
        assert errors[name] < tolerance, f"{name}: relative error {errors[name]:.3g} > {tolerance:.3g}"
    return errors


def _dtype_of(name, experts, weights):
    return weights.dtype if name == "top_k_weights" else getattr(experts, name, experts.gate_up_proj).dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
def test_every_gradient_matches_float64(dtype, activation):
    layer = _layer(dtype=dtype, activation=activation)
    _check_gradients(layer, *_inputs(layer, 40))


def test_float16_gradients_match_float64():
    layer = _layer(dtype=torch.float16)
    _check_gradients(layer, *_inputs(layer, 24))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_long_reductions_on_one_expert(dtype):
    # "single" routing sends every token's first choice to expert 0: its weight gradients sum 160
    # rows, long enough for a bfloat16 running sum to fail the tolerance (see the test below).
    layer = _layer(H=64, I=32, E=4, k=2, dtype=dtype)
    hidden, index, weights, grad_out = _inputs(layer, 160, distribution="single")
    assert int((index == 0).sum()) == 160
    _check_gradients(layer, hidden, index, weights, grad_out)


BACKWARD_KERNELS = ("down_backward", "gate_up_input_grad", "gate_up_weight_grad", "down_weight_grad")


def _variant_plan(experts, num_tokens, top_k, dtype, *, sorted_operands: bool, tma: bool, split: bool = False):
    """The plan the backend would choose, with the backward's operand layout, TMA and the split
    down_backward switched as asked."""
    weights = expert_weights(experts)
    plan = launch_plan(num_tokens, top_k, weights.num_experts, weights.gate_up.shape[-1], weights.intermediate_size,
                       dtype, interpreted=interpreting(), needs_grad=True)
    configs = {name: dataclasses.replace(getattr(plan, name), tma=tma) for name in BACKWARD_KERNELS}
    return dataclasses.replace(plan, sorted_grad_out=sorted_operands, sorted_hidden_states=sorted_operands,
                               split_down_backward=split, **configs)


def test_backward_plan_crosses_into_the_ops_and_back_and_refuses_a_split_without_sorted_dout():
    plan = launch_plan(8192, 8, 128, 2048, 768, torch.bfloat16, interpreted=False, needs_grad=True)
    variant = dataclasses.replace(plan, sorted_grad_out=True, sorted_hidden_states=True, split_down_backward=True,
                                  down_backward=dataclasses.replace(plan.down_backward, tma=True))
    for value in (plan, variant):
        assert LaunchPlan.from_ints(value.as_ints()) == value
    with pytest.raises(ValueError, match="split_down_backward .* sorted_grad_out=True"):
        dataclasses.replace(plan, split_down_backward=True, sorted_grad_out=False)


def test_backward_configs_tell_wide_experts_from_fine_grained_ones():
    # Measured on an H200 (run 2, docs/performance_notes.md): from 64 rows per expert on, sorted operands
    # and the split down_backward won, their tiles through TMA from 256 rows per expert
    # (h200_training_plan_ab_backward_tma); mixtral-wide layers (I = 14336) at 2048 rows
    # take 256-column weight-gradient tiles and three stages for the long dX reduction.
    wide = backward_configs(2048, 4096, 14336, interpreted=False)
    fine = backward_configs(512, 2048, 768, interpreted=False)
    for configs in (wide, fine, backward_configs(256, 2048, 768, interpreted=False)):
        assert configs.sorted_grad_out and configs.sorted_hidden_states and configs.split_down_backward
        assert configs.gate_up_weight_grad.tma and configs.down_weight_grad.tma
    for rows in (34, 64, 128, 255):
        configs = backward_configs(rows, 2048, 768, interpreted=False)
        assert configs.sorted_grad_out and configs.split_down_backward
        assert not any(config.tma for config in (configs.down_backward, configs.gate_up_input_grad,
                                                 configs.gate_up_weight_grad, configs.down_weight_grad))
    assert wide.gate_up_weight_grad.block_n == 256 and fine.gate_up_weight_grad.block_n == 128
    assert wide.gate_up_input_grad.num_stages == 3 and fine.gate_up_input_grad.num_stages == 4
    few = backward_configs(16, 2048, 768, interpreted=False)  # not measured: the old layout
    assert not few.sorted_grad_out and not few.split_down_backward
    # float32 halves BLOCK_K, every other field kept
    halved = backward_configs(512, 2048, 768, interpreted=False, itemsize=4)
    assert halved.gate_up_weight_grad.block_k == fine.gate_up_weight_grad.block_k // 2
    assert halved.sorted_grad_out == fine.sorted_grad_out


@pytest.fixture
def described(monkeypatch):
    """The shapes of the tensors the launchers read through TMA descriptors during the test."""
    from moe_lab.backends import triton_kernels

    shapes = []
    real = triton_kernels.tile_descriptor
    monkeypatch.setattr(triton_kernels, "tile_descriptor",
                        lambda tensor, block: shapes.append(tuple(tensor.shape)) or real(tensor, block))
    return shapes


# Expert 0 gets 150 rows (4 whole blocks of the weight gradients' 32 and a tail of 22), the others a
# few each (a tail only), one none: TMA tiles past an expert's last row hold the next expert's rows.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("sorted_operands, tma, split", [(True, True, False), (True, False, False),
                                                         (False, True, False), (True, True, True)],
                         ids=["sorted+tma", "sorted", "tma", "sorted+tma+split"])
def test_sorted_operands_and_tma_tiles_match_float64(dtype, sorted_operands, tma, split, described, poisoned_empty):
    layer = _layer(H=64, I=32, E=6, k=2, dtype=dtype)
    hidden, index, weights, grad_out = _inputs(layer, 150, distribution="single")
    plan = _variant_plan(layer, 150, 2, dtype, sorted_operands=sorted_operands, tma=tma, split=split)
    _check_gradients(layer, hidden, index, weights, grad_out, plan=plan)
    S, H, I = 300, 64, 32
    if tma:  # each operand in sorted order through TMA, besides the weights and the forward's h
        expected = {(S, 2 * I), (S, I)} | ({(S, H)} if sorted_operands else set())
        assert expected <= set(described), described
    else:
        assert (S, 2 * I) not in described and (S, H) not in described


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [1, 7])  # T=1: the decode kernels without grad, the sorted ones with
def test_transformers_module_with_bias_transposed_layout_and_own_gate(dtype, T):
    hf = pytest.importorskip("moe_lab.hf")
    model = hf.tiny_transformers_model("gpt_oss", dtype=dtype).to(DEVICE)
    experts = next(hf.experts_modules(model))
    assert experts.has_bias and experts.is_transposed and experts._apply_gate is not None
    config = model.config
    generator = torch.Generator().manual_seed(T)
    hidden = torch.randn(T, config.hidden_size, generator=generator).to(DEVICE, dtype)
    grad_out = torch.randn(T, config.hidden_size, generator=generator).to(DEVICE, dtype)
    index, weights = moe_lab.synthetic_routing(T, experts.num_experts, config.num_experts_per_tok, seed=T,
                                               device=DEVICE)
    _check_gradients(experts, hidden, index, weights, grad_out, own_gate=True)
    # The gradients of the transposed [E, H, 2I] / [E, I, H] parameters keep their layout.
    assert experts.gate_up_proj.grad.stride() == experts.gate_up_proj.stride()
    assert experts.down_proj.grad.stride() == experts.down_proj.stride()
    # The same through the sorted operands and TMA tiles (the bias sums read the TMA tiles' rows),
    # with the fused and the split down_backward, and the forward's weights through k-major TMA tiles
    # (its own gate: gate_up writes the raw [S, 2I] projection, one tile per step)
    for split in (False, True):
        plan = _variant_plan(experts, T, config.num_experts_per_tok, dtype, sorted_operands=True, tma=True,
                             split=split)
        plan = dataclasses.replace(plan, gate_up=dataclasses.replace(plan.gate_up, tma=True),
                                   down=dataclasses.replace(plan.down, tma=True))
        _check_gradients(experts, hidden, index, weights, grad_out, own_gate=True, plan=plan)


@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
def test_transposed_storage_trains_through_tma_tiles_cut_its_own_way(split, described):
    # An is_transposed module's weights ([E, H, 2I], [E, I, H]) are K-major for the forward's GEMMs and
    # N-major for the backward's (dX, down_backward): every kernel's weight tiles are cut from that storage.
    from moe_lab.bench.inputs import TransposedStorageExperts

    E, H, I, T = 4, 64, 128, 40  # H != 2I, so each view's shape says which layout it was cut from
    layer = _layer(H=H, I=I, E=E, k=2)
    stored = TransposedStorageExperts(layer).requires_grad_(True)
    hidden, index, weights, grad_out = _inputs(layer, T)
    plan = _variant_plan(layer, T, 2, torch.float32, sorted_operands=True, tma=True, split=split)
    plan = dataclasses.replace(plan, gate_up=dataclasses.replace(plan.gate_up, tma=True),
                               down=dataclasses.replace(plan.down, tma=True))
    _check_gradients(stored, hidden, index, weights, grad_out, plan=plan)
    assert {(E * H, 2 * I), (E * I, H)} <= set(described), described  # the storage, as it is
    assert (E * 2 * I, H) not in described and (E * H, I) not in described  # never the default layout's views


@pytest.mark.parametrize("save_pre_activation", [True, False])
def test_save_and_recompute_give_the_same_gradients(save_pre_activation):
    layer = _layer()
    hidden, index, weights, grad_out = _inputs(layer, 30, distribution="zipf")
    plan = launch_plan(30, 2, 4, 32, 48, torch.float32, interpreted=interpreting(), needs_grad=True,
                       save_pre_activation=save_pre_activation)
    saved = []
    leaf = hidden.clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        out = triton_experts_forward(layer, leaf, index, weights, plan=plan)
    out.backward(grad_out)
    # Saving keeps the [S, 2I] pre-activation; recomputing keeps nothing of that size: it reruns
    # the gate_up GEMM in the backward.
    assert ((60, 96) in saved) is save_pre_activation
    other = dataclasses.replace(plan, save_pre_activation=not save_pre_activation)
    again = hidden.clone().requires_grad_(True)
    triton_experts_forward(layer, again, index, weights, plan=other).backward(grad_out)
    assert moe_lab.relative_error(leaf.grad, again.grad) < 1e-6


def test_output_requires_grad_exactly_when_an_input_does():
    layer = _layer()
    hidden, index, weights, _ = _inputs(layer, 9)
    with torch.no_grad():
        plain = moe_lab.experts_forward("triton", layer, hidden, index, weights)
    assert not plain.requires_grad
    for needs in ("hidden_states", "top_k_weights", "weights"):
        layer.requires_grad_(needs == "weights")
        x = hidden.clone().requires_grad_(needs == "hidden_states")
        w = weights.clone().requires_grad_(needs == "top_k_weights")
        out = moe_lab.experts_forward("triton", layer, x, index, w)
        assert out.requires_grad and out.grad_fn is not None, needs
        assert torch.equal(out.detach(), plain)  # the same kernels, the same numbers
    layer.requires_grad_(False)
    assert moe_lab.experts_forward("triton", layer, hidden, index, weights).grad_fn is None


def test_only_the_needed_gradients_are_computed():
    # Frozen experts (e.g. adapters trained elsewhere): the hidden states and routing weights still
    # get their gradients, the weights none.
    layer = _layer()
    layer.requires_grad_(False)
    hidden, index, weights, grad_out = _inputs(layer, 12)
    x, w = hidden.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    moe_lab.experts_forward("triton", layer, x, index, w).backward(grad_out)
    expected = reference_gradients(layer, hidden, index, weights, grad_out)
    assert layer.gate_up_proj.grad is None and layer.down_proj.grad is None
    assert moe_lab.relative_error(x.grad, expected["hidden_states"]) < 1e-5
    assert moe_lab.relative_error(w.grad, expected["top_k_weights"]) < 1e-5


def test_strided_routing_tensors_forward_and_backward():
    # Every other column of a wider routing: views whose flat [S] stride is 2. Once read as if
    # contiguous (relative error 0.4-2.3); now copied before the kernels, in both directions.
    layer = _layer()
    hidden, _, _, grad_out = _inputs(layer, 10)
    wide_index, wide_weights = moe_lab.synthetic_routing(10, 4, 4, seed=3, device=DEVICE)
    index, weights = wide_index[:, ::2], wide_weights[:, ::2]
    assert index.reshape(-1).stride() == (2,)
    with torch.no_grad():
        out = moe_lab.experts_forward("triton", layer, hidden, index, weights)
        decode = moe_lab.experts_forward("triton", layer, hidden[:1], index[:1], weights[:1])
    reference = moe_lab.reference_experts_forward(layer, hidden, index, weights)
    assert moe_lab.relative_error(out, reference) < 1e-5
    assert moe_lab.relative_error(decode, reference[:1]) < 1e-5
    _check_gradients(layer, hidden, index, weights, grad_out)


def test_single_token_trains_on_the_sorted_path():
    layer = _layer(E=8, k=2)
    assert "decode" in triton_path(1, 2, 8) and "sorted" in triton_path(1, 2, 8, needs_grad=True)
    _check_gradients(layer, *_inputs(layer, 1))


def test_experts_without_tokens_get_zero_gradients_and_zero_tokens_still_connect():
    layer = _layer(E=6)
    hidden, index, weights, grad_out = _inputs(layer, 12, distribution="single")
    _check_gradients(layer, hidden, index, weights, grad_out)
    unused = sorted(set(range(6)) - set(index.unique().tolist()))
    assert unused and not layer.gate_up_proj.grad[unused].any() and not layer.down_proj.grad[unused].any()
    for plan in (None, _variant_plan(layer, 0, 2, torch.float32, sorted_operands=True, tma=True, split=True)):
        layer.zero_grad(set_to_none=True)
        x = hidden[:0].clone().requires_grad_(True)
        out = triton_experts_forward(layer, x, index[:0], weights[:0], plan=plan)
        out.sum().backward()
        assert out.shape == (0, 32) and x.grad.shape == (0, 32)
        assert not layer.gate_up_proj.grad.any() and not layer.down_proj.grad.any()


def test_router_learns_through_the_routing_weights_in_a_sparse_moe_block():
    torch.manual_seed(0)
    block = moe_lab.SparseMoeBlock(moe_lab.MoEConfig(32, 16, num_experts=4, top_k=2)).to(DEVICE)
    hidden = torch.randn(2, 5, 32, device=DEVICE)
    grads = {}
    for backend in ("triton", "eager"):
        block.zero_grad(set_to_none=True)
        block.set_experts_implementation(backend)
        block(hidden).pow(2).sum().backward()
        grads[backend] = {name: p.grad.clone() for name, p in block.named_parameters()}
    assert set(grads["triton"]) == set(grads["eager"])
    for name, expected in grads["eager"].items():
        assert moe_lab.relative_error(grads["triton"][name], expected) < 1e-5, name
    assert grads["triton"]["router.weight"].abs().sum() > 0


def test_double_backward_is_refused_not_silently_wrong():
    layer = _layer()
    hidden, index, weights, _ = _inputs(layer, 6)
    x = hidden.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(moe_lab.experts_forward("triton", layer, x, index, weights).pow(2).sum(), x,
                                  create_graph=False)
    assert grad.shape == x.shape
    with pytest.raises(NotImplementedError, match="higher-order gradients"):
        torch.autograd.grad(moe_lab.experts_forward("triton", layer, x, index, weights).pow(2).sum(), x,
                            create_graph=True)


def test_fullgraph_compile_of_forward_and_backward_has_no_graph_breaks():
    torch._dynamo.reset()
    layer = _layer(H=32, I=16)
    hidden, index, weights, _ = _inputs(layer, 8)

    def loss(x, w):
        return layer(x, index, w).pow(2).sum()

    x, w = hidden.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    explanation = torch._dynamo.explain(loss)(x, w)
    assert explanation.graph_break_count == 0
    assert "torch.ops.moe_lab.triton_experts" in explanation.graphs[0].code  # the op with the backward
    torch._dynamo.reset()
    try:
        compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")  # the backward is traced too
        compiled(x, w).backward()
        got = (x.grad, w.grad, layer.gate_up_proj.grad, layer.down_proj.grad)
    finally:
        torch._dynamo.reset()
        counters.clear()
    x2, w2 = hidden.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    loss(x2, w2).backward()
    for a, b in zip(got, (x2.grad, w2.grad, layer.gate_up_proj.grad, layer.down_proj.grad)):
        assert torch.equal(a, b)


def test_backward_compiles_where_is_compiling_is_false_while_aot_traces_it(monkeypatch):
    # torch before ~2.12 (the GPU machine's 2.11) says is_compiling() only while dynamo traces, not
    # while AOTAutograd traces the backward formula with fake tensors: the backward then ran the
    # ops' bodies on tensors without data ("Error detected in GeneratedBackwardFor_moe_lab_triton_
    # experts_defaultBackward"). Newer torch holds the flag for the whole compile; take that away.
    monkeypatch.setattr(torch.compiler, "_compile_session_context", contextlib.nullcontext, raising=False)
    torch._dynamo.reset()
    layer = _layer(H=32, I=16)
    hidden, index, weights, grad_out = _inputs(layer, 8)
    plan = _variant_plan(layer, 8, 2, torch.float32, sorted_operands=True, tma=True, split=True)

    def loss(x, w):
        return (triton_experts_forward(layer, x, index, w, plan=plan) * grad_out).sum()

    try:
        x, w = hidden.clone().requires_grad_(True), weights.clone().requires_grad_(True)
        torch.compile(loss, fullgraph=True, backend="aot_eager")(x, w).backward()
    finally:
        torch._dynamo.reset()
        counters.clear()
    _, expected = backend_gradients("triton", layer, hidden, index, weights, grad_out, plan=plan)
    assert torch.equal(x.grad, expected["hidden_states"]) and torch.equal(w.grad, expected["top_k_weights"])


def test_backward_steps_on_fake_tensors_go_through_the_ops():
    # What AOTAutograd hands a backward formula while tracing: tensors without data. The step must
    # reach the op's fake (shapes only), never a kernel launch.
    from torch._subclasses.fake_tensor import FakeTensorMode

    from moe_lab.backends import triton_autograd

    layer = _layer(H=32, I=16)
    hidden, index, weights, grad_out = _inputs(layer, 8)
    sorted_pair, counts = triton_autograd._sort_pairs(index.reshape(-1), 4, "one_program")
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fakes = [mode.from_tensor(t) for t in (grad_out, layer.down_proj.detach(), weights.reshape(-1),
                                               torch.empty(16, 32), sorted_pair, counts)]
        d_pre, weighted_h, dw = triton_autograd._call(triton_autograd.down_backward_op, *fakes, 2, "silu",
                                                      [16, 64, 64, 1, 1, 8, 0], None, False)
    assert (d_pre.shape, weighted_h.shape, dw.shape) == ((16, 32), (16, 16), (16,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tolerance_rejects_low_precision_references(dtype):
    # A weight gradient is a sum over an expert's rows of outer products, accumulated in float32 by
    # the kernels. The same sum over 160 rows (test_long_reductions_on_one_expert) with one more
    # low-precision step — a bfloat16 running sum rounded as this machine's triton rounds, or
    # float32 products of TF32-rounded operands — misses the tolerance the kernels are held to.
    rows = 160
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(rows, 32, generator=generator).to(dtype).double()
    right = torch.randn(rows, 32, generator=generator).to(dtype).double()
    exact = left.T @ right
    if dtype == torch.bfloat16:
        low = torch.zeros(32, 32, dtype=torch.float64)
        for row in range(rows):
            low = _to_bfloat16(low + torch.outer(left[row], right[row]), truncate=TRUNCATING)
    else:
        low = _to_tf32(left).T @ _to_tf32(right)
    tolerance = gradient_tolerance("gate_up_proj", dtype, rows, truncating=TRUNCATING)
    assert moe_lab.relative_error(low, exact) > tolerance


def _to_bfloat16(t, truncate):
    if not truncate:
        return t.to(torch.bfloat16).double()
    bits = t.float().view(torch.int32) & ~0xFFFF  # drop the 16 low bits, as the interpreter does
    return bits.view(torch.float32).double()


def _to_tf32(t):
    bits = (t.float().view(torch.int32) + 0x1000) & ~0x1FFF  # 10 explicit significand bits, rounded
    return bits.view(torch.float32).double()


@pytest.mark.skipif(not TRUNCATING, reason="only triton's interpreter truncates")
def test_interpreter_truncates_bfloat16():
    # Why the CPU tolerances allow a whole bfloat16 ulp per rounding (rounding_unit).
    import triton
    import triton.language as tl

    @triton.jit
    def to_bfloat16(x_ptr, y_ptr, N: tl.constexpr):
        offsets = tl.arange(0, N)
        tl.store(y_ptr + offsets, tl.load(x_ptr + offsets).to(tl.bfloat16))

    x = torch.randn(256, generator=torch.Generator().manual_seed(0))
    y = torch.empty(256, dtype=torch.bfloat16)
    to_bfloat16[(1,)](x, y, N=256)
    assert torch.equal(y.float(), _to_bfloat16(x, truncate=True).float())
    assert rounding_unit(torch.bfloat16, truncating=True) == 2 * rounding_unit(torch.bfloat16, truncating=False)


def test_the_split_down_backward_writes_every_pairs_routing_gradient_and_zero_for_an_absent_expert():
    # Its routing-weight gradient is allocated empty: pairs of an out-of-range expert id (another rank's,
    # in transformers' expert parallelism) sort after every expert and must get 0, the others the fused result.
    from moe_lab.backends.triton_backward import launch_down_backward, launch_down_backward_split, sorted_rows
    from moe_lab.backends.triton_launch import sort_pairs

    layer = _layer(H=32, I=16, E=4, k=2)
    hidden, index, weights, grad_out = _inputs(layer, 24)
    index = index.clone()
    index[::3, 1] = 4
    absent = (index == 4).reshape(-1)
    sorted_pair, counts = sort_pairs(index, 4)
    config = launch_plan(24, 2, 4, 32, 16, torch.float32, interpreted=interpreting(), needs_grad=True).down_backward
    saved = torch.randn(index.numel(), 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)  # a pre-activation
    down, flat_weights = layer.down_proj.detach(), weights.reshape(-1)
    torch.full((4096,), float("nan"), device=DEVICE)  # freed garbage an empty buffer may be handed
    _, _, split_dw = launch_down_backward_split(sorted_rows(grad_out, sorted_pair, 2), down, flat_weights, saved,
                                                sorted_pair, counts, 2, "silu", config)
    _, _, fused_dw = launch_down_backward(grad_out, down, flat_weights, saved, sorted_pair, counts, 2, "silu", config)
    assert torch.all(split_dw[absent] == 0) and torch.all(fused_dw[absent] == 0)
    torch.testing.assert_close(split_dw[~absent], fused_dw[~absent], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("plan_variant", ["plan", "fused", "split"])
def test_absent_slots_contribute_nothing_to_the_output_or_any_gradient(plan_variant, poisoned_empty):
    # Expert parallelism hands a rank the ids of other ranks' experts as ids >= num_experts (transformers'
    # sentinels, moe_lab's gathered layer). Their pairs sort last and no kernel writes their rows, yet the
    # top-k sums (output, dX) meet those rows, and the weight gradients' TMA tiles read them past the last
    # expert's: whatever they hold (NaN here: poisoned_empty) must not reach a sum, on either side of a
    # product (0 * NaN is NaN). The reference: those slots contribute nothing; their routing gradient is 0.
    layer = _layer(H=64, I=32, E=6, k=2)
    hidden, index, weights, grad_out = _inputs(layer, 150, distribution="single")
    index = index.clone()
    index[::4, 1] = 6
    index[5] = torch.tensor([6, 9])  # a token with no expert here: output and dX exactly 0
    plan = None if plan_variant == "plan" else _variant_plan(layer, 150, 2, torch.float32, sorted_operands=True,
                                                              tma=True, split=plan_variant == "split")
    _check_gradients(layer, hidden, index, weights, grad_out, plan=plan, partial=True)
    _, got = backend_gradients("triton", layer, hidden, index, weights, grad_out, plan=plan, partial=True)
    assert torch.all(got["top_k_weights"][index >= 6] == 0)
    assert torch.all(got["hidden_states"][5] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_absent_slots_with_biases_transposed_layout_and_own_gate(dtype, poisoned_empty):
    # gpt-oss's module: the down bias's routing-gradient term must skip absent slots too (it indexes the bias
    # by expert id), and the module's own gate runs on rows no kernel wrote.
    hf = pytest.importorskip("moe_lab.hf")
    model = hf.tiny_transformers_model("gpt_oss", dtype=dtype).to(DEVICE)
    experts = next(hf.experts_modules(model))
    T, k, E = 9, model.config.num_experts_per_tok, experts.num_experts
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(T, model.config.hidden_size, generator=generator).to(DEVICE, dtype)
    grad_out = torch.randn(T, model.config.hidden_size, generator=generator).to(DEVICE, dtype)
    index, weights = moe_lab.synthetic_routing(T, E, k, seed=3, device=DEVICE)
    index = index.clone()
    index[::3, 0] = E
    index[4] = E
    _check_gradients(experts, hidden, index, weights, grad_out, own_gate=True, partial=True)


