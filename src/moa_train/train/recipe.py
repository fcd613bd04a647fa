"""The training recipe: setup -> loop -> save -> evaluate, in plain PyTorch + Accelerate.

    train(cfg, run_dir)      one process of training; all ranks run it under launcher=accelerate|fsdp
    dry_run(cfg)             build the model, print trainable parameters by expert type
(the Hydra job around them, ``moa-train``, is ``moa_train.cli.job.run``)

Read ``_train`` top to bottom: it is the whole recipe (method spec D), one function per phase. The parts
live beside it: batches are planned on the host from ``data.seed`` (``train/batching.py``), one optimizer
step with gradient accumulation is ``train/steps.py``, the optimizer and schedule ``train/optim.py``,
checkpoints ``train/checkpoint.py``, validation and early stopping ``train/validation.py``, the final
held-out accuracy ``train/evaluate.py``. Nothing reads a device value back every step: losses
accumulate on device and are read, with the router statistics, every ``trainer.log_every_steps``.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed
from omegaconf import DictConfig, OmegaConf

from moa_train.core.compile import compile_model, compile_seconds
from moa_train.core.config import MoAConfig
from moa_train.core.dist import full_tensor
from moa_train.core.memory import peak_memory_mb, reset_peak_memory
from moa_train.core.model import get_moa_model
from moa_train.data import load_splits
from moa_train.errors import MoATrainError
from moa_train.models.base import load_base_model, place_base
from moa_train.rundir import write_summary
from moa_train.train.batching import BatchPlan, StepBatch, StreamPlan  # noqa: F401  (StepBatch: re-exported)
from moa_train.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from moa_train.train.evaluate import final_evaluation
from moa_train.train.fsdp import rank0_loading, shard_model, summary_fields
from moa_train.train.loggers import make_logger
from moa_train.train.metrics import Meter, RouterLog
from moa_train.train.optim import LRSchedule, build_optimizer, learning_rate, replan_schedule
from moa_train.train.options import PRECISION_NAMES
from moa_train.train.preemption import StopSignal, stop_on_signal
from moa_train.train.runtime import duration, progress_bar, reset_accelerate_state, worker_logging
from moa_train.train.steps import Session, optimizer_step, parameter_digest
from moa_train.train.steps import token_cross_entropy as token_cross_entropy  # re-exported
from moa_train.train.validation import ValidationLoop, split_validation

log = logging.getLogger(__name__)

PRECISIONS = dict(zip(PRECISION_NAMES, (torch.bfloat16, torch.float16, torch.float32), strict=True))


# ====================================================================================================
# Dry run
# ====================================================================================================


def dry_run(cfg: DictConfig) -> dict[str, Any]:
    """Build the model (``*_arch`` models on the meta device), print the trainable parameters, exit."""
    torch.manual_seed(int(cfg.seed))
    base, _ = load_base_model(cfg.model)
    model = get_moa_model(base, MoAConfig.from_dict(_plain(cfg.moa)))
    by_type = model.num_trainable_parameters(by_type=True)
    total = by_type.pop("total")
    print(f"trainable_params={total}")
    for kind, count in sorted(by_type.items()):
        print(f"  {kind}={count}")
    sys.stdout.flush()
    return {"status": "dry_run", "trainable_params": total, **{f"params_{k}": v for k, v in by_type.items()}}


# ====================================================================================================
# The recipe (one process)
# ====================================================================================================


def train(
    cfg: DictConfig, run_dir: Path, expected_world_size: int = 1, splits: dict[str, list] | None = None
) -> dict[str, Any]:
    """Train with ``cfg`` into ``run_dir`` as one process of ``expected_world_size``.

    SIGTERM, SIGINT, SIGUSR1 and SIGUSR2 finish the current optimizer step, save
    ``checkpoints/step-<N>/`` and raise :class:`Preempted` (see ``moa_train.train.preemption``).
    """
    with StopSignal() as stop:
        return _train(cfg, run_dir, expected_world_size, stop, splits)


def _train(
    cfg: DictConfig, run_dir: Path, expected_world_size: int, stop: Any, splits: dict[str, list] | None
) -> dict[str, Any]:
    run = setup(cfg, run_dir, expected_world_size, stop, splits)
    loop(run, stop)
    summary = save(run)
    evaluate(run, summary)
    return finish(run, summary)


@dataclass
class Run(Session):
    """A :class:`Session` plus what the phases around the loop need."""

    cfg: DictConfig = None  # type: ignore[assignment]
    run_dir: Path = None  # type: ignore[assignment]
    main: bool = True
    fsdp: bool = False
    tokenizer: Any = None
    logger: Any = None
    telemetry: Any = None
    validation: Any = None
    meter: Any = None
    model_node: Any = None
    show_bar: bool = False
    lr: float = 0.0
    compile_time: float = 0.0


# ---- setup ------------------------------------------------------------------------------------------


def setup(
    cfg: DictConfig, run_dir: Path, expected_world_size: int, stop: Any, splits: dict[str, list] | None
) -> Run:
    """Processes, seeds, data, the model (frozen base in the compute dtype, fp32 adapters), optimizer,
    schedule, a resumed state and the loggers."""
    tc = cfg.trainer
    use_cpu = str(tc.get("device", "auto")) == "cpu" or not torch.cuda.is_available()
    processes = PartialState(cpu=use_cpu)
    world, rank, main = processes.num_processes, processes.process_index, processes.is_main_process
    if world != expected_world_size:  # e.g. `accelerate launch --cpu` silently gives N lone processes
        raise RuntimeError(f"expected a process group of {expected_world_size}, got world size {world}")
    if expected_world_size > 1:
        worker_logging(run_dir, main)
    stop.join(world)  # ranks agree on a stop after the same step
    set_seed(int(cfg.seed) + rank)  # the init seed; the data order has its own seed (data.seed)
    if tc.get("cpu_threads"):  # on a shared CPU, fewer threads avoid spin-waiting on busy cores
        torch.set_num_threads(int(tc.cpu_threads))
    reset_peak_memory(processes.device)  # this job's peak, not the sweep process's lifetime peak
    precision = str(tc.precision)
    if precision not in PRECISIONS:
        raise MoATrainError(f"trainer.precision={precision!r} is not known; choose one of bf16, fp16, fp32")
    bar = tc.get("progress_bar", "auto")
    if bar not in (True, False, "auto"):
        raise MoATrainError(f"trainer.progress_bar={bar!r} is not known; choose auto, true or false")
    # the data is read before the model loads, so a bad data path fails in a second, not after the load
    splits = load_splits(cfg.data) if splits is None else splits  # moa-train read them before the run dir
    if "val" not in splits:  # moa-train holds the validation split out before the run dir; the API here
        splits = split_validation(splits, cfg)

    fsdp = cfg.launcher.name == "fsdp"  # FSDP2, applied below by moa_train itself (train/fsdp.py)
    # with rank-0 loading, the other ranks build the base on the meta device and get rank 0's weights
    from_rank0 = rank0_loading(cfg.launcher.get("rank0_loading", True), cfg.model.get("quantization"))
    base, tokenizer = load_base_model(cfg.model, empty=fsdp and rank > 0 and from_rank0)
    place_base(base, processes.device, PRECISIONS[precision])
    model = get_moa_model(base, MoAConfig.from_dict(_plain(cfg.moa)))
    if tc.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    log.info("trainable parameters: %s", model.num_trainable_parameters(by_type=True))
    find_unused = cfg.launcher.get("find_unused_parameters")
    if find_unused is None:  # sparse routing leaves some adapters without gradient in a step
        find_unused = model.has_conditional_parameters()
    accelerator = Accelerator(
        cpu=use_cpu, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=bool(find_unused))]
    )
    if fsdp:  # before the optimizer: it must hold the sharded parameters
        shard_model(
            model, accelerator.device, cpu_offload=bool(cfg.launcher.get("cpu_offload", False)),
            reshard_after_forward=bool(cfg.launcher.get("reshard_after_forward", True)), from_rank0=from_rank0,
        )  # fmt: skip
    if tc.get("compile"):  # one graph per forward (moa_train.core.compile); compiles lazily at the first step
        compile_model(model, tc.get("compile_mode"), tc.get("compile_dynamic"))

    # encoded once, batches planned per epoch; or read as consumed (data.streaming)
    plan = (StreamPlan if cfg.data.get("streaming") else BatchPlan)(cfg, tokenizer, world, rank, splits)
    lr = learning_rate(cfg.optimizer, plan.global_batch)
    total_steps = plan.total_steps(tc)
    optimizer = build_optimizer(model, cfg.optimizer, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, LRSchedule.from_config(cfg.scheduler, lr, total_steps, plan.steps_per_epoch)
    )
    scaler = torch.amp.GradScaler(accelerator.device.type) if precision == "fp16" else None
    autocast = torch.autocast(
        accelerator.device.type, dtype=PRECISIONS[precision], enabled=precision != "fp32"
    )
    state = TrainState(world_size=world)
    if cfg.get("resume"):
        state = load_checkpoint(
            Path(cfg.resume), accelerator=accelerator, model=model, optimizer=optimizer,
            scheduler=scheduler, scaler=scaler,
        )  # fmt: skip
        log.info("resumed from %s at step %d (epoch %d)", cfg.resume, state.step, state.epoch)
        replan_schedule(scheduler, total_steps)
        if state.step > total_steps:
            raise MoATrainError(
                f"resume={cfg.resume}: the run is already at step {state.step}, past trainer.max_steps="
                f"{total_steps}; to train it further add trainer.max_steps=<more than {state.step}>"
            )
        if state.step == total_steps:  # stopped after its last step's checkpoint, before final/ or the
            # final eval (a preemption during the 600 generations): no step to train, finish the run
            log.info(
                "training ended at step %d before; writing final/, the final eval and the summary", state.step
            )
    plan.resume(state)  # a stream continues at the saved record
    logger = None
    if main:
        logger = make_logger(cfg.logger, run_dir, OmegaConf.to_container(cfg, resolve=True), state.wandb_id)
        state.wandb_id = getattr(logger.backend, "id", None) or state.wandb_id
    return Run(
        accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
        # DDP across processes; the model itself for one process or under FSDP (already sharded)
        ddp_model=model if fsdp else accelerator.prepare_model(model),
        autocast=autocast, plan=plan, state=state, total_steps=total_steps, world=world,
        grad_clip=tc.grad_clip, trainable=[p for p in model.parameters() if p.requires_grad],
        cfg=cfg, run_dir=run_dir, main=main, fsdp=fsdp, tokenizer=tokenizer, logger=logger, lr=lr,
        telemetry=RouterLog(
            run_dir, logger, heatmap_every=tc.get("heatmap_every_steps"),
            dead_threshold=tc.get("dead_expert_threshold", 0.01),
            dead_intervals=tc.get("dead_expert_intervals", 5),
        ),
        validation=ValidationLoop(cfg, run_dir, tokenizer, splits, state, autocast, accelerator.device),
        meter=Meter(accelerator.device),
        model_node=OmegaConf.to_container(cfg.model, resolve=True),
        # a live bar on a terminal; piped into a file (CI, nohup, a cluster's job log) a \r-redrawn bar is
        # one endless line, so there each log step writes a plain line with the same fields instead
        show_bar=main and (bar is True or (bar == "auto" and sys.stderr.isatty())),
    )  # fmt: skip


# ---- loop -------------------------------------------------------------------------------------------


def loop(run: Run, stop: Any) -> None:
    """Optimizer steps until ``total_steps`` (or early stopping): log, validate, checkpoint, and stop
    cleanly with a checkpoint after the step that saw a stop signal."""
    tc, state, plan, total = run.cfg.trainer, run.state, run.plan, run.total_steps
    log.info(
        "training %d steps: global batch %d = %d micro x %d accumulation x %d processes, lr %.3g",
        total, plan.global_batch, plan.micro_batch, plan.accumulation, run.world, run.lr,
    )  # fmt: skip
    run.model.reset_router_stats()
    progress = progress_bar(run.show_bar, total, state.step)
    first_step, loop_started = state.step, time.perf_counter()
    started, compiled_before = time.perf_counter(), compile_seconds()
    # resumed from the checkpoint where early stopping ended the run: nothing is left to train, unless
    # the run is extended from final/ (resume=<run>/final trainer.max_steps=<more>)
    if run.validation.stopped_early and Path(str(run.cfg.get("resume") or "")).name == "final":
        run.validation.stopped_early = False
    stopped = run.validation.stopped_early
    while state.step < total and not stopped:
        for k in range(state.step_in_epoch, plan.steps_in_epoch(state.epoch)):
            step_batch = plan.step(state.epoch, k)
            lr_now = run.scheduler.get_last_lr()[0]
            logging_now = (state.step + 1) % int(tc.log_every_steps) == 0 or state.step + 1 == total
            grad_norm = optimizer_step(run, step_batch, run.meter, need_norm=logging_now)
            state.step, state.step_in_epoch = state.step + 1, k + 1
            state.tokens_seen += step_batch.tokens
            state.extra["computed_tokens"] = state.extra.get("computed_tokens", 0) + step_batch.computed
            run.meter.tokens += step_batch.tokens
            run.meter.targets += step_batch.target_tokens
            progress.update(1)
            if logging_now:
                per_step = (time.perf_counter() - loop_started) / (state.step - first_step)
                _log_step(run, progress, lr_now, grad_norm, per_step)
            stopped = run.validation.after_step(
                run.model, state, total, run.logger, lambda to: _save(run, to)
            )
            checkpoint = run.run_dir / "checkpoints" / f"step-{state.step}"
            saved = bool(tc.save_every_steps) and state.step % int(tc.save_every_steps) == 0
            if saved:
                state.train_seconds += time.perf_counter() - started
                started = time.perf_counter()
                _save(run, checkpoint, keep_last=tc.get("keep_last"))
            if state.step < total and stop.requested():
                state.train_seconds += time.perf_counter() - started
                progress.close()
                stop_on_signal(
                    stop, run.run_dir, state, run.logger, saved=saved, **_save_args(run),
                    keep_last=tc.get("keep_last"),
                )  # fmt: skip
            if stopped:  # early stopping: this step's checkpoint, then final/ and the summary as usual
                if not saved:
                    _save(run, checkpoint, keep_last=tc.get("keep_last"))
                break
            if state.step >= total:
                break
        else:  # the epoch ran out: the next one has a new order
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
    progress.close()
    state.train_seconds += time.perf_counter() - started
    run.compile_time = compile_seconds() - compiled_before  # apart from step time (train_seconds, tok/s)
    state.train_seconds -= run.compile_time
    if tc.get("compile"):
        log.info("torch.compile: %.1f s compiling forward and backward (not in step time)", run.compile_time)


def _log_step(
    run: Run, progress: Any, lr_now: float, grad_norm: torch.Tensor | None, per_step: float
) -> None:
    """A log step: read the accumulated losses and router statistics, send them to the logger and show
    them on the bar (or, without a terminal, as one log line with an ETA)."""
    state, total = run.state, run.total_steps
    metrics = run.meter.read(run.accelerator, lr_now, grad_norm)
    metrics["train/epoch"] = state.epoch + state.step_in_epoch / run.plan.steps_in_epoch(state.epoch)
    metrics.update(run.telemetry.router(run.model, state.step, final=state.step == total))
    if run.logger:
        run.logger.log(metrics, state.step)
    progress.set_postfix(loss=f"{metrics['train/loss']:.4f}", tok_s=f"{metrics['train/tokens_per_s']:.0f}")
    if run.main and not run.show_bar:
        log.info(
            "step %d/%d  loss %.4f  lr %.3g  %.0f tok/s  ETA %s", state.step, total, metrics["train/loss"],
            lr_now, metrics["train/tokens_per_s"], duration(per_step * (total - state.step)),
        )  # fmt: skip


def _save_args(run: Run) -> dict[str, Any]:
    return dict(
        accelerator=run.accelerator, model=run.model, optimizer=run.optimizer, scheduler=run.scheduler,
        scaler=run.scaler, extra_config={"model": run.model_node},
    )  # fmt: skip


def _save(run: Run, target: Path, keep_last: int | None = None) -> Path:
    return save_checkpoint(target, state=run.state, keep_last=keep_last, **_save_args(run))


# ---- save -------------------------------------------------------------------------------------------


def save(run: Run) -> dict[str, Any]:
    """``final/`` (after checking every rank holds the same adapters) and the run's summary."""
    state, tc = run.state, run.cfg.trainer
    digests = gather_object([parameter_digest([full_tensor(p) for p in run.trainable])])
    if len(set(digests)) != 1:  # DDP must have kept every rank's adapters identical (FSDP: the gathered ones)
        raise RuntimeError(f"trainable parameters differ across ranks: {digests}")
    state.extra["param_sha256_by_rank"] = digests
    _save(run, run.run_dir / "final")
    return {
        "status": "completed",
        "step": state.step,
        "epoch": state.epoch,
        "train/loss": run.meter.last_loss,
        "train/tokens_per_s": round(state.tokens_seen / max(state.train_seconds, 1e-9), 1),
        "train_seconds": round(state.train_seconds, 1),
        **({"compile_seconds": round(run.compile_time, 1)} if tc.get("compile") else {}),
        "trainable_params": run.model.num_trainable_parameters(),
        "world_size": run.world,
        "packing": run.plan.packing,
        "real_token_share": round(state.tokens_seen / max(1, state.extra.get("computed_tokens", 0)), 4),
        **run.validation.summary(),  # best_step, best_metric, stopped_early (with validation on)
        "peak_memory_mb": peak_memory_mb(run.accelerator.device),
        **summary_fields(run.model, run.cfg.launcher.name),  # parallelism, base_params_per_rank
    }


