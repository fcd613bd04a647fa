"""The one place that finds sites in a stock Hugging Face causal LM and wires experts and routers in.

Nothing of transformers is copied or patched. Where a family keeps its sites (module paths, fused
projections, the attention's input norm, routed experts) is data in families.py; for every family we
attach a ``moa`` MoALayer to every decoder layer and install hooks —
  * decoder-layer forward pre-hook: the block router computes this layer's gates from its input;
  * forward hooks on q/k/v/o/up/gate/down projections: output += gated LoRA delta of the site input
    (a site that is a slice of a fused projection adds its delta to that slice's rows only);
  * block-level FFN experts (ffn_experts): hooks on gate/up record the frozen outputs, a pre-hook on
    down feeds it the routed mix of the experts' hidden states, a hook on down adds their deltas;
  * forward hook on the MLP: output += gated parallel adapter of the MLP input (the FFN-norm output);
  * an attention function registered with transformers' AttentionInterface (``moa_<impl>``): it runs
    the model's own attention, then adds the gated prompt attention of the post-RoPE queries;
  * LoRA on the routed experts of an MoE base: an experts function registered with transformers'
    ExpertsInterface (``moa_<impl>``, experts/routed.py) adds each expert's delta inside its computation;
  * a model-level pre-hook that records the padding mask, the instance mask and prefill vs decode.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from moa_train.core.config import LORA_SITES, MoAConfig, parse_layers
from moa_train.core.experts import routed
from moa_train.core.families import AttentionView, Family, family_of, find_layers
from moa_train.core.layer import MoALayer, MoAState
from moa_train.core.segments import instance_fallback, segment_index
from moa_train.errors import MoATrainError

ATTN_PREFIX = "moa_"


def model_family(model: nn.Module, cfg: MoAConfig | None = None) -> Family:
    """The family of ``model``, with the user's ``moa.site_modules`` overriding its module paths."""
    family = family_of(model)
    if cfg is None or not cfg.site_modules:
        return family
    fused = {s: f for s, f in family.fused.items() if s not in cfg.site_modules}
    missing = {s: why for s, why in family.missing.items() if s not in cfg.site_modules}
    return dataclasses.replace(
        family, sites={**family.sites, **cfg.site_modules}, fused=fused, missing=missing
    )


def find_decoder_layers(model: nn.Module, cfg: MoAConfig | None = None) -> nn.ModuleList:
    """The ModuleList of decoder layers (``model.model.layers`` for Llama, ``gpt_neox.layers`` ...)."""
    return find_layers(model, model_family(model, cfg))


Rows = slice | torch.Tensor | None  # the output rows of a site in a fused projection (None: all)


def _site_module(layer: nn.Module, family: Family, site: str, index: int) -> nn.Module:
    return _site(layer, family, site, index, None)[0]


def _site(layer: nn.Module, family: Family, site: str, index: int, shape) -> tuple[nn.Module, Rows]:
    """The module of ``site`` in decoder layer ``index`` and, in a fused projection, its rows.
    ``shape`` = (heads, kv_heads, head_dim) of the attention (for the row layout of fused q/k/v)."""
    if site in family.missing:
        raise MoATrainError(f"no '{site}' site in {family.name} decoder layers: {family.missing[site]}")
    path = family.path(site)
    try:
        module = layer.get_submodule(path)
    except AttributeError:
        names = sorted(n for n, m in layer.named_modules() if n and isinstance(m, nn.Linear))
        raise MoATrainError(
            f"target '{site}' expects module '{path}' in decoder layer {index} ({family.name}), which has: "
            f"{', '.join(names) or 'no linear layers'}; set moa.site_modules.{site}=<one of these>"
        ) from None
    fused = family.fused.get(site)
    if fused is None or shape is None:
        return module, None
    rows = fused.rows(module.out_features, *shape)
    if isinstance(rows, torch.Tensor):
        rows = rows.to(module.weight.device)
    return module, rows


def _width(module: nn.Module, rows: Rows) -> int:
    if rows is None:
        return module.out_features
    return rows.stop - rows.start if isinstance(rows, slice) else int(rows.numel())


