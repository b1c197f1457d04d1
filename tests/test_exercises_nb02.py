"""Notebook 02's exercise check: predict the eager loop's iterations and the textbook loop's syncs."""
import moe_lab
from moe_lab.bench.inputs import random_hidden_states
from moe_lab.exercises.nb02_eager_loop import check_loop_prediction
from moe_lab.lessons.nb02_eager_loop import count_ops, count_sync_points, textbook_loop_forward

# The notebook's exercise routing: 6 tokens, top_k=2, 8 experts, 5 of them hit.
INDEX, WEIGHTS = moe_lab.synthetic_routing(6, 8, 2, distribution="zipf", skew=1.5, seed=1)
HIT = moe_lab.routing_stats(INDEX, 8).experts_hit


def test_routing_is_the_one_the_notebook_describes():
    assert HIT == 5 and INDEX.shape == (6, 2)


def test_correct_answer_passes():
    assert check_loop_prediction(INDEX, 8, eager_iterations=HIT, textbook_syncs=8)


def test_pairs_instead_of_experts_hit():
    result = check_loop_prediction(INDEX, 8, eager_iterations=12, textbook_syncs=8)
    assert not result and "(token, expert) pairs" in result.message


def test_all_experts_instead_of_experts_hit():
    result = check_loop_prediction(INDEX, 8, eager_iterations=8, textbook_syncs=8)
    assert not result and "skips the experts whose group size is 0" in result.message


def test_textbook_syncs_mistaken_for_experts_hit_or_one():
    result = check_loop_prediction(INDEX, 8, eager_iterations=HIT, textbook_syncs=HIT)
    assert not result and "cannot skip an empty expert" in result.message
    result = check_loop_prediction(INDEX, 8, eager_iterations=HIT, textbook_syncs=1)
    assert not result and "moe_lab's eager" in result.message


def test_unanswered_does_not_raise():
    result = check_loop_prediction(INDEX, 8, eager_iterations=None, textbook_syncs="eight")
    assert not result and "still None" in result.message and "whole number" in result.message


def test_counts_match_the_loops_themselves():
    config = moe_lab.MoEConfig(hidden_size=16, intermediate_size=16, num_experts=8, top_k=2)
    experts = moe_lab.Experts(config)
    hidden = random_hidden_states(6, config, INDEX.device)
    _, textbook = count_sync_points(textbook_loop_forward, experts, hidden, INDEX, WEIGHTS)
    _, eager = count_sync_points(moe_lab.backends.eager_experts_forward, experts, hidden, INDEX, WEIGHTS)
    assert sum(textbook.values()) == 8 and dict(eager) == {".tolist()": 1}
    _, ops = count_ops(moe_lab.backends.eager_experts_forward, experts, hidden, INDEX, WEIGHTS)
    assert ops["mm"] == 2 * HIT
    out = textbook_loop_forward(experts, hidden, INDEX, WEIGHTS)
    expected = moe_lab.reference_experts_forward(experts, hidden, INDEX, WEIGHTS)
    assert moe_lab.relative_error(out, expected) < 1e-5
