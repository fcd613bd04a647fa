"""At init the adapted model is the base model; adapters attach to every supported family."""

from __future__ import annotations

import pytest
import torch

from moa_train import MoAConfig, RouterConfig, get_moa_model
from tiny_models import FAMILIES, tiny_model

IDS = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_identity_at_init_exact_without_pa(family: str, attn: str) -> None:
    base = tiny_model(family, attn)
    with torch.no_grad():
        reference = base(IDS).logits
    model = get_moa_model(
        base, MoAConfig(lora_targets=list(("q", "k", "v", "o", "up", "gate", "down")), pa_size=0)
    )
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_identity_at_init_within_pa_init(family: str) -> None:
    base = tiny_model(family)
    with torch.no_grad():
        reference = base(IDS).logits
    model = get_moa_model(base, MoAConfig())  # Soft MoA: LoRA + prompt + PA (xavier gain 1e-4)
    with torch.no_grad():
        diff = (model(IDS).logits - reference).abs().max().item()
    assert 0 < diff < 1e-3  # the PA is near-zero, not exactly zero (spec A.2)


def test_disable_adapters_and_unload_restore_base() -> None:
    base = tiny_model()
    with torch.no_grad():
        reference = base(IDS).logits
    model = get_moa_model(base, MoAConfig())
    with torch.no_grad():
        for p in model.adapter_state_dict().values():
            p.add_(0.5)
        assert not torch.allclose(model(IDS).logits, reference)
        with model.disable_adapters():
            assert torch.equal(model(IDS).logits, reference)
    plain = model.unload()
    assert not any(".moa." in n for n, _ in plain.named_parameters())
    assert plain.config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(plain(IDS).logits, reference)


def test_only_adapters_train_in_fp32_on_a_bf16_base() -> None:
    base = tiny_model(dtype=torch.bfloat16)
    model = get_moa_model(base, MoAConfig(router=RouterConfig(kind="linear")))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".moa." in n and p.dtype == torch.float32 for n, p in trainable.items())
    frozen = [p for n, p in model.named_parameters() if ".moa." not in n]
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in frozen)
    out = model(IDS, labels=IDS)  # bf16 activations meet fp32 adapters without autocast
    out.loss.backward()
    assert all(p.grad is not None for p in trainable.values())
