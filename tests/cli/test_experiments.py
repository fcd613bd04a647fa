"""Paper presets (configs/experiment/): every method and ablation composes, follows spec D.1 / C,
counts the spec F.2 trainable parameters in a dry run, and trains on a tiny model.

Default run: composition, recipe values, dry-run counts on the meta device, the missing-data error
and a 2-step training sample of a few presets. ``pytest -m slow``: a ``-m experiment=glob(*)``
sweep of every experiment on tiny_random and on SmolLM2-135M, then ``moa-report`` on the first.
"""

from __future__ import annotations

import csv
import importlib.resources
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moa_train import MoAConfig

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}


def run_cli(name: str, *args: str, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run a console script of this environment offline (self-contained: works with or without a
    tests package)."""
    script = Path(sys.executable).parent / name
    return subprocess.run(
        [str(script), *args],
        cwd=cwd,
        env={**os.environ, **OFFLINE},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


CONFIGS = Path(str(importlib.resources.files("moa_train.configs")))
FAMILIES = ("commonsense", "math")
METHODS = (
    "soft", "sparse", "instance", "lora", "prompt", "pa", "naive", "unipeft",
    "hydralora", "molora", "topk", "adamole", "topk_lb", "mola", "mixlora",
)  # fmt: skip
MOE_BASELINES = ("hydralora", "molora", "topk", "adamole", "topk_lb")
# The mixture-of-LoRA family beyond the paper's baselines (related-methods spec), on the shared MoE recipe.
RELATED = {"mola", "mixlora", "dynmole", "loramoe", "loramoe_lbc", "moslora", "prompt_moe"}
EMBEDDED_DATA = "arith2"  # an embedded BIG-bench set: presets must also run on it

# Trainable parameters on the real LLaMA-3.1-8B shapes (model=llama3_1_8b_arch, meta device).
SPEC_F2 = {  # the rows of method spec F.2
    "math_soft": 24_520_288,
    "commonsense_soft": 18_089_696,
    "math_sparse": 22_289_120,
    "commonsense_sparse": 22_289_120,
    "commonsense_sparse_linear": 16_777_952,
    "math_instance": 24_520_288,
    **{f"{f}_lora": 23_068_672 for f in FAMILIES},
    **{f"{f}_prompt": 1_311_744 for f in FAMILIES},
    **{f"{f}_pa": 4_325_888 for f in FAMILIES},
    **{f"{f}_naive": 17_171_968 for f in FAMILIES},
    **{f"{f}_unipeft": 17_565_280 for f in FAMILIES},
    **{f"{f}_hydralora": 45_088_768 for f in FAMILIES},
    **{f"{f}_molora": 100_139_008 for f in FAMILIES},
    **{f"{f}_topk": 100_140_288 for f in FAMILIES},
    **{f"{f}_adamole": 101_123_488 for f in FAMILIES},
}
DERIVED = {  # not F.2 rows, but the same arithmetic (documented in the preset headers)
    "commonsense_instance": 18_089_696,  # instance-level with the commonsense linear router
    **{f"{f}_topk_lb": 100_140_288 for f in FAMILIES},  # = Top-K
    # related methods: the counts (MoLA, DynMoLE, LoRAMoE, MoSLoRA) and the same arithmetic
    **{f"{f}_mola": 111_083_520 for f in FAMILIES},
    **{f"{f}_mixlora": 241_172_480 for f in FAMILIES},  # = the releases (tests/core/test_release_fidelity.py)
    "math_dynmole": 259_129_344,
    "math_loramoe": 62_390_272,
    "math_loramoe_lbc": 62_390_272,
    "math_moslora": 28_352_512,
    "math_prompt_moe": 11_535_616,
    "math_soft_no_prompt": 22_158_016,
    "math_soft_lora_only": 16_781_856,
    "math_soft_softmax": 24_520_288,
    "math_soft_linear": 18_089_696,
    "commonsense_soft_swiglu": 24_520_288,
    **{f"math_sparse_gmax{g}": 22_289_120 for g in ("02", "05", "08", "10")},
    **{f"math_sparse_const{g}": 22_158_016 for g in ("05", "08")},
    "math_sparse_shifted": 22_289_120,
}
ALL_COUNTS = {**SPEC_F2, **DERIVED}
# Ablation -> (its base preset, the MoAConfig fields that differ)
ABLATIONS = {
    "math_soft_no_prompt": ("math_soft", {"prompt_len": 0}),
    "math_soft_lora_only": ("math_soft", {"prompt_len": 0, "pa_size": 0}),
    "math_soft_softmax": ("math_soft", {"router.activation": "scaled_softmax"}),
    "math_soft_linear": ("math_soft", {"router.kind": "linear"}),
    "commonsense_soft_swiglu": ("commonsense_soft", {"router.kind": "swiglu"}),
    "commonsense_sparse_linear": ("commonsense_sparse", {"router.kind": "linear"}),
    "math_sparse_gmax02": ("math_sparse", {"router.max_threshold": 0.2}),
    "math_sparse_gmax05": ("math_sparse", {}),
    "math_sparse_gmax08": ("math_sparse", {"router.max_threshold": 0.8}),
    "math_sparse_gmax10": ("math_sparse", {"router.max_threshold": 1.0}),
    "math_sparse_const05": ("math_sparse", {"router.const_threshold": True}),
    "math_sparse_const08": ("math_sparse", {"router.const_threshold": True, "router.max_threshold": 0.8}),
    "math_sparse_shifted": ("math_sparse", {"router.threshold_grad": "shifted"}),
}
PRESETS = sorted(ALL_COUNTS)

# A tiny, fast, CPU-only training run of any preset (2 optimizer steps of 2 x 2 examples).
TINY_TRAIN = [
    "model=tiny_random", f"data={EMBEDDED_DATA}", "logger=none", "trainer.device=cpu",
    "trainer.max_steps=2", "trainer.micro_batch_size=2", "trainer.effective_batch_size=4",
    "trainer.precision=fp32", "trainer.save_every_steps=null", "trainer.heatmap_every_steps=null",
    "trainer.progress_bar=false", "scheduler.warmup_epochs=null", "scheduler.warmup_steps=1",
    "final_eval.enabled=false",
]  # fmt: skip


def experiments() -> list[str]:
    return sorted(p.stem for p in (CONFIGS / "experiment").glob("*.yaml"))


def moa_of(cfg) -> MoAConfig:
    return MoAConfig.from_dict(OmegaConf.to_container(cfg.moa, resolve=True))


def _get(moa: MoAConfig, dotted: str):
    value = moa
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


# ---- the preset files --------------------------------------------------------------------------------


def test_every_method_and_ablation_has_a_preset() -> None:
    names = set(experiments())
    wanted = {f"{f}_{m}" for f in FAMILIES for m in METHODS} | set(ABLATIONS)
    assert wanted <= names, f"missing presets: {sorted(wanted - names)}"
    assert set(PRESETS) <= names


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_header_cites_the_spec(preset: str) -> None:
    lines = (CONFIGS / "experiment" / f"{preset}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"
    header = " ".join(line for line in lines if line.startswith("#"))
    assert re.search(r"method spec [A-I]\.?\d?", header), f"{preset}: cite the spec section it follows"
    assert "Deliberate differences from the official code:" in header
    assert f"{ALL_COUNTS[preset]:,}" in header, f"{preset}: state its trainable-parameter count"


# ---- composition and recipe (spec D.1, C) --------------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_paper_recipe(compose, preset: str) -> None:
    from moa_train.train.recipe import learning_rate

    cfg = compose([f"experiment={preset}"])
    family, method = preset.split("_", 1)
    moa = moa_of(cfg)
    assert cfg.name == preset
    assert cfg.model.name == compose(["model=llama3_1_8b"]).model.name  # paper presets: LLaMA-3.1-8B
    assert cfg.data.max_len == (300 if family == "math" else 200)
    tc = cfg.trainer
    assert tc.effective_batch_size == 32 and tc.effective_batch_size % tc.micro_batch_size == 0
    assert learning_rate(cfg.optimizer, tc.effective_batch_size) == pytest.approx(7.5e-4)
    assert tuple(cfg.optimizer.betas) == (0.9, 0.95) and cfg.optimizer.weight_decay == 0.02
    assert cfg.scheduler.name == "cosine" and cfg.scheduler.min_lr == 0 and tc.precision == "bf16"
    assert tc.grad_clip is None and tc.max_steps is None
    if family == "math" and (method in MOE_BASELINES or method in RELATED):  # spec C / D.1: MoE math budget
        assert (tc.epochs, cfg.scheduler.warmup_epochs, tc.micro_batch_size) == (1, 0.4, 4)
    elif preset == "commonsense_sparse_linear":  # the 3-epoch "seedG" runs
        assert (tc.epochs, cfg.scheduler.warmup_epochs) == (3, 1.0)
    else:
        assert (tc.epochs, cfg.scheduler.warmup_epochs) == (2, 1.0)
    assert not cfg.final_eval.enabled  # the paper protocol evaluates with moa-eval (spec E.4)
    assert all(c == 0 for c in (moa.router.z_loss_coef, moa.router.entropy_coef))
    expected_lb = {"topk_lb": 0.01, "mixlora": 0.001, "dynmole": 0.001}.get(method, 0.0)
    assert moa.site_router.load_balance_coef == expected_lb and moa.router.load_balance_coef == 0
    if method not in ("dynmole",):  # DynMoLE's entropy loss is part of the method
        assert moa.site_router.entropy_coef == 0


def test_router_choices_follow_the_spec(compose) -> None:
    def router(preset: str):
        return moa_of(compose([f"experiment={preset}"])).router

    # spec B.1/B.3: linear for commonsense Soft MoA (and its instance variant), SwiGLU elsewhere
    assert router("commonsense_soft").kind == "linear" and router("commonsense_instance").kind == "linear"
    for preset in ("math_soft", "math_instance", "math_sparse", "commonsense_sparse"):
        assert router(preset).kind == "swiglu" and router(preset).hidden_mult == 4
    for family in FAMILIES:
        soft = router(f"{family}_soft")
        assert (soft.activation, soft.selection, soft.granularity, soft.input) == (
            "sigmoid", "dense", "token", "residual",
        )  # fmt: skip
        sparse_moa = moa_of(compose([f"experiment={family}_sparse"]))
        r = sparse_moa.router
        assert sparse_moa.prompt_len == 0 and sparse_moa.pa_size == 16  # spec B.2: no prompt expert
        assert (r.selection, r.max_threshold, r.const_threshold, r.threshold_grad) == (
            "threshold",
            0.5,
            False,
            "none",
        )
        assert router(f"{family}_instance").granularity == "instance"
        uni = router(f"{family}_unipeft")
        assert (uni.kind, uni.granularity, uni.groups) == ("linear", "instance", "type")
        for method in ("lora", "prompt", "pa", "naive", "mola", "mixlora", *MOE_BASELINES):
            assert router(f"{family}_{method}").kind == "none"
        site = {m: moa_of(compose([f"experiment={family}_{m}"])) for m in MOE_BASELINES}
        assert site["hydralora"].lora_shared_a and not site["hydralora"].site_router.bias
        assert not site["molora"].site_router.bias and site["molora"].site_router.selection == "dense"
        assert (site["topk"].site_router.selection, site["topk"].site_router.top_k) == ("topk", 2)
        assert site["adamole"].site_router.selection == "adamole" and site["adamole"].site_router.bias
        assert all(site[m].lora_experts == 8 and site[m].lora_rank == 8 for m in MOE_BASELINES)
        lora = moa_of(compose([f"experiment={family}_lora"]))
        assert (lora.lora_rank, lora.lora_alpha, lora.pa_size, lora.prompt_len) == (16, 16, 0, 0)


@pytest.mark.parametrize("ablation", sorted(ABLATIONS))
def test_ablation_changes_only_what_it_names(compose, ablation: str) -> None:
    base_name, changes = ABLATIONS[ablation]
    base, cfg = compose([f"experiment={base_name}"]), compose([f"experiment={ablation}"])
    base_moa, moa = moa_of(base), moa_of(cfg)
    for field, value in changes.items():
        assert _get(moa, field) == value, f"{ablation}: {field}"
    flat_base = OmegaConf.to_container(base, resolve=True)
    flat = OmegaConf.to_container(cfg, resolve=True)
    flat_base.pop("name"), flat.pop("name")
    flat_base.pop("moa"), flat.pop("moa")
    if ablation == "commonsense_sparse_linear":
        flat_base["trainer"]["epochs"] = 3
    assert flat == flat_base, f"{ablation} must differ from {base_name} only in moa (and its name)"
    if ablation == "math_soft_lora_only":  # the router stays, over the 5 LoRA experts
        assert moa.router == base_moa.router and moa.max_block_experts() == 5


# ---- dry-run counts (spec F.2) on the meta device --------------------------------------------------------


@pytest.mark.parametrize("preset", PRESETS)
def test_dry_run_counts_match_spec_f2(compose, preset: str, capsys) -> None:
    from moa_train.train.recipe import dry_run

    result = dry_run(compose([f"experiment={preset}", "model=llama3_1_8b_arch", "dry_run=true"]))
    assert result["trainable_params"] == ALL_COUNTS[preset]
    assert f"trainable_params={ALL_COUNTS[preset]}" in capsys.readouterr().out


def test_dry_run_from_the_console_script(tmp_path: Path) -> None:
    result = run_cli(
        "moa-train", "experiment=math_molora", "model=llama3_1_8b_arch", "dry_run=true", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "trainable_params=100139008" in result.stdout


# ---- user-supplied paper data ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "dataset"), [("math_soft", "math_14k"), ("commonsense_sparse", "commonsense_15k")]
)
def test_missing_paper_data_is_a_one_line_error(tmp_path: Path, preset: str, dataset: str) -> None:
    result = run_cli("moa-train", f"experiment={preset}", "model=tiny_random", "logger=none", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    line = lines[0]
    assert f"data.train_path=/path/{dataset}.json" in line  # names the override to use
    assert "LLM-Adapters" in line  # says where to get it


# ---- training -------------------------------------------------------------------------------------------------


def _sweep_rows(sweep: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((sweep / "summary.csv").open()))


def test_a_sample_of_presets_trains_two_steps(tmp_path: Path) -> None:
    """A fast sample of distinct code paths: the sparse threshold router, instance-level type gates
    (UniPEFT), top-2 site routing with a load-balance loss, block-level FFN experts (MixLoRA) and
    DynMoLE routing with its entropy loss."""
    sweep = tmp_path / "sweep"
    result = run_cli(
        "moa-train", "-m", "experiment=math_sparse,commonsense_unipeft,math_topk_lb,math_mixlora,math_dynmole", "seed=125",
        *TINY_TRAIN, f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _sweep_rows(sweep)
    assert len(rows) == 5 and all(r["status"] == "completed" and r["step"] == "2" for r in rows)
    by_method = list(csv.DictReader((sweep / "summary_by_method.csv").open()))
    assert [(r["seeds"], r["completed"]) for r in by_method] == [("125", "1/1")] * 5


@pytest.mark.slow
def test_every_experiment_trains_two_steps_on_tiny_random(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    result = run_cli(
        "moa-train",
        "-m",
        "experiment=glob(*)",
        *TINY_TRAIN,
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        timeout=3000,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _sweep_rows(sweep)
    ran = sorted(r["overrides"].split()[0].split("=")[1] for r in rows)
    assert ran == experiments()
    assert all(r["status"] == "completed" and r["step"] == "2" for r in rows), rows
    report = run_cli("moa-report", str(sweep), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "## Failed or incomplete jobs (0)" in (sweep / "report.md").read_text()


@pytest.mark.slow
def test_every_experiment_runs_on_smollm2_with_embedded_data(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    overrides = [o.replace("model=tiny_random", "model=smollm2_135m") for o in TINY_TRAIN]
    overrides = [o for o in overrides if not o.startswith(("trainer.max_steps", "trainer.effective"))]
    result = run_cli(
        "moa-train", "-m", "experiment=glob(*)", *overrides, "trainer.max_steps=1", "trainer.effective_batch_size=2",
        f"hydra.sweep.dir={sweep}", cwd=tmp_path, timeout=3000,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _sweep_rows(sweep)
    assert len(rows) == len(experiments())
    assert all(r["status"] == "completed" and float(r["train/loss"]) > 0 for r in rows), rows
