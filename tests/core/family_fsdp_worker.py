"""One rank of the per-family FSDP check (tests/core/test_families.py, 2 ranks on CPU, gloo).

Every rank builds the tiny model of a family with a method of tests/core/test_families.py twice: an
unsharded reference that runs the whole batch, and one sharded by ``moa_train.train.fsdp.shard_model``
(FSDP2) that runs only this rank's half. Writes ``<out>/rank<r>.json``: the largest gap between the
gathered sharded gradients and the reference gradients, and how many gradients were compared.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]

from test_families import method  # noqa: E402

from core_helpers import randomize_adapters  # noqa: E402
from family_models import family_model  # noqa: E402
from moa_train import get_moa_model  # noqa: E402
from moa_train.core.dist import full_tensor  # noqa: E402
from moa_train.train.fsdp import shard_model  # noqa: E402


def build(family: str, name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = get_moa_model(family_model(family), method(name, family))
    randomize_adapters(model, 0.2)  # every expert and gate live: all gradients non-zero
    model.set_telemetry(False)
    return model.train()


def loss_of(model: torch.nn.Module, ids: torch.Tensor, scale: float) -> torch.Tensor:
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    ce = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"
    )
    return ce * scale  # CE only: aux losses are per-forward means, not sums over the ranks' halves


def main(out: Path, family: str, name: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(7))
    targets = batch.shape[0] * (batch.shape[1] - 1)

    reference = build(family, name)
    loss_of(reference, batch, 1 / targets).backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad and p.grad is not None}

    model = build(family, name)
    shard_model(model, torch.device("cpu"), from_rank0=True)
    loss_of(model, batch[rank : rank + 1], world / targets).backward()  # FSDP averages over ranks
    gaps = []
    for pname, param in model.named_parameters():
        if param.requires_grad and param.grad is not None and pname in expected:
            gaps.append((full_tensor(param.grad) - expected[pname]).abs().max().item())
    result = {"rank": rank, "grad_gap": max(gaps, default=float("inf")), "grads_compared": len(gaps)}
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
