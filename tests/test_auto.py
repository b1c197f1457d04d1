"""The `auto` backend and `moe-lab calibrate`: which backend runs at which T, and why.

Every test points $MOE_LAB_CALIBRATION into its own tmp_path, so nothing reads or writes the
user's ~/.cache/moe_lab/calibration.json. Layers are tiny (E=4, k=2, H=32, I=16, float32).
"""
import json
import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_lab
from moe_lab.backends import auto
from moe_lab.backends.auto import DEFAULT_CROSSOVERS, pick
from moe_lab.backends.calibration import write_calibration
from moe_lab.bench.calibrate import candidate_backends, format_calibration, rules_from_winners, sticky_winners
from moe_lab.cli import main

E, K, H, I = 4, 2, 32, 16
SHAPE = (E, K, H, I)
CONFIG = moe_lab.MoEConfig(H, I, num_experts=E, top_k=K)
# float32 against the float64 reference: ~6e-8 per rounding, a few hundred accumulations per output.
RTOL = 1e-5


@pytest.fixture(autouse=True)
def calibration_file(tmp_path, monkeypatch):
    """Each test gets its own (absent) calibration file and a cold cache."""
    path = tmp_path / "calibration.json"
    monkeypatch.setenv("MOE_LAB_CALIBRATION", str(path))
    moe_lab.reload_calibration()
    yield path
    moe_lab.reload_calibration()


def write_table(path, rules, shape, *more):
    """A calibration file for this CPU, float32: `rules` at `shape` (None: any shape), plus `more`
    entries as (rules, shape[, dtype])."""
    data = {"format": "moe_lab calibration", "version": 1, "entries": []}
    for rules, shape, *dtype in [(rules, shape), *more]:
        data["entries"].append({
            "device_type": "cpu", "device_name": auto.device_name("cpu"), "dtype": (dtype or ["float32"])[0],
            "shape": None if shape is None else dict(zip(auto.SHAPE_KEYS, shape)),
            "rules": [list(rule) for rule in rules], "date": "2025-01-02T03:04:05+00:00",
        })
    path.write_text(json.dumps(data))
    moe_lab.reload_calibration()
    return path


def make_case(T, seed=0):
    experts = moe_lab.Experts(CONFIG, experts_implementation="auto")
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(seed))
    idx, w = moe_lab.synthetic_routing(T, E, K, seed=seed)
    return experts, x, idx, w


@pytest.fixture
def spies():
    """Two user backends that record the T they ran at (and compute with eager / batched_mm)."""
    calls = {"small": [], "large": []}

    def spy(label, inner):
        def forward(experts, hidden_states, top_k_index, top_k_weights):
            calls[label].append(hidden_states.shape[0])
            return moe_lab.get_backend(inner)(experts, hidden_states, top_k_index, top_k_weights)
        return forward

    moe_lab.register("test_small", spy("small", "eager"))
    moe_lab.register("test_large", spy("large", "batched_mm"))
    yield calls
    moe_lab.unregister("test_small")
    moe_lab.unregister("test_large")


def test_auto_equals_the_chosen_backend_and_the_float64_reference():
    for T in (1, 8, 9, 64, 3000):  # both sides of each default CPU crossover
        experts, x, idx, w = make_case(T)
        chosen, why = moe_lab.choose_backend(T, "cpu", torch.float32, SHAPE)
        assert chosen in {"eager", "batched_mm", "grouped_mm"} and why.startswith("uncalibrated default for cpu")
        out = experts(x, idx, w)
        experts.set_experts_implementation(chosen)
        assert torch.equal(out, experts(x, idx, w)), f"T={T}: auto did not run {chosen}"
        ref = moe_lab.reference_experts_forward(experts, x, idx, w)
        assert moe_lab.relative_error(out, ref) < RTOL


def test_the_choice_changes_across_a_calibrated_crossover(calibration_file, spies):
    write_table(calibration_file, [[4, "test_small"], [None, "test_large"]], SHAPE)
    assert moe_lab.choose_backend(4, "cpu", "float32", SHAPE) == (
        "test_small", f"calibrated on {auto.device_name('cpu')} 2025-01-02 for E=4,k=2,H=32,I=16: T=4 <= 4 -> test_small")
    name, why = moe_lab.choose_backend(5, "cpu", "float32", CONFIG)  # a MoEConfig works as the shape
    assert name == "test_large" and why.endswith("T=5 > 4 -> test_large")
    for T in (1, 4, 5, 40):
        experts, x, idx, w = make_case(T)
        ref = moe_lab.reference_experts_forward(experts, x, idx, w)
        assert moe_lab.relative_error(experts(x, idx, w), ref) < RTOL
    assert spies == {"small": [1, 4], "large": [5, 40]}


