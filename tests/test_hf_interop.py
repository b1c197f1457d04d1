"""moe_lab backends inside Hugging Face transformers (>= 5) MoE models, and vice versa.

All models are tiny random-weight ones built from configs (no download), float32 unless a test says
otherwise. Tolerances: float32 results of different backends differ only by the order of float32
additions (~1e-7 relative here), so 1e-5 relative leaves two orders of magnitude of headroom while
any real mistake (a wrong weight, a lost routing weight, a wrong expert) moves results by >1e-2.
"""
from __future__ import annotations

import copy
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

import moe_lab  # noqa: E402
import moe_lab.hf as hf  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # backend_cases, also under --import-mode=importlib
from backend_cases import MATMUL_BACKENDS  # noqa: E402
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, use_experts_implementation  # noqa: E402

FP32_RTOL = 1e-5
# The matmul built-ins, run on every family below. "triton" and "auto" are registered in transformers too
# (the `registered` fixture) and run in test_compare_implementations_reports_small_differences_and_restores.
BACKENDS = tuple(MATMUL_BACKENDS)
MOE_LAB_NAMES = tuple("moe_lab_" + name for name in BACKENDS)
TRANSFORMERS_NAMES = ("grouped_mm", "batched_mm")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine OpenMP threads
    # waiting for each other made the loop backends ~1000x slower (1.4 s instead of 1 ms a call).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def registered():
    before = set(hf.registered_with_transformers())
    names = hf.register_with_transformers()
    yield names
    hf.unregister_from_transformers(set(hf.registered_with_transformers()) - before)  # leave no trace


@pytest.fixture(scope="module")
def models():
    """One fp32 tiny model per family, built once; tests set the implementation they need."""
    return {family: hf.tiny_transformers_model(family, seed=0) for family in hf.FAMILIES}


@pytest.fixture(scope="module")
def input_ids():
    return torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(7))


def logits_under(model, implementation, input_ids):
    model.set_experts_implementation(implementation)
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def assert_logits_close(actual, expected, rtol=FP32_RTOL):
    # Logits near zero make a purely elementwise rtol meaningless: scale atol by the largest logit.
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * float(expected.abs().max()))


@pytest.fixture
def backend_calls():
    """Count calls of moe_lab's built-in backends, proving a transformers model really ran them."""
    calls = {name: 0 for name in BACKENDS}
    for name in BACKENDS:
        original = moe_lab.get_spec(name)

        def spy(*args, _name=name, _original=original.forward):
            calls[_name] += 1
            return _original(*args)

        # The same capabilities as the built-in, another forward function.
        moe_lab.register(name, dataclasses.replace(original, forward=spy), overwrite=True)
    yield calls
    for name in BACKENDS:
        moe_lab.unregister(name)  # puts the built-in back
    assert all(moe_lab.get_spec(name).builtin and moe_lab.get_spec(name).forward.__name__ != "spy" for name in BACKENDS)


# ---------------------------------------------------------------------------------------------
# 1. moe_lab backends called directly on transformers experts modules
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", hf.FAMILIES)
def test_backends_on_transformers_experts_match_transformers_eager_and_reference(models, family):
    model = models[family]
    all_experts = list(hf.experts_modules(model))
    assert len(all_experts) == model.config.num_hidden_layers == 2
    config = model.config
    before = model.get_experts_implementation()
    for layer, experts in enumerate(all_experts):
        num_experts, hidden = experts.num_experts, config.hidden_size
        # T=5: 10 (token, expert) pairs over 8 experts leaves some experts empty; "single" piles
        # every token onto expert 0; "zipf" is skewed.
        for num_tokens, distribution in ((33, "uniform"), (5, "uniform"), (40, "zipf"), (9, "single")):
            generator = torch.Generator().manual_seed(100 * layer + num_tokens)
            hidden_states = torch.randn(num_tokens, hidden, generator=generator)
            top_k_index, top_k_weights = moe_lab.synthetic_routing(
                num_tokens, num_experts, config.num_experts_per_tok, distribution=distribution, seed=num_tokens)
            with torch.no_grad():
                expected = hf.transformers_experts_forward(experts, hidden_states, top_k_index, top_k_weights, "eager")
                reference = moe_lab.reference_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
                assert moe_lab.relative_error(expected, reference) < FP32_RTOL  # transformers agrees with the reference
                for name in BACKENDS:
                    actual = moe_lab.experts_forward(name, experts, hidden_states, top_k_index, top_k_weights)
                    assert actual.shape == (num_tokens, hidden) and actual.dtype == torch.float32
                    where = f"{family} layer {layer} {name} T={num_tokens} {distribution}"
                    assert moe_lab.relative_error(actual, expected) < FP32_RTOL, where
                    assert moe_lab.relative_error(actual, reference) < FP32_RTOL, where
    assert model.get_experts_implementation() == before  # transformers_experts_forward restores the config


