import subprocess
import sys
from pathlib import Path

import pytest
import torch

import moe_lab
from moe_lab import MoEConfig, MultiBackboneConfig, MultiBackboneMoEModel, SparseMoeBlock

sys.path.insert(0, str(Path(__file__).resolve().parent))  # backend_cases, also under --import-mode=importlib
from backend_cases import MATMUL_BACKENDS  # noqa: E402


def _block_reference(block, x2d):
    routing = block.router(x2d)
    out = moe_lab.reference_experts_forward(block.experts, x2d, routing.top_k_index, routing.top_k_weights)
    if block.shared_expert is not None:
        out = out + (torch.sigmoid(block.shared_expert_gate(x2d)) * block.shared_expert(x2d)).double()
    return out


@pytest.mark.parametrize("shared", [0, 24])
@pytest.mark.parametrize("backend", MATMUL_BACKENDS)
def test_sparse_moe_block_2d_and_3d(backend, shared):
    cfg = MoEConfig(32, 16, num_experts=6, top_k=2, shared_expert_intermediate_size=shared)
    block = SparseMoeBlock(cfg, experts_implementation=backend)
    x = torch.randn(2, 5, 32)
    out3d, routing = block(x, return_router_output=True)
    assert out3d.shape == (2, 5, 32) and routing.top_k_index.shape == (10, 2)
    ref = _block_reference(block, x.reshape(-1, 32))
    assert moe_lab.relative_error(out3d.reshape(-1, 32), ref) < 1e-5
    assert torch.allclose(block(x.reshape(-1, 32)), out3d.reshape(-1, 32), atol=1e-6)
    with pytest.raises(moe_lab.BackendInputError, match=r"expects \[tokens, 32\] or \[batch, seq, 32\]"):
        block(torch.randn(5, 31))


def test_switching_implementation_changes_no_weights():
    block = SparseMoeBlock(MoEConfig(32, 16, num_experts=4, top_k=2))
    params_before = {name: p.data_ptr() for name, p in block.named_parameters()}
    x = torch.randn(7, 32)
    outs = {}
    for name in MATMUL_BACKENDS:
        block.set_experts_implementation(name)
        assert block.get_experts_implementation() == name
        outs[name] = block(x)
    assert {name: p.data_ptr() for name, p in block.named_parameters()} == params_before
    assert torch.allclose(outs["eager"], outs["grouped_mm"], atol=1e-5)
    assert torch.allclose(outs["eager"], outs["batched_mm"], atol=1e-5)


def _model(implementation="grouped_mm"):
    cfg = MultiBackboneConfig(
        text_config=MoEConfig(32, 16, num_experts=4, top_k=2),
        vision_config=MoEConfig(16, 32, num_experts=3, top_k=1, shared_expert_intermediate_size=16),
        vocab_size=50, patch_dim=12,
    )
    return MultiBackboneMoEModel(cfg, experts_implementation=implementation)


def test_model_per_sub_config_dicts():
    model = _model({"": "eager", "vision_config": "batched_mm"})
    assert model.get_experts_implementation() == {"": None, "text_config": "eager", "vision_config": "batched_mm"}
    assert all(layer.experts.experts_implementation == "batched_mm" for layer in model.vision_model.layers)
    model.set_experts_implementation({"text_config": "grouped_mm"})  # unnamed keys: "" absent -> unchanged
    assert model.get_experts_implementation() == {"": None, "text_config": "grouped_mm", "vision_config": "batched_mm"}
    model.set_experts_implementation("eager")
    assert model.get_experts_implementation() == {"": "eager", "text_config": "eager", "vision_config": "eager"}


def test_model_rejects_unknown_keys_and_names_atomically():
    model = _model("eager")
    with pytest.raises(ValueError, match=r"unknown sub-config key\(s\) \['audio_config'\]; valid keys: \['', 'text_config', 'vision_config'\]"):
        model.set_experts_implementation({"audio_config": "eager"})
    with pytest.raises(moe_lab.UnknownBackendError, match="'bmm'"):
        model.set_experts_implementation({"text_config": "grouped_mm", "vision_config": "bmm"})
    assert model.get_experts_implementation()["text_config"] == "eager", "a failed call must change nothing"
    with pytest.raises(ValueError, match="unknown sub-config"):
        _model({"txt": "eager"})


def test_model_logits_equal_across_backends_and_mixed_dicts():
    model = _model("eager").eval()
    ids = torch.randint(0, 50, (2, 6))
    patches = torch.randn(2, 3, 12)
    with torch.no_grad():
        reference = model(ids, patches)
        assert reference.shape == (2, 9, 50)
        for setting in ["batched_mm", "grouped_mm", {"text_config": "grouped_mm", "vision_config": "batched_mm"}]:
            model.set_experts_implementation(setting)
            torch.testing.assert_close(model(ids, patches), reference, rtol=1e-5, atol=1e-5)
        assert model(ids).shape == (2, 6, 50)


def test_import_pulls_in_no_notebook_or_plotting_stack():
    code = ("import sys, moe_lab; bad = [m for m in ('jupyter', 'ipywidgets', 'plotly', 'pandas', 'transformers', "
            "'IPython', 'anywidget') if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
