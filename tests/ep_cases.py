"""What the expert-parallel correctness tests share: a small config, running a case on gloo ranks, and the
check of every rank's errors against the float64 reference's tolerance."""
import torch

import moe_lab
from moe_lab.lessons.tolerances import reference_tolerance
from moe_lab.parallel import run_on_ranks
from moe_lab.parallel.checks import EPCase, check_against_reference

ERRORS = ("output_error", "hidden_states_grad_error", "top_k_weights_grad_error", "gate_up_proj_grad_error",
          "down_proj_grad_error")


def small_config(num_experts=8, top_k=2, dtype=torch.float32):
    return moe_lab.MoEConfig(32, 16, num_experts=num_experts, top_k=top_k, dtype=dtype)


def run_case(case: EPCase) -> list[dict]:
    return run_on_ranks(check_against_reference, len(case.tokens_per_rank), case, timeout_s=120)


def assert_close(results, dtype):
    tolerance = reference_tolerance(dtype)
    for result in results:
        for name in ERRORS:
            assert result[name] <= tolerance, f"rank {result['rank']} {name} = {result[name]:.2e} > {tolerance:.0e}"
