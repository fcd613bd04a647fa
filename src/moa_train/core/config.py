"""MoAConfig / RouterConfig: what to insert where, validated on construction with one-line errors."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from moa_train.errors import MoATrainError

# Sites a LoRA expert can sit on, in the fixed slot order of the block router (method spec A.4):
# attention part q, k, v, [prompt], o; FFN part up, gate, down; then the parallel adapter.
LORA_SITES = ("q", "k", "v", "o", "up", "gate", "down")
SLOT_ORDER = ("q", "k", "v", "prompt", "o", "up", "gate", "down", "pa")
# lora_targets may also name "experts": LoRA on every routed expert of an MoE base (gate/up and down of
# each expert, inside the base's expert computation and routed by the base's router), not a slot of the
# block router.
LORA_TARGETS = (*LORA_SITES, "experts")
# Default module paths inside a decoder layer (Llama, Mistral, Qwen2, Qwen3 and look-alikes).
DEFAULT_SITE_MODULES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "up": "mlp.up_proj",
    "gate": "mlp.gate_proj",
    "down": "mlp.down_proj",
    "mlp": "mlp",
    "attn": "self_attn",
}

ROUTER_KINDS = ("linear", "swiglu", "none")
ROUTER_INPUTS = ("residual", "normed")
GRANULARITIES = ("token", "instance")
GROUPS = ("expert", "type")
ACTIVATIONS = ("sigmoid", "softmax", "scaled_softmax")
SELECTIONS = ("dense", "threshold", "topk", "topp", "adamole", "dynmole")
BALANCE_NORMS = ("spec", "official", "weights")
AUX_POOLS = ("router", "layer", "model")
AUX_LOSSES = ("load_balance", "z_loss", "entropy", "lbc")
BALANCE_SCOPES = ("micro_batch", "global")
THRESHOLD_GRADS = ("none", "shifted", "ste")
SPARSE_IMPLS = ("auto", "gather", "dense")
PA_ACTIVATIONS = ("silu", "relu", "gelu", "tanh")
PROMPT_MOE_FORMS = ("official", "per_group")


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise MoATrainError(f"{name}={value!r} is not known; choose one of {', '.join(choices)}")


@dataclass
class RouterConfig:
    """How gates are computed and which experts they switch on (method spec B and C)."""

    kind: str = "linear"  # linear | swiglu | none (constant gates of 1: naive composition)
    hidden_mult: int = 4  # swiglu hidden width = hidden_mult * number of outputs
    bias: bool = True
    input: str = "residual"  # block routers: the block's residual input (official) or the normed input
    granularity: str = "token"  # token | instance (masked mean over the prompt, cached during decoding)
    groups: str = "expert"  # expert: one gate per expert | type: one gate per expert type (UniPEFT)
    activation: str = "sigmoid"  # sigmoid | softmax | scaled_softmax (E * softmax)
    selection: str = "dense"  # dense | threshold (Sparse MoA) | topk | topp | adamole
    max_threshold: float = 0.5  # Γmax of the learned threshold Γ = Γmax * σ(w·x + b)
    const_threshold: bool = False  # Γ = Γmax, no threshold network
    threshold_grad: str = "none"  # none (official code) | shifted ((g-Γ)·m) | ste
    top_k: Any = 2  # an int, or (site routers) a per-layer span map such as "0-15:2,16-31:4" (MoLA)
    top_p: float = 0.75
    # DynMoLE (selection=dynmole): top-p keeping at least keep_top_k experts; tokens whose normalised
    # Tsallis entropy (index entropy_index) exceeds entropy_threshold use every expert.
    keep_top_k: int = 2
    entropy_index: float = 1.1
    entropy_threshold: float = 0.9
    entropy_eps: float = 0.0  # added to p in the Tsallis entropy, routing and loss (DynMoLE: 1e-5)
    load_balance_coef: float = 0.0
    # spec: f_e = share of (token, kept expert) assignments (method spec C.8); official: f_e = kept
    # counts / tokens (the official Top-K code: k x the spec value) and, for AdaMoLE, P_e = mean (p - tau);
    # weights: f_e = mean routing weight of e (0 where not kept), with gradient (DynMoLE's release).
    balance_norm: str = "spec"
    # micro_batch: f_e from this forward; global: f_e from every micro-batch of the optimizer step so far,
    # summed over data-parallel ranks (global-batch load balance, docs/experiments.md).
    balance_scope: str = "micro_batch"
    z_loss_coef: float = 0.0
    entropy_coef: float = 0.0  # Shannon entropy; with selection=dynmole the normalised Tsallis entropy
    # LoRAMoE localized balancing constraint: lbc_coef x CV^2 of per-example expert importance, the half
    # of the experts matching the example's task type weighted 1 + lbc_alpha, the other half 1 - lbc_alpha.
    lbc_coef: float = 0.0
    lbc_alpha: float = 0.0
    # How the balance, z- and entropy losses pool over routers. router: one loss per router, summed over
    # every router (the MoA spec); layer: the routers of one decoder layer pooled into one loss (their
    # tokens stacked), summed over layers (MoLA's release); model: every router of the model pooled
    # into one loss (MoE-PEFT's releases: MixLoRA, DynMoLE). Routers pool only with routers of the same
    # expert count. The localized balancing constraint is always per router (LoRAMoE's release).
    aux_pool: str = "router"
    # Aux losses whose statistics count padded tokens too, as releases that do not mask them do
    # (DynMoLE's entropy, MoLA's balance, LoRAMoE's constraint); the others average over real tokens.
    aux_include_padding: list[str] = field(default_factory=list)
    init_std: float | None = (
        None  # None: nn.Linear's Kaiming-uniform (a = sqrt 5); x: normal(0, x) (MixLoRA 0.02)
    )

    def __post_init__(self) -> None:
        _choice("router.kind", self.kind, ROUTER_KINDS)
        _choice("router.input", self.input, ROUTER_INPUTS)
        _choice("router.granularity", self.granularity, GRANULARITIES)
        _choice("router.groups", self.groups, GROUPS)
        _choice("router.activation", self.activation, ACTIVATIONS)
        _choice("router.selection", self.selection, SELECTIONS)
        _choice("router.threshold_grad", self.threshold_grad, THRESHOLD_GRADS)
        if self.hidden_mult < 1:
            raise MoATrainError(f"router.hidden_mult must be >= 1, got {self.hidden_mult}")
        if not 0.0 < self.max_threshold <= 1.0:
            raise MoATrainError(f"router.max_threshold (Γmax) must be in (0, 1], got {self.max_threshold}")
        _choice("router.balance_norm", self.balance_norm, BALANCE_NORMS)
        _choice("router.balance_scope", self.balance_scope, BALANCE_SCOPES)
        _choice("router.aux_pool", self.aux_pool, AUX_POOLS)
        self.aux_include_padding = list(self.aux_include_padding or [])
        for name in self.aux_include_padding:
            _choice("router.aux_include_padding entry", name, AUX_LOSSES)
        if self.balance_scope == "global" and (self.aux_pool != "router" or self.balance_norm == "weights"):
            raise MoATrainError(
                "router.balance_scope=global counts assignments per router over the whole step; it needs "
                "router.aux_pool=router and balance_norm spec or official"
            )
        if self.entropy_eps < 0:
            raise MoATrainError(f"router.entropy_eps must be >= 0, got {self.entropy_eps}")
        if self.init_std is not None and (self.init_std <= 0 or self.kind != "linear"):
            raise MoATrainError(
                f"router.init_std={self.init_std} needs router.kind=linear and a value > 0 (null: Kaiming-uniform)"
            )
        top_ks = span_values(self.top_k, "router.top_k")
        if min(top_ks.values()) < 1:
            raise MoATrainError(f"router.top_k must be >= 1 in every layer, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            raise MoATrainError(f"router.top_p must be in (0, 1], got {self.top_p}")
        if self.keep_top_k < 1:
            raise MoATrainError(f"router.keep_top_k must be >= 1, got {self.keep_top_k}")
        if self.entropy_index <= 0 or self.entropy_index == 1.0:
            raise MoATrainError(
                f"router.entropy_index (Tsallis q) must be > 0 and != 1, got {self.entropy_index}"
            )
        if not 0.0 <= self.entropy_threshold <= 1.0:
            raise MoATrainError(f"router.entropy_threshold must be in [0, 1], got {self.entropy_threshold}")
        for name in ("load_balance_coef", "z_loss_coef", "entropy_coef", "lbc_coef"):
            if getattr(self, name) < 0:
                raise MoATrainError(f"router.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.lbc_alpha < 1.0:
            raise MoATrainError(f"router.lbc_alpha must be in [0, 1), got {self.lbc_alpha}")
        if self.kind == "none" and self.selection != "dense":
            raise MoATrainError(
                f"router.kind=none gives constant gates and cannot do selection={self.selection}; "
                "set router.kind=linear or swiglu"
            )
        if self.selection in ("topk", "topp", "adamole", "dynmole") and self.activation == "sigmoid":
            raise MoATrainError(
                f"router.selection={self.selection} needs a distribution over experts; set router.activation=softmax"
            )


@dataclass
class MoAConfig:
    """Which adapter experts go where, and how their gates are computed."""

    # LoRA experts (spec A.1); per-site rank override through lora_rank_pattern, e.g. {"down": 16}.
    lora_targets: list[str] = field(default_factory=lambda: ["q", "k", "v", "o", "down"])
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    lora_rank_pattern: dict[str, int] = field(default_factory=dict)
    lora_layers: Any = "all"  # "all" | "a-b" (half-open, as the official "0-32") | list of indices | "none"
    # > 1: homogeneous mixture at every LoRA site (MoLoRA, HydraLoRA, Top-K, AdaMoLE, LoRAMoE); an int or a
    # per-layer span map "0-7:2,8-15:4" (inclusive spans; MoLA's layer-wise allocation).
    lora_experts: Any = 1
    lora_shared_a: bool = False  # HydraLoRA: one shared A, lora_experts B heads
    lora_mixer: bool = False  # MoSLoRA: a learnable r x r mixer between A and B (single-expert LoRA)
    # Block-level FFN experts (MixLoRA, DynMoLE): each expert is a LoRA triple (lora_rank, lora_alpha,
    # lora_dropout) on gate/up/down, all under ONE site_router per FFN; an int or a span map; 0 disables.
    ffn_experts: Any = 0
    # Parallel adapter on the FFN (spec A.2); pa_size 0 disables it.
    pa_size: int = 16
    pa_activation: str = "silu"
    pa_init_gain: float = 1e-4
    pa_layers: Any = "all"
    pa_experts: int = 1  # > 1: PA-MoE (E up-projections)
    pa_shared_down: bool = False  # PA-MoE with one shared down-projection
    # Zero-gated prompt expert (spec A.3); prompt_len 0 disables it.
    prompt_len: int = 10
    prompt_layers: Any = "all"
    prompt_experts: int = 1  # > 1: prompt-MoE (E groups of prompt_len vectors)
    # prompt-MoE form: official (ONE softmax over all E*L slots, ONE per-head gate shared by the groups;
    # method spec C.2) or per_group (a softmax and a per-head gate per group)
    prompt_moe_form: str = "official"
    # The block router over all of a layer's experts, and the router of homogeneous multi-expert sites.
    router: RouterConfig = field(default_factory=lambda: RouterConfig(kind="swiglu"))
    site_router: RouterConfig = field(
        default_factory=lambda: RouterConfig(kind="linear", bias=False, activation="softmax")
    )
    sparse_impl: str = "auto"  # gather (compute only selected tokens) | dense (masked) | auto (per device)
    site_modules: dict[str, str] = field(default_factory=dict)  # override module paths, e.g. {"q": "attn.wq"}

    def __post_init__(self) -> None:
        if isinstance(self.router, dict):
            self.router = RouterConfig(**_known(self.router, RouterConfig, "router"))
        if isinstance(self.site_router, dict):
            self.site_router = RouterConfig(**_known(self.site_router, RouterConfig, "site_router"))
        self.lora_targets = [str(t).lower() for t in (self.lora_targets or [])]
        for site in self.lora_targets:
            _choice("lora target", site, LORA_TARGETS)
        if len(set(self.lora_targets)) != len(self.lora_targets):
            raise MoATrainError(f"lora_targets has duplicates: {self.lora_targets}")
        if self.lora_targets and self.lora_rank <= 0:
            raise MoATrainError(f"lora_rank must be > 0, got {self.lora_rank}")
        for site, r in dict(self.lora_rank_pattern).items():
            _choice("lora_rank_pattern site", site, LORA_TARGETS)
            if int(r) <= 0:
                raise MoATrainError(f"lora_rank_pattern[{site}] must be > 0, got {r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise MoATrainError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        for name in ("pa_experts", "prompt_experts"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise MoATrainError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if min(span_values(self.lora_experts, "lora_experts").values()) < 1:
            raise MoATrainError(f"lora_experts must be >= 1 in every layer, got {self.lora_experts!r}")
        if min(span_values(self.ffn_experts, "ffn_experts").values()) < 0:
            raise MoATrainError(f"ffn_experts must be >= 0 in every layer, got {self.ffn_experts!r}")
        self._check_ffn_and_mixer()
        if self.pa_size < 0 or self.prompt_len < 0:
            raise MoATrainError("pa_size and prompt_len must be >= 0 (0 disables the expert)")
        _choice("pa_activation", self.pa_activation, PA_ACTIVATIONS)
        _choice("prompt_moe_form", self.prompt_moe_form, PROMPT_MOE_FORMS)
        _choice("sparse_impl", self.sparse_impl, SPARSE_IMPLS)
        for key in self.site_modules:
            _choice("site_modules key", key, tuple(DEFAULT_SITE_MODULES))
        for name in ("lora_layers", "pa_layers", "prompt_layers"):
            parse_layers(getattr(self, name), None, name)  # syntax check now; range check at injection
        if not self.expert_types():
            raise MoATrainError(
                "the config enables no expert: set lora_targets, ffn_experts > 0, pa_size > 0 or prompt_len > 0"
            )
        if not isinstance(self.router.top_k, int):
            raise MoATrainError(
                f"router.top_k={self.router.top_k!r}: per-layer maps are for site routers (moa.site_router.top_k)"
            )
        n_block = self.max_block_experts()
        if self.router.kind != "none" and n_block == 0:
            raise MoATrainError(
                "the block router (moa.router) has no expert to gate: block-level FFN experts have their own "
                "router (moa.site_router); set router=none or add lora_targets / pa_size / prompt_len"
            )
        if self.router.kind != "none" and self.router.selection == "topk" and self.router.top_k > n_block:
            raise MoATrainError(f"router.top_k={self.router.top_k} exceeds the {n_block} experts of a block")
        self._check_site_top_k()
        if self.site_router.granularity != "token" or self.site_router.groups != "expert":
            raise MoATrainError("site_router supports granularity=token and groups=expert only")

    def _check_ffn_and_mixer(self) -> None:
        if self.has_ffn_experts():
            both = sorted(set(self.lora_targets) & {"gate", "up", "down"})
            if both:
                raise MoATrainError(
                    f"ffn_experts puts LoRA experts on gate/up/down already; drop {both} from lora_targets"
                )
            if self.lora_rank <= 0:
                raise MoATrainError(f"lora_rank must be > 0 for ffn_experts, got {self.lora_rank}")
        if self.lora_mixer and (self.lora_shared_a or self.lora_experts != 1):
            raise MoATrainError("lora_mixer (MoSLoRA) needs single-expert LoRA: set lora_experts=1")

    def _check_site_top_k(self) -> None:
        """site_router.top_k <= the experts of every layer that routes with it (per-layer maps allowed)."""
        router = self.site_router
        if router.selection not in ("topk", "dynmole"):
            return
        k_of = span_values(
            router.top_k if router.selection == "topk" else router.keep_top_k, "site_router.top_k"
        )
        pools = [("lora_experts", self.lora_experts), ("ffn_experts", self.ffn_experts)]
        pools += [(n, getattr(self, n)) for n in ("pa_experts", "prompt_experts")]
        for name, spec in pools:
            counts = span_values(spec, name)
            for layer, n in counts.items():
                k = k_of.get(layer, k_of.get(ALL_LAYERS))
                if layer == ALL_LAYERS and k is None:
                    k = max(k_of.values())
                if n > 1 and k is not None and k > n:
                    where = (
                        "every layer"
                        if layer == ALL_LAYERS
                        else f"layer group {-2 - layer}"
                        if layer < ALL_LAYERS
                        else f"layer {layer}"
                    )
                    what = "top_k" if router.selection == "topk" else "keep_top_k"
                    raise MoATrainError(f"site_router.{what}={k} exceeds the {n} experts ({name}) of {where}")

    def has_ffn_experts(self) -> bool:
        return max(span_values(self.ffn_experts, "ffn_experts").values()) > 0

    def has_site_routers(self) -> bool:
        """True when some site has more than one expert (and so its own site router)."""
        most = max(span_values(self.lora_experts, "lora_experts").values()) if self.lora_targets else 1
        return max(most, self.pa_experts, self.prompt_experts) > 1 or self.has_ffn_experts()

    def for_layer(self, index: int, num_layers: int) -> MoAConfig:
        """This config with every per-layer span map resolved to layer ``index``'s value."""
        experts = layer_value(self.lora_experts, index, num_layers, "lora_experts")
        ffn = layer_value(self.ffn_experts, index, num_layers, "ffn_experts")
        top_k = layer_value(self.site_router.top_k, index, num_layers, "site_router.top_k")
        if (experts, ffn, top_k) == (self.lora_experts, self.ffn_experts, self.site_router.top_k):
            return self
        site_router = dataclasses.replace(self.site_router, top_k=top_k)
        return dataclasses.replace(self, lora_experts=experts, ffn_experts=ffn, site_router=site_router)

    def expert_types(self) -> list[str]:
        types = []
        if self.lora_targets:
            types.append("lora")
        if self.has_ffn_experts():
            types.append("ffn")
        if self.prompt_len > 0:
            types.append("prompt")
        if self.pa_size > 0:
            types.append("pa")
        return types

    def max_block_experts(self) -> int:
        sites = [s for s in self.lora_targets if s != "experts"]  # routed-expert LoRA: the base router's
        return len(sites) + (self.prompt_len > 0) + (self.pa_size > 0)

    def rank_for(self, site: str) -> int:
        return int(self.lora_rank_pattern.get(site, self.lora_rank))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MoAConfig:
        return cls(**_known(dict(data), cls, "moa"))


