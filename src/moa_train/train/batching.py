"""Which examples go into which micro-batch: the training split encoded once, global batches planned per
epoch on the host from ``data.seed`` (independent of the init seed), so a resumed run skips straight to
its position and N processes see the same global batches as one."""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from omegaconf import DictConfig

from moa_train.data import (
    TrainCollator,
    encode_dataset,
    epoch_order,
    length_grouped_order,
    stream_paths,
    task_types,
)
from moa_train.data.packing import PackedCollator, pack_examples
from moa_train.data.streaming import JsonlStream, StreamPosition, record_converter
from moa_train.errors import MoATrainError

log = logging.getLogger(__name__)


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
        tc, dc = cfg.trainer, cfg.data
        self.splits = splits  # read by the caller before the model loads
        self.examples, stats = encode_dataset(
            task_types.assign(splits["train"], dc),  # LoRAMoE LBC: a 0/1 task type per record, if configured
            tokenizer,
            int(dc.max_len),
            bool(dc.get("train_on_inputs", False)),
            template=str(dc.get("template") or "alpaca"),
        )
        log.info("training examples: %s", stats)
        self.lengths = [len(e["input_ids"]) for e in self.examples]
        self.packing = bool(dc.get("packing", False))
        if self.packing:  # rows of whole examples, each isolated from the others (data/packing.py)
            self.examples = pack_examples(self.examples, int(dc.max_len))
            log.info(
                "packing: %d examples in %d rows of up to %d tokens",
                stats["kept"],
                len(self.examples),
                dc.max_len,
            )
            self.lengths = [len(e["input_ids"]) for e in self.examples]
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
            if self.group_by_length:
                order = length_grouped_order(self.lengths, self.global_batch, self.data_seed, epoch)
            else:
                order = epoch_order(len(self.examples), self.data_seed, epoch)
            self._order = (epoch, order)
        return self._order[1]

    def resume(self, state: Any) -> None:
        """Nothing to restore: the plan of step k depends only on (epoch, k)."""

    def step(self, epoch: int, k: int) -> StepBatch:
        chunk = self.order(epoch)[k * self.global_batch : (k + 1) * self.global_batch]
        return self.layout([self.examples[i] for i in chunk])

    def layout(self, chunk: list[dict[str, Any]]) -> StepBatch:
        """This process's micro-batches of a global batch (micro-batch j of rank r: slice j * world + r),
        with the global batch's token counts."""
        micro = []
        for j in range(self.accumulation):
            start = (j * self.world + self.rank) * self.micro_batch
            micro.append(self.collate(chunk[start : start + self.micro_batch]))
        lengths = [len(e["input_ids"]) for e in chunk]
        computed = (
            0  # what the forwards compute: each micro-batch (every process's) padded to its longest row
        )
        for start in range(0, len(chunk), self.micro_batch):
            computed += len(lengths[start : start + self.micro_batch]) * max(
                lengths[start : start + self.micro_batch]
            )
        # labels are compared with the next token: position 0 never has a target
        targets = sum(1 for e in chunk for t in e["labels"][1:] if t != -100)
        return StepBatch(micro, sum(lengths), targets, computed)

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


class StreamPlan(BatchPlan):
    """``data.streaming``: global batches are the next records of the JSONL stream (data/streaming.py),
    encoded as they come (records with no room for a response are skipped, as in memory); the stream's
    position after each step travels in the checkpoint (``TrainState.extra["stream"]``), so a resumed
    run reads on from the exact record. Every process reads the same records and takes its slices."""

    def __init__(
        self, cfg: DictConfig, tokenizer: Any, world: int, rank: int, splits: dict[str, list]
    ) -> None:
        tc, dc = cfg.trainer, cfg.data
        self.splits, self.packing, self.world, self.rank = splits, False, world, rank
        self.tokenizer, self.max_len = tokenizer, int(dc.max_len)
        self.train_on_inputs, self.template = (
            bool(dc.get("train_on_inputs", False)),
            str(dc.get("template") or "alpaca"),
        )
        self.paths, self.convert = stream_paths(dc), record_converter(dc)
        self.collate = TrainCollator(tokenizer.pad_token_id)
        self.micro_batch, self.global_batch = int(tc.micro_batch_size), int(tc.effective_batch_size)
        if self.global_batch % (self.micro_batch * world):
            raise MoATrainError(
                f"trainer.effective_batch_size={self.global_batch} must be a multiple of "
                f"micro_batch_size x processes = {self.micro_batch} x {world}"
            )
        self.accumulation = self.global_batch // (self.micro_batch * world)
        self.steps_per_epoch = int(
            tc.max_steps
        )  # the loop's one "epoch" is the run; the stream counts its own
        self.stream: Any = None
        self.state: Any = None

    def total_steps(self, tc: DictConfig) -> int:
        return int(tc.max_steps)

    def resume(self, state: Any) -> None:
        saved = state.extra.get("stream")
        position = StreamPosition.from_dict(saved) if saved is not None else None
        self.stream, self.state = JsonlStream(self.paths, self.convert, position), state

    def step(self, epoch: int, k: int) -> StepBatch:
        chunk: list[dict[str, Any]] = []
        while len(chunk) < self.global_batch:
            records = self.stream.take(self.global_batch - len(chunk))
            encoded, _ = encode_dataset(
                records, self.tokenizer, self.max_len, self.train_on_inputs, self.template
            )
            chunk += encoded
        self.state.extra["stream"] = self.stream.position.to_dict()  # saved with this step's checkpoint
        return self.layout(chunk)
