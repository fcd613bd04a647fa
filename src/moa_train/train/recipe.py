"""The training recipe: setup -> train -> save (-> evaluate), in plain PyTorch + Accelerate.

    train(cfg, run_dir)      one process of training; all ranks run it under launcher=accelerate
    dry_run(cfg)             build the model, print trainable parameters by expert type
(the Hydra job around them, ``moa-train``, is ``moa_train.cli.job.run``)

Read ``train`` top to bottom: it is the whole recipe (method spec D). Design choices:
- Batches are planned on the host from ``data.seed`` (``epoch_order``), independent of the init
  ``seed``: global step k of an epoch takes examples [k*B, (k+1)*B) of that epoch's order, and
  micro-batch j of rank r takes its slice. The plan depends only on (epoch, k), so a resumed run
  skips straight to its position and a 2-process run sees the same global batches as 1 process.
- The loss of a step is the sum of token cross-entropies over the whole global batch divided by
  its number of target tokens (counted on the host beforehand), so gradient accumulation and data
  parallelism give the same gradient as one big batch.
- Nothing reads a device value back every step; losses accumulate on device and are read, with
  the router statistics, every ``trainer.log_every_steps``.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from moa_train.core.compile import compile_seconds
from moa_train.core.memory import peak_memory_mb, reset_peak_memory
from moa_train.errors import MoATrainError
from moa_train.rundir import write_summary
from moa_train.train.checkpoint import TrainState, load_checkpoint, save_checkpoint
from moa_train.train.metrics import Meter, RouterLog

log = logging.getLogger(__name__)

PRECISIONS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SCHEDULES = ("cosine", "constant", "linear")


# ====================================================================================================
# Dry run
# ====================================================================================================


def dry_run(cfg: DictConfig) -> dict[str, Any]:
    """Build the model (``*_arch`` models on the meta device), print the trainable parameters, exit."""
    from moa_train import MoAConfig, get_moa_model
    from moa_train.models.base import load_base_model

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

    SIGTERM, SIGINT and SIGUSR1 finish the current optimizer step, save ``checkpoints/step-<N>/`` and
    raise :class:`Preempted` (see ``moa_train.train.preemption``).
    """
    from moa_train.train.preemption import StopSignal

    with StopSignal() as stop:
        return _train(cfg, run_dir, expected_world_size, stop, splits)