def test_transformers_experts_forward_runs_the_named_transformers_implementation(models):
    experts = next(hf.experts_modules(models["qwen3_moe"]))
    hidden_states = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    top_k_index, top_k_weights = moe_lab.synthetic_routing(16, 8, 2, seed=1)
    with torch.no_grad():
        eager = hf.transformers_experts_forward(experts, hidden_states, top_k_index, top_k_weights, "eager")
        for name in TRANSFORMERS_NAMES:
            other = hf.transformers_experts_forward(experts, hidden_states, top_k_index, top_k_weights, name)
            assert moe_lab.relative_error(other, eager) < FP32_RTOL
    with pytest.raises(TypeError, match="not a transformers experts module"):
        hf.transformers_experts_forward(moe_lab.Experts(moe_lab.scale_down("mixtral-8x7b")), hidden_states,
                                        top_k_index, top_k_weights)


# ---------------------------------------------------------------------------------------------
# 2. whole transformers models running moe_lab backends
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", hf.FAMILIES)
def test_model_logits_with_moe_lab_backends_match_transformers(models, input_ids, family, backend_calls):
    model = models[family]
    eager = logits_under(model, "eager", input_ids)
    transformers_logits = {name: logits_under(model, name, input_ids) for name in TRANSFORMERS_NAMES}
    assert sum(backend_calls.values()) == 0  # transformers' own implementations never call moe_lab
    for backend, name in zip(BACKENDS, MOE_LAB_NAMES):
        before = backend_calls[backend]
        logits = logits_under(model, name, input_ids)
        assert model.config._experts_implementation == name
        assert backend_calls[backend] - before == 2  # once per MoE layer: really moe_lab, not a fallback
        assert_logits_close(logits, eager)
        for theirs in transformers_logits.values():
            assert_logits_close(logits, theirs)


