"""The mixture-of-LoRA family (related-methods spec): MoLA per-layer counts, block-level FFN experts
(MixLoRA), DynMoLE routing, LoRAMoE's localized balancing constraint, the MoSLoRA mixer, global-batch
load balance, the official balance normalisation and the official prompt-MoE form, each against a
plain-torch reference written from the spec text, plus identity at init, save/load and KV-cache decoding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from core_helpers import randomize_adapters
from moa_train import MoAConfig, MoAModel, MoATrainError, RouterConfig, get_moa_model
from moa_train.core.config import layer_value, span_values
from moa_train.core.layer import MoAState
from moa_train.core.routers import Router, aux_losses
from moa_train.core.routers.dynmole import dynmole, tsallis_entropy
from tiny_models import tiny_model

NONE = RouterConfig(kind="none")
SOFTMAX = dict(kind="linear", bias=False, activation="softmax")
IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(3))

METHODS = {
    "mola": MoAConfig(
        lora_targets=["q", "k", "v", "o", "gate", "up", "down"], lora_experts=[2, 4], lora_dropout=0.0,
        pa_size=0, prompt_len=0, router=NONE, site_router=RouterConfig(selection="topk", top_k=2, **SOFTMAX),
    ),
    "mixlora": MoAConfig(
        lora_targets=["q", "k", "v", "o"], ffn_experts=4, pa_size=0, prompt_len=0, router=NONE,
        site_router=RouterConfig(selection="topk", top_k=2, load_balance_coef=0.01, **SOFTMAX),
    ),
    "dynmole": MoAConfig(
        lora_targets=[], ffn_experts=6, lora_rank=4, pa_size=0, prompt_len=0, router=NONE,
        site_router=RouterConfig(selection="dynmole", entropy_coef=0.01, load_balance_coef=0.001, **SOFTMAX),
    ),
    "loramoe": MoAConfig(
        lora_targets=["gate", "up", "down"], lora_experts=4, lora_rank=4, pa_size=0, prompt_len=0,
        router=NONE, site_router=RouterConfig(lbc_coef=0.1, lbc_alpha=0.1, **SOFTMAX),
    ),
    "moslora": MoAConfig(lora_targets=["q", "k", "v", "up", "down"], lora_mixer=True, pa_size=0, prompt_len=0,
                         router=NONE),
    "prompt_moe": MoAConfig(lora_targets=[], pa_size=0, prompt_experts=4, router=NONE,
                            site_router=RouterConfig(kind="linear", bias=True, activation="softmax")),
}  # fmt: skip


# ---- per-layer counts (MoLA) -------------------------------------------------------------------------------


def test_span_maps_and_group_lists_resolve_per_layer() -> None:
    spans = "0-7:2,8-15:4,16-23:6,24-31:8"
    expected = [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8
    assert [layer_value(spans, i, 32, "x") for i in range(32)] == expected
    assert [layer_value([2, 4, 6, 8], i, 32, "x") for i in range(32)] == expected
    assert [layer_value([2, 4], i, 3, "x") for i in range(3)] == [2, 2, 4]  # l * 2 // 3
    assert layer_value(3, 5, 8, "x") == 3 and layer_value("3", 5, 8, "x") == 3
    assert span_values("4:1, 0-3:2", "x") == {4: 1, 0: 2, 1: 2, 2: 2, 3: 2}


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("0-7:2,8-x:4", "is not a per-layer count"),
        ("0-7:2,5-9:3", "gives layer 5 twice"),
        ("7-3:2", "ends before it starts"),
        ([2, "a"], "is not a list of integers"),
        (True, "is not a count"),
    ],
)
def test_bad_span_maps_are_one_line_errors(value, fragment: str) -> None:
    with pytest.raises(MoATrainError) as info:
        MoAConfig(lora_experts=value, pa_size=0, prompt_len=0, router=NONE)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_span_maps_are_checked_against_the_model_and_top_k() -> None:
    with pytest.raises(MoATrainError, match=r"gives no value for layers \[1\]"):
        get_moa_model(tiny_model(), MoAConfig(lora_experts="0:2", pa_size=0, prompt_len=0, router=NONE))
    with pytest.raises(MoATrainError, match="names layers"):
        get_moa_model(tiny_model(), MoAConfig(lora_experts="0-2:2", pa_size=0, prompt_len=0, router=NONE))
    topk = RouterConfig(selection="topk", top_k="0:2,1:3", **SOFTMAX)
    with pytest.raises(MoATrainError, match=r"top_k=3 exceeds the 2 experts \(lora_experts\) of layer 1"):
        MoAConfig(lora_experts="0:4,1:2", pa_size=0, prompt_len=0, router=NONE, site_router=topk)
    with pytest.raises(MoATrainError, match="per-layer maps are for site routers"):
        MoAConfig(router=RouterConfig(kind="linear", activation="softmax", selection="topk", top_k="0-1:2"))


def test_mola_builds_per_layer_experts_and_top_k() -> None:
    cfg = MoAConfig(
        lora_targets=["q", "down"], lora_experts="0:2,1-3:4", pa_size=0, prompt_len=0, router=NONE,
        site_router=RouterConfig(selection="topk", top_k=[1, 3], **SOFTMAX),
    )  # fmt: skip
    model = get_moa_model(tiny_model(layers=4), cfg)
    layers = model._moa_layers
    assert [m.lora["q"].num_experts for m in layers] == [2, 4, 4, 4]
    assert [m.lora["down"].router.cfg.top_k for m in layers] == [1, 1, 3, 3]
    with model.capture_gates() as gates, torch.no_grad():
        model(IDS)
    assert [int((g > 0).sum(-1).max()) for g in gates[::2]] == [1, 1, 3, 3]  # q sites: exactly top-k kept


# ---- DynMoLE ---------------------------------------------------------------------------------------------------


def _dynmole_reference(p: torch.Tensor, top_p: float, keep_top_k: int, q: float, threshold: float):
    """Token by token, as the spec words it."""
    weights = torch.zeros_like(p)
    n = p.shape[-1]
    for t in range(p.shape[0]):
        probs = p[t].tolist()
        tsallis = (1 - sum(x**q for x in probs)) / (q - 1)
        normalised = tsallis / ((1 - n ** (1 - q)) / (q - 1))
        order = sorted(range(n), key=lambda i: -probs[i])
        kept, mass = set(), 0.0
        for rank, i in enumerate(order):
            mass += probs[i]
            if rank < keep_top_k or mass <= top_p:
                kept.add(i)
        if normalised > threshold:
            kept = set(range(n))
        for i in kept:
            weights[t, i] = p[t, i]
    return weights


def test_dynmole_selection_against_the_spec_text() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 6, generator=gen) * torch.tensor([0.2, 1.0, 3.0, 6.0]).repeat(16)[:, None]
    p = logits.softmax(-1)
    for args in [(0.75, 2, 1.1, 0.9), (0.5, 1, 1.4, 0.7), (0.9, 3, 2.0, 1.0)]:
        weights, keep = dynmole(p, *args)
        ref = _dynmole_reference(p, *args)
        torch.testing.assert_close(weights, ref)
        assert torch.equal(keep, ref > 0)
    uniform = torch.full((1, 6), 1 / 6)
    assert tsallis_entropy(uniform, 1.1).item() == pytest.approx(1.0)
    assert tsallis_entropy(torch.eye(6)[:1], 1.1).item() == pytest.approx(0.0)
    assert bool(dynmole(uniform, 0.1, 1, 1.1, 0.9)[1].all())  # broadcast: every expert


def test_dynmole_router_losses_are_tsallis_entropy_and_official_balance() -> None:
    state = MoAState("auto")
    cfg = RouterConfig(selection="dynmole", entropy_coef=0.01, load_balance_coef=0.001, balance_norm="official",
                       **SOFTMAX)  # fmt: skip
    router = Router(16, 6, cfg, state)
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[1.0] * 5, [1.0] * 3 + [0.0] * 2])
    out = router(x, mask)
    p = (x @ router.net.weight.t()).softmax(-1).reshape(-1, 6)
    m = mask.reshape(-1)
    real = m.bool()
    entropy = tsallis_entropy(p[real], 1.1).mean()
    f = out.keep.reshape(-1, 6)[real].float().mean(0)  # kept counts / real tokens
    balance = 6 * (f * p[real].mean(0)).sum()
    torch.testing.assert_close(state.aux["entropy"][0], entropy)
    torch.testing.assert_close(state.aux["load_balance"][0], balance)


# ---- block-level FFN experts (MixLoRA) ------------------------------------------------------------------------


def _ffn_reference(mlp, ffn, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_i w_i FFN_i(x), each expert a full FFN with its own LoRA on gate, up and down."""
    e, r, s = ffn.num_experts, ffn.rank, ffn.scale
    out = 0
    for i in range(e):
        rows = slice(i * r, (i + 1) * r)

        def proj(base, a, b, z, rows=rows):  # the frozen weight directly: the module's hooks must not run
            return F.linear(z, base.weight) + s * F.linear(F.linear(z, a[rows]), b[:, rows])

        hidden = mlp.act_fn(proj(mlp.gate_proj, ffn.gate_A, ffn.gate_B, x)) * proj(
            mlp.up_proj, ffn.up_A, ffn.up_B, x
        )
        out = out + weights[..., i : i + 1] * proj(mlp.down_proj, ffn.down_A, ffn.down_B, hidden)
    return out