def _train(
    cfg: DictConfig, run_dir: Path, expected_world_size: int, stop: Any, splits: dict[str, list] | None
) -> dict[str, Any]:
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed

    from moa_train import MoAConfig, get_moa_model
    from moa_train.core.dist import full_tensor
    from moa_train.models.base import load_base_model, place_base
    from moa_train.train.fsdp import rank0_loading, shard_model, summary_fields
    from moa_train.train.loggers import make_logger

    tc = cfg.trainer
    # ---- processes, logs, seeds ---------------------------------------------------------------
    use_cpu = str(tc.get("device", "auto")) == "cpu" or not torch.cuda.is_available()
    processes = PartialState(cpu=use_cpu)
    world, rank, main = processes.num_processes, processes.process_index, processes.is_main_process
    if world != expected_world_size:  # e.g. `accelerate launch --cpu` silently gives N lone processes
        raise RuntimeError(f"expected a process group of {expected_world_size}, got world size {world}")
    if expected_world_size > 1:
        _worker_logging(run_dir, main)
    stop.join(world)  # ranks agree on a stop after the same step
    set_seed(int(cfg.seed) + rank)  # the init seed; the data order has its own seed (data.seed)
    if tc.get("cpu_threads"):  # on a shared CPU, fewer threads avoid spin-waiting on busy cores
        torch.set_num_threads(int(tc.cpu_threads))
    reset_peak_memory(processes.device)  # this job's peak, not the sweep process's lifetime peak

    # ---- model: frozen base in the compute dtype, fp32 adapters ---------------------------------
    precision = str(tc.precision)
    if precision not in PRECISIONS:
        raise MoATrainError(f"trainer.precision={precision!r} is not known; choose one of bf16, fp16, fp32")
    bar = tc.get("progress_bar", "auto")
    if bar not in (True, False, "auto"):
        raise MoATrainError(f"trainer.progress_bar={bar!r} is not known; choose auto, true or false")
    # the data is read before the model loads, so a bad data path fails in a second, not after the load
    from moa_train.data import load_splits

    splits = load_splits(cfg.data) if splits is None else splits  # moa-train read them before the run dir
    if "val" not in splits:  # moa-train holds the validation split out before the run dir; the API here
        from moa_train.train.validation import split_validation

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
        from moa_train.core.compile import compile_model

        compile_model(model, tc.get("compile_mode"), tc.get("compile_dynamic"))

    # ---- data: encoded once, batches planned per epoch from data.seed ------------------------------
    plan = BatchPlan(cfg, tokenizer, world, rank, splits)

    # ---- optimizer, schedule, loss scaling --------------------------------------------------------
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
    # DDP across processes; the model itself for one process or under FSDP (already sharded)
    ddp_model = model if fsdp else accelerator.prepare_model(model)

    # ---- resume --------------------------------------------------------------------------------
    state = TrainState(world_size=world)
    if cfg.get("resume"):
        state = load_checkpoint(
            Path(cfg.resume), accelerator=accelerator, model=model, optimizer=optimizer,
            scheduler=scheduler, scaler=scaler,
        )  # fmt: skip
        log.info("resumed from %s at step %d (epoch %d)", cfg.resume, state.step, state.epoch)
        _replan_schedule(scheduler, total_steps)
        if state.step >= total_steps:
            raise MoATrainError(
                f"resume={cfg.resume}: the run is already at step {state.step} of {total_steps}; to train "
                f"it further add trainer.max_steps=<more than {state.step}>"
            )

    logger = None
    if main:
        config = OmegaConf.to_container(cfg, resolve=True)
        logger = make_logger(cfg.logger, run_dir, config, resume_id=state.wandb_id)
        state.wandb_id = getattr(logger.backend, "id", None) or state.wandb_id
    telemetry = RouterLog(
        run_dir, logger, heatmap_every=tc.get("heatmap_every_steps"),
        dead_threshold=tc.get("dead_expert_threshold", 0.01), dead_intervals=tc.get("dead_expert_intervals", 5),
    )  # fmt: skip
    model_node = OmegaConf.to_container(cfg.model, resolve=True)
    # a live bar on a terminal; piped into a file (CI, nohup, a cluster's job log) a \r-redrawn bar is one
    # endless line, so there each log step writes a plain line with the same fields instead
    show_bar = main and (bar is True or (bar == "auto" and sys.stderr.isatty()))
    progress = _progress_bar(show_bar, total_steps, state.step)
    first_step, loop_started = state.step, time.perf_counter()
    trainable = [p for p in model.parameters() if p.requires_grad]

    # ---- train -----------------------------------------------------------------------------------
    log.info(
        "training %d steps: global batch %d = %d micro x %d accumulation x %d processes, lr %.3g",
        total_steps, plan.global_batch, plan.micro_batch, plan.accumulation, world, lr,
    )  # fmt: skip
    model.reset_router_stats()
    from moa_train.train.validation import ValidationLoop

    validation = ValidationLoop(cfg, run_dir, tokenizer, splits, state, autocast, accelerator.device)
    stopped = False
    meter = Meter(accelerator.device)
    started, compiled_before = time.perf_counter(), compile_seconds()
    while state.step < total_steps:
        for k in range(state.step_in_epoch, plan.steps_in_epoch(state.epoch)):
            step_batch = plan.step(state.epoch, k)
            lr_now = scheduler.get_last_lr()[0]
            model.begin_step()  # global-batch load balance counts this step's micro-batches and ranks
            for j, micro in enumerate(step_batch.micro_batches):
                last = j == len(step_batch.micro_batches) - 1
                # DDP all-reduces gradients only on the last micro-batch of the step
                with contextlib.nullcontext() if last else accelerator.no_sync(ddp_model):
                    batch = {key: t.to(accelerator.device) for key, t in micro.items()}
                    with autocast:
                        out = ddp_model(
                            input_ids=batch["input_ids"],
                            **plan.forward_masks(batch),  # packed rows: segments and per-example positions
                            task_types=batch.get("task_types"),  # LoRAMoE LBC (when the data has them)
                            use_cache=False,  # no KV cache in training (under checkpointing: a graph break)
                        )
                    ce = token_cross_entropy(out.logits, batch["labels"])  # summed over tokens, fp32
                    aux = model.aux_loss()  # coefficient-weighted router losses of this forward
                    # sum over micro-batches (+ DDP mean over ranks) of this = mean CE over the global batch
                    loss = ce * (world / step_batch.target_tokens) + aux / len(step_batch.micro_batches)
                    (scaler.scale(loss) if scaler else loss).backward()
                meter.add(ce, aux, model.aux_losses())
            if scaler:
                scaler.unscale_(optimizer)
            logging_now = (state.step + 1) % int(tc.log_every_steps) == 0 or state.step + 1 == total_steps
            grad_norm = None
            if tc.grad_clip:
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable, float(tc.grad_clip))
            elif logging_now:
                grad_norm = torch.nn.utils.get_total_norm([p.grad for p in trainable if p.grad is not None])
            if grad_norm is not None:
                grad_norm = full_tensor(grad_norm)  # FSDP: a norm over gradient shards is itself sharded
            if scaler:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)

            state.step, state.step_in_epoch = state.step + 1, k + 1
            state.tokens_seen += step_batch.tokens
            state.extra["computed_tokens"] = state.extra.get("computed_tokens", 0) + step_batch.computed
            meter.tokens += step_batch.tokens
            meter.targets += step_batch.target_tokens
            progress.update(1)

            if logging_now:
                metrics = meter.read(accelerator, lr_now, grad_norm)
                metrics["train/epoch"] = state.epoch + state.step_in_epoch / plan.steps_in_epoch(state.epoch)
                metrics.update(telemetry.router(model, state.step, final=state.step == total_steps))
                if logger:
                    logger.log(metrics, state.step)
                progress.set_postfix(
                    loss=f"{metrics['train/loss']:.4f}", tok_s=f"{metrics['train/tokens_per_s']:.0f}"
                )
                if main and not show_bar:
                    per_step = (time.perf_counter() - loop_started) / (state.step - first_step)
                    log.info(
                        "step %d/%d  loss %.4f  lr %.3g  %.0f tok/s  ETA %s", state.step, total_steps,
                        metrics["train/loss"], lr_now, metrics["train/tokens_per_s"],
                        _duration(per_step * (total_steps - state.step)),
                    )  # fmt: skip
            save = dict(
                accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                state=state, extra_config={"model": model_node},
            )  # fmt: skip
            stopped = validation.after_step(
                model, state, total_steps, logger, lambda to, save=save: save_checkpoint(to, **save)
            )
            if tc.save_every_steps and state.step % int(tc.save_every_steps) == 0:
                state.train_seconds += time.perf_counter() - started
                started = time.perf_counter()
                save_checkpoint(
                    run_dir / "checkpoints" / f"step-{state.step}", accelerator=accelerator, model=model,
                    optimizer=optimizer, scheduler=scheduler, scaler=scaler, state=state,
                    extra_config={"model": model_node}, keep_last=tc.get("keep_last"),
                )  # fmt: skip
            if state.step < total_steps and stop.requested():
                saved = bool(tc.save_every_steps) and state.step % int(tc.save_every_steps) == 0
                state.train_seconds += time.perf_counter() - started
                progress.close()
                _stop_on_signal(
                    stop, run_dir, state, logger, saved=saved, accelerator=accelerator, model=model,
                    optimizer=optimizer, scheduler=scheduler, scaler=scaler,
                    extra_config={"model": model_node}, keep_last=tc.get("keep_last"),
                )  # fmt: skip
            if stopped:  # early stopping: this step's checkpoint, then final/ and the summary as usual
                if not (tc.save_every_steps and state.step % int(tc.save_every_steps) == 0):
                    save_checkpoint(
                        run_dir / "checkpoints" / f"step-{state.step}", keep_last=tc.get("keep_last"), **save
                    )
                break
            if state.step >= total_steps:
                break
        else:  # the epoch ran out: the next one has a new order
            state.epoch, state.step_in_epoch = state.epoch + 1, 0
        if stopped:
            break
    progress.close()
    state.train_seconds += time.perf_counter() - started
    compile_time = compile_seconds() - compiled_before  # logged apart from step time (train_seconds, tok/s)
    state.train_seconds -= compile_time
    if tc.get("compile"):
        log.info("torch.compile: %.1f s compiling forward and backward (not in step time)", compile_time)

    # ---- save ------------------------------------------------------------------------------------
    digests = gather_object([parameter_digest([full_tensor(p) for p in trainable])])
    if len(set(digests)) != 1:  # DDP must have kept every rank's adapters identical (FSDP: the gathered ones)
        raise RuntimeError(f"trainable parameters differ across ranks: {digests}")
    state.extra["param_sha256_by_rank"] = digests
    save_checkpoint(
        run_dir / "final", accelerator=accelerator, model=model, optimizer=optimizer,
        scheduler=scheduler, scaler=scaler, state=state, extra_config={"model": model_node},
    )  # fmt: skip
    summary = {
        "status": "completed",
        "step": state.step,
        "epoch": state.epoch,
        "train/loss": meter.last_loss,
        "train/tokens_per_s": round(state.tokens_seen / max(state.train_seconds, 1e-9), 1),
        "train_seconds": round(state.train_seconds, 1),
        **({"compile_seconds": round(compile_time, 1)} if tc.get("compile") else {}),
        "trainable_params": model.num_trainable_parameters(),
        "world_size": world,
        "packing": plan.packing,
        "real_token_share": round(state.tokens_seen / max(1, state.extra.get("computed_tokens", 0)), 4),
        **validation.summary(),  # best_step, best_metric, stopped_early (with validation on)
        "peak_memory_mb": peak_memory_mb(accelerator.device),
        **summary_fields(model, cfg.launcher.name),  # parallelism, base_params_per_rank
    }

    # ---- evaluate (main process), then tear down cleanly ----------------------------------------
    if cfg.final_eval.enabled and (main or fsdp):  # FSDP: every rank runs the forwards (all-gathers)
        records = plan.splits.get(str(cfg.final_eval.split), [])
        summary.update(final_evaluation(cfg, model, tokenizer, records, autocast, run_dir, write=main))
    if cfg.final_eval.enabled and main:
        logger.log({f"eval/{k}": v for k, v in summary.items() if k.endswith("accuracy")}, state.step)
    if main:
        write_summary(run_dir, summary)
        logger.close()
    # Free the DDP wrapper and optimizer before the group goes: torch 2.13 + gloo otherwise
    # sometimes aborts a rank at exit ("terminate called without an active exception").
    del ddp_model, optimizer, scheduler, trainable, model, base
    gc.collect()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    _reset_accelerate_state()
    return summary


