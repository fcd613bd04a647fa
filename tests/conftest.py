"""Shared test setup: offline environment, the console scripts, Hydra composition helpers.

Every test runs offline (no hub lookups, W&B offline). Models and data come from the shared cache
``~/.cache/moa_train`` (``$MOA_TRAIN_CACHE``), which the SmolLM2 tokenizer conversion fills once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "TOKENIZERS_PARALLELISM": "false",
}
os.environ.update(OFFLINE_ENV)  # at import: before any test module imports transformers or wandb

REPO = Path(__file__).resolve().parents[1]
# Test data that ships with the repository (each folder's README names its origin).
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# Tests that prove core properties from those fixtures (the official-implementation equivalence, the
# real-file evaluation pipeline): if any of them is skipped, the session fails, so CI cannot go green
# without running them.
MUST_RUN = ("test_official_reference.py::", "::test_real_llm_adapters_files_through_the_pipeline")
_SKIPPED_MUST_RUN: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and any(key in report.nodeid for key in MUST_RUN):
        _SKIPPED_MUST_RUN.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _SKIPPED_MUST_RUN:
        print(f"\nerror: {len(_SKIPPED_MUST_RUN)} test(s) that must run were skipped: {_SKIPPED_MUST_RUN[0]}")
        session.exitstatus = 1


BIN = Path(sys.executable).parent

# The seconds-long end-to-end configuration (tiny random Llama, fp32, no external logger).
TINY = ["experiment=tiny"]


def console_script(name: str) -> str:
    """Path of an installed console script of this environment (moa-train, moa-eval)."""
    path = BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in {BIN}; run `pip install -e .` first")
    return str(path)


def run_cli(
    name: str, *args: str, cwd: Path, timeout: float = 600, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a console script with the offline environment and capture its output."""
    full_env = {**os.environ, **OFFLINE_ENV, **(env or {})}
    return subprocess.run(
        [console_script(name), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def compose_config(overrides: list[str] | None = None, config_name: str = "train", hydra: bool = False):
    """Compose a packaged config (as the console scripts do) with ``overrides``."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    import moa_train.cli.main  # noqa: F401  (registers the run-dir resolvers used by configs/hydra)

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("moa_train.configs", version_base="1.3"):
            return compose(config_name, overrides=list(overrides or []), return_hydra_config=hydra)
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture
def compose():
    """``compose(overrides, config_name="train", hydra=False)`` -> the composed config."""
    return compose_config


def train_in_process(run_dir: Path, overrides: list[str]) -> dict:
    """Compose ``overrides`` and run the recipe in this process (what `moa-train` does, minus
    Hydra's job setup); returns the run summary."""
    from omegaconf import OmegaConf

    from moa_train.train.recipe import train

    cfg = compose_config(overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    return train(cfg, run_dir)


@pytest.fixture(autouse=True)
def _fresh_hydra_state():
    """Tests that run a console script in-process leave Hydra's singletons (HydraConfig, GlobalHydra)
    set; code that asks "was this option given on the command line?" would then read another test's
    overrides. Every test starts and ends without them, and without a sweep stop noted by another test's
    in-process sweep (moa_train.cli.sweep_jobs.refuse_if_stopped)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    from moa_train.cli import sweep_jobs

    def clear() -> None:
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
        sweep_jobs._STOPPED.clear()

    clear()
    yield
    clear()
