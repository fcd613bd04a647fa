"""data.packing: row layout (best-fit decreasing), the collated tensors, and the segment helpers of core."""

from __future__ import annotations

import random

import pytest
import torch

from moa_train.core.segments import (
    instance_fallback,
    pool_segments,
    positions_from_segments,
    segment_index,
    spread,
)
from moa_train.data.packing import PackedCollator, pack_examples, pack_rows
from moa_train.errors import MoATrainError


def test_pack_rows_is_a_partition_within_max_len_and_deterministic() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(1, 64) for _ in range(500)]
    rows = pack_rows(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(500))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert rows == pack_rows(lengths, 64)
    # best-fit decreasing is within 11/9 OPT + 1 rows; OPT >= total / capacity
    assert len(rows) <= 11 / 9 * (sum(lengths) / 64) + 1
    with pytest.raises(MoATrainError, match="example 1 has 9 tokens, more than data.max_len=8"):
        pack_rows([3, 9], 8)


def test_packed_rows_keep_each_example_and_mask_its_first_token() -> None:
    examples = [
        {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]},
        {"input_ids": [9, 10, 11], "labels": [9, 10, 11]},  # train_on_inputs: labels everywhere
        {"input_ids": [12, 13], "labels": [-100, 13]},
    ]
    rows = pack_examples(examples, max_len=7)
    assert [r["segment_ids"] for r in rows] == [[1, 1, 1, 1, 2, 2, 2], [1, 1]]
    first = rows[0]
    assert first["input_ids"] == [5, 6, 7, 8, 9, 10, 11]
    assert first["position_ids"] == [0, 1, 2, 3, 0, 1, 2]
    assert first["labels"] == [-100, -100, 7, 8, -100, 10, 11]  # 9 is never a target (it starts an example)
    assert first["instance_mask"] == [1, 1, 0, 0, 0, 0, 0]  # from the examples' own labels
    batch = PackedCollator(pad_token_id=0)(rows)
    assert batch["input_ids"].tolist()[1] == [12, 13, 0, 0, 0, 0, 0]
    assert batch["position_ids"].tolist()[1] == [0, 1, 0, 1, 2, 3, 4]  # padding: its own sequence
    assert batch["segment_ids"].tolist()[1] == [1, 1, 0, 0, 0, 0, 0]
    assert batch["attention_mask"].tolist()[1] == [1, 1, 0, 0, 0, 0, 0]
    assert batch["labels"].tolist()[1] == [-100, 13, -100, -100, -100, -100, -100]
    with pytest.raises(MoATrainError, match="data.packing=false"):
        pack_examples([{"input_ids": [1], "labels": [1], "task_type": 0}], 4)


def test_positions_restart_per_segment() -> None:
    segment_ids = torch.tensor([[1, 1, 1, 2, 2, 0, 0], [1, 2, 3, 3, 3, 3, 3]])
    assert positions_from_segments(segment_ids).tolist() == [[0, 1, 2, 0, 1, 0, 1], [0, 0, 0, 1, 2, 3, 4]]


def test_segment_pooling_equals_per_example_means() -> None:
    torch.manual_seed(0)
    segment_ids = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    pool = torch.tensor([[1, 0, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0]])
    x = torch.randn(2, 6, 3)
    segments = segment_index(segment_ids)
    pooled, counts = pool_segments(x, pool, segments)
    slots = [0, 1, 6]  # b * T + segment - 1; the other slots hold no token
    assert counts.flatten().tolist() == [3, 2, 0, 0, 0, 0, 6] + [0] * 5
    # example 2 selects no token: the caller's fallback (instance_fallback) is what makes it pool all
    expected = [x[0, [0, 2]].mean(0), torch.zeros(3), x[1, :2].mean(0)]
    torch.testing.assert_close(pooled[slots, 0], torch.stack(expected))
    filled = instance_fallback(pool, (segment_ids > 0).long(), segments)
    assert filled.tolist() == [[1, 0, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]]
    gates = torch.zeros(12, 1, 3)
    gates[slots] = torch.arange(9.0).reshape(3, 1, 3)
    tokens = spread(gates, *segments[:2])
    assert tokens[0, 3].tolist() == [3.0, 4.0, 5.0] and tokens[0, 5].tolist() == [0.0, 0.0, 0.0]
    assert tokens[1, 5].tolist() == [6.0, 7.0, 8.0]
    keep = spread(gates > 4, *segments[:2])
    assert keep.dtype == torch.bool and keep[0, 3].tolist() == [False, False, True] and not keep[0, 5].any()