def _model_attention(module: nn.Module, implementation: str) -> Callable:
    if implementation == "eager":
        return sys.modules[type(module).__module__].eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _moa_attention(module, query, key, value, attention_mask, **kwargs):
    """The model's own attention, plus the gated prompt expert of this layer (when it has one).

    The prompt expert reads the family's attention traits (scale, soft-cap, k norm) from
    families.AttentionView; sliding windows do not apply to it (its slots have no position)."""
    moa_layer: MoALayer | None = module.__dict__.get("_moa_layer")
    implementation = module.config._attn_implementation.removeprefix(ATTN_PREFIX)
    out, weights = _model_attention(module, implementation)(
        module, query, key, value, attention_mask, **kwargs
    )
    if moa_layer is not None and moa_layer._state.enabled:
        delta = moa_layer.prompt_delta(module, query)
        out = out + (delta if delta.dtype == out.dtype else delta.to(out.dtype))
    return out, weights


def _use_moa_attention(model: nn.Module) -> None:
    config = model.config
    current = config._attn_implementation or "eager"
    if current.startswith(ATTN_PREFIX):
        return
    name = ATTN_PREFIX + current
    ALL_ATTENTION_FUNCTIONS.register(name, _moa_attention)
    if current in ALL_MASK_ATTENTION_FUNCTIONS:
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    config._attn_implementation = name


def restore_attention(model: nn.Module) -> None:
    impl = model.config._attn_implementation
    if impl and impl.startswith(ATTN_PREFIX):
        model.config._attn_implementation = impl.removeprefix(ATTN_PREFIX)
    routed.unregister(model)


def inject(model: nn.Module, cfg: MoAConfig, state: MoAState) -> tuple[list[MoALayer | None], list]:
    """Attach a MoALayer to every decoder layer that gets an expert; return them and the hook handles."""
    family = model_family(model, cfg)
    layers = find_layers(model, family)
    n = len(layers)
    has_lora = bool(cfg.lora_targets) or cfg.has_ffn_experts()
    lora_layers = set(parse_layers(cfg.lora_layers, n, "lora_layers")) if has_lora else set()
    pa_layers = set(parse_layers(cfg.pa_layers, n, "pa_layers")) if cfg.pa_size > 0 else set()
    prompt_layers = set(parse_layers(cfg.prompt_layers, n, "prompt_layers")) if cfg.prompt_len > 0 else set()
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    hidden, heads = text_config.hidden_size, text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or hidden // heads
    shape = (heads, getattr(text_config, "num_key_value_heads", None) or heads, head_dim)
    targets = [s for s in cfg.lora_targets if s != "experts"]
    handles: list = []
    any_routed = False
    moa_layers: list[MoALayer | None] = []
    for index, layer in enumerate(layers):
        layer_cfg = cfg.for_layer(index, n)  # per-layer expert counts and top-k (MoLA span maps)
        sites = {s: _site(layer, family, s, index, shape) for s in targets} if index in lora_layers else {}
        ffn_sites = _ffn_sites(layer, family, index) if index in lora_layers and layer_cfg.ffn_experts else {}
        experts = (
            _routed_experts(layer, family, index)
            if index in lora_layers and "experts" in cfg.lora_targets
            else None
        )
        use_pa, use_prompt = index in pa_layers, index in prompt_layers
        if not (sites or ffn_sites or experts is not None or use_pa or use_prompt):
            moa_layers.append(None)
            continue
        shapes = {s: (m.in_features, _width(m, rows)) for s, (m, rows) in sites.items()}
        ffn = None
        if ffn_sites:
            gate = ffn_sites["gate"]
            ffn = (gate.in_features, gate.out_features, ffn_sites["act_fn"])
        reference = next(p for p in layer.parameters())
        with torch.device(reference.device):
            moa = MoALayer(layer_cfg, shapes, hidden, heads, use_prompt, use_pa, state, ffn)
            if experts is not None:  # LoRA on the routed experts: a LoRA site, not a slot of the block router
                moa.lora["experts"] = routed.RoutedLoRA(
                    experts, cfg.rank_for("experts"), cfg.lora_alpha, cfg.lora_dropout, state
                )
        moa.float()  # adapters train in fp32 whatever the base dtype (spec D.1)
        layer.moa = moa
        norm = family.attn_norm and getattr(layer, family.attn_norm, None)
        moa.__dict__["_attn_norm"] = norm  # what a normed router reads (None: the residual itself)
        moa_layers.append(moa)
        handles.append(layer.register_forward_pre_hook(_route_hook(moa, state), with_kwargs=True))
        for site, (module, rows) in sites.items():
            handles.append(module.register_forward_hook(_site_hook(moa, state, site, rows)))
        if experts is not None:
            experts.__dict__["_moa_routed"] = moa.lora["experts"]  # plain attribute, read by routed_forward
            any_routed = True
        if ffn_sites:
            handles += _ffn_hooks(moa, state, ffn_sites)
        if use_pa:
            mlp = _site_module(layer, family, "mlp", index)
            handles.append(mlp.register_forward_hook(_pa_hook(moa, state)))
        if use_prompt:
            attn = _site_module(layer, family, "attn", index)
            k, v = (_site(layer, family, s, index, shape) for s in ("k", "v"))
            moa.__dict__["_attn_view"] = AttentionView(attn, k, v, head_dim)
            attn.__dict__["_moa_layer"] = moa  # plain attribute: not a second registration of the module
    if "experts" in cfg.lora_targets and lora_layers and not any_routed:
        raise MoATrainError(
            f"lora target 'experts' is LoRA on the routed experts of an MoE base, and {family.name} has no "
            "routed experts; drop 'experts' from moa.lora_targets"
        )
    if prompt_layers:
        _use_moa_attention(model)
    if any_routed:
        routed.register(model)
    handles.append(model.register_forward_pre_hook(_model_hook(state, moa_layers), with_kwargs=True))
    if family.moe_experts is not None:
        coef = float(getattr(text_config, "router_aux_loss_coef", 0.0) or 0.0)
        handles.append(model.register_forward_hook(_base_aux_hook(state, coef), with_kwargs=True))
    return moa_layers, handles