def test_an_exact_shape_entry_wins_over_the_device_dtype_entry(calibration_file):
    write_table(calibration_file, [[None, "eager"]], None, ([[2, "batched_mm"], [None, "grouped_mm"]], SHAPE),
                ([[None, "batched_mm"]], None, "bfloat16"))
    assert moe_lab.choose_backend(2, "cpu", torch.float32, SHAPE)[0] == "batched_mm"
    assert moe_lab.choose_backend(3, "cpu", torch.float32, SHAPE)[0] == "grouped_mm"
    other, why = moe_lab.choose_backend(2, "cpu", torch.float32, (8, 2, 32, 16))
    assert other == "eager" and "for E=" not in why  # the shape-less entry serves other shapes
    assert moe_lab.choose_backend(2, "cpu", torch.float32)[0] == "eager"
    assert moe_lab.choose_backend(2, "cpu", torch.bfloat16, SHAPE)[0] == "batched_mm"  # dtype is part of the key
    # An entry for another machine is not used here.
    data = json.loads(calibration_file.read_text())
    for entry in data["entries"]:
        entry["device_name"] = "some other CPU"
    calibration_file.write_text(json.dumps(data))
    moe_lab.reload_calibration()
    name, why = moe_lab.choose_backend(2, "cpu", torch.float32, SHAPE)
    assert why.startswith("uncalibrated default for cpu") and f"no float32 entry for {auto.device_name('cpu')!r}" in why


def test_uncalibrated_cpu_defaults(calibration_file):
    rules = DEFAULT_CROSSOVERS["cpu"]
    assert rules[-1][0] is None and all(name not in ("auto", "triton") for _, name in rules)
    previous = 0
    for (max_tokens, name), following in zip(rules, [*rules[1:], None]):
        if max_tokens is None:
            assert moe_lab.choose_backend(previous + 1, "cpu", torch.float32)[0] == name
            break
        for T in (previous + 1, max_tokens):
            chosen, why = moe_lab.choose_backend(T, "cpu", torch.float32)
            assert chosen == name and why == (f"uncalibrated default for cpu (no calibration file at "
                                              f"{calibration_file}): T={T} <= {max_tokens} -> {name}")
        assert moe_lab.choose_backend(max_tokens + 1, "cpu", torch.float32)[0] == following[1]
        previous = max_tokens


def test_names_that_cannot_run_are_skipped_with_the_reason(calibration_file):
    write_table(calibration_file, [[2, "auto"], [8, "flash"], [16, "triton"], [None, "batched_mm"]], SHAPE)
    name, why = moe_lab.choose_backend(1, "cpu", torch.float32, SHAPE)
    assert name == "batched_mm"
    assert "skipped auto: auto dispatches to other backends" in why and "skipped flash: not registered" in why
    assert "skipped triton: only through an interpreter here, too slow to choose" in why
    # With nothing usable left, auto falls back to grouped_mm; the forward runs it without complaint.
    write_table(calibration_file, [[None, "auto"]], SHAPE)
    name, why = moe_lab.choose_backend(7, "cpu", torch.float32, SHAPE)
    assert name == "grouped_mm" and "no rule covers it -> grouped_mm (fallback)" in why
    experts, x, idx, w = make_case(7)
    out = experts(x, idx, w)
    experts.set_experts_implementation("grouped_mm")
    assert torch.equal(out, experts(x, idx, w))
    # Under torch.compile eager would break the graph, so auto passes over it there.
    write_table(calibration_file, [[None, "eager"]], SHAPE)
    assert moe_lab.choose_backend(7, "cpu", torch.float32, SHAPE)[0] == "eager"
    name, why = moe_lab.choose_backend(7, "cpu", torch.float32, SHAPE, compiling=True)
    assert name == "grouped_mm" and "skipped eager: it is being compiled, and it reads the per-expert" in why
    # The reasons come from the backends' declared capabilities, not from a list in auto.
    assert moe_lab.get_spec("eager").supports("fullgraph", moe_lab.Where.of("cpu", torch.float32)).reason in why


