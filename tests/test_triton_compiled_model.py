"""A transformers model compiled with moe_lab's triton backend keeps every Triton launch inside moe_lab's
custom ops: the graph torch.compile builds holds `moe_lab::triton_decode` (one token, no grad: generate's
decode step), never a `triton_kernel_wrapper_*` node. Such a node is what broke the H200 end-to-end run under
CompileConfig(backend="cudagraphs") (torch 2.11: "cannot extract sympy expressions from {'out_ptr': ...}",
docs/errors.md); on this CPU (torch 2.14, triton's interpreter) the graph is right, so the CUDA case is the one
that matters: `pytest tests/test_triton_compiled_model.py` on a GPU.
"""
import pytest
import torch

import moe_lab

hf = pytest.importorskip("moe_lab.hf")
pytest.importorskip("transformers")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _graph_targets(device, dtype, compile_backend):
    """The call targets of every graph dynamo hands `compile_backend` for one no-grad token; and the output."""
    from torch._dynamo.backends.registry import lookup_backend

    hf.register_with_transformers()
    model = hf.tiny_transformers_model("qwen3_moe", seed=0).to(device=device, dtype=dtype).eval()
    model.set_experts_implementation("moe_lab_triton")
    targets = []

    def watching(gm, example_inputs):
        targets.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return lookup_backend(compile_backend)(gm, example_inputs)

    torch._dynamo.reset()
    ids = torch.tensor([[5]], device=device)
    with torch.no_grad():
        compiled = torch.compile(model, backend=watching)(input_ids=ids, use_cache=False).logits
        eager = model(input_ids=ids, use_cache=False).logits
    return targets, compiled, eager


@pytest.mark.parametrize("device", DEVICES)
def test_no_grad_decode_token_compiles_to_the_custom_op_not_traced_launches(device):
    if device == "cpu" and not moe_lab.backends.triton_status("cpu")[0]:
        pytest.skip("triton's interpreter is off")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    compile_backend = "cudagraphs" if device == "cuda" else "aot_eager"
    targets, compiled, eager = _graph_targets(device, dtype, compile_backend)
    traced_launches = sorted({t for t in targets if "triton_kernel_wrapper" in t})
    assert not traced_launches, f"Triton launches traced into the graph outside moe_lab's ops: {traced_launches}"
    assert "moe_lab.triton_decode.default" in targets, sorted(set(targets))
    torch.testing.assert_close(compiled, eager, rtol=2e-2, atol=2e-2)