def _base_aux_hook(state: MoAState, coef: float):
    """Report an MoE base's own router aux loss (when its config asks for it: output_router_logits) as
    ``base_router`` beside moa_train's router losses. With labels the base already added coef x it to
    its ``loss``, so it is reported with coefficient 0 (no double count); without labels (moa-train
    computes the loss from the logits) it enters ``aux_loss()`` with the base's own coefficient."""

    def hook(module, args, kwargs, output):
        aux = getattr(output, "aux_loss", None)
        if state.enabled and isinstance(aux, torch.Tensor):
            state.add_aux("base_router", aux, 0.0 if kwargs.get("labels") is not None else coef)

    return hook


def _ffn_sites(layer: nn.Module, family: Family, index: int) -> dict:
    """gate/up/down projections and the MLP activation of a layer that gets block-level FFN experts."""
    fused = sorted(s for s in ("gate", "up") if s in family.fused)
    if fused:
        raise MoATrainError(
            f"ffn_experts needs separate gate and up projections; {family.name}'s MLP has a fused "
            f"{family.fused[fused[0]].path.rsplit('.', 1)[-1]} (use lora_targets with gate/up instead)"
        )
    act = family.act and getattr(_site_module(layer, family, "mlp", index), family.act, None)
    if act is None or "gate" in family.missing:
        raise MoATrainError(
            f"ffn_experts needs a gated MLP with an activation (Llama style); decoder layer {index} of "
            f"{family.name} has none"
        )
    found = {s: _site_module(layer, family, s, index) for s in ("gate", "up", "down")}
    return {**found, "act_fn": act}


def _routed_experts(layer: nn.Module, family: Family, index: int) -> nn.Module | None:
    """The experts module of layer ``index``'s MoE block (None: a dense layer of an MoE model)."""
    if family.moe_experts is None:
        return None
    try:
        return layer.get_submodule(family.moe_experts)
    except AttributeError:
        return None  # e.g. Qwen3-MoE's mlp_only_layers


