"""The triton backend's training path on a CUDA GPU: compiled kernels, TMA tiles, torch.compile and
CUDA graphs. Skipped without CUDA (conftest.py); run with `pytest tests/test_triton_gpu.py`.

- every gradient in bfloat16 against float64 on every preset's shape (scaled down to H=256, same
  experts, top_k and I/H), at a decode-sized T and at 256 rows per expert, where the plan takes TMA
  tiles on Hopper and later;
- torch.compile(fullgraph=True) of a forward and backward: zero graph breaks, the same gradients;
- a whole training step of a SparseMoeBlock (router, experts, backward, SGD step) captured in a CUDA
  graph and replayed on new inputs, equal to the same step launched; no host sync anywhere in it.
"""
import copy
import dataclasses
import traceback
from collections import Counter

import pytest
import torch

import moe_lab
from moe_lab.backends import triton_launch
from moe_lab.backends.triton_fused import launch_plan, triton_experts_forward

from triton_grad_reference import backend_gradients, gradient_tolerance, reference_gradients

pytestmark = pytest.mark.gpu
DEVICE = "cuda"


def _scaled_layer(preset, dtype=torch.bfloat16, hidden_size=256):
    config = moe_lab.scale_down(preset, hidden_size, dtype=dtype)
    torch.manual_seed(0)
    return moe_lab.Experts(config, experts_implementation="triton").to(DEVICE)


def _inputs(layer, num_tokens, seed=0):
    config = layer.config
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, config.hidden_size, generator=generator).to(DEVICE, config.dtype)
    grad_out = torch.randn(num_tokens, config.hidden_size, generator=generator).to(DEVICE, config.dtype)
    index, weights = moe_lab.synthetic_routing(num_tokens, config.num_experts, config.top_k, seed=seed, device=DEVICE)
    return hidden, index, weights, grad_out


def _tokens_for_rows_per_expert(config, rows):
    return rows * config.num_experts // config.top_k


@pytest.mark.parametrize("preset", list(moe_lab.PRESETS))
@pytest.mark.parametrize("regime", ["decode_sized", "tma_tiles"])
def test_bf16_gradients_on_every_preset_shape(preset, regime):
    layer = _scaled_layer(preset)
    config = layer.config
    T = 2 if regime == "decode_sized" else _tokens_for_rows_per_expert(config, 256)
    hidden, index, weights, grad_out = _inputs(layer, T)
    expected = reference_gradients(layer, hidden, index, weights, grad_out)
    out, got = backend_gradients("triton", layer, hidden, index, weights, grad_out)
    assert out.grad_fn is not None
    reduction = max(index.numel(), config.hidden_size, 2 * config.intermediate_size)
    for name, reference in expected.items():
        error = moe_lab.relative_error(got[name], reference)
        tolerance = gradient_tolerance(name, torch.bfloat16, reduction, truncating=False)
        assert error < tolerance, f"{preset} T={T} {name}: {error:.3g} > {tolerance:.3g}"


def test_float32_gradients_stay_float32():
    # INPUT_PRECISION="ieee": no TF32 anywhere, so the float32 tolerance (which TF32 misses) holds.
    layer = _scaled_layer("qwen3-30b-a3b", dtype=torch.float32)
    hidden, index, weights, grad_out = _inputs(layer, _tokens_for_rows_per_expert(layer.config, 256))
    expected = reference_gradients(layer, hidden, index, weights, grad_out)
    _, got = backend_gradients("triton", layer, hidden, index, weights, grad_out)
    for name, reference in expected.items():
        tolerance = gradient_tolerance(name, torch.float32, index.numel(), truncating=False)
        assert moe_lab.relative_error(got[name], reference) < tolerance, name


BACKWARD_KERNELS = ("down_backward", "gate_up_input_grad", "gate_up_weight_grad", "down_weight_grad")


def _training_plan(layer, num_tokens):
    c = layer.config
    return launch_plan(num_tokens, c.top_k, c.num_experts, c.hidden_size, c.intermediate_size, c.dtype,
                       interpreted=False, needs_grad=True)


def _variant_plan(layer, num_tokens, *, sorted_operands=True, tma=True, split=False):
    """The plan the backend would choose, with the backward's operand layout, TMA and the split
    down_backward switched as asked."""
    plan = _training_plan(layer, num_tokens)
    configs = {name: dataclasses.replace(getattr(plan, name), tma=tma) for name in BACKWARD_KERNELS}
    return dataclasses.replace(plan, sorted_grad_out=sorted_operands, sorted_hidden_states=sorted_operands,
                               split_down_backward=split, **configs)


