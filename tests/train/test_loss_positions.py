"""The training and validation loss run the LM head on the target positions only (transformers'
``logits_to_keep``): same loss and same adapter gradients as the full logits, on every base family."""

from __future__ import annotations

import pytest
import torch

from core_helpers import randomize_adapters
from family_models import FAMILY_CONFIGS, family_model
from moa_train import get_moa_model
from moa_train.train.steps import loss_logits_kwargs, target_positions, token_cross_entropy

IDS = torch.randint(3, 128, (3, 14), generator=torch.Generator().manual_seed(3))
LABELS = torch.full_like(IDS, -100)
LABELS[0, 9:12] = IDS[0, 9:12]  # answers at different places per row
LABELS[1, 5:7] = IDS[1, 5:7]
# row 2: no target at all (a fully truncated answer)
SOFT_MOA = dict(
    lora_targets=["q", "k", "v", "o"], lora_rank=4, pa_size=8, prompt_len=4, router=dict(kind="swiglu")
)


def _loss_and_grads(model, keep_targets_only: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    keep, positions = loss_logits_kwargs(model, LABELS) if keep_targets_only else ({}, None)
    out = model(input_ids=IDS, attention_mask=torch.ones_like(IDS), use_cache=False, **keep)
    loss = token_cross_entropy(out.logits, LABELS, positions)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# the default suite: a plain Llama, Gemma 2's logit soft-capping after the head, an MoE base; the rest slow
FAST = ("llama", "gemma2", "qwen3_moe")


@pytest.mark.parametrize(
    "family", [pytest.param(f, marks=() if f in FAST else (pytest.mark.slow,)) for f in FAMILY_CONFIGS]
)
def test_target_positions_give_the_full_logits_loss_and_gradients(family: str) -> None:
    model = get_moa_model(family_model(family), SOFT_MOA)
    randomize_adapters(model, scale=0.1)
    keep, positions = loss_logits_kwargs(model, LABELS)
    assert positions is not None and positions.tolist() == [4, 5, 8, 9, 10]  # the union over the rows
    full, full_grads = _loss_and_grads(model, keep_targets_only=False)
    kept, kept_grads = _loss_and_grads(model, keep_targets_only=True)
    torch.testing.assert_close(kept, full, rtol=1e-5, atol=1e-6)
    assert full_grads and kept_grads.keys() == full_grads.keys()
    for name, grad in full_grads.items():
        torch.testing.assert_close(kept_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_positions_are_the_union_of_target_rows_and_never_empty() -> None:
    assert target_positions(LABELS).tolist() == [4, 5, 8, 9, 10]
    none = torch.full((2, 6), -100)
    assert target_positions(none).tolist() == [0]  # a forward still runs; its loss is 0
    logits = torch.randn(2, 1, 7, requires_grad=True)
    loss = token_cross_entropy(logits, none, target_positions(none))
    loss.backward()
    assert float(loss.detach()) == 0.0 and float(logits.grad.abs().sum()) == 0.0


def test_a_model_without_logits_to_keep_gets_every_position() -> None:
    class Plain(torch.nn.Module):
        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return input_ids

    assert loss_logits_kwargs(Plain(), LABELS) == ({}, None)


@pytest.mark.slow  # 4 short trainings
def test_the_gain_script_runs_both_paths_to_the_same_loss(tmp_path, monkeypatch, capsys) -> None:
    """scripts/loss_positions_gain.py (docs/training.md) on the tiny model: both paths train, the loss
    is the same, and the ratio and the JSON are written."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "loss_positions_gain.py"
    spec = importlib.util.spec_from_file_location("loss_positions_gain", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.setenv("LOSS_POSITIONS_OUT", str(tmp_path / "out.json"))
    monkeypatch.chdir(tmp_path)
    tiny = [o for o in script.DEFAULT if not o.startswith(("model=", "trainer.max_steps"))]
    script.main(["model=tiny_random", "trainer.max_steps=2", *tiny])
    results = json.loads((tmp_path / "out.json").read_text())
    losses = [r["train_loss"] for name in ("every position", "target positions") for r in results[name]]
    assert len(losses) == 4 and max(losses) - min(losses) < 1e-5 * abs(losses[0])
    assert results["speedup"] > 0 and "target positions / every position tokens/s:" in capsys.readouterr().out
    from moa_train.train import steps, validation

    assert steps.loss_logits_kwargs is validation.loss_logits_kwargs  # the patch is undone
    assert steps.loss_logits_kwargs.__module__ == "moa_train.train.steps"