@pytest.mark.parametrize("family", [*hf.FAMILIES, *hf.EXTRA_FAMILIES])
def test_training_through_moe_lab_backends_gives_transformers_eager_gradients(family, input_ids):
    """loss.backward() on a tiny fp32 model: every parameter's gradient (router, attention, embeddings,
    experts — gpt-oss's biases and transposed weights too) equals the one under transformers' eager."""
    model = hf.tiny_transformers_model(family, seed=0).train()

    def gradients(implementation):
        model.zero_grad(set_to_none=True)
        model.set_experts_implementation(implementation)
        model(input_ids=input_ids, labels=input_ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    expected = gradients("eager")
    assert any("experts" in name for name in expected) and any("gate" in name for name in expected)
    for name in MOE_LAB_NAMES:
        got = gradients(name)
        assert got.keys() == expected.keys(), name
        worst = max(moe_lab.relative_error(got[key], expected[key]) for key in expected)
        assert worst < 1e-4, f"{family} {name}: worst relative gradient error {worst:.2e}"


def test_compare_implementations_reports_small_differences_and_restores(models, input_ids):
    model = models["mixtral"]
    model.set_experts_implementation("batched_mm")
    results = hf.compare_implementations(model, input_ids)
    assert set(results) >= {"eager", *TRANSFORMERS_NAMES, *MOE_LAB_NAMES}
    assert set(results) >= {"moe_lab_" + name for name in moe_lab.runnable_backends("cpu")}  # triton, auto too
    assert results["eager"] == {"max_abs_diff": 0.0, "max_rel_diff": 0.0, "relative_error": 0.0}
    for name, result in results.items():
        assert result["max_rel_diff"] < FP32_RTOL and result["relative_error"] < FP32_RTOL, name
    assert model.get_experts_implementation() == {"": "batched_mm"}


def test_comparison_catches_a_wrong_backend(models, input_ids):
    """Negative control: the experts matter enough in the tiny models for 1e-5 to catch a mistake."""
    def uniform_weights(experts, hidden_states, top_k_index, top_k_weights):  # ignores the router's weights
        uniform = torch.full_like(top_k_weights, 1.0 / top_k_weights.shape[1])
        return moe_lab.backends.grouped_mm_experts_forward(experts, hidden_states, top_k_index, uniform)

    moe_lab.register("test_uniform_weights", uniform_weights)
    try:
        [name] = hf.register_with_transformers(["test_uniform_weights"])
        for family in ("mixtral", "qwen2_moe"):
            result = hf.compare_implementations(models[family], input_ids, [name])[name]
            assert result["relative_error"] > 1e-3, family
    finally:
        hf.unregister_from_transformers(["moe_lab_test_uniform_weights"])
        moe_lab.unregister("test_uniform_weights")


@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_experts_implementation_chosen_at_construction(models, input_ids, family, backend_calls):
    eager = logits_under(models[family], "eager", input_ids)
    # from_config(..., experts_implementation=...), through tiny_transformers_model; same seed, same weights.
    model = hf.tiny_transformers_model(family, seed=0, experts_implementation="moe_lab_grouped_mm")
    assert model.get_experts_implementation() == {"": "moe_lab_grouped_mm"}
    with torch.no_grad():
        assert_logits_close(model(input_ids=input_ids).logits, eager)
    assert backend_calls["grouped_mm"] == 2
    # The config keyword, then the model class constructor.
    config = hf.tiny_transformers_config(family, experts_implementation="moe_lab_batched_mm")
    model = type(model)(config).eval()
    model.load_state_dict(models[family].state_dict())
    assert model.config._experts_implementation == "moe_lab_batched_mm"
    with torch.no_grad():
        assert_logits_close(model(input_ids=input_ids).logits, eager)
    assert backend_calls["batched_mm"] == 2


def test_gpt_oss_interleaved_gate_runs_through_its_own_apply_gate(input_ids):
    """gpt-oss: transposed weights, biases, interleaved gate/up undone by the module's `_apply_gate`."""
    model = hf.tiny_transformers_model("gpt_oss", seed=0)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for experts in hf.experts_modules(model):
            assert experts.is_concatenated is False and experts.is_transposed and experts.has_bias
            for bias in (experts.gate_up_proj_bias, experts.down_proj_bias):  # transformers zero-inits them
                bias.copy_(0.1 * torch.randn(bias.shape, generator=generator))
        experts = next(hf.experts_modules(model))
        hidden_states = torch.randn(24, 64, generator=generator)
        top_k_index, top_k_weights = moe_lab.synthetic_routing(24, 8, 2, seed=4)
        expected = hf.transformers_experts_forward(experts, hidden_states, top_k_index, top_k_weights, "eager")
        # The float64 reference reads the same flags (transposed, biases, own _apply_gate) independently.
        reference = moe_lab.reference_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
        assert moe_lab.relative_error(expected, reference) < FP32_RTOL
        for name in BACKENDS:
            actual = moe_lab.experts_forward(name, experts, hidden_states, top_k_index, top_k_weights)
            assert moe_lab.relative_error(actual, expected) < FP32_RTOL, name
    eager = logits_under(model, "eager", input_ids)
    for name in MOE_LAB_NAMES:
        assert_logits_close(logits_under(model, name, input_ids), eager)


# ---------------------------------------------------------------------------------------------
# 3. a user backend registered in moe_lab reaches transformers
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def sort_then_loop():
    calls = []

    def sort_then_loop(experts, hidden_states, top_k_index, top_k_weights):
        """Sort the (token, expert) pairs by expert, then one matmul pair per expert that has tokens."""
        calls.append(hidden_states.shape[0])
        top_k = top_k_index.shape[1]
        expert_of_pair = top_k_index.reshape(-1)
        order = torch.argsort(expert_of_pair, stable=True)
        counts = torch.bincount(expert_of_pair, minlength=experts.num_experts).tolist()
        output = torch.zeros_like(hidden_states, dtype=torch.float32)
        start = 0
        for expert, count in enumerate(counts):
            pairs = order[start:start + count]
            start += count
            if count == 0:
                continue
            tokens = pairs // top_k
            gate, up = (hidden_states[tokens] @ experts.gate_up_proj[expert].T).chunk(2, dim=-1)
            y = (experts.act_fn(gate) * up) @ experts.down_proj[expert].T
            output.index_add_(0, tokens, y.float() * top_k_weights.reshape(-1)[pairs, None].float())
        return output.to(hidden_states.dtype)

    moe_lab.register("test_sort_then_loop", sort_then_loop)
    yield sort_then_loop, calls
    if "moe_lab_test_sort_then_loop" in hf.registered_with_transformers():
        hf.unregister_from_transformers(["moe_lab_test_sort_then_loop"])
    moe_lab.unregister("test_sort_then_loop")


def test_user_backend_registered_in_moe_lab_runs_in_transformers(models, input_ids, sort_then_loop):
    function, calls = sort_then_loop
    assert "moe_lab_test_sort_then_loop" not in ALL_EXPERTS_FUNCTIONS
    names = hf.register_with_transformers()
    assert names == ["moe_lab_" + name for name in moe_lab.available_backends()]
    assert "moe_lab_test_sort_then_loop" in names and "moe_lab_test_sort_then_loop" in ALL_EXPERTS_FUNCTIONS
    assert hf.registered_with_transformers()["moe_lab_test_sort_then_loop"] == "test_sort_then_loop"
    for family in ("qwen2_moe", "qwen3_moe"):
        model = models[family]
        eager = logits_under(model, "eager", input_ids)
        calls.clear()
        assert_logits_close(logits_under(model, "moe_lab_test_sort_then_loop", input_ids), eager)
        assert calls == [input_ids.numel()] * 2  # both MoE layers, all tokens
    # Re-registering the moe_lab name takes effect in transformers at once (looked up per call).
    moe_lab.register("test_sort_then_loop", lambda *args: 2 * function(*args))
    with torch.no_grad():
        doubled = models["qwen3_moe"](input_ids=input_ids).logits  # still set to moe_lab_test_sort_then_loop
    assert moe_lab.relative_error(doubled, eager) > 1e-2
    # Removing it from transformers: a model still set to it fails with transformers' message.
    assert hf.unregister_from_transformers(["moe_lab_test_sort_then_loop"]) == ["moe_lab_test_sort_then_loop"]
    assert "moe_lab_test_sort_then_loop" not in ALL_EXPERTS_FUNCTIONS
    with pytest.raises(KeyError, match="moe_lab_test_sort_then_loop"), torch.no_grad():
        models["qwen3_moe"](input_ids=input_ids)
    models["qwen3_moe"].set_experts_implementation("eager")


# ---------------------------------------------------------------------------------------------
# 4. unknown names, idempotency, name clashes
# ---------------------------------------------------------------------------------------------

def test_unknown_names_still_raise(models, input_ids):
    model = models["mixtral"]
    model.set_experts_implementation("moe_lab_grouped_mm")
    with pytest.raises(ValueError, match="moe_lab_no_such_backend"):
        model.set_experts_implementation("moe_lab_no_such_backend")
    assert model.config._experts_implementation == "moe_lab_grouped_mm"  # unchanged
    with pytest.raises(ValueError, match="moe_lab_no_such_backend"):
        hf.tiny_transformers_model("mixtral", experts_implementation="moe_lab_no_such_backend")
    # Set behind transformers' back, the dispatch itself refuses it.
    model.config._experts_implementation = "moe_lab_no_such_backend"
    try:
        with pytest.raises(KeyError, match="moe_lab_no_such_backend"), torch.no_grad():
            model(input_ids=input_ids)
    finally:
        model.config._experts_implementation = "eager"
    # Unknown in moe_lab: its own error, naming the valid backends; nothing is registered.
    size = len(ALL_EXPERTS_FUNCTIONS)
    with pytest.raises(moe_lab.UnknownBackendError, match="no_such_backend.*grouped_mm"):
        hf.register_with_transformers(["grouped_mm", "no_such_backend"])
    assert len(ALL_EXPERTS_FUNCTIONS) == size
    with pytest.raises(ValueError, match="not a moe_lab entry"):
        hf.unregister_from_transformers(["grouped_mm"])  # transformers' own entries are never removed


def test_register_twice_is_idempotent(registered):
    functions = {name: ALL_EXPERTS_FUNCTIONS[name] for name in registered}
    size = len(ALL_EXPERTS_FUNCTIONS)
    assert hf.register_with_transformers() == registered
    assert hf.register_with_transformers(names=None) == registered
    assert len(ALL_EXPERTS_FUNCTIONS) == size
    assert all(ALL_EXPERTS_FUNCTIONS[name] is function for name, function in functions.items())
    assert hf.register_with_transformers("grouped_mm") == ["moe_lab_grouped_mm"]  # one name as a string
    assert ALL_EXPERTS_FUNCTIONS["moe_lab_grouped_mm"] is functions["moe_lab_grouped_mm"]


def test_register_refuses_to_shadow_transformers_names():
    own = ALL_EXPERTS_FUNCTIONS["grouped_mm"]
    with pytest.raises(ValueError, match="already has an experts implementation named 'grouped_mm'"):
        hf.register_with_transformers(["grouped_mm"], prefix="")
    with pytest.raises(ValueError, match="'eager' is reserved"):
        hf.register_with_transformers(["eager"], prefix="")
    assert ALL_EXPERTS_FUNCTIONS["grouped_mm"] is own
    # overwrite=True replaces transformers' own until unregistered, which puts it back.
    try:
        assert hf.register_with_transformers(["grouped_mm"], prefix="", overwrite=True) == ["grouped_mm"]
        assert hf.registered_with_transformers()["grouped_mm"] == "grouped_mm"
    finally:
        hf.unregister_from_transformers(["grouped_mm"])
    assert ALL_EXPERTS_FUNCTIONS["grouped_mm"] is own
    try:
        assert hf.register_with_transformers(["grouped_mm"], prefix="lab_") == ["lab_grouped_mm"]
        assert hf.registered_with_transformers()["lab_grouped_mm"] == "grouped_mm"
    finally:
        hf.unregister_from_transformers(["lab_grouped_mm"])


# ---------------------------------------------------------------------------------------------
# Experts modules moe_lab cannot run: a clear ValueError, not a wrong answer
# ---------------------------------------------------------------------------------------------

def _toy_experts_class(**flags):
    @use_experts_implementation(**flags)
    class ToyExperts(torch.nn.Module):
        def __init__(self, config):
            super().__init__()
            self.num_experts, hidden, intermediate = 4, 16, 32
            rows = 2 * intermediate if flags.get("has_gate", True) else intermediate
            weight = torch.nn.Parameter(torch.randn(4, rows, hidden))
            if flags.get("has_gate", True):
                self.gate_up_proj = weight
            else:
                self.up_proj = weight
            self.down_proj = torch.nn.Parameter(torch.randn(4, hidden, intermediate))
            self.act_fn = torch.nn.SiLU()

        def forward(self, hidden_states, top_k_index, top_k_weights):  # pragma: no cover - not the point
            raise AssertionError("eager is not used here")

    return ToyExperts


@pytest.mark.parametrize("flags, message", [
    ({"has_gate": False}, "has_gate=False"),
    ({"is_concatenated": False}, "is_concatenated=False"),
])
def test_unsupported_transformers_experts_raise_value_error(flags, message):
    config = transformers.PretrainedConfig()
    config._experts_implementation = "moe_lab_grouped_mm"
    experts = _toy_experts_class(**flags)(config)
    top_k_index, top_k_weights = moe_lab.synthetic_routing(3, 4, 2)
    with pytest.raises(ValueError, match=message) as caught:
        experts(torch.randn(3, 16), top_k_index, top_k_weights)
    assert "moe_lab_grouped_mm" in str(caught.value)


def test_post_norm_experts_raise_value_error(models, monkeypatch):
    # (An expert-parallel module runs: tests/test_hf_expert_parallel.py.)
    experts = next(hf.experts_modules(models["olmoe"]))
    monkeypatch.setattr(experts, "has_post_expert_norm", True, raising=False)
    top_k_index, top_k_weights = moe_lab.synthetic_routing(3, 8, 2)
    for name in MOE_LAB_NAMES:
        with pytest.raises(ValueError, match="has_post_expert_norm"), torch.no_grad():
            hf.transformers_experts_forward(experts, torch.randn(3, 64), top_k_index, top_k_weights, name)


def test_bad_inputs_are_checked_by_moe_lab(models):
    experts = next(hf.experts_modules(models["mixtral"]))
    top_k_index, top_k_weights = moe_lab.synthetic_routing(4, 8, 2)
    with pytest.raises(moe_lab.BackendInputError, match="expert ids in"), torch.no_grad():
        hf.transformers_experts_forward(experts, torch.randn(4, 64), top_k_index + 7, top_k_weights,
                                        "moe_lab_grouped_mm")
    with pytest.raises(moe_lab.BackendInputError, match="dtype"), torch.no_grad():
        hf.transformers_experts_forward(experts, torch.randn(4, 64, dtype=torch.float64), top_k_index,
                                        top_k_weights, "moe_lab_batched_mm")


# ---------------------------------------------------------------------------------------------
# 5. bfloat16
# ---------------------------------------------------------------------------------------------

def test_bf16_model_logits_with_moe_lab_backends(input_ids):
    """bf16 (unit roundoff u = 2**-9 ~ 2e-3). moe_lab sums each token's top_k contributions in float32
    and rounds once; transformers' eager rounds every expert's contribution to bf16 and adds them in
    bf16. So the experts outputs differ by ~1 ulp, and these differences pass through attention, a
    second MoE layer and lm_head, each rounding again: measured ~5e-3 (~3u) relative L2 on the
    logits. We allow 2e-2 (10u) for the agreement, and require moe_lab to be as accurate as
    transformers' own bf16 path against float32 arithmetic on the same bf16-rounded weights (within
    25% + u): a genuine bug (e.g. a lost routing weight) is >1e-1.
    """
    model = hf.tiny_transformers_model("qwen3_moe", seed=0, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    exact = copy.deepcopy(model).float()  # the same (bf16-rounded) weights, float32 arithmetic
    expected = logits_under(exact, "eager", input_ids).double()
    eager = logits_under(model, "eager", input_ids)
    assert eager.dtype == torch.bfloat16
    eager_error = moe_lab.relative_error(eager, expected)
    transformers_logits = [eager, *(logits_under(model, name, input_ids) for name in TRANSFORMERS_NAMES)]
    u = 2.0 ** -9
    for name in MOE_LAB_NAMES:
        logits = logits_under(model, name, input_ids)
        assert logits.dtype == torch.bfloat16
        for theirs in transformers_logits:
            assert moe_lab.relative_error(logits, theirs) < 10 * u, name
        assert moe_lab.relative_error(logits, expected) < 1.25 * eager_error + u, name


def test_bf16_backends_on_transformers_experts_match_reference():
    """Experts level, bf16, routing given (no router, so no top-k flips): every backend, and transformers'
    eager, is within a few u of the float64 reference: bf16 rounds gate_up, act*up, down and the output
    (4 roundings of ~u/2 each, measured ~2u relative L2); 4u = 8e-3 allowed."""
    model = hf.tiny_transformers_model("mixtral", seed=1, dtype=torch.bfloat16, num_hidden_layers=1)
    experts = next(hf.experts_modules(model))
    hidden_states = torch.randn(48, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    top_k_index, top_k_weights = moe_lab.synthetic_routing(48, 8, 2, distribution="zipf", seed=5)
    u = 2.0 ** -9
    with torch.no_grad():
        reference = moe_lab.reference_experts_forward(experts, hidden_states, top_k_index, top_k_weights)
        theirs = hf.transformers_experts_forward(experts, hidden_states, top_k_index, top_k_weights, "eager")
        assert moe_lab.relative_error(theirs, reference) < 4 * u
        for name in BACKENDS:
            actual = moe_lab.experts_forward(name, experts, hidden_states, top_k_index, top_k_weights)
            assert actual.dtype == torch.bfloat16
            assert moe_lab.relative_error(actual, reference) < 4 * u, name


# ---------------------------------------------------------------------------------------------
# The tiny models and the optional import
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", hf.FAMILIES)
def test_tiny_model_shape_and_determinism(models, family):
    model = models[family]
    config = model.config
    assert config.model_type == family and not model.training
    assert (config.hidden_size, config.num_hidden_layers, config.vocab_size) == (64, 2, 128)
    assert (config.num_experts, config.num_experts_per_tok) == (8, 2)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for experts in hf.experts_modules(model):
        num_experts, two_i, hidden = experts.gate_up_proj.shape
        assert (num_experts, hidden) == (8, 64) and two_i % 32 == 0  # I a multiple of 16
        assert experts.down_proj.shape == (8, 64, two_i // 2)
    if family == "qwen2_moe":
        mlp = model.model.layers[0].mlp
        assert mlp.shared_expert.gate_proj.weight.shape == (config.shared_expert_intermediate_size, 64)
        assert config.shared_expert_intermediate_size % 16 == 0
    state = torch.random.get_rng_state()
    again = hf.tiny_transformers_model(family, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is left alone
    other = hf.tiny_transformers_model(family, seed=1)
    ours, theirs = model.state_dict(), other.state_dict()
    assert ours.keys() == again.state_dict().keys()
    for name, tensor in again.state_dict().items():
        assert torch.equal(tensor, ours[name]), name  # same seed, same weights
    for experts_name, _ in hf.named_experts_modules(model):
        assert not torch.equal(theirs[experts_name + ".gate_up_proj"], ours[experts_name + ".gate_up_proj"])


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown family 'deepseek_v3'.*qwen2_moe"):
        hf.tiny_transformers_model("deepseek_v3")


def test_moe_lab_import_does_not_import_transformers():
    code = "import sys, moe_lab; assert 'transformers' not in sys.modules, 'moe_lab imported transformers'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_missing_transformers_gives_install_hint(monkeypatch):
    import importlib

    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    monkeypatch.delitem(sys.modules, "moe_lab.hf")
    with pytest.raises(ImportError, match=r"pip install 'moe-lab\[hf\]'"):
        importlib.import_module("moe_lab.hf")


# ---------------------------------------------------------------------------------------------
# On a CUDA device (skipped without one): the same agreement, with torch's native grouped GEMM
# ---------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_models_on_cuda_with_moe_lab_backends(input_ids, family):
    ids = input_ids.cuda()
    u = 2.0 ** -9
    # float32: cuBLAS may sum in another order than the CPU, nothing more (TF32 stays off by default).
    model = hf.tiny_transformers_model(family, seed=0).cuda()
    expected = logits_under(model, "eager", ids)
    for name in (*TRANSFORMERS_NAMES, *MOE_LAB_NAMES):
        assert_logits_close(logits_under(model, name, ids), expected)
    # bfloat16: the same 10u agreement bound as on the CPU (see test_bf16_model_logits_with_moe_lab_backends).
    model = model.to(torch.bfloat16)
    experts = next(hf.experts_modules(model))
    path = moe_lab.grouped_mm_path("cuda", torch.bfloat16, 64, experts.down_proj.shape[-1])
    assert path.uses_torch_op, path.reason
    expected = logits_under(model, "eager", ids)
    for name in MOE_LAB_NAMES:
        logits = logits_under(model, name, ids)
        assert logits.dtype == torch.bfloat16 and logits.is_cuda
        assert moe_lab.relative_error(logits, expected) < 10 * u, name


def test_transformers_backends_compared_in_the_bench_share_the_layers_weights():
    from moe_lab.bench.implementations import implementation, spec_of
    from moe_lab.hf.comparison import transformers_twin

    experts = moe_lab.Experts(moe_lab.MoEConfig(32, 16, num_experts=4, top_k=2))
    x = torch.randn(6, 32)
    index, weights = moe_lab.synthetic_routing(6, 4, 2, seed=1)
    expected = moe_lab.reference_experts_forward(experts, x, index, weights)
    for name in ("transformers:eager", "transformers:batched_mm", "transformers:grouped_mm"):
        experts.set_experts_implementation(implementation(name))
        assert moe_lab.relative_error(experts(x, index, weights), expected) < 1e-5, name
        assert spec_of(name).name == name and name not in moe_lab.available_backends()
    twin = transformers_twin(experts)
    assert twin.gate_up_proj is experts.gate_up_proj and twin.down_proj is experts.down_proj  # no copy
    registered = hf.register_with_transformers()
    assert registered and not any(":" in name for name in registered)
    with pytest.raises(ValueError, match="transformers' experts backends compared here"):
        implementation("transformers:sonicmoe")
    with pytest.raises(ValueError, match="unknown library 'flash'"):
        implementation("flash:fused_moe")
