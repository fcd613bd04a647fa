"""One optimizer step: the micro-batches of this process (forward, loss, backward, with DDP's gradient
all-reduce only on the last one), gradient clipping and the optimizer and schedule update.

The loss of a step is the sum of token cross-entropies over the whole global batch divided by its
number of target tokens (counted on the host beforehand), so gradient accumulation and data
parallelism give the same gradient as one big batch. Nothing is read back from the device here.

Only the positions whose next token is a target (in any row of the micro-batch) go through the output
layer (transformers' ``logits_to_keep``): with the prompt masked, that skips most of the LM head's
matmul and the [batch, length, vocab] logits, which dominate the memory of large-vocabulary models.
The loss is the same sum over the same target tokens (tests/train/test_loss_positions.py).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from moa_train.core.dist import full_tensor
from moa_train.train.batching import BatchPlan, StepBatch
from moa_train.train.checkpoint import TrainState


@dataclass
class Session:
    """What one training process holds while it trains (built by the recipe's setup)."""

    accelerator: Any
    model: Any  # the MoAModel
    ddp_model: Any  # the model under DDP (the model itself for one process or FSDP)
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any  # GradScaler for fp16, else None
    autocast: Any
    plan: BatchPlan
    state: TrainState
    total_steps: int
    world: int
    grad_clip: float | None
    trainable: list[torch.Tensor] = field(default_factory=list)


def token_cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Next-token cross-entropy summed over labelled tokens (labels -100 ignored), in fp32. ``logits``
    holds every position, or only ``positions`` (those of :func:`target_positions`) when given."""
    targets = labels[:, 1:]  # position p predicts token p + 1
    if positions is None:
        logits = logits[:, :-1]
    else:
        targets = targets[:, positions]
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """The positions whose next token is a target in any row: the only logits the loss reads (at least
    one, so that a micro-batch without targets still runs its forward and contributes a zero loss)."""
    keep = (labels[:, 1:] != -100).any(0).nonzero().squeeze(1)
    return keep if keep.numel() else keep.new_zeros(1)


@functools.cache
def _takes_logits_to_keep(forward: Any) -> bool:
    return "logits_to_keep" in inspect.signature(forward).parameters


def loss_logits_kwargs(model: Any, labels: torch.Tensor) -> tuple[dict[str, Any], torch.Tensor | None]:
    """(forward keyword arguments, positions for :func:`token_cross_entropy`): the target positions
    only, where the base model's forward takes ``logits_to_keep`` (else every position)."""
    base = getattr(model, "base_model", model)
    if not _takes_logits_to_keep(type(base).forward):
        return {}, None
    positions = target_positions(labels)
    return {"logits_to_keep": positions}, positions


def optimizer_step(s: Session, step_batch: StepBatch, meter: Any, need_norm: bool) -> torch.Tensor | None:
    """Run one optimizer step; return the gradient norm when clipping or ``need_norm`` (else None)."""
    model, micro_batches = s.model, step_batch.micro_batches
    model.begin_step()  # global-batch load balance counts this step's micro-batches and ranks
    for j, micro in enumerate(micro_batches):
        last = j == len(micro_batches) - 1
        # DDP all-reduces gradients only on the last micro-batch of the step
        with contextlib.nullcontext() if last else s.accelerator.no_sync(s.ddp_model):
            batch = {key: t.to(s.accelerator.device) for key, t in micro.items()}
            keep, positions = loss_logits_kwargs(model, batch["labels"])  # the LM head on targets only
            with s.autocast:
                out = s.ddp_model(
                    input_ids=batch["input_ids"],
                    **s.plan.forward_masks(batch),  # packed rows: segments and per-example positions
                    task_types=batch.get("task_types"),  # LoRAMoE LBC (when the data has them)
                    use_cache=False,  # no KV cache in training (under checkpointing: a graph break)
                    **keep,
                )
            ce = token_cross_entropy(out.logits, batch["labels"], positions)  # summed over tokens, fp32
            aux = model.aux_loss()  # coefficient-weighted router losses of this forward
            # sum over micro-batches (+ DDP mean over ranks) of this = mean CE over the global batch
            loss = ce * (s.world / step_batch.target_tokens) + aux / len(micro_batches)
            (s.scaler.scale(loss) if s.scaler else loss).backward()
        meter.add(ce, aux, model.aux_losses())
    if s.scaler:
        s.scaler.unscale_(s.optimizer)
    grad_norm = None
    if s.grad_clip:
        grad_norm = torch.nn.utils.clip_grad_norm_(s.trainable, float(s.grad_clip))
    elif need_norm:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in s.trainable if p.grad is not None])
    if grad_norm is not None:
        grad_norm = full_tensor(grad_norm)  # FSDP: a norm over gradient shards is itself sharded
    if s.scaler:
        s.scaler.step(s.optimizer)
        s.scaler.update()
    else:
        s.optimizer.step()
    s.scheduler.step()
    s.optimizer.zero_grad(set_to_none=True)
    return grad_norm


def parameter_digest(params: list[torch.Tensor]) -> str:
    """SHA-256 of the given tensors' values: equal on every rank when DDP kept the adapters in step."""
    digest = hashlib.sha256()
    for p in params:
        digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
