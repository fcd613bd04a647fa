"""A sweep's launcher and sweeper settings are checked before anything is launched or written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from omegaconf import open_dict
from tests.conftest import TINY, run_cli

from moa_train.cli import sweep_checks
from moa_train.cli.keys import unknown_override
from moa_train.errors import MoATrainError

BAD = [
    (["sweep=lr_search", "hydra.sweeper.direction=sideways"], "hydra.sweeper.direction='sideways' is invalid"),
    (["sweep=lr_search", "hydra.sweeper.n_trials=0"], "hydra.sweeper.n_trials=0 is invalid"),
    (["sweep=lr_search", "hydra.sweeper.n_jobs=-2"], "hydra.sweeper.n_jobs=-2 is invalid"),
    (["sweep=lr_search", "hydra.sweeper.storage=foo://bar"], "hydra.sweeper.storage='foo://bar' is not a database URL"),
    (["sweep=lr_search", "hydra.sweeper.storage=nonsense"], "is not a database URL"),
    (["sweep=lr_search", "hydra.sweeper.storage=sqlite:///no/such/dir/s.db"], "the folder no/such/dir does not exist"),
    (["hydra/sweeper=optuna"], "hydra/sweeper=optuna needs objective="),
    (["sweep=lr_search", "dry_run=true"], "dry_run=true cannot be swept with hydra/sweeper=optuna"),
    (["hydra/launcher=joblib", "hydra.launcher.n_jobs=0"], "hydra.launcher.n_jobs=0 is invalid"),
    (["hydra/launcher=joblib", "hydra.launcher.backend=dask_typo"], "hydra.launcher.backend='dask_typo' would be ignored"),
    (["hydra/launcher=joblib", "hydra.launcher.backend=threading"], "always runs one process per job"),
    (["hydra/launcher=joblib", "hydra.launcher.require=sharedmem"], "hydra.launcher.require='sharedmem' cannot be met"),
    (["hydra/launcher=joblib", "hydra.launcher.prefer=fast"], "hydra.launcher.prefer='fast' is invalid"),
    (["hydra/launcher=submitit_local", "hydra.launcher.timeout_min=-5"], "hydra.launcher.timeout_min=-5 is invalid"),
    (["hydra/launcher=submitit_local", "hydra.launcher.nodes=0"], "hydra.launcher.nodes=0 is invalid"),
    (["hydra/launcher=slurm", "hydra.launcher.array_parallelism=0"], "hydra.launcher.array_parallelism=0 is invalid"),
    (["hydra/launcher=slurm", "hydra.launcher.cpus_per_task=0"], "hydra.launcher.cpus_per_task=0 is invalid"),
    (["hydra/launcher=slurm", "hydra.launcher.signal_delay_s=-1"], "hydra.launcher.signal_delay_s=-1 is invalid"),
]  # fmt: skip

GOOD = [
    ["sweep=lr_search"],
    ["sweep=lr_search", "hydra.sweeper.direction=maximize", "objective=tuned_accuracy"],
    ["sweep=lr_search", "hydra.sweeper.storage=sqlite:///study.db"],  # a file in the current folder
    ["hydra/launcher=joblib", "hydra.launcher.n_jobs=-1"],
    ["hydra/launcher=joblib", "hydra.launcher.backend=loky", "hydra.launcher.prefer=threads"],  # a soft hint
    ["hydra/launcher=submitit_local"],
    ["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
    ["sweep=leaderboard", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
    ["sweep=leaderboard_gpu", "hydra/launcher=slurm"],
]


@pytest.fixture
def sbatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A SLURM login node: sbatch on PATH."""
    monkeypatch.setattr(sweep_checks.shutil, "which", lambda name: f"/usr/bin/{name}")


@pytest.mark.parametrize(("overrides", "expected"), BAD)
def test_bad_launcher_and_sweeper_settings_are_one_line(compose, sbatch, overrides, expected) -> None:
    cfg = compose([*TINY, *overrides], hydra=True)
    with pytest.raises(MoATrainError) as caught:
        sweep_checks.check_launch(cfg)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("overrides", GOOD)
def test_working_settings_pass(compose, sbatch, overrides) -> None:
    sweep_checks.check_launch(compose([*TINY, *overrides], hydra=True))


@pytest.mark.parametrize(
    ("task", "bad"),
    [
        (["optimizer.lr=tag(log, interval(1e-4, 3e-3))", "moa.lora_rank=choice(4, 8)"], None),
        (["optimizer.lr=tag(log, interval(0, 1e-2))"], "optimizer.lr=tag(log, interval(0, 1e-2))"),
        (["seed=0", "moa.lora_rank=range(8, 2)"], "moa.lora_rank=range(8, 2)"),
    ],
)
def test_the_optuna_search_space_is_checked_key_by_key(compose, task: list[str], bad: str | None) -> None:
    cfg = compose([*TINY, "sweep=lr_search"], hydra=True)
    with open_dict(cfg):  # the command line's sweep overrides (compose takes no sweep outside a multirun)
        cfg.hydra.overrides.task = [*TINY, "sweep=lr_search", *task]
    if bad is None:
        sweep_checks.check_launch(cfg)
        return
    with pytest.raises(MoATrainError, match=re.escape(f"the Optuna search space '{bad}' cannot be used")):
        sweep_checks.check_launch(cfg)


