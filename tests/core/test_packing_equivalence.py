"""Packed = unpacked: the loss, every adapter gradient and the router statistics of a packed batch equal
those of the same examples run one per row (fp32), for each routing family. This is what shows that no
token of one example attends, routes, pools or counts across into another inside a packed row."""

from __future__ import annotations

import pytest
import torch

from core_helpers import randomize_adapters
from moa_train import MoAConfig, MoAModel
from moa_train.data import TrainCollator
from moa_train.data.packing import PackedCollator, pack_examples
from tiny_models import tiny_model

AUX = dict(load_balance_coef=0.1, z_loss_coef=0.01, entropy_coef=0.01)  # balance statistics enter the loss
SOFT = dict(lora_targets=["q", "k", "v", "o", "down"], pa_size=16, prompt_len=10)
METHODS = {
    "soft_moa": dict(**SOFT, router=dict(kind="swiglu", **AUX)),
    "sparse_moa": dict(**SOFT, router=dict(kind="swiglu", selection="threshold", **AUX)),
    "instance": dict(**SOFT, router=dict(kind="swiglu", granularity="instance", **AUX)),
    "molora": dict(
        lora_experts=4,
        pa_size=0,
        prompt_len=0,
        router=dict(kind="none"),
        site_router=dict(kind="linear", bias=True, activation="softmax", **AUX),
    ),  # fmt: skip
    "lora": dict(lora_experts=1, pa_size=0, prompt_len=0, router=dict(kind="none")),
}


def examples(train_on_inputs: bool = False) -> list[dict[str, list[int]]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for length, prompt in ((9, 4), (14, 6), (5, 2), (11, 7), (7, 3), (16, 5)):
        ids = torch.randint(3, 128, (length,), generator=gen).tolist()
        labels = list(ids) if train_on_inputs else [-100] * prompt + ids[prompt:]
        out.append({"input_ids": ids, "labels": labels})
    return out


def loss_and_grads(model: MoAModel, batch: dict[str, torch.Tensor], packed: bool):
    model.zero_grad(set_to_none=True)
    model.reset_router_stats()
    common = dict(input_ids=batch["input_ids"], use_cache=False)
    if packed:
        out = model(
            **common, attention_mask=None, position_ids=batch["position_ids"],
            segment_ids=batch["segment_ids"], instance_mask=batch["instance_mask"],
        )  # fmt: skip
    else:
        mask = batch["attention_mask"]
        out = model(**common, attention_mask=mask, instance_mask=(batch["labels"] == -100) & mask.bool())
    labels = batch["labels"][:, 1:].reshape(-1)
    ce = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), labels, ignore_index=-100, reduction="sum"
    )
    loss = ce / (labels != -100).sum() + model.aux_loss()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads, model.router_stats()


FAST = {("instance", "sdpa"), ("soft_moa", "eager")}  # the default suite; every case runs under -m slow
CASES = [
    pytest.param(m, a, marks=() if (m, a) in FAST else (pytest.mark.slow,), id=f"{m}-{a}")
    for m in METHODS
    for a in ("sdpa", "eager")
    if a == "sdpa" or m in ("soft_moa", "instance")  # the attention kernel matters once per pooling kind
]


@pytest.mark.parametrize(("method", "attn"), CASES)
def test_packed_batch_equals_unpacked(method: str, attn: str) -> None:
    model = MoAModel(tiny_model(attn=attn), MoAConfig(**METHODS[method])).train()
    randomize_adapters(model)
    for train_on_inputs in (False, True):
        data = examples(train_on_inputs)
        unpacked = TrainCollator(pad_token_id=0)(data)
        rows = pack_examples(data, max_len=24)
        assert len(rows) < len(data)  # several examples share a row
        packed = PackedCollator(pad_token_id=0)(rows)
        assert int((packed["labels"] != -100).sum()) == int((unpacked["labels"][:, 1:] != -100).sum())
        loss_u, grads_u, stats_u = loss_and_grads(model, unpacked, packed=False)
        loss_p, grads_p, stats_p = loss_and_grads(model, packed, packed=True)
        torch.testing.assert_close(loss_p, loss_u, rtol=1e-5, atol=1e-6)
        assert grads_p.keys() == grads_u.keys() and len(grads_u) > 0
        for name, grad in grads_u.items():
            torch.testing.assert_close(grads_p[name], grad, rtol=1e-4, atol=1e-6, msg=name)
        if stats_u["layers"]:  # telemetry counts each example's real tokens, nothing else
            assert stats_p["tokens"] == stats_u["tokens"] == sum(len(e["input_ids"]) for e in data)
            for key in ("mean_gate", "entropy"):
                torch.testing.assert_close(torch.tensor(stats_p[key]), torch.tensor(stats_u[key]))


def test_packing_without_segment_ids_would_leak() -> None:
    """The control: the same packed row with one plain causal mask (no per-example positions, no
    segments) gives a different loss, so the equality above is not vacuous."""
    model = MoAModel(tiny_model(), MoAConfig(**METHODS["instance"])).train()
    randomize_adapters(model)
    data = examples()
    packed = PackedCollator(pad_token_id=0)(pack_examples(data, max_len=24))
    loss_u, _, _ = loss_and_grads(model, TrainCollator(pad_token_id=0)(data), packed=False)
    leaky = dict(packed, position_ids=None, segment_ids=None)
    leaky["attention_mask"] = packed["attention_mask"]
    loss_l, _, _ = loss_and_grads(model, {**leaky, "labels": packed["labels"]}, packed=False)
    assert abs(float(loss_l) - float(loss_u)) > 1e-3
