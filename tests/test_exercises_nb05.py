"""Notebook 05's exercise check: the fastest mode per backend that stayed correct."""
from moe_lab.exercises.nb05_compile import check_fastest_modes, exercise_frame, fastest_correct_modes

RIGHT = {"eager": "reduce-overhead", "batched_mm": "reduce-overhead", "grouped_mm": "max-autotune-no-cudagraphs"}


def test_correct_answer_passes():
    assert fastest_correct_modes(exercise_frame()) == RIGHT
    assert check_fastest_modes(RIGHT)
    assert check_fastest_modes({**RIGHT, "my_backend": None})
    frame = exercise_frame()
    good = frame[(frame.status == "compiled") & frame.equal_after_routing_change]
    assert check_fastest_modes(good.loc[good.groupby("backend").compiled_ms.idxmin()].set_index("backend")["mode"])


def test_ignoring_correctness():
    result = check_fastest_modes({**RIGHT, "grouped_mm": "reduce-overhead"})
    assert not result and "ignored correctness" in result.message and "grouped_mm" in result.message


def test_including_failed_rows():
    result = check_fastest_modes({**RIGHT, "my_backend": "default"})
    assert not result and "my_backend never compiled" in result.message and "failed rows" in result.message
    result = check_fastest_modes({**RIGHT, "eager": "max-autotune-no-cudagraphs"})
    assert not result and "failed" in result.message


def test_compile_time_and_missing_backends():
    result = check_fastest_modes({**RIGHT, "batched_mm": "default"})
    assert not result and "quickest to COMPILE" in result.message
    result = check_fastest_modes({"grouped_mm": "max-autotune-no-cudagraphs"})
    assert not result and "eager is missing" in result.message and "batched_mm is missing" in result.message
    assert "replace" in check_fastest_modes(None).message
    assert "no row with mode" in check_fastest_modes({**RIGHT, "eager": "fast"}).message


def test_ignoring_correctness_under_every_cuda_graph_mode():
    result = check_fastest_modes({**RIGHT, "grouped_mm": "max-autotune"})
    assert not result and "ignored correctness" in result.message


def test_the_made_up_matrix_is_consistent():
    """Within a backend: one uncompiled time; default compiles quickest and autotuning slowest; the modes
    with CUDA graphs agree on grouped_mm's correctness; batched_mm barely changes when compiled."""
    frame = exercise_frame()
    ok = frame[frame.status == "compiled"]
    for backend, rows in ok.groupby("backend"):
        assert rows.uncompiled_ms.nunique() == 1, backend
        times = rows.set_index("mode").compile_s
        assert times.idxmin() == "default", backend  # every other mode does what default does, and more
        for autotuned in {"max-autotune", "max-autotune-no-cudagraphs"} & set(times.index):
            assert times[autotuned] > times.get("reduce-overhead", 0) > 0, backend  # benchmarking takes longest
    grouped = ok[ok.backend == "grouped_mm"].set_index("mode")
    assert grouped.loc["reduce-overhead", "equal_after_routing_change"] == grouped.loc["max-autotune",
                                                                                       "equal_after_routing_change"]
    batched = ok[ok.backend == "batched_mm"]
    assert (batched.speedup.between(0.9, 1.1)).all()