@pytest.mark.parametrize("preset", list(moe_lab.PRESETS))
@pytest.mark.parametrize("split", [False, True], ids=["fused", "split"])
def test_sorted_operands_and_tma_tiles_on_every_preset_shape(preset, split):
    # The backward's variants that gather dout and x into sorted order once and read every row
    # operand through TMA tiles, with down_backward fused or split in two (tools/tune_triton.py
    # measures them against the default)
    layer = _scaled_layer(preset)
    config = layer.config
    T = _tokens_for_rows_per_expert(config, 256) + 5  # + 5: experts' rows not a multiple of any block
    hidden, index, weights, grad_out = _inputs(layer, T)
    expected = reference_gradients(layer, hidden, index, weights, grad_out)
    plan = _variant_plan(layer, T, split=split)
    _, got = backend_gradients("triton", layer, hidden, index, weights, grad_out, plan=plan)
    reduction = max(index.numel(), config.hidden_size, 2 * config.intermediate_size)
    for name, reference in expected.items():
        error = moe_lab.relative_error(got[name], reference)
        tolerance = gradient_tolerance(name, torch.bfloat16, reduction, truncating=False)
        assert error < tolerance, f"{preset} T={T} {name}: {error:.3g} > {tolerance:.3g}"


def test_backward_kernels_take_tma_tiles_where_the_plan_asks(monkeypatch):
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA tiles need Hopper or later")
    layer = _scaled_layer("qwen3-30b-a3b")
    c = layer.config
    T = _tokens_for_rows_per_expert(c, 256)
    hidden, index, weights, grad_out = _inputs(layer, T)
    used, described = [], []
    real_launch = triton_launch.grid_launch
    monkeypatch.setattr(triton_launch, "grid_launch", lambda kernel, *args, **kwargs: used.append(
        (kernel.fn.__name__, kwargs["USE_TMA"], kwargs.get("DOUT_TMA"))) or real_launch(kernel, *args, **kwargs))
    from moe_lab.backends import triton_backward, triton_kernels
    monkeypatch.setattr(triton_backward, "grid_launch", triton_launch.grid_launch)
    real_descriptor = triton_kernels.tile_descriptor
    # Only activations are counted: a weight's descriptor views it as [E*rows, cols], which can have the shape
    # of an activation (down_proj [E*H, I] is [S, I] when S = E*H, as at 256 rows per expert with H = 256).
    weight_storages = {layer.gate_up_proj.untyped_storage().data_ptr(), layer.down_proj.untyped_storage().data_ptr()}

    def counting_descriptor(tensor, block):
        if tensor.untyped_storage().data_ptr() not in weight_storages:
            described.append(tuple(tensor.shape))
        return real_descriptor(tensor, block)

    monkeypatch.setattr(triton_kernels, "tile_descriptor", counting_descriptor)
    # the fused down_backward, first with dout / x gathered by token, then in sorted order through TMA
    for plan in (_variant_plan(layer, T, sorted_operands=False, tma=False), _variant_plan(layer, T)):
        used.clear()
        described.clear()
        backend_gradients("triton", layer, hidden, index, weights, grad_out, plan=plan)
        # forward gate_up and down, down_backward, and the input gradient (down_kernel, K-major weights)
        assert [name for name, *_ in used] == ["gate_up_kernel", "down_kernel", "down_backward_kernel", "down_kernel"]
        asked = [plan.gate_up.tma, plan.down.tma, plan.down_backward.tma, plan.gate_up_input_grad.tma]
        assert [tma for _, tma, _ in used] == asked, used
        assert used[2][2] == (plan.down_backward.tma and plan.sorted_grad_out), used  # dout's tiles
    # The variant: the sorted dout (down_backward, dW_down) and x (dW_gate_up), d_pre (dX, dW_gate_up)
    # and weight * h (dW_down), each [S, *], described for TMA
    S, H, I = T * c.top_k, c.hidden_size, c.intermediate_size
    counted = Counter(described)
    assert counted[S, H] == 3 and counted[S, 2 * I] == 2, counted
    assert counted[S, I] == 1 + plan.down.tma, counted  # and the forward's h [S, I] when its down kernel takes TMA


