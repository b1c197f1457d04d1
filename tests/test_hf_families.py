"""Every transformers family whose experts go through transformers' experts registry, found in the
installed transformers (not a list kept by hand): moe_lab's backends run its experts with the outputs
of transformers' own "eager" forward, or are refused with a message that says why.

Experts modules are built from each family's own config class on tiny sizes (hidden 64, 8 experts,
width 32) with random weights and biases; fp32 results differ only in the order of additions (~1e-7
relative), so 1e-5 relative is "equal" with two orders of magnitude to spare (see test_hf_interop).
"""
from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

import moe_lab  # noqa: E402
import moe_lab.hf as hf  # noqa: E402
from moe_lab.errors import BackendInputError  # noqa: E402
from moe_lab.hf import families  # noqa: E402
from moe_lab.hf.models import transformers_experts_forward  # noqa: E402

FP32_RTOL = 1e-5
ENTRIES = [entry for group in families.experts_families().values() for entry in group]
RUNNABLE = [entry for entry in ENTRIES if families.refusal_reason(entry) is None]
REFUSED = [entry for entry in ENTRIES if families.refusal_reason(entry) is not None]
# What moe_lab cannot run, and the words its refusal must contain (README: "Families moe_lab refuses").
EXPECTED_REFUSALS = {
    "muse_spark.MuseSparkExperts": "has_post_expert_norm=True",
    "nemotron_h.NemotronHExperts": "has_gate=False",
}


# Families whose default config, shrunk field by field (families.tiny_causal_lm), builds a whole causal LM
# that generates; the others are checked at the experts level above (their whole models need
# family-specific sizes: multimodal wrappers, hybrid linear-attention layers, MLA head sizes).
GENERATE_FAMILIES = (
    "afmoe", "beam", "cohere2_moe", "ernie4_5_moe", "exaone_moe", "flex_olmo", "flint", "gemma4", "glm4_moe",
    "gpt_oss", "granitemoe", "granitemoe_swa", "granitemoeshared", "hunyuan_v1_moe", "hy_v3", "inkling", "kolibri1",
    "laguna", "lara_mini", "mellum", "mimo_v2_flash", "minimax", "minimax_m2", "mixtral", "olmoe", "phimoe",
    "qwen2_moe", "qwen3_moe", "solar_open", "zaya",
)


@pytest.fixture(scope="module", autouse=True)
def one_thread_and_registered():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    before = set(hf.registered_with_transformers())
    hf.register_with_transformers()
    yield
    hf.unregister_from_transformers(set(hf.registered_with_transformers()) - before)
    torch.set_num_threads(threads)


def _routing(module, tokens=16, experts=families.TINY_EXPERTS, top_k=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, families.experts_hidden_size(module), generator=generator)
    index = torch.stack([torch.randperm(experts, generator=generator)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=generator)
    return hidden, index, weights


def test_the_families_are_found_in_transformers():
    found = families.experts_families()
    # the families moe_lab's tiny models and presets come from are among them
    assert {"qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "gpt_oss", "deepseek_v3", "qwen3_vl_moe"} <= set(found)
    assert len(ENTRIES) >= 60, "transformers' decorated experts classes were not read"


def test_refused_layouts_are_exactly_the_known_ones():
    assert {entry.label for entry in REFUSED} == set(EXPECTED_REFUSALS)


@pytest.mark.parametrize("entry", RUNNABLE, ids=lambda entry: entry.label)
def test_every_moe_lab_backend_matches_transformers_eager(entry):
    experts = families.tiny_experts(entry)
    hidden, index, weights = _routing(experts)
    expected = transformers_experts_forward(experts, hidden, index, weights, "eager")
    assert expected.abs().max() > 0
    for backend in moe_lab.available_backends():
        actual = moe_lab.experts_forward(backend, experts, hidden, index, weights)
        error = moe_lab.relative_error(actual, expected)
        assert error <= FP32_RTOL, f"{entry.label} ({entry.flags or 'gated, concatenated'}): {backend} {error:.2e}"
    # and through transformers' own dispatch, by the registered name
    registered = transformers_experts_forward(experts, hidden, index, weights, "moe_lab_grouped_mm")
    assert moe_lab.relative_error(registered, expected) <= FP32_RTOL


@pytest.mark.parametrize("label", sorted(EXPECTED_REFUSALS))
def test_refused_family_says_why_through_transformers_dispatch(label):
    entry = next(entry for entry in ENTRIES if entry.label == label)
    experts = families.tiny_experts(entry)
    hidden, index, weights = _routing(experts)
    transformers_experts_forward(experts, hidden, index, weights, "eager")  # transformers runs it
    with pytest.raises(BackendInputError, match=EXPECTED_REFUSALS[label]) as refused:
        transformers_experts_forward(experts, hidden, index, weights, "moe_lab_grouped_mm")
    assert "model.set_experts_implementation('eager')" in str(refused.value)  # and what to do instead


@pytest.mark.parametrize("family", GENERATE_FAMILIES)
def test_greedy_generate_gives_the_same_tokens_with_every_backend(family):
    from moe_lab.bench.e2e_generate import timed_generate

    model = families.tiny_causal_lm(family)
    prompt = torch.randint(3, 120, (2, 8), generator=torch.Generator().manual_seed(1))
    model.set_experts_implementation("eager")
    expected, _ = timed_generate(model, prompt, 4)
    # the triton interpreter is minutes for 30 whole models: its experts are checked above
    for backend in moe_lab.runnable_backends("cpu", interpreted=False):
        model.set_experts_implementation(f"moe_lab_{backend}")
        tokens, _ = timed_generate(model, prompt, 4)
        assert torch.equal(tokens, expected), f"{family}: moe_lab_{backend} {tokens.tolist()} != {expected.tolist()}"
