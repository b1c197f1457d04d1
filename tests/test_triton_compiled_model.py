"""A transformers model compiled with moe_lab's triton backend keeps every Triton launch inside moe_lab's
custom ops: the graphs torch.compile builds for a no-grad forward hold moe_lab's ops (`triton_decode` for
generate's one-token decode step, the sorted ops for a prompt; the decode pair around the module's own gate for
gpt-oss), never a `triton_kernel_wrapper_*` node. A traced launch is what broke the H200 end-to-end runs: under
CompileConfig(backend="cudagraphs") ("cannot extract sympy expressions from {'out_ptr': ...}"), and under
Inductor at batch 8 ("launcher() missing 3 required positional arguments") — docs/errors.md. Torch 2.11's dynamo
read transformers' default gate as the module's own and left the fused path; torch 2.14 does not, so the gpt-oss
cases are the ones that catch a launch outside an op on this machine.
"""
import pytest
import torch

import moe_lab

hf = pytest.importorskip("moe_lab.hf")
pytest.importorskip("transformers")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# (family, tokens) -> moe_lab ops the graph must hold
EXPECTED_OPS = {
    ("qwen3_moe", 1): {"moe_lab.triton_decode.default"},
    ("qwen3_moe", 8): {"moe_lab.triton_sort_pairs.default", "moe_lab.triton_experts.default"},
    ("gpt_oss", 1): {"moe_lab.triton_decode_gate_up.default", "moe_lab.triton_decode_down.default"},
    ("gpt_oss", 8): {"moe_lab.triton_sort_pairs.default", "moe_lab.triton_gate_up_projection.default",
                     "moe_lab.triton_down_projection.default"},
}


def _graph_targets(family, tokens, device, dtype, compile_backend):
    """The call targets of every graph dynamo hands `compile_backend` for one no-grad forward; and the output."""
    from torch._dynamo.backends.registry import lookup_backend

    hf.register_with_transformers()
    model = hf.tiny_transformers_model(family, seed=0).to(device=device, dtype=dtype).eval()
    model.set_experts_implementation("moe_lab_triton")
    targets = []

    def watching(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return lookup_backend(compile_backend)(gm, example_inputs)

    torch._dynamo.reset()
    ids = torch.arange(5, 5 + tokens, device=device).view(1, tokens)
    with torch.no_grad():
        compiled = torch.compile(model, backend=watching)(input_ids=ids, use_cache=False).logits
        eager = model(input_ids=ids, use_cache=False).logits
    return targets, compiled, eager


@pytest.mark.parametrize("family,tokens", sorted(EXPECTED_OPS))
@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_forward_compiles_to_the_custom_ops_not_traced_launches(device, family, tokens):
    if device == "cpu" and not moe_lab.backends.triton_status("cpu")[0]:
        pytest.skip("triton's interpreter is off")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    compile_backend = "cudagraphs" if device == "cuda" else "aot_eager"
    targets, compiled, eager = _graph_targets(family, tokens, device, dtype, compile_backend)
    traced_launches = sorted({t for t in targets if "triton_kernel_wrapper" in t})
    assert not traced_launches, f"Triton launches traced into the graph outside moe_lab's ops: {traced_launches}"
    moe_lab_ops = {t for t in targets if t.startswith("moe_lab.")}
    assert moe_lab_ops == EXPECTED_OPS[(family, tokens)], sorted(moe_lab_ops)
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)


def test_transformers_default_gate_is_the_fused_activation_while_dynamo_traces():
    """The check torch 2.11's dynamo got wrong, asked inside a compiled function (any torch: the class attribute
    is what is read)."""
    from moe_lab.backends.triton_fused import fused_activation

    hf.register_with_transformers()
    answers = {}
    for family in ("qwen3_moe", "gpt_oss"):
        experts = next(hf.experts_modules(hf.tiny_transformers_model(family, seed=0)))

        def probe(x, experts=experts, family=family):
            answers[family] = fused_activation(experts)
            return x + 1

        torch._dynamo.reset()
        torch.compile(probe, backend="eager", fullgraph=True)(torch.zeros(1))
        assert answers[family] == fused_activation(experts)
    assert answers == {"qwen3_moe": "silu", "gpt_oss": "none"}