def _known(data: dict[str, Any], cls: type, where: str) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise MoATrainError(f"unknown {where} option(s) {unknown}; valid options: {', '.join(sorted(names))}")
    return {
        k: (dict(v) if hasattr(v, "items") else list(v) if isinstance(v, (list, tuple)) else v)
        for k, v in data.items()
    }


def parse_layers(spec: Any, num_layers: int | None, name: str = "layers") -> list[int] | None:
    """Turn "all" / "a-b" (half-open) / "none" / a list of indices into layer indices.

    With ``num_layers=None`` only the syntax is checked and None is returned.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "all"):
        return None if num_layers is None else list(range(num_layers))
    if isinstance(spec, str):
        text = spec.strip().lower()
        if text in ("none", ""):
            return [] if num_layers is not None else None
        parts = text.split("-")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise MoATrainError(
                f"{name}={spec!r} is not a layer span; use 'all', 'none', 'a-b' or a list of indices"
            )
        lo, hi = int(parts[0]), int(parts[1])
        indices = list(range(lo, hi))
    else:
        try:
            indices = [int(i) for i in spec]
        except (TypeError, ValueError):
            raise MoATrainError(
                f"{name}={spec!r} is not a layer span; use 'all', 'none', 'a-b' or a list"
            ) from None
    if num_layers is None:
        return None
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
        raise MoATrainError(
            f"{name}={spec!r} names layers {bad} but the model has {num_layers} layers (0-{num_layers - 1})"
        )
    return sorted(set(indices))


ALL_LAYERS = -1  # key of span_values() for a plain int: the value of every layer


def span_values(spec: Any, name: str) -> dict[int, int]:
    """Parse a per-layer count: an int (every layer), a span map "0-7:2,8-15:4,16:6" (inclusive layer
    spans) or a list [2, 4, 6, 8] (the layers split into len(list) consecutive, near-equal groups: layer l
    of L gets list[l * len(list) // L]; on 32 layers [2, 4, 6, 8] is "0-7:2,8-15:4,16-23:6,24-31:8").

    Returns {layer: value} for a span map, {ALL_LAYERS: value} for an int and {-2 - i: list[i]} for a
    list (group keys, resolved by layer_value). Syntax only: layer ranges are checked by layer_value().
    """
    hint = (
        "use an integer, a span map like '0-7:2,8-15:4' (inclusive layer spans) or a list like [2, 4, 6, 8]"
    )
    if isinstance(spec, bool):
        raise MoATrainError(f"{name}={spec!r} is not a count; {hint}")
    if isinstance(spec, int):
        return {ALL_LAYERS: spec}
    if isinstance(spec, (list, tuple)):
        if not spec or not all(isinstance(v, int) and not isinstance(v, bool) for v in spec):
            raise MoATrainError(f"{name}={list(spec)!r} is not a list of integers; {hint}")
        return {-2 - i: v for i, v in enumerate(spec)}
    text = str(spec).strip()
    if text.lstrip("-").isdigit():
        return {ALL_LAYERS: int(text)}
    values: dict[int, int] = {}
    for part in text.split(","):
        span, sep, value = part.strip().partition(":")
        bounds = span.split("-")
        digits = all(b.strip().isdigit() for b in bounds) and value.strip().isdigit()
        if not sep or not digits or len(bounds) > 2:
            raise MoATrainError(f"{name}={spec!r} is not a per-layer count; {hint}")
        lo, hi = int(bounds[0]), int(bounds[-1])
        if hi < lo:
            raise MoATrainError(f"{name}={spec!r}: span '{span.strip()}' ends before it starts")
        for layer in range(lo, hi + 1):
            if layer in values:
                raise MoATrainError(f"{name}={spec!r} gives layer {layer} twice")
            values[layer] = int(value)
    return values


def layer_value(spec: Any, index: int, num_layers: int, name: str) -> int:
    """The value of an int or span map (see span_values) for layer ``index`` of a ``num_layers`` model."""
    values = span_values(spec, name)
    if ALL_LAYERS in values:
        return values[ALL_LAYERS]
    if isinstance(spec, (list, tuple)):
        return int(spec[index * len(spec) // num_layers])
    beyond = sorted(i for i in values if i >= num_layers)
    if beyond:
        raise MoATrainError(
            f"{name}={spec!r} names layers {beyond} but the model has {num_layers} layers (0-{num_layers - 1})"
        )
    if index not in values:
        missing = [i for i in range(num_layers) if i not in values]
        raise MoATrainError(
            f"{name}={spec!r} gives no value for layers {missing}; cover every layer 0-{num_layers - 1}"
        )
    return values[index]


# ----------------------------------------------------------------------------------------------------
# A moa node as read from a config file or a checkpoint (plain dict): field types, then MoAConfig
# ----------------------------------------------------------------------------------------------------


def check_moa_config(plain: dict[str, Any], where: str) -> None:
    """A ``moa`` node (from the config or a checkpoint's ``moa_config``): field types, then MoAConfig."""
    _check_types(plain, MoAConfig(), where)
    for sub in ("router", "site_router"):
        if isinstance(plain.get(sub), dict):
            _check_types(plain[sub], RouterConfig(), f"{where}.{sub}")
    try:
        MoAConfig.from_dict(plain)
    except MoATrainError as exc:
        raise MoATrainError(f"{where}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise MoATrainError(f"{where}: {exc}; check the moa values") from None


def _check_types(values: dict[str, Any], defaults: Any, where: str) -> None:
    for f in dataclasses.fields(defaults):
        if f.name not in values:
            continue
        if f.type in ("Any", Any):
            continue  # per-layer counts and layer specs (int, span map or list): checked by MoAConfig
        value, default = values[f.name], getattr(defaults, f.name)
        expected = type(default)
        if expected is bool:
            ok = isinstance(value, bool)
        elif expected is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif expected is float:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        elif expected is str:
            ok = isinstance(value, str)
        else:
            continue  # lists, dicts, layer specs: checked by MoAConfig
        if not ok:
            noun = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[expected]
            raise MoATrainError(
                f"{where}.{f.name}={_shown(value)} is invalid: expected {noun} (default {default!r})"
            )


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)
