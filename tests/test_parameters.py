"""moe_lab.parameters: a notebook's parameters checked in the notebook, with one message for everyone."""
import pytest
import torch

from moe_lab.parameters import (Bool, Device, Dtype, Float, Int, IntList, NotebookParameterError, Parameters, Rule,
                                Str, StrList, check_parameters, check_values, undeclared_names)

NAMES = ["eager", "batched_mm", "grouped_mm"]
SPEC = Parameters(
    device=Device(), dtype=Dtype(), num_experts=Int(min=1, max=256), top_k=Int(min=1), scale=Float(positive=True),
    sweep_tokens=IntList(min=1, max=4096), backends=StrList(choices=lambda: NAMES), label=Str(), flag=Bool(),
    rules=[Rule(lambda p: p["top_k"] <= p["num_experts"],
                "top_k={top_k} must be <= num_experts={num_experts}: each token picks top_k distinct experts")],
)
GOOD = dict(device="cpu", dtype="float32", num_experts=8, top_k=2, scale=0.5, sweep_tokens=[1, 16],
            backends=["eager"], label="x", flag=False)


def with_(**changes):
    return {**GOOD, **changes}


def test_good_values_pass_and_are_returned_plain():
    assert check_values(SPEC, GOOD) == GOOD


@pytest.mark.parametrize("name, value, fragment", [
    ("num_experts", True, "must be an integer from 1 to 256, got True"),  # bool is not an int here
    ("num_experts", 0, "from 1 to 256, got 0"),
    ("num_experts", 2.5, "got 2.5"),
    ("num_experts", "eight", "got 'eight'"),
    ("scale", 0, "must be a number > 0"),
    ("scale", float("nan"), "got nan"),
    ("flag", 1, "must be True or False"),
    ("dtype", "int8", "one of ['float32', 'float64', 'bfloat16', 'float16']"),
    ("device", "tpu", '"auto", "cpu" or "cuda"'),
    ("sweep_tokens", [], "a list of at least 1 distinct items"),
    ("sweep_tokens", [1, -1], "each an integer from 1 to 4096"),
    ("sweep_tokens", [4, 4], "distinct"),
    ("sweep_tokens", "abc", "got 'abc'"),
    ("backends", ["eagr"], "one of ['eager', 'batched_mm', 'grouped_mm']"),
    ("label", 3, "a string"),
])
def test_bad_values_are_refused_with_what_is_allowed(name, value, fragment):
    with pytest.raises(NotebookParameterError, match=r"parameter " + name) as error:
        check_values(SPEC, with_(**{name: value}))
    assert fragment in str(error.value)


def test_rules_across_parameters():
    with pytest.raises(NotebookParameterError, match="top_k=9 must be <= num_experts=8"):
        check_values(SPEC, with_(top_k=9))


def test_text_from_papermill_is_parsed():
    # `papermill -p sweep_tokens "[1, 16]"` and `-r num_experts 8` hand the notebook strings
    values = check_values(SPEC, with_(sweep_tokens="[1, 16]", num_experts="8", flag="True", scale="0.25",
                                      backends="eager,grouped_mm"))
    assert values["sweep_tokens"] == [1, 16] and values["num_experts"] == 8 and values["flag"] is True
    assert values["scale"] == 0.25 and values["backends"] == ["eager", "grouped_mm"]
    assert check_values(SPEC, with_(sweep_tokens="1,16"))["sweep_tokens"] == [1, 16]
    assert check_values(SPEC, with_(sweep_tokens=(1, 16)))["sweep_tokens"] == [1, 16]
    assert check_values(SPEC, with_(sweep_tokens="64"))["sweep_tokens"] == [64]


def test_choices_are_asked_when_checked_so_a_new_backend_counts():
    NAMES.append("my_backend")
    try:
        assert check_values(SPEC, with_(backends=["my_backend"]))["backends"] == ["my_backend"]
    finally:
        NAMES.remove("my_backend")
    with pytest.raises(NotebookParameterError, match="my_backend"):
        check_values(SPEC, with_(backends=["my_backend"]))


def test_device_and_dtype_normalise():
    values = check_values(SPEC, with_(device="auto", dtype="bf16"))
    assert values["device"] == ("cuda" if torch.cuda.is_available() else "cpu") and values["dtype"] == "bfloat16"
    if not torch.cuda.is_available():
        with pytest.raises(NotebookParameterError, match='no CUDA GPU; use "auto" or "cpu"'):
            check_values(SPEC, with_(device="cuda"))


def test_unknown_names_are_refused_without_a_notebook():
    with pytest.raises(NotebookParameterError, match=r"no parameter\(s\) \['topk'\]; its parameters are: device, dtype"):
        check_values(SPEC, with_(topk=3))


def test_check_parameters_writes_converted_values_back():
    namespace = with_(device="auto", sweep_tokens="[1, 4]")
    recorded = check_parameters(namespace, SPEC)
    assert namespace["sweep_tokens"] == [1, 4] and isinstance(namespace["device"], torch.device)
    assert recorded["device"] == str(namespace["device"])
    with pytest.raises(NotebookParameterError, match="are not defined: run the parameters cell first"):
        check_parameters({"device": "cpu"}, SPEC)


INJECTED = "# Parameters\ntopk = 4\nnum_tokens = 8\n"
PARAMETERS_CELL = 'device = "auto"\nnum_experts = 8  # E\ntop_k = 2\nnum_expert = 4\n'
CHECK_CELL = "record('parameters', check_parameters(globals(), SPEC))"


@pytest.mark.parametrize("history, unknown", [
    (["", PARAMETERS_CELL, INJECTED, CHECK_CELL], ["num_tokens", "topk"]),  # papermill's injected cell
    (["", PARAMETERS_CELL, CHECK_CELL], ["num_expert"]),  # a name typed into the parameters cell
    (["", "answer = None", CHECK_CELL], []),  # some other assignment-only cell: not the parameters
    (["", "import torch\nnum_experts = 3", CHECK_CELL], []),  # not only assignments
    ([CHECK_CELL], []),
    (None, []),
])
def test_undeclared_names_come_from_the_cell_before_the_check(history, unknown):
    assert undeclared_names(history, SPEC) == unknown


def test_a_misspelled_papermill_parameter_stops_the_check():
    namespace = {**GOOD, "topk": 4, "In": ["", PARAMETERS_CELL, "# Parameters\ntopk = 4\n", CHECK_CELL]}
    with pytest.raises(NotebookParameterError, match=r"no parameter\(s\) \['topk'\].*would otherwise run on the default"):
        check_parameters(namespace, SPEC)


def test_spec_refuses_what_is_not_a_parameter_kind():
    with pytest.raises(TypeError, match="expected a Parameter"):
        Parameters(num_tokens=8)

