"""Notebook 08: the per-sub-config exercise says what changed that should not have."""
from moe_lab.exercises import nb08_real_models as ex


def test_correct_dicts_pass(capsys):
    assert ex.check_vision_only({"vision_config": "batched_mm"})
    assert ex.check_vision_only({"vision_config": "batched_mm", "text_config": "grouped_mm"})
    out = capsys.readouterr().out
    assert "Correct: get_experts_implementation() -> {'': None, 'text_config': 'grouped_mm', " \
           "'vision_config': 'batched_mm'}" in out


def test_a_string_changes_both_backbones():
    result = ex.check_vision_only("batched_mm")
    assert not result
    assert "text_config changed from 'grouped_mm' to 'batched_mm', which should not have changed (a str sets " \
           "every backbone" in result.message


def test_the_empty_key_fills_the_text_backbone():
    result = ex.check_vision_only({"": "batched_mm"})
    assert not result and "the \"\" key fills in every backbone the dict does not name" in result.message
    result = ex.check_vision_only({"": "eager", "vision_config": "batched_mm"})
    assert not result and "text_config changed from 'grouped_mm' to 'eager'" in result.message


def test_wrong_key_wrong_name_and_unfilled():
    result = ex.check_vision_only({"vision": "batched_mm"})
    assert not result and "raised ValueError: unknown sub-config key(s) ['vision']" in result.message
    result = ex.check_vision_only({"vision_config": "bmm"})
    assert not result and "raised UnknownBackendError: unknown experts implementation 'bmm'" in result.message
    result = ex.check_vision_only({"vision_config": "grouped_mm"})
    assert not result and "vision_config is 'grouped_mm', it should be 'batched_mm'" in result.message
    assert "still None" in ex.check_vision_only(None).message
