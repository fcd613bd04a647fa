"""The ``moa-train`` Hydra job: validate, claim the run dir, then dry-run, train here, or launch workers.

Order (nothing is written before step 3):
1. ``resume=``: merge the command line into the run's saved config (refusing real changes);
2. validate every value (``moa_train.cli.validate``), including the batch split over all processes;
3. claim the run dir atomically by creating its ``config.yaml`` (``moa_train.rundir``) and hold its
   lock until the job ends (a resume or a sweep job locks the folder before looking into it, so a
   folder another process is training is never resumed twice); a resumed run never rewrites
   ``config.yaml``: each resume records its overrides and effective config under ``resumes/<time>/``;
4. write Hydra's ``.hydra/`` files and ``train.log``; train or launch the workers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from moa_train import rundir
from moa_train.cli import sweep_jobs
from moa_train.cli.launch import join_run, launch_workers
from moa_train.cli.sweep_jobs import existing_run
from moa_train.cli.validate import validate
from moa_train.errors import MoATrainError, Preempted
from moa_train.files import read_json, write_atomic, write_new
from moa_train.rundir import STATE_NAME, refuse_code_from_file, resolve_resume

log = logging.getLogger(__name__)

# Keys a resume may change: how long to train and how to log, launch and evaluate. Anything else
# (model, experts, ranks, data, seeds, optimizer...) would make it another run.
RESUME_MAY_CHANGE = (
    "trainer.max_steps",
    "trainer.epochs",
    "trainer.log_every_steps",
    "trainer.save_every_steps",
    "trainer.keep_last",
    "trainer.heatmap_every_steps",
    "trainer.progress_bar",
    "trainer.cpu_threads",
    "trainer.dead_expert_threshold",
    "trainer.dead_expert_intervals",
    "logger",
    "launcher",
    "final_eval",
    "dry_run",
    "full_traceback",
    "overwrite",
    "model.trust_remote_code",  # only ever from the command line (see rundir.refuse_code_from_file)
)
RESUMES_DIR = "resumes"
# A requeued SLURM job may start while its predecessor still exits (saving, releasing the run's lock)
REQUEUE_WAIT_S = 300.0
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"


def run(cfg: DictConfig) -> Any:
    """Body of ``moa-train``. A sweep job returns its objective, leaves the reason of a failure in its
    folder and, stopped by a signal under submitit, is requeued (``moa_train.cli.sweep_jobs``)."""
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return _run(cfg)
    try:
        sweep_jobs.refuse_if_stopped(Path(hc.runtime.output_dir))
        return sweep_jobs.objective_value(cfg, _run(cfg))
    except rundir.RunBusy as exc:
        return sweep_jobs.busy_job(cfg, hc, exc)
    except Preempted as exc:
        sweep_jobs.note_stopped(exc)
        sweep_jobs.requeue_if_submitit(exc)
        raise
    except BaseException as exc:
        sweep_jobs.record_failure(Path(hc.runtime.output_dir), exc)
        raise


def _run(cfg: DictConfig) -> dict[str, Any]:
    # deferred: torch and transformers load after the config validates
    from moa_train.train.recipe import dry_run

    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    overrides = list(hc.overrides.task)
    run_dir = Path(hc.runtime.output_dir)
    if cfg.get("resume"):
        cfg, run_dir = resumed_config(cfg, overrides)
    validate(cfg, "train")
    if cfg.dry_run:  # a sweep's job folder gets the summary so that `-m dry_run=true` tabulates counts
        summary = dry_run(cfg)
        if multirun:
            rundir.write_summary(run_dir, summary)
        return summary

    if multirun and (recorded := sweep_jobs.recorded_job(cfg, hc, run_dir)) is not None:
        return recorded  # skip_recorded: its committed record stands for it
    if int(cfg.launcher.get("machine_rank") or 0) > 0:  # a further machine: global rank 0 writes the run dir
        explicit = any(o.lstrip("+").startswith("hydra.run.dir=") for o in hc.overrides.hydra)
        return join_run(cfg, run_dir, explicit or bool(cfg.get("resume")))

    # deferred (here and below): moa_train.data and train.validation load torch; cli.job stays torch-free
    from moa_train.data import load_splits

    splits = load_splits(cfg.data)  # a bad data file fails here, before the run dir is claimed
    from moa_train.train.validation import split_validation  # deferred: loads torch (see above)

    splits = split_validation(splits, cfg)  # the validation split and its options, also before the run dir
    split = str(cfg.final_eval.get("split"))
    if cfg.final_eval.get("enabled") and not splits.get(split):
        raise MoATrainError(
            f"final_eval.split={split} is empty or missing in data={cfg.data.get('name', '?')} "
            f"(splits: {', '.join(k for k, v in splits.items() if v) or 'none'}); set final_eval.enabled=false"
        )
    config_text = OmegaConf.to_yaml(cfg, resolve=True)
    with contextlib.ExitStack() as held:
        if cfg.get("resume") or multirun:  # the folder exists: lock it before looking at what it holds
            held.enter_context(
                rundir.hold(run_dir, wait_s=REQUEUE_WAIT_S if sweep_jobs.in_submitit_job() else 0)
            )
        if cfg.get("resume"):
            stamp = f"{datetime.now():%Y-%m-%d_%H-%M-%S}-{os.getpid()}"
            config_path = run_dir / RESUMES_DIR / stamp / rundir.CONFIG_NAME
            config_path.parent.mkdir(parents=True)
            write_atomic(config_path, config_text)  # the effective config of this session
            write_atomic(
                config_path.parent / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(overrides))
            )
        elif multirun:  # a numbered job folder of this sweep, where Hydra already wrote .hydra/
            config_path = run_dir / rundir.CONFIG_NAME
            if not write_new(config_path, config_text):  # the sweep again, or a requeued job: skip or resume
                finished = existing_run(cfg, run_dir, config_text)
                if finished is not None:
                    return finished
                if cfg.get("resume"):
                    # resumed in place: this session's config, as resume= records it (launcher=accelerate's
                    # workers read it, so they resume too)
                    stamp = f"{datetime.now():%Y-%m-%d_%H-%M-%S}-{os.getpid()}"
                    config_path = run_dir / RESUMES_DIR / stamp / rundir.CONFIG_NAME
                    config_path.parent.mkdir(parents=True)
                    write_atomic(config_path, OmegaConf.to_yaml(cfg, resolve=True))
        else:
            explicit = any(o.lstrip("+").startswith("hydra.run.dir=") for o in hc.overrides.hydra)
            run_dir = rundir.claim(
                run_dir, config_text, auto=not explicit, overwrite=bool(cfg.get("overwrite"))
            )
            held.enter_context(rundir.hold(run_dir))  # a resume= of this new run waits for its end
            config_path = run_dir / rundir.CONFIG_NAME
            _write_hydra_files(run_dir, cfg, hc)
        return _train_in(cfg, run_dir, config_path, splits, multirun)


def _train_in(
    cfg: DictConfig, run_dir: Path, config_path: Path, splits: Any, multirun: bool
) -> dict[str, Any]:
    """Train (or launch the workers) in the claimed run dir; a user error before the first save removes
    what this start wrote."""
    # deferred: torch and transformers load after the config validates
    from moa_train.train.recipe import train

    saved_before = _saved(run_dir)
    try:
        with _log_file(run_dir / "train.log"):
            log.info("run dir: %s", run_dir)
            if cfg.launcher.name in ("accelerate", "fsdp"):
                launch_workers(cfg, run_dir, config_path)
                return rundir.read_summary(run_dir)
            return train(cfg, run_dir, splits=splits)
    except MoATrainError:
        # a user error found before anything was saved (data too long for data.max_len, a damaged
        # checkpoint...) leaves nothing behind: not the new run's folder, not the resume's record
        if _saved(run_dir) == saved_before:
            if cfg.get("resume") and config_path.parent != run_dir:  # not a sweep job resuming in place
                shutil.rmtree(config_path.parent, ignore_errors=True)  # resumes/<time>/
                with contextlib.suppress(OSError):
                    config_path.parent.parent.rmdir()  # resumes/, if this was its only session
            elif not multirun and not (run_dir / "metrics.jsonl").exists():  # a sweep lists failed jobs
                shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _saved(run_dir: Path) -> list[tuple[str, float]]:
    """The complete checkpoints of a run with the time of their completeness marker."""
    markers = [*run_dir.glob(f"checkpoints/step-*/{STATE_NAME}"), run_dir / "final" / STATE_NAME]
    return sorted((str(m), m.stat().st_mtime) for m in markers if m.is_file())


def resumed_config(cfg: DictConfig, overrides: list[str]) -> tuple[DictConfig, Path]:
    """The run's saved config with the command line's allowed changes applied; its run dir.

    The command line may re-state the run's own choices (the same command with ``resume=`` appended);
    a change to anything outside ``RESUME_MAY_CHANGE`` is refused naming the key and the saved value.
    """
    target = resolve_resume(cfg.resume)
    if target.checkpoint is None:
        raise MoATrainError(
            f"resume={cfg.resume}: the run has no complete checkpoint yet; start it again without resume"
        )
    saved_path = latest_config(target.run_dir)
    saved = load_yaml(saved_path)
    changes = command_line_changes(cfg, overrides)
    for key, value in changes.items():
        if key == "resume" or key.startswith("hydra"):
            continue
        allowed = next((k for k in RESUME_MAY_CHANGE if key == k or key.startswith(k + ".")), None)
        if allowed is not None:  # the whole allowed node (logger, launcher...) as this command line has it
            node = OmegaConf.select(cfg, allowed, default=None)
            OmegaConf.update(saved, allowed, node if node is not None else value, force_add=True, merge=False)
            continue
        before = OmegaConf.select(saved, key, default="<unset>")
        before = OmegaConf.to_container(before, resolve=True) if OmegaConf.is_config(before) else before
        if before != value:
            raise MoATrainError(
                f"resume keeps the run's config: {key}={_show(value)} differs from the saved "
                f"{key}={_show(before)} in {saved_path}; drop it (allowed changes: trainer.max_steps, "
                "logger, launcher, ...) or start a new run"
            )
    refuse_code_from_file(saved, cfg, source=saved_path)
    saved.resume = str(target.checkpoint)
    state = read_json(target.checkpoint / STATE_NAME)
    finished = target.checkpoint.name == "final"
    step = state.get("step") if isinstance(state, dict) else None
    max_steps = OmegaConf.select(saved, "trainer.max_steps", default=None)
    longer = {"trainer.max_steps", "trainer.epochs"} & set(changes)
    if finished and (
        not longer or (isinstance(max_steps, int) and isinstance(step, int) and max_steps <= step)
    ):
        raise MoATrainError(
            f"resume={cfg.resume}: the run already finished at step {step} (final/ is saved); to train it "
            f"further add trainer.max_steps=<more than {step}>"
        )
    return saved, target.run_dir


def command_line_changes(cfg: DictConfig, overrides: list[str]) -> dict[str, Any]:
    """Leaf keys (dotted) whose value the command line set: ``cfg`` against the same config composed
    without the command line, plus every key a dotted override names (even at its default)."""
    here = _flat(cfg)
    base = _flat(compose(config_name=HydraConfig.get().job.config_name, overrides=[]))
    changes = {k: v for k, v in here.items() if base.get(k, _MISSING) != v}
    for key in base.keys() - here.keys():
        if not any(name.startswith(key + ".") for name in here):  # not a null that became a node
            changes[key] = None  # deleted with ~key
    for override in OverridesParser.create().parse_overrides(overrides):
        key = override.key_or_group
        if override.is_delete() or key.startswith("hydra"):
            continue
        for name, value in here.items():  # a dotted key, or every key of a group whose package is its name
            if name == key or name.startswith(key + "."):
                changes.setdefault(name, value)
    return changes


def latest_config(run_dir: Path) -> Path:
    """The run's effective config: its newest resume session's, else ``config.yaml``."""
    sessions = sorted(p for p in (run_dir / RESUMES_DIR).glob(f"*/{rundir.CONFIG_NAME}") if p.is_file())
    return sessions[-1] if sessions else run_dir / rundir.CONFIG_NAME


def load_yaml(path: Path) -> DictConfig:
    """A config file of a run, checked: readable UTF-8 YAML holding a mapping."""
    try:
        node = OmegaConf.load(path)
    except FileNotFoundError:
        raise MoATrainError(f"{path} is missing; the run dir is incomplete") from None
    except UnicodeDecodeError:
        raise MoATrainError(f"{path} is not UTF-8 text; the run dir is damaged") from None
    except Exception as exc:
        raise MoATrainError(f"{path} is not valid YAML ({' '.join(str(exc).split())[:200]})") from None
    if not isinstance(node, DictConfig):
        raise MoATrainError(f"{path} does not hold a config mapping; the run dir is damaged")
    return node


_MISSING = object()


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    try:
        data = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    except Exception:
        data = OmegaConf.to_container(node, resolve=False)
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out


def _show(value: Any) -> str:
    text = "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _write_hydra_files(run_dir: Path, cfg: DictConfig, hc: Any) -> None:
    """What Hydra writes into a job folder, written once the run dir is ours."""
    out = run_dir / ".hydra"
    out.mkdir(exist_ok=True)
    OmegaConf.save(cfg, out / "config.yaml")
    OmegaConf.save(OmegaConf.create({"hydra": hc}), out / "hydra.yaml")
    OmegaConf.save(hc.overrides.task, out / "overrides.yaml")


@contextlib.contextmanager
def _log_file(path: Path) -> Iterator[None]:
    """The run's ``train.log`` (appended by a resume), attached to the root logger for this job."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