@settings(max_examples=60, deadline=None)
@given(names=st.lists(st.sampled_from(["auto", "triton", "eager", "batched_mm", "grouped_mm", "flash"]),
                      min_size=1, max_size=5),
       steps=st.lists(st.integers(1, 64), min_size=5, max_size=5), open_ended=st.booleans(),
       num_tokens=st.integers(0, 400))
def test_choose_backend_never_returns_auto_nor_triton_on_cpu(tmp_path_factory, names, steps, open_ended, num_tokens):
    bounds = [sum(steps[:i + 1]) for i in range(len(names))]
    rules = [[None if open_ended and i == len(names) - 1 else bound, name] for i, (bound, name) in enumerate(zip(bounds, names))]
    path = write_table(tmp_path_factory.mktemp("table") / "c.json", rules, SHAPE)
    name, why = moe_lab.choose_backend(num_tokens, "cpu", torch.float32, SHAPE, path=path)
    assert name not in ("auto", "triton") and name in moe_lab.available_backends()
    assert why.startswith("calibrated on")


FILE_FORMAT = '{"format": "moe_lab calibration", "version": 1 or 2, "entries": [...]}'


@pytest.mark.parametrize("content, problem, expected", [
    ("{not json", "is not valid JSON", FILE_FORMAT),
    (json.dumps({"format": "moe_lab calibration", "version": 99, "entries": []}), "'version': 99", FILE_FORMAT),
    (json.dumps({"format": "moe_lab calibration", "version": 1, "entries": [
        {"device_type": "cpu", "device_name": "x", "dtype": "float32", "rules": [[16, "eager"], [8, "grouped_mm"]]}]}),
     "entry 0: rule 1 has max_tokens 8 after 16", "max_tokens increasing ints >= 0, only the last null"),
    (json.dumps({"format": "moe_lab calibration", "version": 1, "entries": [{"device_type": "cpu"}]}),
     "entry 0: missing ['device_name', 'dtype', 'rules']", "an entry needs device_type, device_name, dtype, rules"),
])
def test_a_corrupt_file_is_a_value_error_naming_it(calibration_file, content, problem, expected):
    calibration_file.write_text(content)
    with pytest.raises(ValueError, match=re.escape(str(calibration_file))) as info:
        moe_lab.choose_backend(1, "cpu", torch.float32)
    assert isinstance(info.value, moe_lab.CalibrationError)
    assert problem in str(info.value) and expected in str(info.value)
    with pytest.raises(moe_lab.CalibrationError, match=re.escape(str(calibration_file))):
        moe_lab.calibrate(CONFIG, tokens=[1], device="cpu")  # refused before measuring anything


def test_the_forward_warns_once_on_a_corrupt_file_and_uses_the_defaults(calibration_file):
    calibration_file.write_text("{not json")
    expected = moe_lab.choose_backend(3, "cpu", torch.float32, path=calibration_file.parent / "absent.json")[0]
    experts, x, idx, w = make_case(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = experts(x, idx, w)
        experts(x, idx, w)
        experts(*make_case(300)[1:])
    messages = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]
    assert len(messages) == 1 and str(calibration_file) in messages[0] and "uncalibrated defaults" in messages[0]
    experts.set_experts_implementation(expected)
    assert torch.equal(out, experts(x, idx, w))
    assert moe_lab.relative_error(out, moe_lab.reference_experts_forward(experts, x, idx, w)) < RTOL


def test_auto_under_torch_compile_picks_per_shape(calibration_file):
    import torch._dynamo

    write_table(calibration_file, [[4, "batched_mm"], [None, "grouped_mm"]], SHAPE)
    graphs = []

    def capture(graph_module, example_inputs):  # record the traced graph, run it as is (no inductor)
        graphs.append(graph_module.code)
        return graph_module.forward

    torch._dynamo.reset()
    try:
        experts, _, _, _ = make_case(1)
        compiled = torch.compile(experts, fullgraph=True, backend=capture)
        for T, marker in ((2, "torch.bmm"), (16, "grouped_matmul_loop")):
            _, x, idx, w = make_case(T, seed=T)
            with torch.no_grad():
                out = compiled(x, idx, w)
            assert marker in graphs[-1], f"T={T}: expected {marker} in the traced graph"
            assert moe_lab.relative_error(out, moe_lab.reference_experts_forward(experts, x, idx, w)) < RTOL
        assert len(graphs) == 2 and "grouped_matmul_loop" not in graphs[0] and "torch.bmm" not in graphs[1]
    finally:
        torch._dynamo.reset()


