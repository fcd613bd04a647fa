"""The config tree: every group and option composes, documents itself and builds a valid MoAConfig."""

from __future__ import annotations

import importlib.resources
from pathlib import Path

import pytest
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from moa_train import MoAConfig

CONFIGS = Path(str(importlib.resources.files("moa_train.configs")))
REPO_ROOT = Path(__file__).resolve().parents[2]
GROUPS = [
    "model", "experts", "router", "data", "optimizer", "scheduler",
    "trainer", "logger", "launcher", "experiment", "hydra", "debug",
]  # fmt: skip
# Block routers that only make sense over several experts of a block (top-k keeps 2 of them).
MULTI_EXPERT_ROUTERS = {"topk"}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def test_configs_are_shipped_in_the_package() -> None:
    # Resolved through importlib (what Hydra's pkg:// search path uses), not through the source tree.
    assert (CONFIGS / "train.yaml").is_file()
    for group in GROUPS:
        assert options(group), f"config group {group}/ is empty or missing"


def test_every_config_group_is_a_listed_package() -> None:
    """pyproject lists packages explicitly; a group folder missing there would be left out of the wheel."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    listed = set(tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {
        p.name for p in (REPO_ROOT / "configs").iterdir() if p.is_dir() and not p.name.startswith("__")
    }
    assert {f"moa_train.configs.{g}" for g in folders} <= listed
    src = REPO_ROOT / "src"
    code_and_data = {  # every folder of the package, code or data-only (setuptools drops unlisted ones)
        ".".join(p.relative_to(src).parts)
        for p in (src / "moa_train").rglob("*")
        if p.is_dir() and "__pycache__" not in p.parts
    }
    assert code_and_data <= listed, sorted(code_and_data - listed)


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_starts_with_a_comment(group: str) -> None:
    for name in options(group):
        text = (CONFIGS / group / f"{name}.yaml").read_text()
        comments = [line for line in text.splitlines() if line.startswith("#") and "@package" not in line]
        assert text.startswith("#") and comments, f"{group}/{name}.yaml must start with a comment"
        assert len(" ".join(comments)) > 40, f"{group}/{name}.yaml: say what it is and when to use it"


@pytest.mark.parametrize(
    ("group", "package"),
    [("experiment", "_global_"), ("debug", "_global_"), ("experts", "moa"), ("router", "moa.router")],
)
def test_package_headers(group: str, package: str) -> None:
    for name in options(group):
        first = (CONFIGS / group / f"{name}.yaml").read_text().splitlines()[0]
        assert first == f"# @package {package}", f"{group}/{name}.yaml must start with '# @package {package}'"


def test_default_is_the_quickstart(compose) -> None:
    cfg = compose()
    assert cfg.name == "quickstart"
    assert cfg.model.source == "smollm2" and cfg.data.name == "arith2"
    assert cfg.launcher.name == "local" and cfg.logger.name == "wandb"
    assert cfg.final_eval.enabled
    moa = MoAConfig.from_dict(OmegaConf.to_container(cfg.moa))
    assert moa.lora_targets == ["q", "k", "v", "o", "down"] and moa.pa_size == 16 and moa.prompt_len == 10


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes_to_a_valid_moa_config(compose, experiment: str) -> None:
    cfg = compose([f"experiment={experiment}"])
    assert cfg.name, "each experiment names its run folder"
    MoAConfig.from_dict(OmegaConf.to_container(cfg.moa, resolve=True))
    OmegaConf.to_container(cfg, resolve=True)  # no dangling interpolation


def test_experiments_are_pure_deltas(compose) -> None:
    """An experiment changes only the nodes it names (values or group overrides); the rest of
    the tree is the default composition."""
    base = OmegaConf.to_container(compose(["~experiment"]), resolve=True)
    for experiment in options("experiment"):
        delta = OmegaConf.load(CONFIGS / "experiment" / f"{experiment}.yaml")
        named = {key for key in delta if key != "defaults"}
        for entry in delta.get("defaults", []):
            if not isinstance(entry, str):  # {"override /model": "tiny_random"}
                named |= {key.split("/")[-1] for key in entry}
        if named & {"experts", "router"}:
            named.add("moa")  # both groups live under the moa node
        changed = OmegaConf.to_container(compose([f"experiment={experiment}"]), resolve=True)
        for key in base:
            if key not in named:
                assert changed[key] == base[key], f"experiment={experiment} changes {key} without naming it"


@pytest.mark.parametrize("experts", options("experts"))
def test_every_experts_option_builds(compose, experts: str) -> None:
    for router in ("none", "soft_swiglu"):
        cfg = compose([f"experts={experts}", f"router={router}"])
        MoAConfig.from_dict(OmegaConf.to_container(cfg.moa))


@pytest.mark.parametrize("router", options("router"))
def test_every_router_option_builds(compose, router: str) -> None:
    cfg = compose(["experts=moa_soft", f"router={router}"])
    moa = MoAConfig.from_dict(OmegaConf.to_container(cfg.moa))
    assert moa.router.kind == cfg.moa.router.kind


def test_named_router_semantics(compose) -> None:
    sparse = MoAConfig.from_dict(OmegaConf.to_container(compose(["router=sparse"]).moa)).router
    assert (sparse.selection, sparse.max_threshold, sparse.threshold_grad) == ("threshold", 0.5, "none")
    assert not sparse.const_threshold
    instance = MoAConfig.from_dict(OmegaConf.to_container(compose(["router=instance"]).moa)).router
    assert instance.granularity == "instance"
    soft = MoAConfig.from_dict(OmegaConf.to_container(compose(["router=soft_linear"]).moa)).router
    assert (soft.kind, soft.activation, soft.selection) == ("linear", "sigmoid", "dense")
    soft_moa = MoAConfig.from_dict(OmegaConf.to_container(compose(["experts=moa_sparse"]).moa))
    assert soft_moa.prompt_len == 0 and soft_moa.pa_size == 16


def test_unknown_option_lists_the_choices(compose) -> None:
    with pytest.raises(MissingConfigException) as info:
        compose(["router=nope"])
    message = str(info.value)
    assert "Available options in 'router'" in message
    for choice in options("router"):
        assert choice in message


def test_run_and_sweep_dirs(compose) -> None:
    cfg = compose(hydra=True)
    run_dir = cfg.hydra.run.dir
    assert run_dir.startswith("runs/quickstart/") and len(Path(run_dir).name) == len("2026-01-01_00-00-00")
    assert compose(["experiment=tiny"], hydra=True).hydra.run.dir.startswith("runs/tiny/")
    assert cfg.hydra.sweep.dir.startswith("multirun/")
    assert (
        OmegaConf.to_container(cfg.hydra.sweep)["subdir"] == "${hydra.job.num}"
    )  # multirun/<date>/<time>/<job>
    assert cfg.hydra.callbacks.sweep_summary._target_ == "moa_train.cli.sweep.SweepSummary"


def test_run_dir_of_a_resumed_run_is_its_own(compose, tmp_path: Path) -> None:
    run = tmp_path / "runs" / "x" / "2026-01-01_00-00-00"
    (run / "checkpoints" / "step-4").mkdir(parents=True)
    (run / "config.yaml").write_text("name: x\n")
    (run / "checkpoints" / "step-4" / "trainer_state.json").write_text("{}")
    for target in (run, run / "checkpoints" / "step-4"):
        cfg = compose([f"resume={target}"], hydra=True)
        assert Path(cfg.hydra.run.dir) == run
        assert cfg.hydra.output_subdir is None  # the job records the resume beside config.yaml itself
