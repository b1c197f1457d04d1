"""Notebook 01's exercise check: top-k routing with renormalisation written by hand."""
import torch

from moe_lab.exercises.nb01_routing import check_my_route


def correct(logits, k):
    weights, index = torch.topk(logits.float().softmax(dim=-1), k, dim=-1)
    return index, weights / weights.sum(dim=-1, keepdim=True)


def test_correct_answers_pass():
    assert check_my_route(correct)

    def mixtral_style(logits, k):  # softmax over the top-k logits: the same numbers
        values, index = torch.topk(logits, k, dim=-1)
        return index, values.float().softmax(dim=-1)

    assert check_my_route(mixtral_style)


def test_forgot_renormalisation():
    def no_renorm(logits, k):
        weights, index = torch.topk(logits.float().softmax(dim=-1), k, dim=-1)
        return index, weights

    result = check_my_route(no_renorm)
    assert not result and "forgot the renormalisation" in result.message


def test_forgot_softmax():
    def no_softmax(logits, k):
        values, index = torch.topk(logits.float(), k, dim=-1)
        return index, values / values.sum(dim=-1, keepdim=True)

    result = check_my_route(no_softmax)
    assert not result and "forgot the softmax" in result.message


def test_wrong_dtype_and_shape():
    def bf16_weights(logits, k):
        weights, index = torch.topk(logits.softmax(dim=-1), k, dim=-1)
        return index, weights / weights.sum(dim=-1, keepdim=True)

    result = check_my_route(bf16_weights)
    assert not result and "dtype torch.bfloat16" in result.message and "float32" in result.message

    def all_experts(logits, k):
        weights, index = torch.sort(logits.float().softmax(dim=-1), dim=-1, descending=True)
        return index, weights

    result = check_my_route(all_experts)
    assert not result and "expected [T, k]" in result.message and "every expert" in result.message


def test_unfinished_and_broken_answers_do_not_raise():
    result = check_my_route(lambda logits, k: None)
    assert not result and "must return a tuple" in result.message

    def broken(logits, k):
        raise RuntimeError("oops")

    result = check_my_route(broken)
    assert not result and "raised RuntimeError: oops" in result.message
    assert not check_my_route(None)
