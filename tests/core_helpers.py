"""Helpers for core tests: randomised adapters so no expert is a no-op."""

from __future__ import annotations

import torch

from moa_train import MoAModel


def randomize_adapters(model: MoAModel, scale: float = 0.3, seed: int = 0) -> None:
    """Give every adapter / router tensor random values (LoRA B, prompt gates and PA are ~0 at init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.adapter_state_dict().values():
            param.copy_(torch.randn(param.shape, generator=gen) * scale)
