"""Each related-method preset (configs/experts/{dynmole,mixlora,mola,loramoe,moslora}.yaml) against its
public release: the same logits, aux losses and gradients as a plain-torch transcription of the release's
forward and loss code (tests/release_refs.py, which names repository, commit, file and function) on the
same weights, the release's defaults, initialisation, identity at init and parameter count on the
LLaMA-3.1-8B shape."""

from __future__ import annotations

import copy
import importlib.resources
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from test_core_params import llama31_8b_on_meta

import release_refs as ref
from core_helpers import randomize_adapters
from moa_train import MoAConfig, MoAModel, get_moa_model
from tiny_models import tiny_model

CONFIGS = Path(str(importlib.resources.files("moa_train.configs")))
PRESETS = ("dynmole", "mixlora", "mola", "loramoe", "moslora")
IDS = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(5))
MASK = torch.tensor([[1] * 9, [1] * 6 + [0] * 3])  # right padding: the aux losses see real and padded rows
LABELS = IDS.masked_fill(MASK == 0, -100)
SITES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
         "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}  # fmt: skip


def preset(name: str, **site_router) -> MoAConfig:
    """The preset as `experts=<name> router=none` composes it, with optional site-router overrides."""
    cfg = OmegaConf.merge(
        OmegaConf.load(CONFIGS / "experts" / f"{name}.yaml"),
        {"router": OmegaConf.load(CONFIGS / "router" / "none.yaml")},
        {"site_router": site_router},
    )
    return MoAConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))


def pair(name: str, layers: int = 2, **site_router) -> tuple[MoAModel, torch.nn.Module]:
    """(project model with random adapters, an untouched copy of the same base model)."""
    base = tiny_model(layers=layers)
    plain = copy.deepcopy(base)
    model = get_moa_model(base, preset(name, **site_router))
    randomize_adapters(model, scale=0.1, seed=1)
    return model.eval(), plain.eval()


def layers_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    return list(model.model.layers)


def experts(lora, e_count: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    r = lora.rank
    return [lora.A[e * r : (e + 1) * r] for e in range(e_count)], [
        lora.B[:, e * r : (e + 1) * r] for e in range(e_count)
    ]


def swap(layer: torch.nn.Module, site: str, module: torch.nn.Module) -> None:
    parent_name, _, leaf = SITES[site].rpartition(".")
    setattr(getattr(layer, parent_name), leaf, module)


def base_linear(layer: torch.nn.Module, site: str) -> torch.nn.Module:
    parent_name, _, leaf = SITES[site].rpartition(".")
    return getattr(getattr(layer, parent_name), leaf)


def ce(logits: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), LABELS[:, 1:].reshape(-1))


def project_run(model: MoAModel, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(input_ids=IDS, attention_mask=MASK, **kwargs).logits
    aux = model.aux_loss()
    (ce(logits) + aux).backward()
    return logits.detach(), aux.detach()


def reference_run(plain: torch.nn.Module, aux_fn) -> tuple[torch.Tensor, torch.Tensor]:
    logits = plain(input_ids=IDS, attention_mask=MASK).logits
    aux = aux_fn()
    (ce(logits) + aux).backward()
    return logits.detach(), aux.detach()


def grads(params) -> list[torch.Tensor]:
    """Gradients of the reference's per-expert tensors (zero for an expert no token picked)."""
    return [torch.zeros_like(p) if p.grad is None else p.grad for p in params]


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(
        a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()), msg=lambda m: f"{what}: {m}"
    )


def close_expert_grads(refs: list) -> None:
    """Router, A and B gradients of each routed site against its reference module."""
    for lora, module in refs:
        close(lora.router.net.weight.grad, module.router.grad, "router gradient")
        close(lora.A.grad, torch.cat(grads(module.a)), "A gradient")
        close(lora.B.grad, torch.cat(grads(module.b), dim=1), "B gradient")


# ---- forward, aux losses and gradients against the transcriptions ----------------------------------------


