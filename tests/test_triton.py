"""The triton backend on CPU, through triton's interpreter (moe_lab switches it on when there is
no CUDA GPU). Same kernels as on the GPU; numpy instead of PTX, so sizes stay tiny.
"""
import dataclasses

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moe_lab
from moe_lab.backends import get_spec
from moe_lab.backends.triton_launch import interpreting
from moe_lab.backends.triton_fused import (
    fused_activation,
    kernel_configs,
    launch_plan,
    triton_experts_forward,
    triton_path,
    triton_status,
    uses_decode_path,
)

from triton_device import triton_device_or_skip

DEVICE = triton_device_or_skip()

TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 3e-3, torch.float32: 1e-5}


def _case(H, I, E, k, T, dtype, activation="silu", distribution="uniform", seed=0):
    torch.manual_seed(seed)
    config = moe_lab.MoEConfig(H, I, num_experts=E, top_k=k, dtype=dtype, activation=activation)
    layer = moe_lab.Experts(config).to(DEVICE)
    hidden = torch.randn(T, H, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)
    index, weights = moe_lab.synthetic_routing(T, E, k, seed=seed, device=DEVICE, distribution=distribution)
    return layer, hidden, index, weights


def _error(layer, hidden, index, weights):
    # Without a gradient: the inference path, where T=1 takes the decode kernels (a call that needs gradients
    # never does: the module's weights require grad, so under grad mode this would test the sorted path).
    with torch.no_grad():
        out = moe_lab.experts_forward("triton", layer, hidden, index, weights)
    assert out.shape == hidden.shape and out.dtype == hidden.dtype
    return moe_lab.relative_error(out, moe_lab.reference_experts_forward(layer, hidden, index, weights))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("T", [1, 5])  # the decode kernels, then the sorted ones
def test_matches_reference_per_dtype_and_activation(dtype, activation, T):
    case = _case(32, 16, 8, 3, T, dtype, activation)
    assert uses_decode_path(T, 3, 8) == (T == 1)
    assert fused_activation(case[0]) == activation  # the kernel applies it, not torch
    assert _error(*case) < TOLERANCE[dtype]