def test_rules_from_winners_merges_runs_and_opens_the_last():
    assert rules_from_winners([(1, "b"), (8, "b"), (64, "g"), (512, "g")]) == ((8, "b"), (None, "g"))
    assert rules_from_winners([(1, "a"), (2, "b"), (4, "a")]) == ((1, "a"), (2, "b"), (None, "a"))
    assert rules_from_winners([(16, "g")]) == ((None, "g"),)


def test_calibrate_drops_refused_candidates_and_merges_entries(calibration_file):
    one_token = moe_lab.predict_gather_bytes(1, K, H, I, torch.float32)
    with moe_lab.batched_mm_budget(one_token):  # batched_mm may run T=1 but refuses T=8
        entry = moe_lab.calibrate(CONFIG, tokens=[8, 1], backends=["batched_mm", "grouped_mm"], device="cpu",
                                  max_seconds=0.02)
    first, second = entry.measurements
    assert [first["num_tokens"], second["num_tokens"]] == [1, 8]
    assert first["median_ms"]["batched_mm"] > 0 and second["median_ms"]["batched_mm"] is None
    assert second["skipped"]["batched_mm"].startswith("refused: GatherBudgetError") and second["winner"] == "grouped_mm"
    assert entry.rules[-1] == (None, "grouped_mm") and entry.shape == SHAPE
    assert first["winner"] == min(first["median_ms"], key=first["median_ms"].get)
    assert "T=8 batched_mm not timed: refused" in format_calibration(entry)
    # Same device+dtype+shape replaces; another shape (here: shape null) adds.
    write_calibration(entry)
    write_calibration(moe_lab.Calibration("cpu", entry.device_name, "float32", None, ((None, "eager"),)))
    write_calibration(entry)
    stored = moe_lab.load_calibration()
    assert [e.shape for e in stored] == [None, SHAPE] and stored[1].rules == entry.rules
    assert moe_lab.choose_backend(8, "cpu", torch.float32, SHAPE)[0] == "grouped_mm"