def test_dynmole_equals_its_release() -> None:
    """Per-site routers on gate/up/down over 6 LoRA experts (DynMoleSparseMoe.forward); one entropy and
    one balance loss over all routers of the model (_dynamic_load_balancing_loss_func)."""
    model, plain = pair("dynmole")
    site_cfg = model.moa_config.site_router
    cfg = dict(
        entropy_threshold=site_cfg.entropy_threshold, entropy_index=site_cfg.entropy_index,
        entropy_eps=site_cfg.entropy_eps, keep_top_k=site_cfg.keep_top_k, top_p=site_cfg.top_p,
        aux_coef=site_cfg.load_balance_coef, dyn_coef=site_cfg.entropy_coef,
    )  # fmt: skip
    assert cfg == {k: v for k, v in ref.RELEASE_DEFAULTS["dynmole"].items() if k in cfg}
    refs = []
    for ours, theirs in zip(layers_of(model.base_model), layers_of(plain)):
        for site in ("gate", "up", "down"):
            lora = ours.moa.lora[site]
            a, b = experts(lora, 6)
            module = ref.DynMoLELinear(
                base_linear(theirs, site), lora.router.net.weight, a, b, lora.scale, cfg
            )
            swap(theirs, site, module)
            refs.append((lora, module))
    logits, aux = project_run(model)
    ref_logits, ref_aux = reference_run(plain, lambda: ref.dynmole_router_loss(
        torch.cat([m.router_logits_ for _, m in refs]), MASK, cfg))  # fmt: skip
    close(logits, ref_logits, "logits")
    close(aux, ref_aux, "aux loss")
    close_expert_grads(refs)


def test_mixlora_equals_its_release() -> None:
    """Plain LoRA on q,k,v,o and 8 LoRA triples on the FFN under one top-2 router per layer
    (MixtralSparseMoe.forward, LlamaMLP._mixlora_forward); one balance loss pooled over layers."""
    model, plain = pair("mixlora")
    site_cfg = model.moa_config.site_router
    refs, mlps = [], []
    for ours, theirs in zip(layers_of(model.base_model), layers_of(plain)):
        for site in ("q", "k", "v", "o"):
            lora = ours.moa.lora[site]
            module = ref.LoRALinear(base_linear(theirs, site), lora.A, lora.B, lora.scale)
            swap(theirs, site, module)
            refs.append((lora, module))
        ffn, e, r = ours.moa.ffn, ours.moa.ffn.num_experts, ours.moa.ffn.rank
        loras = {
            proj: (
                list(getattr(ffn, f"{proj}_A").split(r, 0)),
                list(getattr(ffn, f"{proj}_B").split(r, 1)),
            )
            for proj in ("gate", "up", "down")
        }
        mlp = ref.MixLoRAMLP(theirs.mlp, ffn.router.net.weight, loras, ffn.scale, site_cfg.top_k)
        theirs.mlp = mlp
        mlps.append((ffn, mlp, e))
    logits, aux = project_run(model)
    ref_logits, ref_aux = reference_run(plain, lambda: site_cfg.load_balance_coef * ref.mixtral_load_balancing_loss(
        torch.cat([m.router_logits_ for _, m, _ in mlps]), 8, site_cfg.top_k, MASK))  # fmt: skip
    close(logits, ref_logits, "logits")
    close(aux, ref_aux, "aux loss")
    for lora, module in refs:
        close(lora.A.grad, module.a.grad, "attention A gradient")
        close(lora.B.grad, module.b.grad, "attention B gradient")
    for ffn, mlp, e in mlps:
        close(ffn.router.net.weight.grad, mlp.router.grad, "router gradient")
        for proj in ("gate", "up", "down"):
            params = mlp.loras[proj]
            close(getattr(ffn, f"{proj}_A").grad, torch.cat(grads(params[:e])), f"{proj} A gradient")
            close(getattr(ffn, f"{proj}_B").grad, torch.cat(grads(params[e:]), 1), f"{proj} B gradient")


