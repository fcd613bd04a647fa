"""One rank of the FSDP sharding check (started by tests/train/test_fsdp.py through torchrun, 2 ranks, gloo).

Every rank builds the same tiny MoA model twice: a plain reference that runs the whole global batch,
and one sharded with ``moa_train.train.fsdp.shard_model``, which runs only this rank's half. The halves
are chosen so that the sparse routers (top-1 of 4 LoRA experts per site, gather path: an expert with no
token of a rank runs on no row there) keep different experts on the two ranks. Writes ``<out>/rank<r>.json`` with what the
test asserts: which parameters are DTensor shards, the elements held, the routing per rank and the
largest gap between the gathered sharded gradient and the reference gradient.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.tensor import DTensor, Shard

from moa_train import MoAConfig, get_moa_model
from moa_train.core.dist import full_tensor
from moa_train.models.base import load_base_model
from moa_train.train.fsdp import shard_model
from moa_train.train.recipe import token_cross_entropy

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MOA = {
    "lora_targets": ["q", "v", "down"],
    "lora_rank": 4,
    "lora_experts": 4,
    "pa_size": 8,
    "prompt_len": 4,
    "sparse_impl": "gather",
    "router": {"kind": "none"},
    "site_router": {"kind": "linear", "activation": "softmax", "selection": "topk", "top_k": 1},
}


def build() -> torch.nn.Module:
    torch.manual_seed(0)  # the same adapter init on every rank and for both copies
    base, _ = load_base_model(OmegaConf.load(CONFIGS / "model" / "tiny_random.yaml"))
    model = get_moa_model(base, MoAConfig.from_dict(MOA))
    with torch.no_grad():  # routers as after training: input-dependent choices (at init one expert wins)
        for name, param in model.named_parameters():
            if ".router." in name:
                param.normal_(0.0, 1.0)
    model.set_telemetry(False)  # router statistics are not what this test is about
    return model.train()


def loss_of(model: torch.nn.Module, ids: torch.Tensor, targets: int, world: int) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    return token_cross_entropy(out.logits, ids) * (world / targets) + model.aux_loss()


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # two halves from different token ranges: the routers see different inputs on each rank
    g = torch.Generator().manual_seed(7)
    halves = [torch.randint(10, 500, (1, 6), generator=g), torch.randint(20000, 40000, (1, 6), generator=g)]
    batch = torch.cat(halves)
    targets = batch.numel() - batch.shape[0]

    reference = build()
    loss_of(reference, batch, targets, 1).backward()
    expected = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad and p.grad is not None}

    model = build()
    shard_model(model, torch.device("cpu"), from_rank0=True)
    with model.capture_gates() as gates:
        loss = loss_of(model, halves[rank], targets, world)
    loss.backward()
    # per router call: which experts got at least one token of this rank's half
    used = [[bool(c) for c in (g.detach() > 0).flatten(0, -2).any(0)] for g in gates]
    gaps = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            grad = full_tensor(param.grad) if param.grad is not None else None
            ref = expected.get(name)
            if grad is None or ref is None:
                gaps[name] = None if (grad is None) == (ref is None) else float("inf")
            else:
                gaps[name] = (grad - ref).abs().max().item()
    base = [(n, p) for n, p in model.base_model.named_parameters() if ".moa." not in n]
    result = {
        "rank": rank,
        "base_total": sum(p.numel() for _, p in base),
        "base_local": sum(p.to_local().numel() for _, p in base if isinstance(p, DTensor)),
        "base_not_sharded": [
            n for n, p in base if not (isinstance(p, DTensor) and p.placements == (Shard(0),))
        ],
        "adapters_not_sharded": [
            n for n, p in model.named_parameters() if p.requires_grad and not isinstance(p, DTensor)
        ],
        "experts_used": used,
        "grad_gap": max((v for v in gaps.values() if v is not None), default=0.0),
        "grads_compared": sum(v is not None for v in gaps.values()),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    del model, reference
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
