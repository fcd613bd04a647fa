"""KV-cache generation equals full-sequence forwards; gradient checkpointing changes no gradient."""

from __future__ import annotations

import pytest
import torch

from core_helpers import randomize_adapters
from moa_train import MoAConfig, RouterConfig, get_moa_model
from tiny_models import tiny_model

VARIANTS = {
    "soft": RouterConfig(kind="swiglu"),
    "sparse": RouterConfig(kind="swiglu", selection="threshold"),
    "instance": RouterConfig(kind="swiglu", granularity="instance"),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_generate_with_cache_equals_full_forward(variant: str, family: str) -> None:
    base = tiny_model(family)
    model = get_moa_model(base, MoAConfig(prompt_len=10, router=VARIANTS[variant]))  # prompt expert on
    randomize_adapters(model, 0.3)
    prompt = torch.randint(3, 128, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        generated = model.generate(
            prompt, max_new_tokens=8, do_sample=False, min_new_tokens=8, eos_token_id=None
        )
        # Full forward over prompt + generated tokens; an instance router pools over the prompt only.
        instance_mask = torch.zeros_like(generated)
        instance_mask[:, : prompt.shape[1]] = 1
        logits = model(generated, instance_mask=instance_mask).logits
    predicted = logits[0, prompt.shape[1] - 1 : -1].argmax(-1)
    assert torch.equal(predicted, generated[0, prompt.shape[1] :])
    assert len(set(generated[0, prompt.shape[1] :].tolist())) > 1  # not a degenerate repetition


def test_instance_gates_are_constant_over_positions_and_cached_while_decoding() -> None:
    model = get_moa_model(tiny_model(), MoAConfig(router=VARIANTS["instance"]))
    randomize_adapters(model)
    prompt = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), model.capture_gates() as gates:
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=3, do_sample=False)
    per_layer0 = gates[0::2]
    assert all(g.shape == (2, 1, 7) for g in per_layer0)
    assert all(torch.equal(g, per_layer0[0]) for g in per_layer0)  # prefill gates reused at every step


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    grads = []
    for checkpointing in (False, True):
        base = tiny_model()
        base.config.use_cache = False
        model = get_moa_model(
            base,
            MoAConfig(router=RouterConfig(kind="swiglu", selection="threshold", threshold_grad="shifted")),
        )
        randomize_adapters(model, 0.3)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(7))
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.adapter_state_dict().items()})
        stats = model.router_stats()
        assert stats["tokens"] == 20  # recomputation in backward does not double-count telemetry
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


AUX = dict(load_balance_coef=0.1, z_loss_coef=0.01, entropy_coef=0.01)
SITE_ROUTERS = {  # MoLoRA / Top-K MoE-LoRA / AdaMoLE: a router at every LoRA site, inside the checkpoint
    "molora": dict(kind="linear", bias=True, activation="softmax", **AUX),
    "topk": dict(kind="linear", bias=True, activation="softmax", selection="topk", top_k=2, **AUX),
    "adamole": dict(kind="linear", bias=True, activation="softmax", selection="adamole", **AUX),
    "topk_global": dict(  # global-batch balance: the replay reuses the forward's step counts
        kind="linear", activation="softmax", selection="topk", top_k=2, balance_scope="global", **AUX
    ),
}


@pytest.mark.parametrize("name", sorted(SITE_ROUTERS))
def test_site_router_aux_losses_under_checkpointing_equal_plain_and_count_once(name: str) -> None:
    """Non-reentrant checkpointing replays site routers in backward: the replay must save the same tensors
    as the forward (else CheckpointError), and aux losses / telemetry / global counts are recorded once."""
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    runs = []
    for checkpointing in (False, True):
        base = tiny_model()
        base.config.use_cache = False
        cfg = MoAConfig(
            lora_experts=4, pa_size=0, prompt_len=0, router=dict(kind="none"), site_router=SITE_ROUTERS[name]
        )
        model = get_moa_model(base, cfg)
        randomize_adapters(model, 0.3)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        loss = model(ids, attention_mask=mask, labels=ids).loss + model.aux_loss()
        aux = {k: v.detach().clone() for k, v in model.aux_losses().items()}
        counts = [c.clone() for c in model._state.step_counts.values()]
        loss.backward()
        assert {k: v.detach() for k, v in model.aux_losses().items()} == aux  # backward added nothing
        assert all(torch.equal(a, b) for a, b in zip(counts, model._state.step_counts.values(), strict=True))
        grads = {n: p.grad.clone() for n, p in model.adapter_state_dict().items()}
        runs.append((loss.detach(), aux, grads, model.router_stats(), counts))
    (loss0, aux0, grads0, stats0, counts0), (loss1, aux1, grads1, stats1, counts1) = runs
    assert set(aux0) == {"load_balance", "z_loss", "entropy"}
    torch.testing.assert_close(loss1, loss0, atol=1e-6, rtol=1e-5)
    for key in aux0:
        torch.testing.assert_close(aux1[key], aux0[key], atol=1e-6, rtol=1e-5)
    assert grads0.keys() == grads1.keys() and all(g.abs().sum() > 0 for g in grads0.values())
    for key in grads0:
        torch.testing.assert_close(grads1[key], grads0[key], atol=1e-6, rtol=1e-5, msg=key)
    assert stats0["tokens"] == stats1["tokens"] == 17  # real tokens, counted once per forward
    torch.testing.assert_close(torch.tensor(stats1["mean_gate"]), torch.tensor(stats0["mean_gate"]))
    assert (len(counts0) > 0) == (name == "topk_global")
    for a, b in zip(counts0, counts1, strict=True):
        torch.testing.assert_close(b, a)