def test_slurm_off_a_cluster_names_the_local_launchers(compose, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sweep_checks.shutil, "which", lambda name: None)
    with pytest.raises(MoATrainError, match="sbatch is not on PATH.*hydra/launcher=submitit_local"):
        sweep_checks.check_launch(compose([*TINY, "hydra/launcher=slurm"], hydra=True))


def test_a_refused_sweep_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    done = run_cli("moa-train", "-m", *TINY, "trainer.max_steps=1,2", "hydra/launcher=joblib",
                   "hydra.launcher.n_jobs=0", f"hydra.sweep.dir={sweep}", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: hydra.launcher.n_jobs=0 is invalid: the number of jobs run at once is >= 1 (or -1 for one per core)"
    ]
    assert not sweep.exists() and not (tmp_path / "multirun").exists()


def test_keys_of_an_unchosen_option_and_dotted_search_spaces_get_their_fix() -> None:
    other = unknown_override("Could not override 'hydra.sweeper.n_trials'.", "train")
    assert other is not None and "choose that one first (hydra/sweeper=<option>)" in str(other)
    params = unknown_override("Could not override 'hydra.sweeper.params.optimizer.lr'.", "train")
    assert params is not None and "optimizer.lr='tag(log, interval(1e-4, 1e-2))'" in str(params)
    unset = unknown_override("Could not override 'moa.router.aux_pool'.", "train")  # a field no preset sets
    assert (
        str(unset)
        == "'moa.router.aux_pool' is not set in this config; add it with +moa.router.aux_pool=<value>"
    )


def test_a_sweep_folder_that_cannot_be_made_is_one_line_and_a_good_one_is_left_as_it_was(
    compose, tmp_path: Path
) -> None:
    (tmp_path / "afile").write_text("x")
    for bad, reason in (
        (tmp_path / "afile" / "sweep", "afile is a file"),
        ("/proc/no/sweep", "No such file"),
    ):
        with pytest.raises(MoATrainError, match=rf"hydra.sweep.dir={bad} cannot be created \(.*{reason}"):
            sweep_checks.check_launch(compose([*TINY, f"hydra.sweep.dir={bad}"], hydra=True))
    good = tmp_path / "new" / "sweep"
    sweep_checks.check_launch(compose([*TINY, f"hydra.sweep.dir={good}"], hydra=True))
    assert not (tmp_path / "new").exists()  # made to check, removed again: Hydra makes it when it starts


def test_a_wrongly_typed_or_dotted_sweep_override_names_the_override_and_the_fix(tmp_path: Path) -> None:
    from test_bad_inputs import invoke

    from moa_train.cli.main import train_main

    for args, expected in (
        (["hydra/launcher=joblib", "hydra.launcher.n_jobs=abc"],
         "error: hydra.launcher.n_jobs=abc is invalid: Value 'abc' of type 'str' could not be converted to "
         "Integer; give an integer"),
        (["hydra/sweeper=optuna", "objective=val/loss", "hydra.sweeper.params.optimizer.lr=interval(0.1,0.2)"],
         "error: 'hydra.sweeper.params.optimizer.lr' cannot be set with key=value: give the search space of "
         "optimizer.lr as a sweep override"),
    ):  # fmt: skip
        code, output = invoke(train_main, ["-m", *TINY, f"hydra.sweep.dir={tmp_path / 's'}", *args], tmp_path)
        assert code == 2 and output.strip().splitlines()[-1].startswith(expected), output[-2000:]
        assert not (tmp_path / "s").exists()


def test_moa_eval_sweeps_are_checked_the_same_way(tmp_path: Path) -> None:
    from test_bad_inputs import invoke

    from moa_train.cli.main import eval_main

    for args, expected in (
        (["hydra/launcher=joblib", "hydra.launcher.n_jobs=0"], "error: hydra.launcher.n_jobs=0 is invalid"),
        (["hydra/launcher=joblib", "hydra.launcher.backend=threading"], "error: hydra.launcher.backend='threading'"),
        (["hydra/sweeper=optuna"], "error: hydra/sweeper=optuna searches training settings and eval jobs"),
    ):  # fmt: skip
        argv = ["-m", "checkpoint=a,b", f"hydra.sweep.dir={tmp_path / 's'}", *args]
        code, output = invoke(eval_main, argv, tmp_path)
        assert code == 2 and output.strip().splitlines()[-1].startswith(expected), output[-2000:]
        assert not (tmp_path / "s").exists() and not (tmp_path / "multirun").exists()