# ====================================================================================================
# Data: which examples go into which micro-batch
# ====================================================================================================


class StepBatch:
    """The micro-batches this process runs for one optimizer step, with global token counts."""

    def __init__(
        self, micro_batches: list[dict[str, torch.Tensor]], tokens: int, target_tokens: int, computed: int = 0
    ) -> None:
        self.micro_batches = micro_batches
        self.tokens = tokens  # non-padding input tokens in the global batch (all processes)
        self.target_tokens = target_tokens  # tokens with a label in the global batch (all processes)
        self.computed = (
            computed  # rows x padded width of every micro-batch of the global batch (all processes)
        )


class BatchPlan:
    """Encodes the training split once and lays out global batches per epoch (host only)."""

    def __init__(
        self, cfg: DictConfig, tokenizer: Any, world: int, rank: int, splits: dict[str, list]
    ) -> None:
        from moa_train.data import TrainCollator, encode_dataset

        tc, dc = cfg.trainer, cfg.data
        self.splits = splits  # read by the caller before the model loads
        from moa_train.data import task_types

        self.examples, stats = encode_dataset(
            task_types.assign(splits["train"], dc),  # LoRAMoE LBC: a 0/1 task type per record, if configured
            tokenizer,
            int(dc.max_len),
            bool(dc.get("train_on_inputs", False)),
            template=str(dc.get("template") or "alpaca"),
        )
        log.info("training examples: %s", stats)
        self.lengths = [len(e["input_ids"]) for e in self.examples]
        # labels are compared with the next token: position 0 never has a target
        self.packing = bool(dc.get("packing", False))
        if self.packing:  # rows of whole examples, each isolated from the others (data/packing.py)
            from moa_train.data.packing import PackedCollator, pack_examples

            self.examples = pack_examples(self.examples, int(dc.max_len))
            log.info(
                "packing: %d examples in %d rows of up to %d tokens",
                stats["kept"],
                len(self.examples),
                dc.max_len,
            )
            self.lengths = [len(e["input_ids"]) for e in self.examples]
        self.targets = [sum(1 for t in e["labels"][1:] if t != -100) for e in self.examples]
        self.collate = (
            PackedCollator(tokenizer.pad_token_id) if self.packing else TrainCollator(tokenizer.pad_token_id)
        )
        self.data_seed = int(dc.get("seed", 0))
        self.group_by_length = bool(dc.get("group_by_length", False))
        self.world, self.rank = world, rank
        self.micro_batch = int(tc.micro_batch_size)
        self.global_batch = int(tc.effective_batch_size)
        if self.global_batch % (self.micro_batch * world):
            raise MoATrainError(
                f"trainer.effective_batch_size={self.global_batch} must be a multiple of "
                f"micro_batch_size x processes = {self.micro_batch} x {world}"
            )
        self.accumulation = self.global_batch // (self.micro_batch * world)
        self.steps_per_epoch = len(self.examples) // self.global_batch  # drop_last
        if not self.examples and stats.get("dropped_no_room"):
            raise MoATrainError(
                f"all {stats['dropped_no_room']} training records leave no room for a response within "
                f"data.max_len={dc.max_len} tokens; raise data.max_len"
            )
        if self.steps_per_epoch == 0:
            raise MoATrainError(
                f"trainer.effective_batch_size={self.global_batch} exceeds the {len(self.examples)} "
                "training examples; lower it"
            )
        self._order: tuple[int, list[int]] | None = None

    def total_steps(self, tc: DictConfig) -> int:
        if tc.get("max_steps"):
            return int(tc.max_steps)
        return int(math.ceil(float(tc.epochs) * self.steps_per_epoch))

    def steps_in_epoch(self, epoch: int) -> int:
        return self.steps_per_epoch

    def order(self, epoch: int) -> list[int]:
        """This epoch's example order: a permutation from (data.seed, epoch), optionally length-grouped."""
        if self._order is None or self._order[0] != epoch:
            from moa_train.data import epoch_order, length_grouped_order

            if self.group_by_length:
                order = length_grouped_order(self.lengths, self.global_batch, self.data_seed, epoch)
            else:
                order = epoch_order(len(self.examples), self.data_seed, epoch)
            self._order = (epoch, order)
        return self._order[1]

    def step(self, epoch: int, k: int) -> StepBatch:
        chunk = self.order(epoch)[k * self.global_batch : (k + 1) * self.global_batch]
        micro = []
        for j in range(self.accumulation):
            start = (j * self.world + self.rank) * self.micro_batch
            micro.append(self.collate([self.examples[i] for i in chunk[start : start + self.micro_batch]]))
        computed = (
            0  # what the forwards compute: each micro-batch (every process's) padded to its longest row
        )
        for start in range(0, len(chunk), self.micro_batch):
            rows = chunk[start : start + self.micro_batch]
            computed += len(rows) * max(self.lengths[i] for i in rows)
        tokens, targets = sum(self.lengths[i] for i in chunk), sum(self.targets[i] for i in chunk)
        return StepBatch(micro, tokens, targets, computed)

    def forward_masks(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """The mask arguments of the model's forward: packed rows pass their segments and per-example
        positions (transformers then builds the block-diagonal mask itself), padded rows the padding mask."""
        if self.packing:
            return {
                "attention_mask": None, "position_ids": batch["position_ids"],
                "segment_ids": batch["segment_ids"], "instance_mask": batch["instance_mask"],
            }  # fmt: skip
        mask = batch["attention_mask"]
        return {"attention_mask": mask, "instance_mask": (batch["labels"] == -100) & mask.bool()}


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy summed over labelled tokens (labels -100 ignored), in fp32."""
    return F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]),
        labels[:, 1:].reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )


# ====================================================================================================
# Optimizer and learning-rate schedule
# ====================================================================================================


def learning_rate(opt_cfg: DictConfig, global_batch: int) -> float:
    """``optimizer.lr`` if set, else the paper's rule ``blr x effective_batch / 256``."""
    if opt_cfg.get("lr") is not None:
        return float(opt_cfg.lr)
    if opt_cfg.get("blr") is None:
        raise MoATrainError("set optimizer.lr (absolute) or optimizer.blr (scaled by effective_batch/256)")
    return float(opt_cfg.blr) * global_batch / 256


def build_optimizer(model: torch.nn.Module, opt_cfg: DictConfig, lr: float) -> torch.optim.Optimizer:
    """AdamW; weight decay on >=2-D weights only (biases, norms, gates and 1-D tensors get none)."""
    if str(opt_cfg.get("name", "adamw")) != "adamw":
        raise MoATrainError(f"optimizer.name={opt_cfg.name!r} is not known; the recipe supports adamw")
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or name.endswith("bias") else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": float(opt_cfg.weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(opt_cfg.betas), eps=float(opt_cfg.eps))


def _replan_schedule(scheduler: Any, total_steps: int) -> None:
    """LambdaLR restores the saved plan; a resume with a new trainer.max_steps re-plans the decay over
    it (an extended run would otherwise go on at min_lr), from the current step on."""
    changed = False
    for schedule in scheduler.lr_lambdas:
        if isinstance(schedule, LRSchedule) and schedule.total != total_steps:
            schedule.total, changed = total_steps, True
    if changed:
        groups = scheduler.optimizer.param_groups
        for group, base, schedule in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["lr"] = base * schedule(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in groups]


class LRSchedule:
    """Multiplier of the base lr at optimizer step ``s`` (LambdaLR): linear warmup from 0, then
    a per-iteration half-cosine to ``min_lr``, a constant, or a linear decay to ``min_lr``."""

    def __init__(self, name: str, warmup: int, total: int, min_ratio: float) -> None:
        if name not in SCHEDULES:
            raise MoATrainError(f"scheduler.name={name!r} is not known; choose one of {', '.join(SCHEDULES)}")
        self.name, self.warmup, self.total, self.min_ratio = name, warmup, total, min_ratio

    @classmethod
    def from_config(cls, sc: DictConfig, lr: float, total: int, steps_per_epoch: int) -> LRSchedule:
        if sc.get("warmup_steps") is not None and sc.get("warmup_epochs") is not None:
            raise MoATrainError("set scheduler.warmup_steps or scheduler.warmup_epochs, not both")
        if sc.get("warmup_epochs") is not None:
            warmup = round(float(sc.warmup_epochs) * steps_per_epoch)
        else:
            warmup = int(sc.get("warmup_steps") or 0)
        min_ratio = float(sc.get("min_lr") or 0.0) / lr if lr > 0 else 0.0
        return cls(str(sc.name), min(warmup, total), total, min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / self.warmup
        if self.name == "constant":
            return 1.0
        progress = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.name == "cosine" else 1.0 - progress
        return self.min_ratio + (1.0 - self.min_ratio) * shape


# ====================================================================================================
# After training
# ====================================================================================================


def final_evaluation(
    cfg: DictConfig,
    model: Any,
    tokenizer: Any,
    records: list[dict],
    autocast: Any,
    run_dir: Path,
    write: bool = True,
) -> dict[str, Any]:
    """Held-out accuracy of the base model (adapters off) and the tuned model with the same
    ``evaluate_records`` that ``moa-eval`` uses; prints ``<name> accuracy: base=<f> tuned=<f>``."""
    from moa_train.eval import evaluate_records

    ec = cfg.final_eval
    if not records:
        raise MoATrainError(
            f"final_eval.split={ec.split} is empty or missing in data={cfg.data.get('name', '?')}"
        )
    if ec.get("max_records"):
        records = records[: int(ec.max_records)]
    kwargs = dict(
        decoding=ec.decoding,
        batch_size=int(ec.batch_size),
        max_new_tokens=ec.get("max_new_tokens"),
        template=str(cfg.data.get("template") or "alpaca"),  # prompts as in training
    )
    model.eval()
    model.set_telemetry(False)
    results: dict[str, Any] = {"eval_records": len(records)}
    started = time.perf_counter()
    with torch.no_grad(), autocast:
        if ec.get("base", True):
            with model.disable_adapters():
                base = evaluate_records(model, tokenizer, records, **kwargs)
            results["base_accuracy"] = base["accuracy"]
        tuned = evaluate_records(model, tokenizer, records, **kwargs)
    results["tuned_accuracy"] = tuned["accuracy"]
    results["eval_seconds"] = round(time.perf_counter() - started, 1)
    if not write:  # an FSDP rank other than 0: it took part in the forwards, rank 0 reports
        return results
    with open(run_dir / "final_eval_predictions.jsonl", "w", encoding="utf-8") as f:
        for prediction in tuned.get("predictions", []):
            f.write(json.dumps(prediction, default=str) + "\n")
    base_text = f"{results['base_accuracy']:.3f}" if "base_accuracy" in results else "n/a"
    line = f"{cfg.name} accuracy: base={base_text} tuned={results['tuned_accuracy']:.3f}"
    log.info(line)
    print(line, flush=True)
    return results


def _stop_on_signal(
    stop: Any, run_dir: Path, state: TrainState, logger: Any, *, saved: bool, **save: Any
) -> None:
    """After the optimizer step that saw a stop signal: save (if this step was not just saved), record
    the stop in ``summary.json`` and raise Preempted (all ranks)."""
    from moa_train.errors import Preempted

    accelerator = save["accelerator"]
    target = run_dir / "checkpoints" / f"step-{state.step}"
    if not saved:
        save_checkpoint(target, state=state, **save)
    message = f"stopped by {stop.name} after step {state.step}; checkpoint {target}"
    if accelerator.is_main_process:
        log.warning(message)
        summary = {
            "status": "preempted",
            "step": state.step,
            "stop_message": message,
            "checkpoint": str(target),
        }
        write_summary(run_dir, summary)
        if logger:
            logger.close()
    accelerator.wait_for_everyone()
    raise Preempted(message, run_dir)


def parameter_digest(params: list[torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


# ====================================================================================================
# Small helpers
# ====================================================================================================


def _plain(node: Any) -> dict[str, Any]:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)


def _duration(seconds: float) -> str:
    """``1h02m``, ``4m05s`` or ``12s``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _progress_bar(enabled: bool, total: int, initial: int) -> Any:
    """Rank 0's bar: step n/total, elapsed<ETA, loss and tokens/s (refreshed at log steps)."""
    from tqdm.auto import tqdm

    return tqdm(
        total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True,
        mininterval=1.0,
    )  # fmt: skip


def _worker_logging(run_dir: Path, main: bool) -> None:
    """Workers started by `accelerate launch` have no Hydra logging: rank 0 logs to the run's log."""
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if main:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    logging.basicConfig(
        level=logging.INFO if main else logging.WARNING,
        format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s",
        handlers=handlers,
        force=True,
    )


def _reset_accelerate_state() -> None:
    """Let a later job of the same process (a Hydra sweep) build a fresh Accelerator."""
    with contextlib.suppress(Exception):
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
