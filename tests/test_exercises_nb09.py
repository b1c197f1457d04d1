"""Notebook 09: the down_proj-gradient exercise's checker, and the tiny MoE language model it trains."""
import pytest
import torch

import moe_lab
from moe_lab.exercises.nb09_training import check_down_proj_gradient
from moe_lab.lessons import nb09_training as nb09


def test_the_right_gradient_passes_and_common_mistakes_are_named():
    assert check_down_proj_gradient(lambda h, dout, w: (w[:, None] * dout).T @ h)
    cases = [
        (None, "still None"),
        (lambda h, dout, w: h.T @ (w[:, None] * dout), "[I, H]"),
        (lambda h, dout, w: dout.T @ h, "routing weight is missing"),
        (lambda h, dout, w: (w[:, None] ** 2 * dout).T @ h, "applied twice"),
        (lambda h, dout, w: (w[:, None] * dout).T @ h / len(w), "mean over rows"),
        (lambda h, dout, w: 1 / 0, "ZeroDivisionError"),
        (lambda h, dout, w: [[0.0]], "returned list"),
        (lambda h, dout, w: torch.zeros(3, 3), "shape is (3, 3)"),
        (lambda h, dout, w: (w[:, None] * dout).T @ h + 1, "differ from autograd"),
    ]
    for answer, message in cases:
        result = check_down_proj_gradient(answer)
        assert not result and message in result.message, (message, result.message)


def test_sorted_activations_are_the_forward_intermediates_grouped_by_expert():
    experts = moe_lab.Experts(moe_lab.MoEConfig(16, 24, num_experts=4, top_k=2))
    x = torch.randn(9, 16)
    index, _ = moe_lab.synthetic_routing(9, 4, 2, seed=2)
    h, order = nb09.sorted_activations(experts, x, index)
    experts_of_rows = index.reshape(-1)[order]
    assert h.shape == (18, 24) and bool((experts_of_rows[1:] >= experts_of_rows[:-1]).all())
    pair = int(order[5])
    token, expert = pair // 2, int(index.reshape(-1)[pair])
    gate, up = (experts.gate_up_proj[expert] @ x[token]).chunk(2)
    assert torch.allclose(h[5], experts.act_fn(gate) * up, atol=1e-6)


def test_backends_train_the_tiny_model_to_the_same_losses():
    corpus = nb09.markov_corpus(vocab_size=24, length=3000, seed=1)
    assert int(corpus.max()) < 24 and len(set(corpus[:200].tolist())) > 5
    config = moe_lab.MoEConfig(16, 24, num_experts=4, top_k=2)
    runs = [nb09.train(backend, corpus, steps=25, seed=3, config=config) for backend in ("eager", "grouped_mm")]
    assert runs[0].loss[0] == pytest.approx(runs[1].loss[0], abs=1e-6)
    assert max(abs(a - b) for a, b in zip(runs[0].loss, runs[1].loss)) < 1e-4
    assert runs[0].loss[-1] < runs[0].loss[0]  # it learns
    usage = torch.tensor(runs[0].usage)
    assert usage.shape == (25, 4) and torch.allclose(usage.sum(1), torch.ones(25))
    assert nb09.chain_entropy() < torch.log(torch.tensor(48.0)).item()


def test_training_with_a_backend_that_cannot_give_gradients_is_refused():
    moe_lab.register("test_forward_only", moe_lab.backends.eager_experts_forward, autograd=False)
    try:
        with pytest.raises(moe_lab.BackendCapabilityError, match="cannot give gradients"):
            nb09.train("test_forward_only", nb09.markov_corpus(length=500), steps=1)
    finally:
        moe_lab.unregister("test_forward_only")