# ---- evaluate ---------------------------------------------------------------------------------------


def evaluate(run: Run, summary: dict[str, Any]) -> None:
    """``final_eval``: base and tuned accuracy on held-out records, into the summary and the logger."""
    cfg = run.cfg
    if not cfg.final_eval.enabled:
        return
    if run.main or run.fsdp:  # FSDP: every rank runs the forwards (all-gathers)
        records = run.plan.splits.get(str(cfg.final_eval.split), [])
        summary.update(
            final_evaluation(
                cfg, run.model, run.tokenizer, records, run.autocast, run.run_dir, write=run.main
            )
        )
    if run.main:
        run.logger.log({f"eval/{k}": v for k, v in summary.items() if k.endswith("accuracy")}, run.state.step)


def finish(run: Run, summary: dict[str, Any]) -> dict[str, Any]:
    """Write ``summary.json`` (rank 0) and tear the processes down cleanly."""
    if run.main:
        write_summary(run.run_dir, summary)
        run.logger.close()
    # Free the DDP wrapper and optimizer before the group goes: torch 2.13 + gloo otherwise
    # sometimes aborts a rank at exit ("terminate called without an active exception").
    accelerator = run.accelerator
    for name in ("ddp_model", "optimizer", "scheduler", "trainable", "model"):
        setattr(run, name, None)
    gc.collect()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    reset_accelerate_state()
    return summary


def _plain(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
