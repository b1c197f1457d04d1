"""moe_lab's expert-parallel dispatch inside transformers models (transformers' EPImplementationInterface),
two gloo ranks on CPU: logits and input gradients equal the unsharded model's, with transformers' own experts
and with a moe_lab backend running the local experts."""
import pytest
import torch
import torch.distributed as dist

pytest.importorskip("transformers.distributed.expert_parallel",
                    reason="this transformers has no pluggable expert parallelism (EPImplementationInterface)")

from moe_lab.lessons.tolerances import logits_tolerance, reference_tolerance  # noqa: E402
from moe_lab.parallel import run_on_ranks  # noqa: E402

CALLS = {"count": 0}


def _counting(experts, hidden_states, top_k_index, top_k_weights):
    CALLS["count"] += 1
    from moe_lab.backends import grouped_mm_experts_forward
    return grouped_mm_experts_forward(experts, hidden_states, top_k_index, top_k_weights)


def _sharded_against_whole(family, experts_implementation):
    from torch.distributed.device_mesh import init_device_mesh
    from transformers.distributed.expert_parallel import apply_expert_parallelism

    import moe_lab
    import moe_lab.hf
    from moe_lab.hf.expert_parallel import register_expert_parallel
    from moe_lab.hf.models import tiny_transformers_model

    moe_lab.register("counting", _counting, autograd=True, overwrite=True)
    moe_lab.hf.register_with_transformers(["grouped_mm", "counting"])
    name = register_expert_parallel()
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_transformers_model(family, seed=0, experts_implementation=experts_implementation)
    ids = torch.randint(0, 128, (1, 9 + 4 * rank), generator=torch.Generator().manual_seed(rank))  # [1, T_r]
    whole_logits = model(ids).logits
    whole_logits.sum().backward()
    whole_grad = model.get_input_embeddings().weight.grad.clone()
    model.zero_grad()

    mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("ep", "tp"))
    plan = {}
    for module_name, _ in model.named_modules():
        if module_name.endswith("mlp.experts"):
            plan |= {f"{module_name}.gate_up_proj": "grouped_gemm", f"{module_name}.down_proj": "grouped_gemm",
                     module_name: "ep_dispatch_experts"}
    apply_expert_parallelism(model, mesh["ep"], mesh["tp"], plan, ep_implementation=name)
    CALLS["count"] = 0
    logits = model(ids).logits
    logits.sum().backward()
    grad = model.get_input_embeddings().weight.grad
    return {"logits": float((logits - whole_logits).abs().max()),
            "grad": moe_lab.relative_error(grad, whole_grad), "counting_calls": CALLS["count"],
            "local_experts": model.model.layers[0].mlp.experts.num_experts}


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("experts_implementation", ["eager", "moe_lab_counting"])
def test_moe_lab_dispatch_inside_a_transformers_model(family, experts_implementation):
    for result in run_on_ranks(_sharded_against_whole, 2, family, experts_implementation, timeout_s=180):
        assert result["local_experts"] == 4  # 8 experts over 2 ranks: transformers sharded them
        assert result["logits"] <= logits_tolerance(torch.float32)
        assert result["grad"] <= reference_tolerance(torch.float32)
        # the moe_lab backend ran the local experts, once per layer (2 layers) in the sharded forward
        assert result["counting_calls"] == (2 if experts_implementation == "moe_lab_counting" else 0)


def test_moe_lab_backends_still_refuse_an_expert_parallel_module_outside_moe_lab_dispatch():
    from moe_lab.errors import BackendInputError
    import moe_lab.hf
    from moe_lab.hf.models import experts_modules, tiny_transformers_model

    moe_lab.hf.register_with_transformers(["grouped_mm"])
    model = tiny_transformers_model("qwen3_moe", experts_implementation="moe_lab_grouped_mm")
    experts = next(experts_modules(model))
    experts._is_expert_parallel = True  # as transformers' MoEParamShard marks it: sentinel ids may come
    with pytest.raises(BackendInputError, match="sharded for expert parallelism"):
        model(torch.randint(0, 128, (1, 5)))
