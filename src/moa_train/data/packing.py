"""Packing (``data.packing=true``): several encoded examples per row, isolated from each other.

A packed row is the concatenation of whole examples, at most ``data.max_len`` tokens, with

* ``position_ids`` that restart at 0 for each example (RoPE sees each example as if it were alone);
* ``segment_ids`` 1, 2, ... per example and 0 on padding. The model gets ``attention_mask=None`` and the
  position ids, from which transformers builds a block-diagonal causal mask (its packed-sequence path),
  so no token attends across examples; moa_train's routers get the segment ids (``MoAModel.forward``),
  so instance routers pool per example and token masks / balance statistics count real tokens only;
* ``labels`` as each example had them, except the first token of every example, which is never a target
  (unpacked, the shift to next-token prediction drops it; packed, it would be predicted from the
  previous example's last token);
* ``instance_mask``: the tokens an instance router averages over (each example's prompt), taken from
  the example's own labels before that first-token change, exactly as the unpacked batch computes it.

Rows are formed once per run (best-fit decreasing on lengths: deterministic, ~no waste on short
instruction data) and then shuffled per epoch like examples are; ``trainer.effective_batch_size`` and
``micro_batch_size`` count rows. Rows do not change between epochs (as in TRL's packing), a deliberate
trade-off for a fixed, resumable step plan. Home-made rather than TRL's ``pack_dataset``: that one works
on Arrow datasets and yields ``seq_lengths`` for flash-attention kernels, not the segment ids and
instance masks the routers need.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from moa_train.data.tokenize import TrainCollator
from moa_train.errors import MoATrainError

IGNORE_INDEX = -100


def pack_rows(lengths: Sequence[int], max_len: int) -> list[list[int]]:
    """Indices of the examples in each row: best-fit decreasing (longest first, each into the row whose
    free room fits it most tightly). Deterministic: ties go by example index."""
    if max_len < 1:
        raise MoATrainError(f"data.max_len must be >= 1 for packing, got {max_len}")
    rows: list[list[int]] = []
    rooms: list[int] = []  # the distinct free-room values that some row has (sorted); at most max_len
    by_room: dict[int, list[int]] = {}  # free room -> rows with exactly that room
    for i in sorted(range(len(lengths)), key=lambda j: (-lengths[j], j)):
        need = int(lengths[i])
        if need > max_len:
            raise MoATrainError(f"example {i} has {need} tokens, more than data.max_len={max_len}")
        k = bisect_left(rooms, need)
        if k < len(rooms):
            room = rooms[k]
            row = by_room[room].pop()
            if not by_room[room]:
                del by_room[room]
                rooms.pop(k)
        else:
            room, row = max_len, len(rows)
            rows.append([])
        rows[row].append(i)
        left = room - need
        if left > 0:
            if left not in by_room:
                by_room[left] = []
                insort(rooms, left)
            by_room[left].append(row)
    return rows


def pack_examples(
    examples: Sequence[Mapping[str, Sequence[int]]], max_len: int
) -> list[dict[str, list[int]]]:
    """Packed rows (``input_ids``, ``labels``, ``position_ids``, ``segment_ids``, ``instance_mask``) of
    encoded examples (``input_ids``, ``labels``); see the module doc."""
    for example in examples:
        if "task_type" in example:
            raise MoATrainError(
                "data.packing=true cannot carry per-example task types (router.lbc_coef / LoRAMoE's localized "
                "balancing): set data.packing=false for this method"
            )
    rows = pack_rows([len(e["input_ids"]) for e in examples], max_len)
    packed = []
    for members in rows:
        row: dict[str, list[int]] = {k: [] for k in ("input_ids", "labels", "position_ids", "segment_ids")}
        row["instance_mask"] = []
        for segment, index in enumerate(members, start=1):
            ids, labels = list(examples[index]["input_ids"]), list(examples[index]["labels"])
            row["input_ids"] += ids
            row["labels"] += [IGNORE_INDEX] + labels[1:]
            row["position_ids"] += list(range(len(ids)))
            row["segment_ids"] += [segment] * len(ids)
            row["instance_mask"] += [int(label == IGNORE_INDEX) for label in labels]
        packed.append(row)
    return packed


class PackedCollator(TrainCollator):
    """Right-pads packed rows: ``input_ids`` with the pad id, ``labels`` -100, ``segment_ids`` 0,
    ``position_ids`` counting on from 0 over the padding (transformers then sees the padding as one more
    sequence, which no real token attends to), ``instance_mask`` 0; ``attention_mask`` is the real-token
    mask (for counting; the model is called with ``attention_mask=None``)."""

    def __call__(self, rows: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        width = self._width(rows)
        shape = (len(rows), width)
        out = {
            "input_ids": torch.full(shape, self.pad_token_id, dtype=torch.long),
            "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
            "position_ids": torch.arange(width, dtype=torch.long).repeat(len(rows), 1),
            "segment_ids": torch.zeros(shape, dtype=torch.long),
            "instance_mask": torch.zeros(shape, dtype=torch.bool),
        }
        for b, row in enumerate(rows):
            n = len(row["input_ids"])
            for key in ("input_ids", "labels", "position_ids", "segment_ids", "instance_mask"):
                out[key][b, :n] = torch.as_tensor(list(row[key]), dtype=out[key].dtype)
            out["position_ids"][b, n:] = torch.arange(width - n)
        out["attention_mask"] = (out["segment_ids"] > 0).long()
        return out


def real_token_share(real_tokens: int, rows: int, width: int) -> float:
    """Real tokens / tokens computed (rows x padded width) of the batches a run computed."""
    return real_tokens / max(1, rows * width)


def check_flags(cfg: Any) -> None:
    """One-line errors for ``data.packing`` / ``data.streaming`` and the options they cannot go with."""
    dc, tc = cfg.data, cfg.trainer
    for key in ("packing", "streaming"):
        value = dc.get(key, False)
        if not isinstance(value, bool):
            raise MoATrainError(f"data.{key}={value!r} must be true or false")
    lbc = float((cfg.get("moa") or {}).get("router", {}).get("lbc_coef") or 0.0)
    if dc.get("packing") and lbc:
        raise MoATrainError(
            "data.packing=true cannot carry per-example task types (router.lbc_coef > 0, LoRAMoE's localized "
            "balancing): set data.packing=false for this method"
        )
    if dc.get("streaming"):
        if dc.get("packing"):
            raise MoATrainError("data.streaming=true does not pack rows yet: set data.packing=false")
        if str(dc.get("source", "json")) != "json":
            raise MoATrainError(
                f"data.streaming=true reads local JSONL files (data.source=json), not data.source={dc.get('source')}"
            )
        if not tc.get("max_steps"):
            raise MoATrainError(
                "data.streaming=true needs trainer.max_steps (a stream's length is not known in advance)"
            )
        if dc.get("val_size") is not None:
            raise MoATrainError("data.streaming=true cannot hold records out of a stream: use data.val_path")
        if dc.get("group_by_length"):
            raise MoATrainError(
                "data.streaming=true reads records in file order: set data.group_by_length=false"
            )
        if lbc:
            raise MoATrainError("data.streaming=true cannot assign task types (router.lbc_coef > 0)")
        if (cfg.get("scheduler") or {}).get("warmup_epochs") is not None:
            raise MoATrainError(
                "data.streaming=true has no epochs to count warmup in: set scheduler.warmup_epochs=null "
                "scheduler.warmup_steps=<N>"
            )
