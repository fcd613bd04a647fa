"""moa-bench smoke test: the harness runs end to end on a tiny model (1-2 steps per variant) and writes
a bench.json whose ratios are computed from the measured numbers. No timing assertions."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from moa_train.bench import runner as bench

TINY = ["--model", "tiny", "--device", "cpu", "--batch", "2", "--seq", "16"]


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    args = [*TINY, "--steps", "2", "--warmup", "1", "--decode-tokens", "3", "--decode-rounds", "1",
            "--decode-warmup", "0", "--mem-steps", "0", "--out", str(out)]  # fmt: skip
    assert bench.main(args) == 0
    return json.loads(out.read_text()), str(out)


def test_every_variant_is_measured_with_the_documented_schema(quick_result) -> None:
    result, _ = quick_result
    assert set(result) >= {
        "device",
        "runs",
        "ratio_vs_peft_lora",
        "ratio_vs_frozen_base",
        "targets",
        "machine",
    }
    assert result["device"] == "cpu"
    runs = result["runs"]
    expected = set(bench.MAIN_VARIANTS) | {"soft_moa_no_telemetry"}
    assert expected <= set(runs)
    assert {"sparse_moa_gather", "sparse_moa_dense"} & set(runs)  # the implementation auto does not pick
    tokens = result["batch_size"] * result["seq_len"]
    for run in runs.values():
        assert set(run) >= {"step_s", "tokens_per_s", "peak_mem_mb"}
        assert len(run["step_s_all"]) == 2 and run["step_s"] > 0
        assert run["step_s"] == pytest.approx(
            sorted(run["step_s_all"])[0] / 2 + sorted(run["step_s_all"])[1] / 2
        )
        assert run["tokens_per_s"] == pytest.approx(tokens / run["step_s"])
        assert run["peak_mem_mb"] is None  # --mem-steps 0 skips the memory probes
    assert runs["frozen_base"]["trainable_params"] == 0
    assert runs["peft_lora_r16"]["trainable_params"] > 0 and runs["soft_moa"]["trainable_params"] > 0
    for name in bench.DECODE_VARIANTS:
        assert runs[name]["decode_tokens_per_s"] > 0
    assert "decode_tokens_per_s" not in runs["molora_8"]


def test_ratios_are_computed_from_the_measured_numbers(quick_result) -> None:
    result, _ = quick_result
    runs = result["runs"]
    for reference, key in (("peft_lora_r16", "ratio_vs_peft_lora"), ("frozen_base", "ratio_vs_frozen_base")):
        ratios = result[key]
        assert ratios[reference]["step_s"] == pytest.approx(1.0)
        for name, run in runs.items():
            assert ratios[name]["step_s"] == pytest.approx(run["step_s"] / runs[reference]["step_s"])
            assert ratios[name]["tokens_per_s"] == pytest.approx(
                run["tokens_per_s"] / runs[reference]["tokens_per_s"]
            )
            if "decode_tokens_per_s" in run:
                assert ratios[name]["decode_tokens_per_s"] == pytest.approx(
                    run["decode_tokens_per_s"] / runs[reference]["decode_tokens_per_s"]
                )
    target = result["targets"]["soft_step_vs_peft"]
    assert target["ratio"] == pytest.approx(runs["soft_moa"]["step_s"] / runs["peft_lora_r16"]["step_s"])
    assert target["met"] == (target["ratio"] <= 1.03)
    assert result["targets"]["soft_peak_mem_vs_peft"]["met"] is None  # no memory measured: not judged


def test_markdown_table_lists_every_run(quick_result) -> None:
    result, _ = quick_result
    table = bench.markdown_table(result)
    for name in result["runs"]:
        assert f"| {name} |" in table
    assert "step × PEFT LoRA" in table


def test_compute_ratios_and_targets_on_known_numbers() -> None:
    runs = {
        "frozen_base": {"step_s": 2.0, "tokens_per_s": 500.0, "peak_mem_mb": 1000.0},
        "peft_lora_r16": {
            "step_s": 2.5,
            "tokens_per_s": 400.0,
            "peak_mem_mb": 1100.0,
            "decode_tokens_per_s": 50.0,
        },
        "soft_moa": {
            "step_s": 2.75,
            "tokens_per_s": 1000 / 2.75,
            "peak_mem_mb": 1300.0,
            "decode_tokens_per_s": 40.0,
        },
        "sparse_moa": {"step_s": 2.5, "tokens_per_s": 400.0, "peak_mem_mb": None},
    }
    vs_peft = bench.compute_ratios(runs, "peft_lora_r16")
    assert vs_peft["soft_moa"]["step_s"] == pytest.approx(1.1)
    assert vs_peft["soft_moa"]["peak_mem_mb"] == pytest.approx(1300 / 1100)
    assert vs_peft["soft_moa"]["decode_tokens_per_s"] == pytest.approx(0.8)
    assert "peak_mem_mb" not in vs_peft["sparse_moa"]
    vs_base = bench.compute_ratios(runs, "frozen_base")
    assert vs_base["peft_lora_r16"]["step_s"] == pytest.approx(1.25)
    assert "decode_tokens_per_s" not in vs_base["soft_moa"]  # the reference has no decode number
    targets = bench.evaluate_targets(runs)
    assert targets["soft_step_vs_peft"]["met"] is False
    assert targets["sparse_step_vs_soft"]["ratio"] == pytest.approx(2.5 / 2.75)
    assert targets["sparse_step_vs_soft"]["met"] is True
    assert targets["soft_decode_vs_peft"]["met"] is False
    assert targets["sparse_peak_mem_vs_peft"]["met"] is None
    assert targets["soft_compiled_step_vs_peft"]["met"] is None  # no compiled runs: not judged


@pytest.mark.slow  # compiles every variant (~25 s on 2 cores); test_compile.py pins the graphs
def test_compiled_variants_are_timed_with_their_compile_time(tmp_path) -> None:
    """--compile's variants in the same interleaved rounds (aot_eager here: no C++ build in the test)."""
    out = tmp_path / "bench.json"
    names = "soft_moa,peft_lora_r16_compiled,soft_moa_compiled"
    args = [*TINY, "--variants", names, "--compile-backend", "aot_eager", "--steps", "1", "--warmup", "1",
            "--decode-tokens", "0", "--mem-steps", "0", "--out", str(out)]  # fmt: skip
    assert bench.main(args) == 0
    result = json.loads(out.read_text())
    runs, compiled = result["runs"], result["ratio_vs_compiled_peft_lora"]
    assert set(compiled) == {"peft_lora_r16_compiled", "soft_moa_compiled"}
    assert compiled["soft_moa_compiled"]["step_s"] == pytest.approx(
        runs["soft_moa_compiled"]["step_s"] / runs["peft_lora_r16_compiled"]["step_s"]
    )
    for name in compiled:
        assert runs[name]["compile_s"] > 0 and runs[name]["compile_s_in_measured_rounds"] == 0
    assert "compile_s" not in runs["soft_moa"]
    target = result["targets"]["soft_compiled_step_vs_peft"]
    assert target["ratio"] == pytest.approx(compiled["soft_moa_compiled"]["step_s"])
    assert "| soft_moa_compiled |" in bench.markdown_table(result)