@pytest.mark.parametrize("save_pre_activation", [True, False])
def test_save_and_recompute_agree(save_pre_activation):
    layer = _scaled_layer("olmoe-1b-7b")
    config = layer.config
    T = _tokens_for_rows_per_expert(config, 256)
    hidden, index, weights, grad_out = _inputs(layer, T)
    grads = []
    for save in (save_pre_activation, not save_pre_activation):
        plan = launch_plan(T, config.top_k, config.num_experts, config.hidden_size, config.intermediate_size,
                           config.dtype, interpreted=False, needs_grad=True, save_pre_activation=save)
        x = hidden.clone().requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        triton_experts_forward(layer, x, index, weights, plan=plan).backward(grad_out)
        grads.append((x.grad, layer.gate_up_proj.grad, layer.down_proj.grad))
    for a, b in zip(*grads):
        assert moe_lab.relative_error(a, b) < 1e-2  # bf16; the recomputed pre-activation may round apart


@pytest.mark.parametrize("variants", [False, True], ids=["plan", "sorted+tma+split"])
def test_fullgraph_compile_of_forward_and_backward(variants):
    torch._dynamo.reset()
    layer = _scaled_layer("qwen3-30b-a3b")
    hidden, index, weights, grad_out = _inputs(layer, 512)
    plan = _variant_plan(layer, 512, split=True) if variants else None

    def loss(x, w):
        out = layer(x, index, w) if plan is None else triton_experts_forward(layer, x, index, w, plan=plan)
        return (out.float() * grad_out.float()).sum()

    x, w = hidden.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    assert torch._dynamo.explain(loss)(x, w).graph_break_count == 0
    torch._dynamo.reset()
    try:
        torch.compile(loss, fullgraph=True)(x, w).backward()
        got = [x.grad, w.grad, layer.gate_up_proj.grad, layer.down_proj.grad]
    except Exception as error:  # noqa: BLE001 - inductor's messages are long: say all of it, first
        pytest.fail(_whole_error(error))
    finally:
        torch._dynamo.reset()
    x2, w2 = hidden.clone().requires_grad_(True), weights.clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    loss(x2, w2).backward()
    for a, b in zip(got, [x2.grad, w2.grad, layer.gate_up_proj.grad, layer.down_proj.grad]):
        assert moe_lab.relative_error(a, b) < 1e-6  # the same kernels; only the glue around them is compiled


def test_training_step_is_sync_free_and_capturable_in_a_cuda_graph():
    config = moe_lab.scale_down("qwen3-30b-a3b", 256, dtype=torch.bfloat16)
    torch.manual_seed(0)
    block = moe_lab.SparseMoeBlock(config, experts_implementation="triton").to(DEVICE)
    optimizer = torch.optim.SGD(block.parameters(), lr=1e-2)
    static_x = torch.randn(1024, config.hidden_size, device=DEVICE, dtype=config.dtype)

    def step():
        loss = block(static_x).float().pow(2).mean()
        loss.backward()
        optimizer.step()
        return loss

    torch.cuda.set_sync_debug_mode("error")  # any host sync in the forward or backward raises
    try:
        optimizer.zero_grad(set_to_none=True)
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch's docs ask
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph):
        static_loss = step()

    launched = copy.deepcopy(block)  # the same state, stepped without the graph
    launched_optimizer = torch.optim.SGD(launched.parameters(), lr=1e-2)
    new_x = torch.randn_like(static_x)
    static_x.copy_(new_x)
    graph.replay()
    launched_optimizer.zero_grad(set_to_none=True)
    launched_loss = launched(new_x).float().pow(2).mean()
    launched_loss.backward()
    launched_optimizer.step()
    torch.cuda.synchronize()
    # moe_lab's kernels are deterministic, but cuBLAS may pick another algorithm for the router's
    # matmul inside a capture: equal up to bfloat16 rounding, and far from any stale-input replay.
    assert moe_lab.relative_error(static_loss, launched_loss) < 1e-2
    for (name, replayed), stepped in zip(block.named_parameters(), launched.parameters()):
        assert moe_lab.relative_error(replayed.grad, stepped.grad) < 2e-2, name
        assert moe_lab.relative_error(replayed, stepped) < 1e-2, name


def _whole_error(error: BaseException, frames: int = 12) -> str:
    """Every exception in the chain (type and full message), then the innermost one's last frames:
    a compile failure's cause sits at the bottom of a very long report that tools cut off."""
    chain = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    lines = [f"{type(e).__module__}.{type(e).__qualname__}: {e}" for e in chain]
    innermost = chain[-1]
    lines += ["innermost traceback:"] + [f"  {frame.filename}:{frame.lineno} in {frame.name}: {frame.line}"
                                         for frame in traceback.extract_tb(innermost.__traceback__)[-frames:]]
    return "\n".join(lines)