def test_cli_calibrate_writes_a_file_choose_backend_uses(tmp_path, capsys):
    out = tmp_path / "cli" / "calibration.json"
    rc = main(["calibrate", "--hidden", "32", "--intermediate", "16", "--experts", "4", "--top-k", "2",
               "--tokens", "1,8", "--device", "cpu", "--max-seconds", "0.02", "--tie-margin", "0", "--output", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert re.search(r"T\s+winner\s+eager ms\s+batched_mm ms\s+grouped_mm ms", printed)
    assert "rules (" in printed and printed.strip().endswith(f"wrote {out}")
    (entry,) = moe_lab.load_calibration(out)
    assert entry.shape == SHAPE and entry.dtype == "float32" and entry.provenance["cpu_threads"] == 1
    for measured in entry.measurements:
        T, medians = measured["num_tokens"], measured["median_ms"]
        assert set(medians) == {"eager", "batched_mm", "grouped_mm"} and all(ms > 0 for ms in medians.values())
        assert measured["winner"] == min(medians, key=medians.get)
        name, why = moe_lab.choose_backend(T, "cpu", torch.float32, SHAPE, path=out)
        assert name == pick(entry.rules, T) == measured["winner"] and why.startswith("calibrated on")


def test_isolated_near_ties_keep_the_backend_before_and_crossovers_switch_where_they_start():
    # H200 training calls on mixtral-8x7b (moe-lab calibrate --backward, ms): the fastest flips at 256 and 512 by
    # 0.4-4 %. With a 3 % margin the isolated flip at 512 (grouped_mm fastest again at 1024) keeps grouped_mm; the
    # crossover at 4096 (triton fastest there and at 8192) switches at 4096, not one point late.
    measured = [(128, 3.565, 3.512), (256, 3.653, 3.79), (512, 4.493, 4.473), (1024, 5.666, 6.096),
                (2048, 9.15, 9.347), (4096, 16.46, 16.0), (8192, 31.57, 29.25)]
    measurements = [{"num_tokens": T, "median_ms": {"grouped_mm": g, "triton": t}} for T, g, t in measured]
    assert rules_from_winners(sticky_winners(measurements)) == (
        (128, "triton"), (256, "grouped_mm"), (512, "triton"), (2048, "grouped_mm"), (None, "triton"))
    assert rules_from_winners(sticky_winners(measurements, 0.03)) == (
        (128, "triton"), (2048, "grouped_mm"), (None, "triton"))
    measurements[-1]["median_ms"]["triton"] = 40.0  # triton slower again at 8192: its 1.5 % lead at 4096 is isolated
    assert sticky_winners(measurements, 0.03)[-2:] == [(4096, "grouped_mm"), (8192, "grouped_mm")]
    measurements[2]["median_ms"]["grouped_mm"] = None  # grouped_mm did not run at 512: the fastest that ran
    assert sticky_winners(measurements, 0.03)[1:3] == [(256, "grouped_mm"), (512, "triton")]
    with pytest.raises(ValueError, match=r"tie_margin must be a fraction in \[0, 1\), e.g. 0.03 for 3 %; got 3"):
        sticky_winners(measurements, 3)


def test_cli_calibrate_bad_arguments_exit_2(tmp_path, capsys):
    base = ["calibrate", "--hidden", "32", "--intermediate", "16", "--experts", "4", "--top-k", "2", "--tokens", "1",
            "--device", "cpu", "--output", str(tmp_path / "c.json")]
    assert main([*base, "--backends", "auto"]) == 2
    assert "cannot calibrate 'auto' on cpu in float32: auto dispatches to other backends" in capsys.readouterr().err
    assert main([*base, "--backends", "triton"]) == 2
    assert "only through an interpreter here, too slow to choose" in capsys.readouterr().err
    assert main([*base, "--backends", "flash"]) == 2
    assert "unknown experts implementation 'flash'" in capsys.readouterr().err
    assert not (tmp_path / "c.json").exists()


def test_training_calls_read_training_rules_first_then_the_forward_ones(calibration_file, spies):
    # An entry calibrated on training calls (pass forward_backward) serves calls that need gradients only; a
    # forward entry serves the forward, and training calls where no training entry exists.
    write_table(calibration_file, [[None, "test_small"]], SHAPE)
    data = json.loads(calibration_file.read_text())
    assert moe_lab.choose_backend(5, "cpu", torch.float32, SHAPE, grad=True)[0] == "test_small"  # forward rules
    data["entries"].append({**data["entries"][0], "rules": [[None, "test_large"]], "pass": "forward_backward"})
    calibration_file.write_text(json.dumps(data))
    moe_lab.reload_calibration()
    with pytest.raises(moe_lab.CalibrationError, match="is version 1 but holds training entries"):
        moe_lab.choose_backend(5, "cpu", torch.float32, SHAPE, grad=True)  # an old reader would misuse them
    data["version"] = 2
    calibration_file.write_text(json.dumps(data))
    moe_lab.reload_calibration()
    name, why = moe_lab.choose_backend(5, "cpu", torch.float32, SHAPE, grad=True)
    assert name == "test_large" and why.startswith(f"calibrated on training calls on {auto.device_name('cpu')}")
    assert moe_lab.choose_backend(5, "cpu", torch.float32, SHAPE)[0] == "test_small"
    experts, x, idx, w = make_case(5)
    with torch.no_grad():
        experts(x, idx, w)
    experts(x.requires_grad_(), idx, w).sum().backward()  # gradients needed: the training rules
    assert spies == {"small": [5], "large": [5]} and x.grad is not None
    # Training entries alone do not serve the forward; the reason says so.
    data["entries"] = data["entries"][1:]
    calibration_file.write_text(json.dumps(data))
    moe_lab.reload_calibration()
    name, why = moe_lab.choose_backend(5, "cpu", torch.float32, SHAPE)
    assert why.startswith("uncalibrated default for cpu") and "for training calls only" in why


def test_for_gradients_a_training_entry_of_any_shape_comes_before_a_forward_entry_of_this_shape(calibration_file):
    # The pass is asked first, the shape second: a forward crossover says nothing of a training step's.
    write_table(calibration_file, [[None, "batched_mm"]], SHAPE, ([[None, "eager"]], None))
    data = json.loads(calibration_file.read_text())
    data["entries"][1]["pass"] = "forward_backward"  # the any-shape entry times training calls
    data["version"] = 2
    calibration_file.write_text(json.dumps(data))
    moe_lab.reload_calibration()
    assert moe_lab.choose_backend(4, "cpu", torch.float32, SHAPE, grad=True)[0] == "eager"
    assert moe_lab.choose_backend(4, "cpu", torch.float32, SHAPE)[0] == "batched_mm"


def test_a_bad_pass_is_a_calibration_error(calibration_file):
    write_table(calibration_file, [[None, "eager"]], SHAPE)
    data = json.loads(calibration_file.read_text())
    data["entries"][0]["pass"] = "backward"
    calibration_file.write_text(json.dumps(data))
    moe_lab.reload_calibration()
    with pytest.raises(moe_lab.CalibrationError, match=r"pass must be one of \['forward', 'forward_backward'\]"):
        moe_lab.choose_backend(1, "cpu", torch.float32, SHAPE)


def test_calibrate_backward_times_training_calls_among_backends_that_train(calibration_file):
    moe_lab.register("test_no_grad", moe_lab.get_backend("eager"), autograd=False)
    try:
        assert "test_no_grad" not in candidate_backends("cpu", grad=True)
        with pytest.raises(ValueError, match="cannot calibrate 'test_no_grad' on cpu in float32: gradients are needed"):
            moe_lab.calibrate(CONFIG, tokens=[4], backends=["test_no_grad"], device="cpu", backward=True)
    finally:
        moe_lab.unregister("test_no_grad")
    asked_for_gradients = []

    def spy(experts, hidden_states, top_k_index, top_k_weights):
        asked_for_gradients.append(torch.is_grad_enabled() and hidden_states.requires_grad)
        return moe_lab.get_backend("eager")(experts, hidden_states, top_k_index, top_k_weights)

    moe_lab.register("test_spy", spy, autograd=True)
    try:
        forward = moe_lab.calibrate(CONFIG, tokens=[4], backends=["test_spy", "grouped_mm"], device="cpu",
                                    max_seconds=0.02)
        assert asked_for_gradients and not any(asked_for_gradients)
        assert json.loads(calibration_file.read_text())["version"] == 1
        asked_for_gradients.clear()
        training = moe_lab.calibrate(CONFIG, tokens=[4], backends=["test_spy", "grouped_mm"], device="cpu",
                                     max_seconds=0.02, backward=True)
        assert asked_for_gradients and all(asked_for_gradients)  # every timed call was a training call
        winner = training.measurements[0]["winner"]
        assert moe_lab.choose_backend(4, "cpu", torch.float32, SHAPE, grad=True)[0] == winner
    finally:
        moe_lab.unregister("test_spy")
    assert (forward.pass_, training.pass_) == ("forward", "forward_backward")
    assert "training calls" in format_calibration(training) and "training calls" not in format_calibration(forward)
    stored = moe_lab.load_calibration()  # one entry per pass: neither replaced the other
    assert sorted(e.pass_ for e in stored) == ["forward", "forward_backward"]
    # Version 2 once it holds a training entry (a moe_lab before them refuses it instead of misusing it), 1 before.
    assert json.loads(calibration_file.read_text())["version"] == 2


def test_the_recorded_h200_training_calibration_and_what_todays_rule_makes_of_its_medians():
    # data/h200_calibration_backward.json (moe-lab calibrate --backward on an H200, at 59617ff): it reads in today's
    # format. Its rules came from the first margin rule (any near tie kept the backend before: grouped_mm to 4096);
    # today's rule, on the same stored medians, switches to triton at 4096 where it is fastest there and after.
    from pathlib import Path

    recorded = Path(__file__).resolve().parents[1] / "data" / "h200_calibration_backward.json"
    entries = moe_lab.load_calibration(recorded)
    assert entries and all(e.pass_ == "forward_backward" and e.device_name == "NVIDIA H200" for e in entries)
    stored = {entry.shape[:2]: entry.rules for entry in entries}  # (E, k)
    today = {entry.shape[:2]: rules_from_winners(sticky_winners(entry.measurements, entry.provenance["tie_margin"]))
             for entry in entries}
    assert stored[(8, 2)] == ((512, "triton"), (4096, "grouped_mm"), (None, "triton"))  # mixtral-8x7b, as recorded
    assert today[(8, 2)] == today[(256, 8)] == ((512, "triton"), (2048, "grouped_mm"), (None, "triton"))  # + deepseek
    assert stored[(128, 8)] == today[(128, 8)] == ((None, "triton"),)  # qwen3-30b-a3b
