"""Sparse MoA: skipped experts contribute exactly zero and never see the skipped tokens."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core_helpers import randomize_adapters
from moa_train import MoAConfig, RouterConfig, get_moa_model
from moa_train.core.ops import GATHER_BUCKETS, padded_rows
from tiny_models import tiny_model

IDS = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(4))


def sparse_config(**router) -> MoAConfig:
    return MoAConfig(prompt_len=0, router=RouterConfig(kind="swiglu", selection="threshold", **router))


class Spy(nn.Module):
    """An expert that records the rows it was given and returns ones."""

    def __init__(self) -> None:
        super().__init__()
        self.inputs = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.reshape(-1, x.shape[-1]).clone())
        return torch.ones(*x.shape[:-1], 3)


@pytest.mark.parametrize("impl", ["gather", "dense"])
def test_skipped_tokens_contribute_exactly_zero_and_never_reach_the_expert(impl: str) -> None:
    model = get_moa_model(
        tiny_model(),
        MoAConfig(sparse_impl=impl, prompt_len=0, router=RouterConfig(kind="linear", selection="threshold")),
    )
    randomize_adapters(model, 1.0)
    with torch.no_grad():
        model(IDS)
    layer = model._moa_layers[0]
    keep = layer.keep[..., layer.slot_index["pa"]]
    assert keep.any() and not keep.all()  # a real mixture of kept and skipped tokens
    spy = Spy()
    x = torch.randn(2, 12, 64)
    out = layer.delta("pa", x, spy)
    gate = layer.weights[..., layer.slot_index["pa"]]
    assert torch.equal(out[~keep], torch.zeros_like(out[~keep]))
    torch.testing.assert_close(out[keep], gate[keep][:, None].expand(-1, 3))
    (fed,) = spy.inputs
    if impl == "dense":
        assert fed.shape[0] == 24
        return
    # gather: every kept token, and no skipped one (padding up to a shape bucket repeats a kept row)
    kept, skipped = x[keep], x[~keep]
    assert all(any(torch.equal(row, k) for k in kept) for row in fed)
    assert all(any(torch.equal(k, row) for row in fed) for k in kept)
    assert not any(torch.equal(row, s) for row in fed for s in skipped)


def test_padded_rows_bound_the_shapes_and_pad_with_a_kept_row() -> None:
    total = 1024
    sizes = set()
    for n in range(1, total + 1):
        keep = torch.zeros(total, dtype=torch.bool)
        keep[torch.randperm(total, generator=torch.Generator().manual_seed(n))[:n]] = True
        rows, real = padded_rows(keep)
        assert real == n and n <= rows.numel() <= min(total, n + total // GATHER_BUCKETS)
        assert keep[rows].all()
        assert torch.equal(rows[:n], keep.nonzero().squeeze(1))
        sizes.add(rows.numel())
    assert len(sizes) <= GATHER_BUCKETS
    rows, real = padded_rows(torch.zeros(8, dtype=torch.bool))
    assert real == 0 and rows.numel() == 0


def test_gather_and_dense_masked_paths_agree() -> None:
    outs = {}
    for impl in ("gather", "dense"):
        model = get_moa_model(
            tiny_model(),
            MoAConfig(
                prompt_len=10, sparse_impl=impl, router=RouterConfig(kind="swiglu", selection="threshold")
            ),
        )
        randomize_adapters(model, 0.7)
        ids = IDS
        out = model(ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.adapter_state_dict().items() if p.grad is not None}
        outs[impl] = (out.logits.detach(), grads)
    torch.testing.assert_close(outs["gather"][0], outs["dense"][0], atol=1e-5, rtol=1e-5)
    assert outs["gather"][1].keys() == outs["dense"][1].keys()
    for name in outs["gather"][1]:
        torch.testing.assert_close(outs["gather"][1][name], outs["dense"][1][name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("grad,expect", [("none", False), ("shifted", True), ("ste", True)])
def test_threshold_gradient_modes(grad: str, expect: bool) -> None:
    model = get_moa_model(tiny_model(), sparse_config(threshold_grad=grad))
    randomize_adapters(model, 0.7)
    model(IDS, labels=IDS).loss.backward()
    threshold = model._moa_layers[0].router.threshold
    if expect:
        assert threshold.weight.grad is not None and threshold.weight.grad.abs().sum() > 0
    else:  # the official code: Γ only enters a comparison, so it never gets a gradient (spec G.1)
        assert threshold.weight.grad is None and threshold.bias.grad is None
    assert model._moa_layers[0].router.net.w1.weight.grad.abs().sum() > 0


def test_forward_values_of_ste_equal_none() -> None:
    logits = {}
    for grad in ("none", "ste"):
        model = get_moa_model(tiny_model(), sparse_config(threshold_grad=grad))
        randomize_adapters(model, 0.7)
        with torch.no_grad():
            logits[grad] = model(IDS).logits
    torch.testing.assert_close(logits["none"], logits["ste"])


def test_sparse_models_declare_conditional_parameters_for_ddp() -> None:
    assert get_moa_model(tiny_model(), sparse_config()).has_conditional_parameters()
    assert not get_moa_model(tiny_model(), MoAConfig()).has_conditional_parameters()
    topk_sites = MoAConfig(lora_experts=4, site_router=RouterConfig(activation="softmax", selection="topk"))
    assert get_moa_model(tiny_model(), topk_sites).has_conditional_parameters()
