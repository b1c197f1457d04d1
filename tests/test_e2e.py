"""End to end: real configs, models built from them, and `generate` through every experts backend.

Everything runs on CPU in seconds: the real configs are built on the meta device (shapes, no memory),
the generate runs use tiny fp32 models. fp32 backends differ only in the order of additions, so the
greedy tokens are identical and the logits agree to ~1e-7 relative (the bench's fp32 tolerance,
1e-5, leaves two orders of magnitude).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")

import moe_lab  # noqa: E402
import moe_lab.hf as hf  # noqa: E402
from moe_lab.bench import e2e, e2e_generate, e2e_run  # noqa: E402
from moe_lab.bench.e2e_generate import check_execution, timed_generate  # noqa: E402
from moe_lab.bench.e2e_profile import NO_EXPERTS  # noqa: E402
from moe_lab.hf import real_configs  # noqa: E402
from moe_lab.hf.build import BuiltModel, build_model  # noqa: E402
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The presets' names are the shipped configs' names; Qwen3-VL-MoE's text backbone is Qwen3-30B-A3B's.
PRESET_OF_CONFIG = {name: name for name in moe_lab.PRESETS} | {"qwen3-vl-30b-a3b": "qwen3-30b-a3b"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors; a busy 2-core machine makes intra-op threads wait on each other
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def registered():
    before = set(hf.registered_with_transformers())
    hf.register_with_transformers()
    yield
    hf.unregister_from_transformers(set(hf.registered_with_transformers()) - before)


# --------------------------------------------------------------------------------------------
# The shipped configs
# --------------------------------------------------------------------------------------------

def test_every_preset_and_qwen3_vl_has_a_shipped_config():
    assert set(real_configs.real_config_names()) == set(PRESET_OF_CONFIG)


@pytest.mark.parametrize("name", sorted(PRESET_OF_CONFIG))
def test_shipped_config_agrees_with_its_preset(name):
    preset = moe_lab.get_preset(PRESET_OF_CONFIG[name]).config
    text = real_configs.real_config(name).get_text_config()
    experts = getattr(text, "num_experts", None) or getattr(text, "num_local_experts", None) or text.n_routed_experts
    width = getattr(text, "moe_intermediate_size", None) or text.intermediate_size
    assert (text.hidden_size, width, experts, text.num_experts_per_tok) == (
        preset.hidden_size, preset.intermediate_size, preset.num_experts, preset.top_k)
    if hasattr(text, "norm_topk_prob"):
        assert text.norm_topk_prob == preset.norm_topk_prob
    shared = getattr(text, "shared_expert_intermediate_size", None) or (
        getattr(text, "n_shared_experts", 0) * width if getattr(text, "n_shared_experts", None) else 0)
    assert shared == preset.shared_expert_intermediate_size


@pytest.mark.parametrize("name", sorted(PRESET_OF_CONFIG))
def test_shipped_config_says_where_it_came_from(name):
    source = real_configs.config_source(name)
    assert source["url"].startswith("https://huggingface.co/") and source["url"].endswith("config.json")
    assert source["licence"] and source["model"] in source["url"]


def test_a_preset_names_the_file_its_config_came_from():
    for name, preset in moe_lab.PRESETS.items():
        assert preset.source.split("/config.json")[0] == real_configs.config_source(name)["model"]


def test_quantised_checkpoints_become_plain_configs():
    # DeepSeek-V3 (FP8) and gpt-oss (MXFP4) publish a quantization_config; random weights are built unquantised.
    assert "quantization_config" in real_configs.real_config_dict("deepseek-v3")
    assert getattr(real_configs.real_config("deepseek-v3"), "quantization_config", None) is None


@pytest.mark.parametrize("bad", [0, 62, -1, 2.0, True])
def test_layer_count_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="num_layers must be an integer from 1 to 61"):
        real_configs.real_config("deepseek-v3", num_layers=bad)


def test_unknown_config_names_the_shipped_ones():
    with pytest.raises(ValueError, match="qwen3-30b-a3b"):
        real_configs.real_config("qwen9-moe")


# --------------------------------------------------------------------------------------------
# Building models
# --------------------------------------------------------------------------------------------

def test_full_size_model_is_built_on_the_requested_device_with_all_layers():
    built = build_model("qwen3-30b-a3b", device="meta")
    assert {p.device.type for p in built.model.parameters()} == {"meta"}
    assert built.layers == built.full_layers == 48 and not built.reduced
    experts = next(hf.experts_modules(built.model))
    assert tuple(experts.gate_up_proj.shape) == (128, 2 * 768, 2048)
    assert "all 48 layers" in built.describe()


def test_reduced_model_says_so():
    built = build_model("deepseek-v3", device="meta", num_layers=4)
    assert built.reduced and "4 of its 61 layers (reduced)" in built.describe()
    # layers_that_fit counts DeepSeek-V3's three dense layers as the small ones they are
    base, layers = e2e_run.layer_bytes("deepseek-v3", torch.bfloat16)
    assert layers[0] == layers[2] < layers[3] == layers[-1]
    with mock.patch.object(e2e_run, "available_bytes", return_value=int((base + sum(layers[:5]) + 1) / 0.85)):
        assert e2e_run.layers_that_fit("deepseek-v3", "cuda", torch.bfloat16) == 5


def test_vision_language_config_builds_with_per_backbone_experts_implementations():
    built = build_model("qwen3-vl-30b-a3b", device="meta", num_layers=2,
                        experts_implementation={"text_config": "moe_lab_grouped_mm", "vision_config": "eager"})
    assert built.model.get_experts_implementation()["text_config"] == "moe_lab_grouped_mm"


def test_build_random_weights_with_a_checkpoint_flag_is_refused():
    with pytest.raises(ValueError, match="a checkpoint is loaded with all its layers"):
        build_model("Qwen/Qwen3-30B-A3B", pretrained=True, num_layers=2)
    with pytest.raises(ValueError, match="pretrained=True"):
        build_model("Qwen/Qwen3-30B-A3B")


def test_pretrained_goes_through_from_pretrained_with_the_experts_implementation(tmp_path):
    # The same call loads a checkpoint: save a tiny one, load it back through build_model.
    tiny = hf.tiny_transformers_model("qwen3_moe", seed=3)
    tiny.save_pretrained(tmp_path)
    built = build_model(str(tmp_path), pretrained=True, device="cpu", dtype=torch.float32,
                        experts_implementation="moe_lab_grouped_mm")
    assert built.weights == "pretrained" and built.model.get_experts_implementation()[""] == "moe_lab_grouped_mm"
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(built.model(ids).logits, tiny(ids).logits, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# generate, timed
# --------------------------------------------------------------------------------------------

def _tiny(family="qwen3_moe", **overrides) -> BuiltModel:
    model = hf.tiny_transformers_model(family, seed=0, **overrides)
    return BuiltModel(model, f"tiny:{family}", 2, 2, "random")


MOE_LAB_CPU = [f"moe_lab_{name}" for name in moe_lab.runnable_backends("cpu", interpreted=False)]


def _plan(**changes):
    base = dict(backends=["grouped_mm:pinned", "eager", "batched_mm", *MOE_LAB_CPU, NO_EXPERTS],
                prefill_tokens=(12,), decode_batches=(1, 3), decode_context=6, new_tokens=4, executions=("eager",),
                rounds=1)
    base.update(changes)
    return e2e.E2EPlan(**base)


@pytest.fixture(scope="module")
def tiny_table():
    return e2e.run_e2e(_tiny(), _plan(), progress=False)


def test_every_backend_generates_the_reference_tokens_and_logits(tiny_table):
    decode = tiny_table[(tiny_table.phase == "decode") & (tiny_table.backend != NO_EXPERTS)]
    assert set(decode.backend) == {"grouped_mm:pinned", "eager", "batched_mm", *MOE_LAB_CPU}
    assert (decode.status == "ok").all(), decode[["backend", "reason"]]
    assert (decode.tokens_equal == "True").all()
    assert (decode.logits_within_tolerance == "True").all() and (decode.logits_rel_err < 1e-5).all()
    # every experts module again on the inputs it had in the reference's run: the backend alone
    assert (decode.experts_within_tolerance == "True").all() and (decode.experts_rel_err < 1e-5).all()
    assert (decode[decode.backend == "grouped_mm:pinned"].experts_rel_err == 0).all()  # rerun of itself: deterministic


def _one_percent_off_table(dtype):
    def one_percent_off(experts, hidden_states, top_k_index, top_k_weights):
        return 1.01 * moe_lab.get_backend("grouped_mm")(experts, hidden_states, top_k_index, top_k_weights)

    moe_lab.register("one_percent_off", one_percent_off, autograd=True)
    hf.register_with_transformers(["one_percent_off"])
    try:
        built = BuiltModel(hf.tiny_transformers_model("qwen3_moe", seed=0).to(dtype), "tiny:qwen3_moe", 2, 2, "random")
        return e2e.run_e2e(built, _plan(backends=["grouped_mm:pinned", "eager", "moe_lab_eager",
                                                               "moe_lab_one_percent_off"],
                                                      decode_batches=(1,), prefill_tokens=(), profile=False),
                           progress=False)
    finally:
        hf.unregister_from_transformers(["moe_lab_one_percent_off"])
        moe_lab.unregister("one_percent_off")


def test_the_experts_check_catches_a_backend_one_percent_off_in_float32():
    table = _one_percent_off_table(torch.float32).set_index("backend")
    assert table.loc["moe_lab_one_percent_off", "experts_rel_err"] == pytest.approx(0.01, rel=1e-3)
    assert table.loc["moe_lab_one_percent_off", "experts_within_tolerance"] == "False"
    assert table.loc["moe_lab_one_percent_off", "logits_within_tolerance"] == "False"
    assert (table.loc[["eager", "moe_lab_eager"], "experts_within_tolerance"] == "True").all()


def test_in_bfloat16_the_experts_check_reports_and_a_person_compares():
    # bf16's tolerance (3e-2) would pass a module 1 % off, so nothing is judged there; the number still separates it
    # from the right implementations' rounding in the same run (transformers' eager among them).
    table = _one_percent_off_table(torch.bfloat16).set_index("backend")
    assert (table.experts_within_tolerance == "").all()
    right = table.loc[["grouped_mm:pinned", "eager", "moe_lab_eager"], "experts_rel_err"]
    assert table.loc["moe_lab_one_percent_off", "experts_rel_err"] > 2 * right.max()


def test_rows_carry_times_and_what_ran(tiny_table):
    prefill = tiny_table[tiny_table.phase == "prefill"]
    assert (prefill.prefill_ms > 0).all() and prefill.step_ms.isna().all()
    decode = tiny_table[tiny_table.phase == "decode"]
    assert (decode.step_ms > 0).all()
    assert (decode.tokens_per_s - decode.batch * 1e3 / decode.step_ms).abs().max() < 1e-6
    assert (decode.steps == 3).all()  # 4 new tokens: 3 steps between them
    moe = decode[decode.backend == "moe_lab_grouped_mm"]
    assert set(moe.decode_experts) == {"moe_lab_grouped_mm"}
    assert set(tiny_table.model) == {"tiny:qwen3_moe"} and set(tiny_table.dtype) == {"float32"}


def test_profile_splits_the_step(tiny_table):
    profile = tiny_table[tiny_table.phase == "profile"]
    assert len(profile) == len(_plan().backends) - 1 and (profile.status == "ok").all()
    assert ((profile.experts_share > 0) & (profile.attention_share > 0)).all()
    assert ((profile.experts_share + profile.attention_share) < 1).all()
    decode = tiny_table[(tiny_table.phase == "decode") & (tiny_table.backend != NO_EXPERTS)]
    assert decode.experts_share_by_removal.notna().all()


def test_no_experts_baseline_is_removed_from_transformers_afterwards(tiny_table):
    assert NO_EXPERTS not in ALL_EXPERTS_FUNCTIONS


def test_decode_switch_is_labelled_and_pinned_keeps_grouped_mm():
    # transformers' generate switches grouped_mm to batched_mm for decoding on GPUs; simulate it on CPU.
    from transformers.generation.utils import GenerationMixin

    import contextlib

    @contextlib.contextmanager
    def always_switch(self):
        before = self.get_experts_implementation()
        self.set_experts_implementation({k: "batched_mm" if v == "grouped_mm" else v for k, v in before.items()})
        try:
            yield
        finally:
            self.set_experts_implementation(before)

    with mock.patch.object(GenerationMixin, "_optimize_model_for_decode", always_switch):
        table = e2e.run_e2e(_tiny(), _plan(backends=["grouped_mm", "grouped_mm:pinned"], decode_batches=(1,),
                                           profile=False), progress=False)
    decode = table[table.phase == "decode"].set_index("backend")
    assert decode.loc["grouped_mm", "decode_experts"] == "batched_mm"
    assert decode.loc["grouped_mm", "prefill_experts"] == "grouped_mm"
    assert decode.loc["grouped_mm:pinned", "decode_experts"] == "grouped_mm"


def test_compiled_decode_generates_the_same_tokens():
    table = e2e.run_e2e(_tiny(), _plan(backends=["grouped_mm:pinned", "moe_lab_grouped_mm"], decode_batches=(1,),
                                       executions=("eager", "compile:cudagraphs"), prefill_tokens=(),
                                       compiled_backends=["moe_lab_grouped_mm"], profile=False), progress=False)
    compiled = table[table.execution == "compile:cudagraphs"]
    assert list(compiled.backend) == ["moe_lab_grouped_mm"] and (compiled.status == "ok").all(), compiled.reason
    assert (compiled.tokens_equal == "True").all()  # against the uncompiled reference
    # on a CPU there are no CUDA graphs: torch says it skipped them, and the rows say so; uncompiled rows: n/a
    assert (compiled.cudagraph_skips > 0).all()
    assert table[table.execution == "eager"].cudagraph_skips.isna().all()


def test_spent_budget_skips_and_says_so():
    table = e2e.run_e2e(_tiny(), _plan(backends=["grouped_mm:pinned"], deadline_s=0.0, profile=False),
                        progress=False)
    assert (table.status == "skipped").all() and table.reason.str.contains("time budget").all()


def test_an_execution_failing_everywhere_is_not_retried(monkeypatch):
    import moe_lab.bench.e2e as module

    def broken(model, input_ids, new_tokens, execution="eager", listeners=()):
        if execution != "eager":
            raise RuntimeError("this compile mode cannot take the model")
        return timed_generate(model, input_ids, new_tokens, execution, listeners)

    monkeypatch.setattr(module, "timed_generate", broken)
    table = e2e.run_e2e(_tiny(), _plan(backends=["grouped_mm:pinned"], executions=("compile:default",),
                                       prefill_tokens=(), profile=False), progress=False)
    assert list(table.status) == ["error", "skipped"]
    assert "failed for every backend" in table.reason.iloc[1]


def test_an_implementation_that_fails_is_a_row_not_a_crash():
    table = e2e.run_e2e(_tiny(), _plan(backends=["grouped_mm:pinned", "nonexistent_impl"], decode_batches=(1,),
                                       profile=False), progress=False)
    bad = table[table.backend == "nonexistent_impl"]
    assert (bad.status == "error").all() and bad.reason.str.contains("ValueError: ").all(), bad.reason.iloc[0]
    assert (table[table.backend == "grouped_mm:pinned"].status == "ok").all()


def test_a_failure_keeps_its_cause_when_the_first_line_is_only_a_preamble():
    # torch's compile errors: "backend='cudagraphs' raised:" then the cause on the next line (the H200 run kept
    # only the first line); a gather-budget refusal is "refused", not an "error"
    from moe_lab.errors import GatherBudgetError

    runner = type("Runner", (), {"device": torch.device("cpu"), "progress": False})()
    row = {}
    e2e._Runner.fail(runner, row, RuntimeError("backend='cudagraphs' raised:\nAssertionError: cannot extract sympy"))
    assert row == {"status": "error", "reason": "RuntimeError: backend='cudagraphs' raised: AssertionError: "
                                                "cannot extract sympy"}
    e2e._Runner.fail(runner, row, GatherBudgetError(9 * 2**30, 4 * 2**30))
    assert row["status"] == "refused" and "9.0 GiB" in row["reason"]


def test_a_bare_assertion_says_where_it_was_raised():
    # the H200 run's compiled batch-8 rows said only "AssertionError"
    def check_pools():
        raise AssertionError  # what a bare `assert` inside torch raises

    try:
        check_pools()
    except AssertionError as error:
        text = e2e.error_text(error)
    assert text.startswith("AssertionError at tests/test_e2e.py:") and text.endswith("(check_pools)"), text


def test_a_failed_compile_starts_dynamo_afresh_and_recompiles_the_backends_before_it(monkeypatch):
    # A compile that fails half-way left every later compile failing (the H200 run): the failure resets dynamo, and
    # the backends already compiled in that group are compiled again before the timed rounds.
    built = _tiny()
    # dynamo with its eager backend: what is tested is the reset and the re-compiles, not Inductor's code (whose
    # C++ builds on a CPU made this test take 50 s)
    monkeypatch.setattr(e2e_generate, "compile_backend", lambda execution: "eager")
    resets, warmed = [], []
    real_reset = torch._dynamo.reset
    monkeypatch.setattr(torch._dynamo, "reset", lambda: (resets.append(len(warmed)), real_reset()))
    real_generate = e2e._Runner.generate

    def generate(self, backend, input_ids, new_tokens, execution, *args, **kwargs):
        warmed.append((backend, execution))
        if backend == "moe_lab_grouped_mm" and execution != "eager":
            raise RuntimeError("backend='inductor' raised:\nsomething half-way")
        return real_generate(self, backend, input_ids, new_tokens, execution, *args, **kwargs)

    monkeypatch.setattr(e2e._Runner, "generate", generate)
    table = e2e.run_e2e(built, _plan(backends=["grouped_mm:pinned", "moe_lab_grouped_mm", "moe_lab_eager"],
                                       prefill_tokens=(), decode_batches=(1,), executions=("compile:default",),
                                       compiled_first=True, profile=False), progress=False)
    compiled = table[table.execution == "compile:default"].set_index("backend")
    assert compiled.loc["moe_lab_grouped_mm", "status"] == "error"
    assert (compiled.drop("moe_lab_grouped_mm").status == "ok").all(), compiled.reason
    group = [b for b, execution in warmed if execution == "compile:default"]
    # the group's own reset, then the failure's; grouped_mm:pinned warmed before the failure and again after it
    assert group[:4] == ["grouped_mm:pinned", "moe_lab_grouped_mm", "grouped_mm:pinned", "moe_lab_eager"], group
    assert len(resets) >= 2


def test_a_backend_refused_on_the_check_prompt_still_runs_the_shapes_it_can(monkeypatch):
    # moe_lab's batched_mm refuses a gather over its budget: the 24-token check is refused, the decode is not
    built = _tiny()
    experts = next(hf.experts_modules(built.model))
    per_pair = (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()) * 4  # one expert's weights, fp32
    monkeypatch.setenv("MOE_LAB_BATCHED_MM_BUDGET", str(per_pair * 2 * 10))  # 10 tokens x top-2: 6 fit, 24 do not
    table = e2e.run_e2e(built, _plan(backends=["grouped_mm:pinned", "moe_lab_batched_mm"], prefill_tokens=(),
                                       decode_batches=(1,), check_tokens=24, profile=False), progress=False)
    row = table[table.backend == "moe_lab_batched_mm"].iloc[0]
    assert row.status == "ok" and row.tokens_equal == "True", row.reason
    assert row.reason.startswith("logits not checked: GatherBudgetError")


def test_a_decode_whose_prompt_is_refused_prefills_as_the_reference_and_decodes_under_the_backend(monkeypatch):
    # at the H200's 4 GiB budget moe_lab's batched_mm refused the 128-token prompt of every decode row, though a
    # decode step (B tokens) gathers little; a prefill row over the budget stays refused
    built = _tiny()
    experts = next(hf.experts_modules(built.model))
    per_pair = (experts.gate_up_proj[0].numel() + experts.down_proj[0].numel()) * 4
    monkeypatch.setenv("MOE_LAB_BATCHED_MM_BUDGET", str(per_pair * 2 * 10))  # 10 tokens x top-2 fit
    table = e2e.run_e2e(built, _plan(backends=["grouped_mm:pinned", "moe_lab_batched_mm"], prefill_tokens=(12,),
                                       decode_batches=(8, 1), decode_context=6, check_tokens=8), progress=False)
    ours = table[table.backend == "moe_lab_batched_mm"].set_index(["phase", "batch"])
    assert ours.loc[("prefill", 1), "status"] == "refused"  # 12 tokens: over
    one, eight = ours.loc[("decode", 1)], ours.loc[("decode", 8)]  # prompts of 6 and 48 tokens; steps of 1 and 8
    assert one.status == "ok" and one.prefill_experts == "moe_lab_batched_mm" and one.reason == ""
    assert eight.status == "ok" and eight.tokens_equal == "True", eight.reason
    assert (eight.prefill_experts, eight.decode_experts) == ("grouped_mm", "moe_lab_batched_mm")
    assert eight.reason.startswith("prompt's prefill under grouped_mm")
    profile = ours.loc[("profile", 8)]  # the profile runs at the first batch: its 48-token prompt is over too
    assert profile.status == "ok" and profile.experts_share > 0 and profile.reason.startswith("prompt's prefill")
    assert "_optimize_model_for_decode" not in vars(built.model)  # transformers' own method again


@pytest.mark.parametrize("execution", ["compiled", "compile:fast", ""])
def test_unknown_execution_is_refused(execution):
    with pytest.raises(ValueError, match="compile:reduce-overhead"):
        check_execution(execution)


def test_plan_refuses_one_new_token():
    with pytest.raises(ValueError, match="new_tokens must be >= 2"):
        _plan(new_tokens=1)


# --------------------------------------------------------------------------------------------
# The command line and the GPU recording script
# --------------------------------------------------------------------------------------------

def test_moe_lab_e2e_runs_end_to_end_and_writes_the_table(tmp_path, capsys):
    from moe_lab.cli import main

    output = tmp_path / "e2e_tiny"
    status = main(["e2e", "--model", "tiny:mixtral", "--device", "cpu", "--prefill", "8", "--batches", "1",
                   "--context", "4", "--new-tokens", "3", "--executions", "eager", "--rounds", "1", "--quiet",
                   "--backends", "grouped_mm:pinned,moe_lab_grouped_mm,no_experts", "--output", str(output)])
    assert status == 0
    printed = capsys.readouterr().out
    assert "moe_lab_grouped_mm" in printed and "wrote" in printed
    table, provenance = moe_lab.bench.load_results(output)
    assert set(table.phase) == {"prefill", "decode", "profile"} and (table.status == "ok").all()
    assert provenance["e2e_plan"]["backends"] == ["grouped_mm:pinned", "moe_lab_grouped_mm", "no_experts"]


def test_moe_lab_e2e_refuses_an_unknown_backend_before_building(capsys):
    from moe_lab.cli import main

    assert main(["e2e", "--model", "qwen3-30b-a3b", "--device", "cpu", "--backends", "grouped_nm"]) == 2
    assert "unknown experts implementation(s) ['grouped_nm']" in capsys.readouterr().err


def test_gpu_recording_script_runs_on_cpu_with_a_tiny_model(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), E2E_EXECUTIONS="eager", BUDGET_S="120",
               PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", PYTHONPATH=str(ROOT))
    done = subprocess.run(["bash", "tools/e2e_record.sh", "--tiny", "tiny:qwen3_moe"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    files = sorted(path.name for path in tmp_path.iterdir())
    assert files == ["cpu_fp32_e2e_qwen3_moe.csv", "cpu_fp32_e2e_qwen3_moe.json", "log.txt"]
    assert len(files) <= 8  # the device returns at most 8 files
    sidecar = json.loads((tmp_path / "cpu_fp32_e2e_qwen3_moe.json").read_text())
    assert sidecar["rows"] > 0 and "exit 0" in (tmp_path / "log.txt").read_text()


# --------------------------------------------------------------------------------------------
# Reading a table: goals, time split, the figure, the recorded runs, notebook 08's helpers
# --------------------------------------------------------------------------------------------

def _goal_table():
    import pandas as pd

    def row(backend, phase, batch, value, execution="compile:reduce-overhead", prompt=128, removal=float("nan")):
        ms = value if phase == "prefill" else batch * 1e3 / value
        return dict(backend=backend, library=e2e.library_of(backend), phase=phase, execution=execution, batch=batch,
                    cudagraph_skips=0.0 if execution != "eager" else float("nan"),
                    prompt_tokens=prompt, status="ok", prefill_ms=ms if phase == "prefill" else float("nan"),
                    tokens_per_s=value if phase == "decode" else float("nan"), experts_share_by_removal=removal)

    return pd.DataFrame([
        row("batched_mm", "decode", 1, 100.0, removal=0.5), row("moe_lab_triton", "decode", 1, 140.0, removal=0.3),
        row("moe_lab_grouped_mm", "decode", 1, 90.0),
        row("grouped_mm", "prefill", 1, 20.0, "eager", 4096), row("moe_lab_triton", "prefill", 1, 16.0, "eager", 4096),
        row("no_experts", "decode", 1, 200.0),
    ])


def test_goals_pick_each_librarys_best_and_the_ratio():
    from moe_lab.bench.e2e_summary import e2e_goals

    table = _goal_table()
    not_graphed = e2e_goals(table.assign(execution=table.execution.replace("compile:reduce-overhead",
                                                                           "compile:default")))
    assert not not_graphed.cuda_graphs.any() and not not_graphed.goal_case.iloc[0]  # compiled, no CUDA graphs
    goals = e2e_goals(table).set_index("phase")
    decode, prefill = goals.loc["decode"], goals.loc["prefill"]
    assert (decode.moe_lab_backend, decode.transformers_backend) == ("moe_lab_triton", "batched_mm")
    assert decode.speedup == pytest.approx(1.4) and decode.meets_goal and decode.goal_case and decode.cuda_graphs
    assert (decode.transformers_experts_share, decode.moe_lab_experts_share) == (0.5, 0.3)
    assert prefill.speedup == pytest.approx(20 / 16) and not prefill.meets_goal and prefill.goal_case
    assert not prefill.cuda_graphs


def test_goal_status_lists_every_goal_case_with_why_it_was_not_measured():
    import pandas as pd

    from moe_lab.bench.e2e_summary import goal_status

    table = _goal_table().assign(reason="", round_medians_ms="")
    table.loc[table.backend == "batched_mm", "round_medians_ms"] = "10 10.5"  # 100 tokens/s: 10 ms a step
    table.loc[table.backend == "moe_lab_triton", "round_medians_ms"] = "7 7.2"  # 1.46x..1.5x: every round >= 1.3
    table.loc[table.phase == "prefill", "round_medians_ms"] = ["19 21", "16 16"]  # 1.19x..1.31x: rounds disagree
    failed = dict(table.iloc[1], batch=8, status="error", reason="BackendCompilerFailed: backend='cudagraphs' raised",
                  tokens_per_s=float("nan"))
    table = pd.concat([table, pd.DataFrame([failed, dict(failed, backend="batched_mm", library="transformers",
                                                         status="skipped", reason="time budget spent")])])
    status = goal_status(table).set_index(["phase", "batch"])
    assert list(status.index) == [("decode", 1), ("decode", 8), ("prefill", 1)]
    assert status.loc[("decode", 1), "status"] == "met"
    assert status.loc[("decode", 1), "speedup_lowest"] == pytest.approx(10 / 7.2)
    assert status.loc[("prefill", 1), "status"] == "unclear"  # the medians' 1.25x hides a round at 1.31x
    eight = status.loc[("decode", 8)]
    assert eight.status == "not measured" and "BackendCompilerFailed" in eight.reason
    assert "batched_mm: skipped time budget" in eight.reason
    # a table recorded before cudagraph_skips existed cannot show that a compiled case replayed graphs
    unknown = goal_status(table.assign(cudagraph_skips=float("nan"))).set_index(["phase", "batch"])
    assert unknown.loc[("decode", 1), "status"] == "not measured"
    assert "replay not confirmed" in unknown.loc[("decode", 1), "reason"]


def test_recorded_h200_tables_are_read_with_their_goal_cases():
    # what README, docs/performance_notes.md and notebook 08 say of the recordings: every compiled row replayed CUDA
    # graphs; on the two goal models batch 1 missed on both, batch 8 met on Qwen1.5 and missed on Qwen3 (against
    # transformers' grouped_mm pinned: its batched_mm ran out of memory there), the 4096-token prefill met on both
    from moe_lab.bench.e2e_summary import goal_status
    from moe_lab.recorded_tables import load_recorded_e2e

    # (the same goal cases computed for the other five models, recorded in later sessions; qwen3-vl's batch 8 was
    # not reached in its call)
    expected = {"qwen3-30b-a3b": ({1: "missed", 8: "missed"}, "met"),
                "qwen1.5-moe-a2.7b": ({1: "missed", 8: "met"}, "met"),
                "olmoe-1b-7b": ({1: "missed", 8: "missed"}, "met"),
                "mixtral-8x7b": ({1: "unclear", 8: "met"}, "missed"),
                "gpt-oss-20b": ({1: "missed", 8: "missed"}, "missed"),
                "deepseek-v3": ({1: "missed", 8: "missed"}, "missed"),
                "qwen3-vl-30b-a3b": ({1: "missed", 8: "not measured"}, "met")}
    for model, (statuses, prefill) in expected.items():
        table, provenance = load_recorded_e2e(model)
        assert provenance["device_name"] == "NVIDIA H200"
        compiled = table[(table.execution != "eager") & (table.status == "ok")]
        assert len(compiled) and (compiled.cudagraph_skips == 0).all()
        decode = goal_status(table).query("phase == 'decode'")
        assert dict(zip(decode.batch, decode.status)) == statuses, model
        assert goal_status(table).query("phase == 'prefill'").status.tolist() == [prefill], model


def test_time_split_and_its_figure(tiny_table):
    from moe_lab.bench.e2e_summary import time_split
    from moe_lab.plots import time_split_bars

    split = time_split(tiny_table)
    assert (split[["experts_share", "attention_share", "rest_share"]].sum(axis=1) - 1).abs().max() < 1e-12
    figure = time_split_bars(split)
    assert [trace.name for trace in figure.data] == ["experts", "attention", "rest"]
    stacked = sum(trace.x for trace in figure.data)
    assert list(stacked) == pytest.approx(list(split.step_ms))  # the bars add up to the median step
    with pytest.raises(ValueError, match="lacks column"):
        time_split_bars(split.drop(columns="rest_share"))


def test_recorded_e2e_says_not_recorded_yet_and_reads_a_recorded_table(tmp_path, tiny_table, monkeypatch):
    from moe_lab import recorded_tables

    monkeypatch.setattr(recorded_tables, "data_dir", lambda: tmp_path)
    with pytest.raises(recorded_tables.NotRecordedYet, match="tools/e2e_record.sh"):
        recorded_tables.load_recorded_e2e("qwen3-30b-a3b")
    moe_lab.bench.save_results(tiny_table, tmp_path / "h200_bf16_e2e_qwen3-30b-a3b")
    table, provenance = recorded_tables.load_recorded_e2e("qwen3-30b-a3b")
    assert len(table) == len(tiny_table) and provenance["device"] == "cpu"


def test_notebook_08_live_helpers():
    from moe_lab.lessons.nb08_real_models import generate_verdict, live_generate_table, tokens_per_second_table

    table = live_generate_table(hf.tiny_transformers_model("olmoe"), batches=(1,), new_tokens=3, rounds=3,
                                backends=("grouped_mm:pinned", "moe_lab_grouped_mm"))
    cells = tokens_per_second_table(table)
    assert list(cells.index) == ["grouped_mm:pinned", "moe_lab_grouped_mm"] and list(cells.columns) == ["batch 1"]
    assert all(" (" in cell and "–" in cell for cell in cells["batch 1"])
    sentence = generate_verdict(table, "moe_lab_grouped_mm", "grouped_mm:pinned", 1)
    assert sentence.startswith("moe_lab_grouped_mm vs grouped_mm:pinned, decode step at batch 1: ")
    assert "rounds" in sentence


def test_partial_tables_are_handed_out_while_the_run_goes_on():
    # what tools/e2e_record.sh writes after every case, so that a run stopped by its timeout keeps its rows
    seen = []
    e2e.run_e2e(_tiny(), _plan(backends=["grouped_mm:pinned", "moe_lab_grouped_mm"], decode_batches=(1,),
                               profile=False), on_rows=lambda frame: seen.append(frame.copy()), progress=False)
    assert len(seen) >= 4 and [len(frame) for frame in seen] == sorted(len(frame) for frame in seen)
    first = seen[0]
    assert first.reason.iloc[0] == "warmed up, not timed yet" and first.prefill_ms.isna().all()
    assert seen[-1].status.eq("ok").all() and not seen[-1].reason.str.contains("not timed").any()


def test_notebook_08_recorded_helpers_show_what_ran_and_what_did_not():
    from moe_lab.lessons.nb08_real_models import recorded_failures, recorded_run_summary, recorded_times
    from moe_lab.recorded_tables import load_recorded_e2e

    table, provenance = load_recorded_e2e("qwen3-30b-a3b")
    summary = recorded_run_summary(table, provenance)
    cases = table[table.phase != "profile"]
    assert f"{(cases.status == 'ok').sum()} of {len(cases)} cases measured" in summary
    assert "NVIDIA H200" in summary and provenance["git_commit"][:7] in summary and "2 oom, 1 refused" in summary
    times = recorded_times(table)
    ok = table[(table.status == "ok") & (table.phase == "prefill") & (table.prompt_tokens == 4096)]
    assert times["prefill B=1 P=4096"].dropna().to_dict() == dict(zip(ok.backend, ok.prefill_ms))
    failures = recorded_failures(table).set_index(["backend", "status"])
    assert set(failures.loc[("batched_mm", "oom")].case) == {"prefill B=1 P=4096",
                                                    "decode compile:reduce-overhead B=8 P=128"}
    assert failures.loc[("moe_lab_batched_mm", "refused"), "reason"].startswith("GatherBudgetError")
    # every failed row is in exactly one line
    failed = table.status.isin(["error", "oom", "refused", "unsupported"]).sum()
    assert sum(len(c.split(", ")) for c in failures["case"]) == failed