def _ffn_hooks(moa: MoALayer, state: MoAState, sites: dict) -> list:
    """Block-level FFN experts (experts/ffn.py): record the frozen gate/up outputs, replace the down
    projection's input by the routed mix of the experts' hidden states, add the experts' down deltas."""
    ffn = moa.ffn

    def gate_hook(module, args, output):
        if state.enabled:
            ffn.remember(x=args[0], base_gate=output)

    def up_hook(module, args, output):
        if state.enabled:
            ffn.remember(base_up=output)

    def down_pre_hook(module, args):
        if not state.enabled:
            return None
        mixed = ffn.mixed_hidden()
        return (mixed if mixed.dtype == args[0].dtype else mixed.to(args[0].dtype),)

    def down_hook(module, args, output):
        if not state.enabled:
            return None
        delta = ffn.down_delta()
        return output + (delta if delta.dtype == output.dtype else delta.to(output.dtype))

    return [
        sites["gate"].register_forward_hook(gate_hook),
        sites["up"].register_forward_hook(up_hook),
        sites["down"].register_forward_pre_hook(down_pre_hook),
        sites["down"].register_forward_hook(down_hook),
    ]


def _route_hook(moa: MoALayer, state: MoAState):
    def hook(layer, args, kwargs):
        if state.enabled:
            moa.route(layer, args[0] if args else kwargs["hidden_states"])

    return hook


def _site_hook(moa: MoALayer, state: MoAState, site: str, rows: Rows = None):
    expert = moa.lora[site]
    assert site in LORA_SITES

    def hook(module, args, output):
        if not state.enabled:
            return None
        delta = moa.delta(site, args[0], expert)
        delta = delta if delta.dtype == output.dtype else delta.to(output.dtype)
        if rows is None:
            return output + delta
        if isinstance(rows, slice):  # a block of a fused projection: add to those rows only
            return torch.cat(
                [output[..., : rows.start], output[..., rows] + delta, output[..., rows.stop :]], -1
            )
        return output.index_add(-1, rows, delta)  # interleaved rows (GPT-NeoX query_key_value)

    return hook


def _pa_hook(moa: MoALayer, state: MoAState):
    def hook(module, args, output):
        if not state.enabled:
            return None
        delta = moa.delta("pa", args[0], moa.pa)
        return output + (delta if delta.dtype == output.dtype else delta.to(output.dtype))

    return hook


def _model_hook(state: MoAState, moa_layers: list[MoALayer | None]):
    def hook(module, args, kwargs):
        tokens = kwargs.get("input_ids", args[0] if args else None)
        if tokens is None:
            tokens = kwargs.get("inputs_embeds")
        length = tokens.shape[1]
        attention_mask = kwargs.get("attention_mask")
        token_mask = None
        if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
            token_mask = attention_mask[:, -length:].to(torch.float32)
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        segments = None
        if state.segment_ids is not None:  # packed rows: real tokens are those with a segment
            segments = segment_index(state.segment_ids[:, -length:])
            token_mask = segments[1].to(torch.float32)
        state.segments = segments
        state.is_prefill = (
            cache is None or not hasattr(cache, "get_seq_length") or cache.get_seq_length() == 0
        )
        state.token_mask = token_mask
        # Instance routers average over the prompt: labels of -100 mark it during training (fixes spec G.12).
        instance = state.explicit_instance_mask
        labels = kwargs.get("labels")
        if instance is None and isinstance(labels, torch.Tensor):
            prompt = (labels == -100).to(torch.float32)
            instance = prompt if token_mask is None else prompt * token_mask
            if segments is not None:  # an example with no prompt: all its real tokens (per example)
                instance = instance_fallback(instance, token_mask, segments)
            else:
                empty = instance.sum(1, keepdim=True) == 0  # a row with no prompt: all real tokens
                fallback = token_mask if token_mask is not None else torch.ones_like(instance)
                instance = torch.where(empty, fallback, instance)
        state.instance_mask = instance
        state.aux = {}

    return hook
