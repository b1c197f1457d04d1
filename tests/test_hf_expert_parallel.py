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


def _transformers_ep_against_whole(family, experts_implementation, ep_implementation):
    """transformers' own expert parallelism (its EPImplementation `ep_implementation`) around a moe_lab backend:
    all_to_all hands the experts local ids only, all_reduce hands every rank the whole batch with the ids of the
    other rank's experts as num_experts and weight 0 (sentinels). Logits and input gradients against the
    unsharded model, and how many slots reached the backend's partial entry as absent."""
    from torch.distributed.device_mesh import init_device_mesh
    from transformers.distributed.expert_parallel import apply_expert_parallelism

    import moe_lab
    import moe_lab.hf
    from moe_lab.hf.models import tiny_transformers_model

    spec = moe_lab.backends.get_spec("triton")
    absent_seen = []

    def counted_partial(experts, hidden_states, top_k_index, top_k_weights):
        absent_seen.append(int((top_k_index >= experts.num_experts).sum()))
        return spec.partial_forward(experts, hidden_states, top_k_index, top_k_weights)

    moe_lab.register("triton_counted", spec.forward, autograd=True, partial_forward=counted_partial, overwrite=True)
    moe_lab.hf.register_with_transformers(["grouped_mm", "triton", "triton_counted"])
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_transformers_model(family, seed=0, experts_implementation=experts_implementation)
    shared = ep_implementation == "all_reduce"  # every rank of the group holds the same batch
    ids = torch.randint(0, 128, (1, 9 + (0 if shared else 4 * rank)),
                        generator=torch.Generator().manual_seed(0 if shared else rank))  # [1, T_r]
    whole_logits = model(ids).logits
    whole_logits.sum().backward()
    whole_grad = model.get_input_embeddings().weight.grad.clone()
    model.zero_grad()

    if shared:  # all_reduce wants the EP group to be the TP group
        mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
        ep_mesh = tp_mesh = mesh["ep"]
    else:
        mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("ep", "tp"))
        ep_mesh, tp_mesh = mesh["ep"], mesh["tp"]
    plan = {}
    for module_name, _ in model.named_modules():
        if module_name.endswith("mlp.experts"):
            plan |= {f"{module_name}.gate_up_proj": "grouped_gemm", f"{module_name}.down_proj": "grouped_gemm",
                     module_name: "ep_dispatch_experts"}
    apply_expert_parallelism(model, ep_mesh, tp_mesh, plan, ep_implementation=ep_implementation)
    logits = model(ids).logits
    logits.sum().backward()
    grad = model.get_input_embeddings().weight.grad
    return {"logits": float((logits - whole_logits).abs().max()),
            "grad": moe_lab.relative_error(grad, whole_grad), "absent_seen": absent_seen,
            "sharded": model.model.layers[0].mlp.experts._is_expert_parallel}


@pytest.mark.parametrize("ep_implementation", ["all_to_all", "all_reduce"])
@pytest.mark.parametrize("experts_implementation", ["moe_lab_grouped_mm", "moe_lab_triton_counted"])
def test_moe_lab_backends_inside_transformers_own_expert_parallelism(ep_implementation, experts_implementation):
    # transformers marks the sharded modules (_is_expert_parallel); moe_lab's entries then treat ids >=
    # num_experts as another rank's experts: triton's partial entry (counted) skips them, forward and backward;
    # grouped_mm has no entry and runs them at weight 0 (the generic path), as transformers' own batched_mm does.
    for result in run_on_ranks(_transformers_ep_against_whole, 2, "qwen3_moe", experts_implementation,
                               ep_implementation, timeout_s=240):
        assert result["sharded"]
        assert result["logits"] <= logits_tolerance(torch.float32)
        assert result["grad"] <= reference_tolerance(torch.float32)
        if experts_implementation == "moe_lab_triton_counted":
            assert len(result["absent_seen"]) == 2  # one call per layer, through the partial entry
            # all_reduce: about half of every token's slots belong to the other rank; all_to_all: none
            assert (min(result["absent_seen"]) > 0) == (ep_implementation == "all_reduce")


def test_an_expert_parallel_module_runs_the_partial_entry_or_the_generic_path():
    # No process group: a module marked as transformers marks it, fed sentinel ids by hand.
    import moe_lab.hf
    from moe_lab.hf.models import experts_modules, tiny_transformers_model
    from moe_lab.reference import reference_experts_forward

    moe_lab.hf.register_with_transformers(["grouped_mm", "eager", "triton"])
    model = tiny_transformers_model("qwen3_moe")
    experts = next(experts_modules(model))
    experts._is_expert_parallel = True
    E, k = experts.num_experts, model.config.num_experts_per_tok
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, model.config.hidden_size, generator=generator)
    index = torch.stack([torch.randperm(E, generator=generator)[:k] for _ in range(7)])
    index[::2, 0] = E  # another rank's expert, weight 0, as transformers' all_reduce hands it over
    index[3] = E
    weights = torch.rand(7, k, generator=generator).masked_fill(index >= E, 0.0)
    present = index < E
    expected = reference_experts_forward(experts, x, torch.where(present, index, 0), weights)
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    for name in ("moe_lab_grouped_mm", "moe_lab_eager", "moe_lab_triton"):
        out = ALL_EXPERTS_FUNCTIONS[name](experts, x, index, weights)
        assert moe_lab.relative_error(out, expected) <= reference_tolerance(torch.float32), name
        assert torch.all(out[3] == 0), name  # no expert of this rank
