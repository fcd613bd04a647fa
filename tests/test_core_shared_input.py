"""LoRA sites that read one input (q/k/v, up/gate) share one stacked-A GEMM: the same sums as per site."""

from __future__ import annotations

import pytest
import torch

from core_helpers import randomize_adapters
from moa_train import MoAConfig, RouterConfig, get_moa_model
from tiny_models import tiny_model

IDS = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(7))


def _loss_and_grads(model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    mask = torch.ones_like(IDS)
    mask[1, :3] = 0  # left padding in one row
    out = model(input_ids=IDS, attention_mask=mask, labels=IDS)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize(
    "targets, router",
    [
        (["q", "k", "v", "o", "down"], RouterConfig(kind="swiglu")),  # the paper's sites
        (
            ["q", "v", "up", "gate"],
            RouterConfig(kind="linear", selection="threshold"),
        ),  # sparse, dense-masked
        (
            ["q", "k", "v"],
            RouterConfig(kind="swiglu", granularity="instance"),
        ),  # one gate vector per sequence
    ],
)
def test_shared_input_groups_equal_per_site_experts(targets: list[str], router: RouterConfig) -> None:
    cfg = MoAConfig(lora_targets=targets, lora_rank=4, lora_alpha=8, pa_size=8, prompt_len=4, router=router)
    model = get_moa_model(tiny_model(), cfg)
    randomize_adapters(model)
    layers = [m for m in model._moa_layers if m is not None]
    expected_groups = {s for s in targets if s in ("q", "k", "v", "up", "gate")}
    assert all(set(m.shared_input) == expected_groups for m in layers)
    shared_logits, shared_grads = _loss_and_grads(model)
    for layer in layers:
        layer.shared_input = {}  # every site runs its own A GEMM (LoRAExperts.delta)
    logits, grads = _loss_and_grads(model)
    torch.testing.assert_close(shared_logits, logits, atol=1e-5, rtol=1e-5)
    assert shared_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(shared_grads[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_sites_with_their_own_rank_or_mixtures_are_not_grouped() -> None:
    cfg = MoAConfig(lora_targets=["q", "k", "v"], lora_rank=4, lora_rank_pattern={"k": 2}, prompt_len=0)
    (layer, *_) = [m for m in get_moa_model(tiny_model(), cfg)._moa_layers if m is not None]
    assert layer.shared_input == {}  # the ranks differ within the group: every site runs alone
    cfg = MoAConfig(lora_targets=["q", "v"], lora_rank=4, lora_rank_pattern={"v": 2}, prompt_len=0)
    (layer, *_) = [m for m in get_moa_model(tiny_model(), cfg)._moa_layers if m is not None]
    assert layer.shared_input == {}
    cfg = MoAConfig(lora_targets=["q", "k"], lora_experts=3, prompt_len=0, router=RouterConfig(kind="none"))
    (layer, *_) = [m for m in get_moa_model(tiny_model(), cfg)._moa_layers if m is not None]
    assert layer.shared_input == {}