@pytest.mark.parametrize("balance", [False, True])
def test_mola_equals_its_release(balance: bool) -> None:
    """Layer-wise expert counts, top-2 per site (mola_lora_hacked.py::Linear.forward); with --obalance the
    balance loss pools the 7 sites of each layer and sums over layers (load_balancing_loss_func)."""
    coef = ref.RELEASE_DEFAULTS["mola"]["aux_coef"] if balance else 0.0
    model, plain = pair("mola", layers=4, load_balance_coef=coef)
    refs, per_layer = [], []
    for ours, theirs in zip(layers_of(model.base_model), layers_of(plain)):
        mods = []
        for site in ("q", "k", "v", "o", "gate", "up", "down"):
            lora = ours.moa.lora[site]
            a, b = experts(lora, lora.num_experts)
            module = ref.TopKLoRALinear(
                base_linear(theirs, site), lora.router.net.weight, a, b, lora.scale, 2
            )
            swap(theirs, site, module)
            refs.append((lora, module))
            mods.append(module)
        per_layer.append(mods)
    assert [mods[0].a.__len__() for mods in per_layer] == [2, 4, 6, 8]

    def aux() -> torch.Tensor:
        logits = [torch.cat([m.router_logits_ for m in mods]) for mods in per_layer]
        return coef * ref.mola_balance_loss(logits, [2] * len(per_layer))

    logits, ours_aux = project_run(model)
    ref_logits, ref_aux = reference_run(plain, aux)
    close(logits, ref_logits, "logits")
    close(ours_aux, ref_aux, "aux loss")
    close_expert_grads(refs)


@pytest.mark.parametrize("task_types", [(1, 0), (0, 0), (1, 1)])
def test_loramoe_with_its_balancing_constraint_equals_its_release(task_types: tuple[int, int]) -> None:
    """Dense softmax over 8 LoRA experts at gate/up/down (peft/tuners/lora.py::Linear.forward); the
    localized balancing constraint (on, as the paper's runs) per site, summed over sites and layers."""
    model, plain = pair("loramoe", lbc_coef=0.1, lbc_alpha=0.2)
    types = torch.tensor(task_types)
    refs = []
    for ours, theirs in zip(layers_of(model.base_model), layers_of(plain)):
        for site in ("gate", "up", "down"):
            lora = ours.moa.lora[site]
            a, b = experts(lora, 8)
            module = ref.DenseLoRALinear(base_linear(theirs, site), lora.router.net.weight, a, b, lora.scale)
            swap(theirs, site, module)
            refs.append((lora, module))
    logits, aux = project_run(model, task_types=types)
    ref_logits, ref_aux = reference_run(
        plain, lambda: 0.1 * sum(ref.loramoe_lbc(m.route_weight_, types, 0.2) for _, m in refs)
    )
    close(logits, ref_logits, "logits")
    close(aux, ref_aux, "aux loss")
    for lora, module in refs:
        close(lora.router.net.weight.grad, module.router.grad, "router gradient")
        close(lora.A.grad, torch.cat(grads(module.a)), "A gradient")


def test_moslora_equals_its_release() -> None:
    model, plain = pair("moslora")
    refs = []
    for ours, theirs in zip(layers_of(model.base_model), layers_of(plain)):
        for site in ("q", "k", "v", "up", "down"):
            lora = ours.moa.lora[site]
            module = ref.MixerLoRALinear(base_linear(theirs, site), lora.A, lora.mixer, lora.B, lora.scale)
            swap(theirs, site, module)
            refs.append((lora, module))
    logits, _ = project_run(model)
    ref_logits, _ = reference_run(plain, lambda: torch.zeros(()))
    close(logits, ref_logits, "logits")
    for lora, module in refs:
        close(lora.mixer.grad, module.m.grad, "mixer gradient")
        close(lora.A.grad, module.a.grad, "A gradient")


# ---- defaults, initialisation, identity at init, parameter counts ------------------------------------------


