import math

import pytest
import torch

import moe_lab


def test_softmax_topk_with_and_without_renormalisation():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = logits.softmax(-1)[0]
    out = moe_lab.route(logits, 2, norm_topk_prob=False)
    assert out.top_k_index.tolist() == [[0, 1]]
    torch.testing.assert_close(out.top_k_weights[0], probs[:2])
    renormalised = moe_lab.route(logits, 2, norm_topk_prob=True).top_k_weights[0]
    torch.testing.assert_close(renormalised, probs[:2] / probs[:2].sum())
    assert math.isclose(float(renormalised.sum()), 1.0, rel_tol=1e-6)


def test_sigmoid_scores_and_bias_changes_selection_not_weights():
    logits = torch.tensor([[0.5, 0.4, -3.0]])
    plain = moe_lab.route(logits, 1, score="sigmoid", norm_topk_prob=False)
    assert plain.top_k_index.tolist() == [[0]]
    biased = moe_lab.route(logits, 1, score="sigmoid", norm_topk_prob=False, score_bias=torch.tensor([0.0, 0.5, 0.0]))
    assert biased.top_k_index.tolist() == [[1]]
    torch.testing.assert_close(biased.top_k_weights, torch.sigmoid(torch.tensor([[0.4]])))


def test_route_rejects_bad_arguments():
    with pytest.raises(moe_lab.ConfigError, match=r"top_k=5 must be between 1 and the number of experts \(4\)"):
        moe_lab.route(torch.zeros(3, 4), 5)
    with pytest.raises(moe_lab.ConfigError, match="allowed: \\['softmax', 'sigmoid'\\]"):
        moe_lab.route(torch.zeros(3, 4), 1, score="relu")
    with pytest.raises(ValueError, match=r"\[tokens, experts\]"):
        moe_lab.route(torch.zeros(4), 1)


def test_router_module_matches_route():
    cfg = moe_lab.MoEConfig(16, 8, num_experts=6, top_k=2)
    router = moe_lab.TopKRouter(cfg)
    x = torch.randn(5, 16)
    out = router(x)
    assert out.top_k_index.shape == (5, 2) and out.top_k_index.dtype == torch.int64
    expected = moe_lab.route(x @ router.weight.T, 2)
    assert torch.equal(out.top_k_index, expected.top_k_index)
    assert router.score_bias is None
    assert moe_lab.TopKRouter(cfg.replace(router_score="sigmoid")).score_bias.shape == (6,)


def test_routing_stats_by_hand():
    idx = torch.tensor([[0, 1], [0, 2], [0, 1]])
    stats = moe_lab.routing_stats(idx, 4)
    assert stats.tokens_per_expert == [3, 2, 1, 0]
    assert (stats.num_tokens, stats.top_k, stats.experts_hit, stats.max_load) == (3, 2, 3, 3)
    assert stats.mean_load == 1.5 and stats.imbalance == 2.0
    expected_entropy = -sum(p * math.log(p) for p in (3 / 6, 2 / 6, 1 / 6))
    assert math.isclose(stats.entropy, expected_entropy, rel_tol=1e-12)
    assert math.isclose(stats.normalized_entropy, stats.entropy / math.log(4))
    assert stats.as_dict()["num_experts"] == 4


def test_synthetic_distributions_shape_the_load():
    T, E, k = 2000, 16, 2
    uniform = moe_lab.routing_stats(moe_lab.synthetic_routing(T, E, k)[0], E)
    zipf = moe_lab.routing_stats(moe_lab.synthetic_routing(T, E, k, distribution="zipf", skew=2.0)[0], E)
    single_idx, single_w = moe_lab.synthetic_routing(T, E, k, distribution="single")
    single = moe_lab.routing_stats(single_idx, E)
    assert uniform.normalized_entropy > 0.99 and uniform.imbalance < 1.2
    assert zipf.imbalance > 3 and zipf.tokens_per_expert[0] == zipf.max_load
    assert single.tokens_per_expert[0] == T and single.experts_hit == k
    assert single.imbalance == E / k  # everything on k experts: max/mean = E/k
    for distribution in ("uniform", "zipf", "single"):
        idx, w = moe_lab.synthetic_routing(50, E, 4, distribution=distribution, seed=3)
        assert all(len(set(row)) == 4 for row in idx.tolist()), "a token's experts must be distinct"
        assert (w > 0).all() and torch.allclose(w.sum(-1), torch.ones(50))
    again = moe_lab.synthetic_routing(50, E, 4, distribution="zipf", seed=3)
    assert torch.equal(again[0], moe_lab.synthetic_routing(50, E, 4, distribution="zipf", seed=3)[0])


def test_synthetic_routing_rejects_bad_arguments():
    with pytest.raises(moe_lab.ConfigError, match="allowed: \\['uniform', 'zipf', 'single'\\]"):
        moe_lab.synthetic_routing(4, 4, 1, distribution="normal")
    with pytest.raises(moe_lab.ConfigError, match="top_k=5 must be between 1 and num_experts=4"):
        moe_lab.synthetic_routing(4, 4, 5)
    with pytest.raises(moe_lab.ConfigError, match="skew must be >= 0"):
        moe_lab.synthetic_routing(4, 4, 1, distribution="zipf", skew=-1)
    assert moe_lab.synthetic_routing(0, 4, 2)[0].shape == (0, 2)


def test_load_balancing_loss_is_one_when_even_and_grows_with_imbalance():
    # Every token prefers experts 0 and 1: f = [1/2, 1/2, 0, 0], P ~ [1/2, 1/2, 0, 0] -> 4 * (1/4 + 1/4) ~ 2.
    crowded = moe_lab.route(torch.tensor([[8.0, 8.0, 0.0, 0.0]]).repeat(8, 1), 2)
    assert moe_lab.load_balancing_loss(crowded).item() == pytest.approx(2.0, rel=2e-3)
    # Everything on one expert (k=1) approaches E.
    alone = moe_lab.route(torch.tensor([[12.0, 0.0, 0.0, 0.0]]).repeat(8, 1), 1)
    assert moe_lab.load_balancing_loss(alone).item() == pytest.approx(4.0, rel=1e-3)
    balanced = moe_lab.RouterOutput(torch.zeros(4, 4), torch.full((4, 4), 0.25),
                                    torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]]), torch.full((4, 2), 0.5))
    assert moe_lab.load_balancing_loss(balanced).item() == pytest.approx(1.0)
    # The gradient reaches the router's logits through the scores (the picks are not differentiable),
    # and lowers the scores of the experts picked most.
    logits = torch.randn(64, 8, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    routing = moe_lab.route(logits, 2)
    moe_lab.load_balancing_loss(routing).backward()
    picked = torch.bincount(routing.top_k_index.reshape(-1), minlength=8)
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert logits.grad.sum(0)[picked.argmax()] > logits.grad.sum(0)[picked.argmin()]
    assert moe_lab.load_balancing_loss(moe_lab.route(torch.zeros(0, 4), 2)).item() == 0.0
