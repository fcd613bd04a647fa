"""Gate shapes, ranges and order for every router kind; selections and site mixtures vs plain torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from core_helpers import randomize_adapters
from moa_train import MoAConfig, RouterConfig, get_moa_model
from moa_train.core.routers import aux_losses, selection
from tiny_models import tiny_model

IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(2))
SOFTMAX = dict(activation="softmax")
ROUTERS = {
    "soft_linear": RouterConfig(kind="linear"),
    "soft_swiglu": RouterConfig(kind="swiglu"),
    "softmax": RouterConfig(kind="linear", **SOFTMAX),
    "scaled_softmax": RouterConfig(kind="linear", activation="scaled_softmax"),
    "sparse_threshold": RouterConfig(kind="swiglu", selection="threshold"),
    "const_threshold": RouterConfig(
        kind="linear", selection="threshold", const_threshold=True, max_threshold=0.5
    ),
    "topk": RouterConfig(kind="linear", selection="topk", top_k=2, **SOFTMAX),
    "topp": RouterConfig(kind="linear", selection="topp", top_p=0.5, **SOFTMAX),
    "adamole": RouterConfig(kind="linear", selection="adamole", **SOFTMAX),
    "instance": RouterConfig(kind="swiglu", granularity="instance"),
    "normed_input": RouterConfig(kind="linear", input="normed"),
}


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_gate_shape_range_and_order(name: str) -> None:
    cfg = ROUTERS[name]
    model = get_moa_model(tiny_model(), MoAConfig(router=cfg))
    randomize_adapters(model, scale=0.5)
    assert model._moa_layers[0].slots == ["q", "k", "v", "prompt", "o", "down", "pa"]  # spec A.4
    with torch.no_grad(), model.capture_gates() as gates:
        model(IDS)
    assert len(gates) == 2  # one block router per layer
    for g in gates:
        time = 1 if cfg.granularity == "instance" else IDS.shape[1]
        assert g.shape == (2, time, 7)
        if cfg.activation == "sigmoid":
            assert ((g >= 0) & (g <= 1)).all()
        elif cfg.activation == "scaled_softmax":
            torch.testing.assert_close(g.sum(-1), torch.full(g.shape[:-1], 7.0))
        else:
            assert ((g >= 0) & (g <= 1)).all()
            torch.testing.assert_close(g.sum(-1), torch.ones(g.shape[:-1]))
        if cfg.selection == "topk":
            assert ((g > 0).sum(-1) == 2).all()
        if cfg.selection in ("threshold", "adamole", "topp"):
            assert (g == 0).any() or cfg.selection == "topp"


def test_none_router_gives_constant_gates_and_type_groups_share_gates() -> None:
    naive = get_moa_model(tiny_model(), MoAConfig(router=RouterConfig(kind="none")))
    assert naive._moa_layers[0].router is None
    uni = get_moa_model(
        tiny_model(), MoAConfig(router=RouterConfig(kind="linear", granularity="instance", groups="type"))
    )
    randomize_adapters(uni)
    with torch.no_grad():
        uni(IDS)
    layer = uni._moa_layers[0]
    assert layer.router_outputs == ["lora", "prompt", "pa"]
    w = layer.weights  # expanded to slots: the five LoRA slots share one gate
    assert w.shape == (2, 1, 7)
    lora_slots = [layer.slot_index[s] for s in ("q", "k", "v", "o", "down")]
    assert torch.equal(w[..., lora_slots], w[..., lora_slots[:1]].expand(-1, -1, 5))


def test_selection_functions_against_plain_torch() -> None:
    gen = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(50, 6, generator=gen), -1)
    w, keep = selection.top_k(probs, 2)
    ref = torch.zeros_like(probs)
    for i in range(50):
        idx = probs[i].argsort(descending=True)[:2]
        ref[i, idx] = probs[i, idx] / probs[i, idx].sum()
    torch.testing.assert_close(w, ref)
    assert torch.equal(keep, ref > 0)
    tau = torch.rand(50, 1, generator=gen) / 6
    w, keep = selection.adamole(probs, tau)
    shifted = (probs - tau).clamp_min(0) * (probs >= tau)
    torch.testing.assert_close(
        w, shifted / shifted.sum(-1, keepdim=True).where(shifted.sum(-1, keepdim=True) > 0, torch.ones(1))
    )
    w, keep = selection.top_p(probs, 0.6)
    for i in range(50):
        order = probs[i].argsort(descending=True)
        n_keep = int((probs[i][order].cumsum(0) < 0.6).sum()) + 1
        assert keep[i].sum() == n_keep and keep[i, order[:n_keep]].all()
    gates = torch.rand(50, 6, generator=gen)
    thr = torch.full((50, 1), 0.5)
    w, keep = selection.learned_threshold(gates, thr, "none")
    assert torch.equal(w, gates * (gates >= 0.5))


def test_site_mixtures_equal_plain_torch_reference() -> None:
    """MoLoRA / HydraLoRA / Top-K / AdaMoLE at one site equal the textbook loop over experts."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 64, generator=gen)
    for shared, sel in [(False, "dense"), (True, "dense"), (False, "topk"), (False, "adamole")]:
        for impl in ("gather", "dense"):
            site = RouterConfig(kind="linear", activation="softmax", bias=True, selection=sel, top_k=2)
            cfg = MoAConfig(
                lora_targets=["q"],
                pa_size=0,
                prompt_len=0,
                lora_experts=4,
                lora_shared_a=shared,
                router=RouterConfig(kind="none"),
                site_router=site,
                sparse_impl=impl,
            )
            model = get_moa_model(tiny_model(layers=1), cfg)
            randomize_adapters(model)
            expert = model._moa_layers[0].lora["q"]
            out = expert(x)
            router = expert.router
            probs = torch.softmax(router.net(x), -1)
            if sel == "topk":
                weights, _ = selection.top_k(probs, 2)
            elif sel == "adamole":
                weights, _ = selection.adamole(probs, torch.sigmoid(router.threshold(x)) / 4)
            else:
                weights = probs
            ref = torch.zeros(2, 5, 64)
            for e in range(4):
                a = expert.A if shared else expert.A[e * 8 : (e + 1) * 8]
                b = expert.B[:, e * 8 : (e + 1) * 8]
                ref += weights[..., e : e + 1] * F.linear(F.linear(x, a), b)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_pa_moe_and_prompt_moe_run_and_route() -> None:
    cfg = MoAConfig(
        lora_targets=[],
        pa_experts=4,
        pa_shared_down=True,
        prompt_experts=3,
        router=RouterConfig(kind="none"),
        site_router=RouterConfig(kind="linear", activation="softmax"),
    )
    model = get_moa_model(tiny_model(), cfg)
    randomize_adapters(model)
    x = torch.randn(1, 4, 64)
    pa = model._moa_layers[0].pa
    w = torch.softmax(pa.router.net(x), -1)
    hidden = F.silu(F.linear(x, pa.down_w, pa.down_b))
    ref = sum(
        w[..., e : e + 1] * (F.linear(hidden, pa.up_w[:, e * 16 : (e + 1) * 16]) + pa.up_b[e])
        for e in range(4)
    )
    torch.testing.assert_close(pa(x), ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad(), model.capture_gates() as gates:
        model(IDS)
    assert {tuple(g.shape[-1:]) for g in gates} == {(4,), (3,)}


def test_aux_losses_are_padding_masked_and_weighted() -> None:
    cfg = MoAConfig(
        lora_targets=["q", "down"],
        lora_experts=4,
        pa_size=0,
        prompt_len=0,
        router=RouterConfig(kind="none"),
        site_router=RouterConfig(
            kind="linear",
            activation="softmax",
            selection="topk",
            top_k=2,
            load_balance_coef=0.01,
            z_loss_coef=0.001,
            entropy_coef=0.0,
        ),
    )
    model = get_moa_model(tiny_model(), cfg)
    randomize_adapters(model)
    mask = torch.ones_like(IDS)
    mask[1, 5:] = 0
    out = model(IDS, attention_mask=mask)
    losses = model.aux_losses()
    assert set(losses) == {"load_balance", "z_loss"}
    assert losses["load_balance"].item() >= 2 * 2 - 1e-4  # 2 layers x 2 sites, each >= 1 (uniform = 1)
    total = model.aux_loss()
    torch.testing.assert_close(total, 0.01 * losses["load_balance"] + 0.001 * losses["z_loss"])
    (out.logits.mean() + total).backward()
    router = model._moa_layers[0].lora["q"].router
    assert router.net.weight.grad is not None and router.net.weight.grad.abs().sum() > 0
    # padding does not count: changing tokens under the mask leaves the loss unchanged
    ids2 = IDS.clone()
    ids2[1, 5:] = 7
    model(IDS, attention_mask=mask)
    a = model.aux_losses()["load_balance"].detach()
    model(ids2, attention_mask=mask)
    torch.testing.assert_close(model.aux_losses()["load_balance"].detach(), a)
    with torch.no_grad():  # evaluation computes no aux loss
        model(IDS, attention_mask=mask)
    assert model.aux_losses() == {} and model.aux_loss().item() == 0.0
    p = torch.softmax(torch.randn(6, 4), -1)
    keep = torch.ones_like(p, dtype=torch.bool)
    m = torch.tensor([1.0, 1, 1, 0, 0, 0])
    torch.testing.assert_close(
        aux_losses.load_balance(p, keep, m), aux_losses.load_balance(p[:3], keep[:3], None)
    )
    torch.testing.assert_close(aux_losses.entropy(p, m), aux_losses.entropy(p[:3], None))


def test_telemetry_counts_real_tokens_only() -> None:
    model = get_moa_model(
        tiny_model(), MoAConfig(prompt_len=0, router=RouterConfig(kind="swiglu", selection="threshold"))
    )
    randomize_adapters(model, 0.5)
    mask = torch.ones_like(IDS)
    mask[0, 6:] = 0
    with torch.no_grad(), model.capture_gates() as gates:
        model(IDS, attention_mask=mask)
    stats = model.router_stats(reset=True)
    assert stats["tokens"] == int(mask.sum())
    assert stats["experts"] == ["q", "k", "v", "o", "down", "pa"]
    real = mask.bool()
    for layer, g in enumerate(gates):
        torch.testing.assert_close(
            torch.tensor(stats["mean_gate"][layer]), g[real].mean(0), atol=1e-5, rtol=0
        )
        torch.testing.assert_close(
            torch.tensor(stats["active_frac"][layer]), (g[real] > 0).float().mean(0), atol=1e-5, rtol=0
        )
        assert abs(stats["active_per_token"][layer] - (g[real] > 0).float().sum(-1).mean().item()) < 1e-5
    assert all(0 < t < 0.5 for t in stats["mean_threshold"])
    assert model.router_stats()["tokens"] == 0  # reset