def test_presets_carry_the_release_defaults() -> None:
    for name in PRESETS:
        moa, want = preset(name), ref.RELEASE_DEFAULTS[name]
        assert (moa.lora_rank, moa.lora_alpha, moa.lora_dropout) == (
            want["r"],
            want["alpha"],
            want["dropout"],
        ), name
    dyn = preset("dynmole")
    assert dyn.lora_targets == ["gate", "up", "down"] and dyn.lora_experts == 6 and dyn.ffn_experts == 0
    s = dyn.site_router
    assert (s.bias, s.top_p, s.keep_top_k, s.entropy_index, s.entropy_threshold, s.entropy_eps) == (
        False, 0.75, 2, 1.1, 0.9, 1e-5)  # fmt: skip
    assert (s.entropy_coef, s.load_balance_coef, s.balance_norm, s.aux_pool) == (
        0.01,
        0.001,
        "weights",
        "model",
    )
    mix = preset("mixlora")
    assert mix.lora_targets == ["q", "k", "v", "o"] and mix.ffn_experts == 8
    s = mix.site_router
    assert (s.top_k, s.load_balance_coef, s.balance_norm, s.aux_pool, s.init_std) == (
        2,
        0.001,
        "official",
        "model",
        0.02,
    )
    mola = preset("mola")
    assert mola.lora_experts == [2, 4, 6, 8] and mola.site_router.top_k == 2
    assert (mola.site_router.load_balance_coef, mola.site_router.aux_pool) == (0.0, "layer")
    lm = preset("loramoe")
    assert (lm.lora_experts, lm.site_router.selection, lm.site_router.lbc_coef) == (8, "dense", 0.0)
    assert preset("moslora").lora_mixer


@pytest.mark.parametrize("name", PRESETS)
def test_each_preset_starts_as_the_base_model(name: str) -> None:
    """Every one of these releases adds a zero delta at init (B = 0; MixLoRA's weights sum to 1)."""
    base = tiny_model(layers=4)
    plain = copy.deepcopy(base)
    model = get_moa_model(base, preset(name)).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=IDS, attention_mask=MASK).logits, plain(input_ids=IDS, attention_mask=MASK).logits
        )


def test_router_initialisation_follows_each_release() -> None:
    """MixLoRA: normal(0, 0.02) (router_init_range); the others: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(in))."""
    torch.manual_seed(0)
    mix = get_moa_model(tiny_model(), preset("mixlora")).base_model.model.layers[0].moa.ffn.router.net.weight
    assert abs(float(mix.std()) - 0.02) < 0.003
    for name, site in (("dynmole", "down"), ("mola", "q"), ("loramoe", "gate")):
        weight = (
            get_moa_model(tiny_model(), preset(name))
            .base_model.model.layers[0]
            .moa.lora[site]
            .router.net.weight
        )
        bound = ref.kaiming_bound(weight.shape[1])
        assert float(weight.abs().max()) <= bound and float(weight.std()) > 0.8 * bound / 3**0.5, name


@pytest.mark.parametrize("name", PRESETS)
def test_trainable_parameters_equal_the_release_on_llama31_8b(name: str) -> None:
    expected = ref.release_trainable_parameters(name, 4096, 14336, 32, 32, 8)
    assert get_moa_model(llama31_8b_on_meta(), preset(name)).num_trainable_parameters() == expected


@pytest.mark.parametrize("name", ["dynmole", "mixlora"])
def test_pooled_aux_losses_under_activation_checkpointing(name: str) -> None:
    """The pooled losses are formed after the forward, outside the checkpointed layers: with non-reentrant
    checkpointing (the backward replays each layer) the aux loss and every gradient stay the same."""
    results = []
    for checkpointing in (False, True):
        model, _ = pair(name)
        model.train()
        for module in model.modules():  # no dropout: both runs must compute the same function
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        if checkpointing:
            model.gradient_checkpointing_enable()
        logits = model(input_ids=IDS, attention_mask=MASK).logits
        aux = model.aux_loss()
        (ce(logits) + aux).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((aux.detach(), grads))
    (aux_plain, grads_plain), (aux_ckpt, grads_ckpt) = results
    assert float(aux_plain) > 0
    close(aux_ckpt, aux_plain, "aux loss")
    assert grads_ckpt.keys() == grads_plain.keys()
    for key in grads_plain:
        close(grads_ckpt[key], grads_plain[key], key)