def test_memory_probe_runs_in_a_fresh_process() -> None:
    setup = bench.Setup("tiny", "cpu", 2, 16, "bfloat16", None, 0)
    probe = bench.run_memory_probes(setup, ["soft_moa"], steps=1, threads=1)["soft_moa"]
    assert "error" not in probe, probe
    assert probe["peak_mem_mb"] > 0 and math.isfinite(probe["peak_mem_mb"])
    assert probe["peak_mem_mb"] >= probe["start_mem_mb"] > 0


def test_variants_are_the_issue_configs() -> None:
    soft, sparse = bench.moa_config("soft_moa"), bench.moa_config("sparse_moa")
    assert (
        soft.lora_rank == 8 and soft.pa_size == 16 and soft.prompt_len == 10 and soft.router.kind == "swiglu"
    )
    assert (
        sparse.prompt_len == 0
        and sparse.router.selection == "threshold"
        and sparse.router.max_threshold == 0.5
    )
    assert bench.moa_config("molora_8").lora_experts == 8
    top2 = bench.moa_config("top2_moe_lora")
    assert top2.lora_experts == 8 and top2.site_router.selection == "topk" and top2.site_router.top_k == 2
    assert bench.moa_config("peft_lora_r16") is None


def test_unknown_variant_is_a_one_line_error(tmp_path) -> None:
    with pytest.raises(SystemExit, match="unknown variant"):
        bench.main([*TINY, "--variants", "soft_moa,nope", "--out", str(tmp_path / "b.json")])


def test_console_script_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "moa_train.bench", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--quick" in proc.stdout