@pytest.mark.parametrize("method", ["mixlora", "dynmole"])
def test_ffn_experts_equal_a_mixture_of_full_ffns(method: str) -> None:
    model = get_moa_model(tiny_model(), METHODS[method])
    randomize_adapters(model, 0.3)
    layer = model.base_model.model.layers[0]
    ffn = layer.moa.ffn
    x = torch.randn(2, 7, 64)
    with torch.no_grad():
        got = layer.mlp(x)
        p = F.linear(x, ffn.router.net.weight).softmax(-1)
        if method == "mixlora":  # top-2, renormalised
            top = p.topk(2, -1)
            weights = torch.zeros_like(p).scatter(
                -1, top.indices, top.values / top.values.sum(-1, keepdim=True)
            )
        else:
            weights = _dynmole_reference(p.reshape(-1, 6), 0.75, 2, 1.1, 0.9).reshape(p.shape)
        want = _ffn_reference(layer.mlp, ffn, x, weights)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# ---- identity at init, save/load, KV-cache decoding -------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(METHODS))
def test_new_methods_start_as_the_base_model(method: str) -> None:
    base = tiny_model()
    with torch.no_grad():
        expected = base(IDS).logits
        got = get_moa_model(base, METHODS[method])(IDS).logits
    if method == "dynmole":  # weights p * mask are not renormalised: the FFN is scaled by sum(w) <= 1
        assert not torch.equal(got, expected)
        return
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_dynmole_at_init_scales_the_frozen_ffn_by_its_kept_mass() -> None:
    model = get_moa_model(tiny_model(), METHODS["dynmole"])
    layer = model.base_model.model.layers[0]
    x = torch.randn(2, 7, 64)
    with torch.no_grad(), model.disable_adapters():
        plain = layer.mlp(x)
    with torch.no_grad():
        got = layer.mlp(x)
        kept_mass = layer.moa.ffn.router(x).weights.sum(-1, keepdim=True)
    torch.testing.assert_close(got, kept_mass * plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_save_load_roundtrip(tmp_path, method: str) -> None:
    model = get_moa_model(tiny_model(), METHODS[method])
    randomize_adapters(model, 0.3)
    with torch.no_grad():
        expected = model(IDS).logits
    model.save_pretrained(tmp_path)
    loaded = MoAModel.from_pretrained(tiny_model(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, expected)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_kv_cache_decoding_equals_the_full_forward(method: str) -> None:
    model = get_moa_model(tiny_model(), METHODS[method])
    randomize_adapters(model, 0.3)
    prompt = IDS[:1, :6]
    with torch.no_grad():
        generated = model.generate(
            prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6, eos_token_id=None
        )
        logits = model(generated).logits
    assert torch.equal(logits[0, 5:-1].argmax(-1), generated[0, 6:])


def test_new_methods_train_and_get_gradients() -> None:
    for method, cfg in METHODS.items():
        model = get_moa_model(tiny_model(), cfg)
        randomize_adapters(model, 0.1)
        model.train()
        out = model(IDS, task_types=torch.tensor([0, 1]))
        (out.logits.square().mean() + model.aux_loss()).backward()
        grads = [p.grad for p in model.adapter_state_dict().values()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), method


# ---- MoSLoRA -----------------------------------------------------------------------------------------------------


def test_moslora_mixer_delta_and_merge() -> None:
    model = get_moa_model(tiny_model(), METHODS["moslora"])
    randomize_adapters(model, 0.3)
    q = model.base_model.model.layers[0].self_attn.q_proj
    expert = model.base_model.model.layers[0].moa.lora["q"]
    assert expert.mixer.shape == (8, 8)
    x = torch.randn(3, 64)
    with torch.no_grad():
        want = q.weight @ x.t() + expert.scale * expert.B @ (expert.mixer @ (expert.A @ x.t()))
        torch.testing.assert_close(q(x), want.t(), rtol=1e-5, atol=1e-6)  # through the hook
        merged = F.linear(x, q.weight + expert.merged_weight())
        torch.testing.assert_close(merged, want.t(), rtol=1e-5, atol=1e-6)
    fresh = get_moa_model(tiny_model(), METHODS["moslora"]).base_model.model.layers[0].moa.lora["q"]
    bound = 1 / math.sqrt(8)  # Kaiming-uniform a = sqrt(5) on an r x r matrix: U(-1/sqrt(r), 1/sqrt(r))
    assert fresh.mixer.abs().max() <= bound and fresh.mixer.std() > bound / 4
    with pytest.raises(MoATrainError, match="lora_mixer"):
        MoAConfig(lora_mixer=True, lora_experts=4)


# ---- LoRAMoE localized balancing constraint ------------------------------------------------------------------------


def test_localized_balance_against_hand_computation() -> None:
    w = torch.tensor([[[0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]],
                      [[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 0.7], [0.3, 0.3, 0.2, 0.2]]])  # fmt: skip
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    types = torch.tensor([1, 0])
    alpha = 0.2
    # as released: type 1 boosts the first half of the experts, type 0 the second half
    # example 0 (type 1): importance [0.5, 0.5, 0.5, 0.5], first half x1.2, second half x0.8
    # example 1 (type 0): importance [1.1, 0.5, 0.4, 1.0], second half x1.2, first half x0.8
    values = torch.tensor([0.6, 0.6, 0.4, 0.4, 0.88, 0.4, 0.48, 1.2])
    cv2 = values.var() / values.mean() ** 2
    torch.testing.assert_close(aux_losses.localized_balance(w, mask, types, alpha), cv2)


def test_loramoe_lbc_is_summed_over_sites_and_needs_task_types() -> None:
    model = get_moa_model(tiny_model(), METHODS["loramoe"])
    randomize_adapters(model, 0.3)
    model.train()
    with model.capture_gates() as gates:
        model(IDS, task_types=torch.tensor([1, 0]))
    want = sum(aux_losses.localized_balance(g, None, torch.tensor([1, 0]), 0.1) for g in gates)
    torch.testing.assert_close(model.aux_losses()["lbc"], want)
    with pytest.raises(MoATrainError, match="needs each example's task type"):
        model(IDS)


# ---- balance-loss normalisation (spec C.8) and global-batch balance --------------------------------------------------


def test_official_balance_normalisation() -> None:
    gen = torch.Generator().manual_seed(1)
    p = torch.randn(10, 8, generator=gen).softmax(-1)
    keep = torch.zeros_like(p, dtype=torch.bool).scatter(-1, p.topk(2, -1).indices, True)
    spec = aux_losses.load_balance(p, keep, None)
    official = aux_losses.load_balance(p, keep, None, norm="official")
    f_spec = keep.float().sum(0) / (10 * 2)  # share of (token, slot) assignments
    torch.testing.assert_close(spec, 8 * (f_spec * p.mean(0)).sum())
    torch.testing.assert_close(official, 2 * spec)  # counts / tokens: k x the spec formula
    tau = torch.rand(10, 1, generator=gen) / 8
    kept = p >= tau
    adamole = aux_losses.load_balance(p, kept, None, norm="official", threshold=tau)
    hand = 8 * ((kept.float().mean(0)) * (p - tau).mean(0)).sum()  # unmasked mean of (p - tau)
    torch.testing.assert_close(adamole, hand)


def _micro_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, generator=gen), torch.tensor([[1.0] * 4, [1.0, 1.0, 0.0, 0.0]])


def test_global_batch_balance_over_two_micro_batches_and_two_ranks() -> None:
    """Rank r's loss at micro-batch m: E * sum_e f_e P_e with f from micro-batches 1..m of both ranks
    (the counts are all-reduced) and P from this rank's micro-batch."""
    cfg = RouterConfig(selection="topk", top_k=2, load_balance_coef=1.0, balance_scope="global", **SOFTMAX)
    torch.manual_seed(0)
    routers = [Router(16, 4, cfg, MoAState("auto")) for _ in range(2)]
    routers[1].load_state_dict(routers[0].state_dict())  # data parallel: the same weights
    data = {(r, m): _micro_batch(10 * r + m) for r in range(2) for m in range(2)}

    def counts(rank: int, m: int):
        x, mask = data[rank, m]
        p = F.linear(x, routers[0].net.weight).softmax(-1).reshape(-1, 4)
        keep = torch.zeros_like(p).scatter(-1, p.topk(2, -1).indices, 1.0)
        real = mask.reshape(-1)
        return (keep / 2 * real[:, None]).sum(0), real.sum(), (p * real[:, None]).sum(0) / real.sum()

    losses = {}
    for rank, router in enumerate(routers):
        other = 1 - rank
        # the all-reduce: this rank's packed counts plus the other rank's for the same micro-batch
        micro = iter(range(2))

        def reduce(packed, other=other, micro=micro):
            m = next(micro)
            c, t, _ = counts(other, m)
            return packed + torch.cat([c, t.reshape(1)])

        router._state.begin_step(reduce)
        for m in range(2):
            router._state.aux = {}
            x, mask = data[rank, m]
            router(x, mask)
            losses[rank, m] = router._state.aux["load_balance"][0]
    for rank in range(2):
        for m in range(2):
            seen = [counts(r, j) for r in range(2) for j in range(m + 1)]
            f = sum(c for c, _, _ in seen) / sum(t for _, t, _ in seen)
            want = 4 * (f * counts(rank, m)[2]).sum()
            torch.testing.assert_close(losses[rank, m], want)
    assert not torch.allclose(losses[0, 0], losses[0, 1])


def test_global_balance_runs_through_the_model_step() -> None:
    cfg = METHODS["mixlora"]
    cfg = MoAConfig.from_dict({**cfg.to_dict(), "site_router": {**cfg.to_dict()["site_router"],
                                                                 "balance_scope": "global"}})  # fmt: skip
    model = get_moa_model(tiny_model(), cfg)
    model.train()
    model.begin_step()
    model(IDS[:1])
    first = model.aux_losses()["load_balance"]
    model(IDS[1:])
    assert len(model._state.step_counts) == 2  # one running total per FFN router
    total = sum(v[-1] for v in model._state.step_counts.values())
    assert total == 2 * IDS.numel()  # both micro-batches, both layers
    model.begin_step()
    model(IDS[:1])
    torch.testing.assert_close(model.aux_losses()["load_balance"], first)  # a new step starts afresh


# ---- prompt-MoE: the official form (spec C.2) -----------------------------------------------------------------------


@pytest.mark.parametrize("form", ["official", "per_group"])
def test_prompt_moe_forms_against_plain_torch(form: str) -> None:
    cfg = MoAConfig.from_dict({**METHODS["prompt_moe"].to_dict(), "prompt_moe_form": form})
    model = get_moa_model(tiny_model(), cfg)
    randomize_adapters(model, 0.5)
    layer = model.base_model.model.layers[0]
    prompt = layer.moa.prompt
    assert prompt.head_gate.shape == ((1, 4) if form == "official" else (4, 4))
    attn = layer.self_attn
    query = torch.randn(2, 4, 5, 16)  # [B, heads, T, head_dim]
    router_input = torch.randn(2, 5, 64)
    with torch.no_grad():
        got = prompt(layer.moa._attn_view, query, router_input)  # [B, T, heads, hd]
        keys = F.linear(prompt.vectors, attn.k_proj.weight).unflatten(-1, (2, 16)).repeat_interleave(2, 1)
        values = F.linear(prompt.vectors, attn.v_proj.weight).unflatten(-1, (2, 16)).repeat_interleave(2, 1)
        scores = torch.einsum("bhtd,shd->bhts", query, keys) * attn.scaling  # [B, h, T, E*L]
        w = prompt.router(router_input).weights  # [B, T, E]
        want = torch.zeros(2, 4, 5, 16)
        if form == "official":
            probs = scores.softmax(-1).unflatten(-1, (4, 10))
        else:
            probs = scores.unflatten(-1, (4, 10)).softmax(-1)
        for e in range(4):
            gate = prompt.head_gate[0 if form == "official" else e][None, :, None, None]
            group = torch.einsum("bhtl,lhd->bhtd", probs[..., e, :], values[e * 10 : (e + 1) * 10])
            want += w[..., e][:, None, :, None] * gate * group
    torch.testing.assert_close(got, want.transpose(1, 2), rtol=1e-4, atol=1e-5)


def test_router_stats_with_per_layer_expert_counts() -> None:
    model = get_moa_model(tiny_model(layers=4), METHODS["mola"])
    with torch.no_grad():
        model(IDS)
    stats = model.router_stats()
    assert stats["experts"] == [f"down.e{i}" for i in range(4)]
    assert [sum(not math.isnan(v) for v in row) for row in stats["active_frac"]] == [2, 2, 4, 4]
    assert stats["active_per_token"] == pytest.approx([2.0] * 4)  # top-2 everywhere


def test_gathered_site_top_k_under_a_block_slot_that_keeps_no_token() -> None:
    """Sparse block router + top-k site routers with sparse_impl=gather: a slot that keeps no token hands
    its site an empty input (padded_rows used to divide by zero)."""
    cfg = MoAConfig(
        lora_targets=["q", "v", "down"], lora_experts=4, pa_size=16, prompt_len=0, sparse_impl="gather",
        router=RouterConfig(kind="swiglu", selection="threshold", const_threshold=True),
        site_router=RouterConfig(kind="linear", activation="softmax", selection="topk", top_k=1),
    )  # fmt: skip
    model = get_moa_model(tiny_model(), cfg)
    randomize_adapters(model, 1.0)
    with torch.no_grad():
        for layer in model._moa_layers:  # gates < 0.5 = Γ everywhere: no slot keeps a token
            layer.router.net.w2.weight.zero_()
            layer.router.net.w2.bias.fill_(-10.0)
        out = model(IDS[:1, :6]).logits
        with model.disable_adapters():
            base = model(IDS[:1, :6]).logits
    torch.testing.assert_close(out, base)  # no expert ran


def test_task_types_come_from_a_record_field_or_the_dataset_map() -> None:
    from moa_train.data import TrainCollator, task_types

    records = [
        {"instruction": "a", "output": "1", "dataset": "boolq", "kind": 1},
        {"instruction": "b", "output": "2", "dataset": "gsm8k", "kind": None},
    ]
    by_map = task_types.assign(records, {"task_types": {"boolq": 1, "default": 0}})
    assert [r["task_type"] for r in by_map] == [1, 0]
    by_field = task_types.assign(records, {"task_type_field": "kind", "task_types": {"gsm8k": 1}})
    assert [r["task_type"] for r in by_field] == [1, 1]  # the map covers a record without the field
    assert task_types.assign(records, {}) == records
    with pytest.raises(MoATrainError, match=r"record 1 \(dataset 'gsm8k'\) has no task type"):
        task_types.assign(records, {"task_types": {"boolq": 1}})
    with pytest.raises(MoATrainError, match="needs task types"):
        task_types.check_config({"moa": {"site_router": {"lbc_coef": 0.1}}, "data": {}})
    with pytest.raises(MoATrainError, match="task types are 0 or 1"):
        task_types.check_config({"moa": {}, "data": {"task_types": {"boolq": 2}}})
    batch = TrainCollator(0)([{"input_ids": [5, 6], "labels": [-100, 6], "task_type": t} for t in (1, 0)])
    assert batch["task_types"].tolist() == [1, 0]


def test_prompt_moe_adapters_saved_before_the_form_option_load_per_group(tmp_path) -> None:
    import json

    cfg = MoAConfig.from_dict({**METHODS["prompt_moe"].to_dict(), "prompt_moe_form": "per_group"})
    model = get_moa_model(tiny_model(), cfg)
    randomize_adapters(model, 0.3)
    with torch.no_grad():
        expected = model(IDS).logits
    model.save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    del saved["moa_config"]["prompt_moe_form"]  # as written before the option existed
    config_path.write_text(json.dumps(saved))
    with torch.no_grad():
        assert torch.equal(MoAModel.from_pretrained(tiny_model(), tmp_path)(IDS).logits, expected)


def test_ffn_experts_beside_a_block_router() -> None:
    """MoA's block router over the q,k,v,o LoRA experts; the FFN experts keep their own router."""
    cfg = MoAConfig.from_dict({**METHODS["mixlora"].to_dict(), "router": {"kind": "swiglu"}})
    model = get_moa_model(tiny_model(), cfg)
    assert model._moa_layers[0].slots == ["q", "k", "v", "o"] and model._moa_layers[0].ffn is not None
    with torch.no_grad():
        assert torch.isfinite(model(IDS).logits).all()


def _global_balance_rank(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same router weights on both ranks (data parallel)
        cfg = RouterConfig(
            selection="topk", top_k=2, load_balance_coef=1.0, balance_scope="global", **SOFTMAX
        )
        state = MoAState("auto")
        router = Router(16, 4, cfg, state)
        model = MoAModel.__new__(MoAModel)  # only begin_step's rank-reduce wiring is exercised here
        model.__dict__["_state"] = state
        MoAModel.begin_step(model)
        losses = []
        for m in range(2):
            state.aux = {}
            router(*_micro_batch(10 * rank + m))
            losses.append(state.aux["load_balance"][0])
        torch.save({"losses": torch.stack(losses), "weight": router.net.weight}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: ~10-30 s of interpreter start-up
def test_global_batch_balance_all_reduces_over_real_ranks(tmp_path) -> None:
    """The trainer's path: MoAModel.begin_step() sums the counts over a real (gloo) process group."""
    import torch.multiprocessing as mp

    mp.spawn(_global_balance_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    weight = results[0]["weight"]

    def counts(rank: int, m: int):
        x, mask = _micro_batch(10 * rank + m)
        p = F.linear(x, weight).softmax(-1).reshape(-1, 4)
        keep = torch.zeros_like(p).scatter(-1, p.topk(2, -1).indices, 1.0)
        real = mask.reshape(-1)
        return (keep / 2 * real[:, None]).sum(0), real.sum(), (p * real[:, None]).sum(0) / real.sum()

    for rank in range(2):
        for m in range(2):
            seen = [counts(r, j) for r in range(2) for j in range(m + 1)]
            f = sum(c for c, _, _ in seen) / sum(t for _, t, _ in seen)
            want = 4 * (f * counts(rank, m)[2]).sum()
            torch.testing.assert_close(results[rank]["losses"][m], want)