def test_decode_and_sorted_paths_agree_where_both_could_run():
    # 64 experts, k=2: T=8 (16 pairs = E/4) is decode, T=9 (18 pairs) sorted; same tokens, same layer.
    layer, hidden, index, weights = _case(48, 32, 64, 2, 9, torch.float32)
    assert uses_decode_path(8, 2, 64) and not uses_decode_path(9, 2, 64)
    assert not uses_decode_path(8, 2, 64, hidden_size=4096)  # wide experts: sorted from T=2
    assert "decode" in triton_path(8, 2, 64) and "sorted" in triton_path(9, 2, 64)
    with torch.no_grad():
        decoded = moe_lab.experts_forward("triton", layer, hidden[:8], index[:8], weights[:8])
        sorted_ = moe_lab.experts_forward("triton", layer, hidden, index, weights)[:8]
    torch.testing.assert_close(decoded, sorted_, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("hidden, intermediate, top_k", [(2048, 40, 2), (24, 1408, 1), (24, 2100, 1)])
def test_decode_kernels_with_the_gpu_tiles(hidden, intermediate, top_k):
    # The GPU plan's decode tiles are whole rows (BLOCK_K up to 2048) of 2-8 rows: wider than these layers'
    # K (I=40, H=24), I=1408 takes one 2048-wide step for down, I=2100 three 1024-wide ones with a masked
    # tail. The interpreter runs the same kernels.
    from moe_lab.backends.triton_plan import decode_configs

    # (one slot where I is wide: each row of gate_up is its own program in the interpreter)
    layer, hidden_states, index, weights = _case(hidden, intermediate, 4, top_k, 1, torch.float32)
    gpu_gate_up, gpu_down = decode_configs(hidden, intermediate, interpreted=False)
    plan = dataclasses.replace(launch_plan(1, top_k, 4, hidden, intermediate, torch.float32, interpreted=interpreting()),
                               decode_gate_up=gpu_gate_up, decode_down=gpu_down)
    assert plan.decode
    with torch.no_grad():
        out = triton_experts_forward(layer, hidden_states, index, weights, plan=plan)
    assert moe_lab.relative_error(out, moe_lab.reference_experts_forward(layer, hidden_states, index, weights)) < 1e-5


# (2100, 1100): gpt-oss's own branch of the rule (gate_up N blocks of 64 over 2I = 2200, down N blocks of 16 over
# H = 2100 with 8 warps), both with a partial last N block; the others the narrowest branch.
@pytest.mark.parametrize("hidden, intermediate", [(24, 40), (300, 24), (24, 600), (2100, 1100)])
def test_decode_kernels_with_the_gpu_tiles_on_transposed_storage(hidden, intermediate, monkeypatch):
    # gpt-oss stores [E, H, 2I] / [E, I, H]: the plan reads that off the weights' strides and takes tiles that span
    # the contiguous N, 256 rows of K a step for gate_up and 512 for down: K=300, 600, 1100 and 2100 leave a masked
    # tail, K=24 and K=40 one mostly masked step. Biases and gpt-oss's own gate (N = 2I raw rows) as in the model.
    hf = pytest.importorskip("moe_lab.hf")
    from moe_lab.backends import triton_fused
    from moe_lab.backends.common import expert_weights

    model = hf.tiny_transformers_model("gpt_oss", hidden_size=hidden, intermediate_size=intermediate,
                                       num_hidden_layers=1, layer_types=["full_attention"]).to(DEVICE)
    experts = next(hf.experts_modules(model))
    assert experts.is_transposed and triton_fused.weights_transposed(expert_weights(experts).gate_up)
    E, k = experts.num_experts, model.config.num_experts_per_tok
    gpu = launch_plan(1, k, E, hidden, intermediate, torch.float32, interpreted=False, transposed=True)
    rows = launch_plan(1, k, E, hidden, intermediate, torch.float32, interpreted=False)
    assert (gpu.decode_gate_up, gpu.decode_down) != (rows.decode_gate_up, rows.decode_down)
    if hidden == 2100:  # the branch this shape is here for
        assert (gpu.decode_gate_up.block_n, gpu.decode_down.block_n) == (64, 16)
    plan = dataclasses.replace(launch_plan(1, k, E, hidden, intermediate, torch.float32, interpreted=interpreting()),
                               decode_gate_up=gpu.decode_gate_up, decode_down=gpu.decode_down)
    hidden_states = torch.randn(1, hidden, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    index, weights = moe_lab.synthetic_routing(1, E, k, seed=0, device=DEVICE)
    reference = moe_lab.reference_experts_forward(experts, hidden_states, index, weights)
    asked = []
    real_plan = triton_fused.launch_plan
    monkeypatch.setattr(triton_fused, "launch_plan",
                        lambda *a, **kw: asked.append(kw.get("transposed", False)) or real_plan(*a, **kw))
    with torch.no_grad():
        out = triton_experts_forward(experts, hidden_states, index, weights, plan=plan)
        assert moe_lab.relative_error(out, reference) < 1e-5
        # The plan it chooses itself (the interpreter's small tiles: on the wide shape, half a minute of numpy for
        # what the small shapes already show).
        if hidden < 2048:
            moe_lab.experts_forward("triton", experts, hidden_states, index, weights)
            assert asked == [True]


@pytest.mark.parametrize("distribution", ["uniform", "zipf", "single"])  # "single": all on one expert
def test_block_layout_with_skewed_and_empty_experts(distribution):
    # 40 tokens x 2 slots into 6 experts: blocks of 16 rows straddle nothing, empty experts cost nothing.
    assert _error(*_case(32, 48, 6, 2, 40, torch.float32, distribution=distribution)) < 1e-5


def test_odd_sizes_are_masked():
    # H=24 and I=40 are not multiples of any tile size; 17 experts is not a power of two.
    assert _error(*_case(24, 40, 17, 5, 9, torch.float32)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(32, 48, 6, 2, 40), (24, 40, 17, 5, 9)])  # aligned; odd sizes, masked tails
def test_tma_tiles_match_the_reference(monkeypatch, dtype, shape):
    # The interpreter emulates TMA descriptors, so the USE_TMA kernels (weights, and down's h rows,
    # as tiles that may run past an expert's rows) are checked here as on a Hopper GPU.
    from moe_lab.backends import triton_launch

    H, I, E, k, T = shape
    layer, hidden, index, weights = _case(H, I, E, k, T, dtype, distribution="zipf")
    plan = _plan_with_tma(layer, T, dtype, tma=True)
    launched = []
    real_launch = triton_launch.grid_launch
    monkeypatch.setattr(triton_launch, "grid_launch", lambda *args, **kwargs: launched.append(kwargs["USE_TMA"])
                        or real_launch(*args, **kwargs))
    out = triton_experts_forward(layer, hidden, index, weights, plan=plan)
    reference = moe_lab.reference_experts_forward(layer, hidden, index, weights)
    assert moe_lab.relative_error(out, reference) < TOLERANCE[dtype]
    # TMA needs 16-byte rows: even H=24, I=40 in bf16 qualify, so both kernels ran on descriptors.
    assert launched == [True, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_storage_reads_k_major_tma_tiles(monkeypatch, dtype):
    # transformers' is_transposed modules (gpt-oss) store gate_up [E, H, 2I] and down [E, I, H]: N, not K,
    # is the contiguous dimension, so both kernels' weight tiles are cut [BLOCK_K, BLOCK_N] from that storage.
    from moe_lab.backends import triton_launch
    from moe_lab.bench.inputs import TransposedStorageExperts

    # H and I multiples of every BLOCK_K the plans take (a k-major tile must not reach the next expert)
    layer, hidden, index, weights = _case(128, 128, 4, 2, 20, dtype, distribution="zipf")
    stored = TransposedStorageExperts(layer)
    plan = _plan_with_tma(layer, 20, dtype, tma=True)
    launched = []
    real_launch = triton_launch.grid_launch
    monkeypatch.setattr(triton_launch, "grid_launch", lambda *args, **kwargs: launched.append(
        (kwargs["USE_TMA"], kwargs["W_TILE_KN"])) or real_launch(*args, **kwargs))
    with torch.no_grad():
        out = triton_experts_forward(stored, hidden, index, weights, plan=plan)
        reference = moe_lab.reference_experts_forward(layer, hidden, index, weights)
        assert moe_lab.relative_error(out, reference) < TOLERANCE[dtype]
        assert launched == [(True, True), (True, True)]
        # the same tiles' values as the default layout's row-major tiles, transposed: the same result
        default = triton_experts_forward(layer, hidden, index, weights, plan=plan)
    assert launched[2:] == [(True, False), (True, False)]
    assert torch.equal(out, default)


@pytest.mark.parametrize("tokens", [1, 4])  # 1: the plan would decode; the partial entry sorts anyway
@pytest.mark.parametrize("module", ["moe_lab", "gpt_oss"])  # gpt-oss: biases, transposed weights, its own gate
def test_the_partial_entry_gives_out_of_range_ids_nothing(tokens, module, poisoned_empty):
    # Expert parallelism hands a rank the ids of other ranks' experts as ids >= E (transformers' sentinels,
    # the gathered layer's E/w): no kernel may read weights past the last expert or sum a row it never wrote.
    if module == "gpt_oss":
        hf = pytest.importorskip("moe_lab.hf")
        model = hf.tiny_transformers_model("gpt_oss").to(DEVICE)
        layer = next(hf.experts_modules(model))
        E, H, k = layer.num_experts, model.config.hidden_size, 2
    else:
        E, H, k = 6, 32, 3
        layer = moe_lab.Experts(moe_lab.MoEConfig(H, 16, num_experts=E, top_k=k), experts_implementation="triton")
        layer = layer.to(DEVICE)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(tokens, H, generator=generator).to(DEVICE)
    index = torch.stack([torch.randperm(E, generator=generator)[:k] for _ in range(tokens)]).to(DEVICE)
    index[0, 0] = E + 5  # any id past the last expert
    if tokens > 1:
        index[1] = E  # no expert here: exactly zero
    weights = torch.rand(tokens, k, generator=generator).to(DEVICE)
    assert triton_path(tokens, k, E, hidden_size=H).startswith("decode") == (tokens == 1)
    with torch.no_grad():
        out = get_spec("triton").partial_forward(layer, hidden, index, weights)
    absent = index >= E
    reference = moe_lab.reference_experts_forward(layer, hidden, index.masked_fill(absent, 0),
                                                  weights.masked_fill(absent, 0))
    assert moe_lab.relative_error(out, reference) < TOLERANCE[torch.float32]
    if tokens > 1:
        assert torch.all(out[1] == 0)


def _plan_with_tma(layer, num_tokens, dtype, tma: bool):
    config = layer.config
    plan = launch_plan(num_tokens, config.top_k, config.num_experts, config.hidden_size, config.intermediate_size,
                       dtype, interpreted=interpreting())
    return dataclasses.replace(plan, gate_up=dataclasses.replace(plan.gate_up, tma=tma),
                               down=dataclasses.replace(plan.down, tma=tma))


@pytest.mark.parametrize("num_experts", [1, 2, 7, 128])
def test_expert_counts_histogram_equals_the_scatter_count(num_experts):
    # histc's equal-width bins over [0, E-1] must put id e in bin e, the last id included.
    from moe_lab.backends.common import expert_counts

    index = torch.randint(0, num_experts, (300, 1), generator=torch.Generator().manual_seed(num_experts))
    index[0, 0] = num_experts - 1
    counts = expert_counts(index.reshape(-1).to(torch.int32).to(DEVICE), num_experts)
    assert counts.shape == (num_experts,)
    assert counts.long().cpu().tolist() == moe_lab.tokens_per_expert(index, num_experts).tolist()


@pytest.mark.parametrize("num_tokens, top_k, num_experts, distribution, method", [
    (2, 8, 128, "uniform", None),  # 16 pairs: the smallest one-program block
    (37, 4, 60, "zipf", None),  # 148 pairs padded to 256, 60 experts padded to 64 histogram bins
    (64, 8, 8, "single", None),  # every pair on one expert
    (256, 8, 64, "zipf", None),  # 2048 pairs: the largest one-program sort
    (257, 8, 64, "uniform", None),  # one token more: the block sort, 3 blocks, the last one partial
    (300, 4, 7, "single", None),  # blocks where every pair has the same expert
    (37, 4, 60, "zipf", "blocks"),  # one partial block
    (257, 8, 64, "uniform", "torch"),  # torch's sort and histogram, kept to measure the others against
])
def test_sort_pairs_is_a_stable_sort_by_expert_with_counts(num_tokens, top_k, num_experts, distribution, method):
    from moe_lab.backends.triton_fused import sort_pairs

    index, _ = moe_lab.synthetic_routing(num_tokens, num_experts, top_k, seed=num_tokens, device=DEVICE,
                                         distribution=distribution)
    sorted_pair, counts = sort_pairs(index, num_experts, method=method)
    flat = index.reshape(-1).cpu()
    assert sorted_pair.dtype == counts.dtype == torch.int32
    assert sorted_pair.long().cpu().tolist() == torch.sort(flat, stable=True).indices.tolist()
    assert counts.long().cpu().tolist() == torch.bincount(flat, minlength=num_experts).tolist()


@pytest.mark.parametrize("method", ["one_program", "blocks", "torch"])
@pytest.mark.parametrize("num_experts", [6, 1])
def test_sort_pairs_puts_out_of_range_experts_last_and_counts_none_of_them(method, num_experts):
    from moe_lab.backends.triton_fused import sort_pairs

    index, _ = moe_lab.synthetic_routing(300, num_experts, 4 if num_experts > 1 else 1, seed=3, device=DEVICE)
    index = index.clone()
    index[::7, -1] = num_experts  # transformers' sentinel for an expert on another rank
    index[::11, 0] = -1
    index[5::13, 0] = 1000
    flat = index.reshape(-1)
    in_range = (flat >= 0) & (flat < num_experts)
    if method == "one_program":
        flat, in_range = flat[:2048], in_range[:2048]  # one program's limit
    sorted_pair, counts = sort_pairs(flat.view(-1, 1), num_experts, method=method)
    keys = torch.where(in_range, flat, num_experts)
    assert sorted_pair.long().tolist() == torch.sort(keys, stable=True).indices.tolist()
    assert counts.long().tolist() == torch.bincount(flat[in_range], minlength=num_experts).tolist()


def test_sort_pairs_names_the_methods_it_has():
    from moe_lab.backends.triton_fused import sort_pairs

    with pytest.raises(ValueError, match=r"unknown sort method 'radix'; allowed: \['one_program', 'blocks', 'torch'\]"):
        sort_pairs(torch.zeros(4, 2, dtype=torch.long), 4, method="radix")


def test_zero_tokens_give_an_empty_output():
    layer, hidden, index, weights = _case(32, 16, 8, 2, 0, torch.float32)
    assert moe_lab.experts_forward("triton", layer, hidden, index, weights).shape == (0, 32)


@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    H=st.sampled_from([16, 32, 48]), I=st.sampled_from([16, 24, 64]), E=st.integers(1, 12),
    k=st.integers(1, 4), T=st.integers(1, 20), seed=st.integers(0, 1000),
)
def test_property_matches_reference(H, I, E, k, T, seed):
    k = min(k, E)
    assert _error(*_case(H, I, E, k, T, torch.float32, seed=seed)) < 1e-5


@pytest.mark.parametrize("T", [1, 6])
def test_transformers_module_with_bias_transposed_layout_and_custom_gate(T):
    hf = pytest.importorskip("moe_lab.hf")
    model = hf.tiny_transformers_model("gpt_oss").to(DEVICE)
    experts = next(hf.experts_modules(model))  # random biases (tiny_transformers_model): a dropped term shows
    assert experts.has_bias and experts.is_transposed
    assert fused_activation(experts) == "none"  # gpt-oss's clamped gate runs in torch between the kernels
    k = model.config.num_experts_per_tok
    hidden = torch.randn(T, model.config.hidden_size, device=DEVICE)
    index, weights = moe_lab.synthetic_routing(T, experts.num_experts, k, seed=0, device=DEVICE)
    with torch.no_grad():
        out = moe_lab.experts_forward("triton", experts, hidden, index, weights)
    assert moe_lab.relative_error(out, moe_lab.reference_experts_forward(experts, hidden, index, weights)) < 1e-5


def test_float64_is_refused_with_what_is_allowed():
    layer, hidden, index, weights = _case(32, 16, 8, 2, 3, torch.float64)
    with pytest.raises(moe_lab.BackendInputError, match="bfloat16/float16/float32, got torch.float64"):
        moe_lab.experts_forward("triton", layer, hidden, index, weights)


@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU interpreter is only switched on where there is no CUDA GPU")
def test_status_and_runnable_backends_on_cpu():
    runs, why = triton_status("cpu")
    assert runs and "interpreter" in why
    assert "triton" in moe_lab.runnable_backends("cpu")
    assert "triton" not in moe_lab.runnable_backends("cpu", interpreted=False)  # never timed interpreted


def test_kernel_configs_grow_with_rows_per_expert():
    decode, _ = kernel_configs(1.0, interpreted=False)
    prefill, _ = kernel_configs(512.0, interpreted=False)
    assert decode.block_m == 16 and prefill.block_m > decode.block_m
    assert prefill.tma and not decode.tma  # TMA tiles pay where the kernels are compute bound
    # float32 halves BLOCK_K: the same shared memory per pipeline stage as the bf16 tiles measured.
    assert [c.block_k for c in kernel_configs(512.0, interpreted=False, itemsize=4)] == [
        c.block_k // 2 for c in kernel_configs(512.0, interpreted=False)]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_transformers_default_gate_is_fused(family):
    # transformers gives every experts class its default `_apply_gate` (act(gate) * up): the kernel
    # must recognise it and fuse it, not fall back to the unfused path with an extra bf16 rounding.
    hf = pytest.importorskip("moe_lab.hf")
    model = hf.tiny_transformers_model(family, dtype=torch.bfloat16).to(DEVICE)
    experts = next(hf.experts_modules(model))
    assert fused_activation(experts) == "silu"
    T, k = 6, model.config.num_experts_per_tok
    hidden = torch.randn(T, model.config.hidden_size, device=DEVICE, dtype=torch.bfloat16)
    index, weights = moe_lab.synthetic_routing(T, experts.num_experts, k, seed=0, device=DEVICE)
    with torch.no_grad():
        out = moe_lab.experts_forward("triton", experts, hidden, index, weights)
        grouped = moe_lab.experts_forward("grouped_mm", experts, hidden, index, weights)
    reference = moe_lab.reference_experts_forward(experts, hidden, index, weights)
    assert moe_lab.relative_error(out, reference) <= 1.5 * moe_lab.relative_error(grouped, reference) + 1e-3


@pytest.mark.parametrize("T", [1, 16])  # the decode kernels, then the sorted ones
def test_compiled_inference_traces_no_triton_launch(T):
    """Under torch.compile the forward without gradients runs its launches inside custom ops: dynamo and
    Inductor trace none of them (Inductor's max-autotune modes failed on traced launches on an H200)."""
    layer, hidden, index, weights = _case(64, 32, 16, 2, T, torch.bfloat16)
    layer.set_experts_implementation("triton")
    with torch.no_grad():
        expected = layer(hidden, index, weights)
        torch._dynamo.reset()
        try:
            explained = torch._dynamo.explain(layer)(hidden, index, weights)
            compiled = torch.compile(layer, fullgraph=True)(hidden, index, weights)
            graph = explained.graphs[0].code
        finally:
            torch._dynamo.reset()
    assert explained.graph_break_count == 0
    assert "moe_lab.triton_decode" in graph if T == 1 else "moe_lab.triton_experts" in graph
    assert "triton_kernel_wrapper" not in graph
    assert moe_lab.relative_error(compiled, expected) == 0.0
