"""MoAConfig / RouterConfig: what to insert where, validated on construction with one-line errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from moa_train.errors import MoATrainError

# Sites a LoRA expert can sit on, in the fixed slot order of the block router (method spec A.4):
# attention part q, k, v, [prompt], o; FFN part up, gate, down; then the parallel adapter.
LORA_SITES = ("q", "k", "v", "o", "up", "gate", "down")
SLOT_ORDER = ("q", "k", "v", "prompt", "o", "up", "gate", "down", "pa")
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
SELECTIONS = ("dense", "threshold", "topk", "topp", "adamole")
THRESHOLD_GRADS = ("none", "shifted", "ste")
SPARSE_IMPLS = ("auto", "gather", "dense")
PA_ACTIVATIONS = ("silu", "relu", "gelu", "tanh")


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
    top_k: int = 2
    top_p: float = 0.75
    load_balance_coef: float = 0.0
    z_loss_coef: float = 0.0
    entropy_coef: float = 0.0

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
        if self.top_k < 1:
            raise MoATrainError(f"router.top_k must be >= 1, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise MoATrainError(f"router.top_p must be in (0, 1], got {self.top_p}")
        if self.kind == "none" and self.selection != "dense":
            raise MoATrainError(
                f"router.kind=none gives constant gates and cannot do selection={self.selection}; "
                "set router.kind=linear or swiglu"
            )
        if self.selection in ("topk", "topp", "adamole") and self.activation == "sigmoid":
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
    lora_experts: int = 1  # > 1: homogeneous mixture at every LoRA site (MoLoRA, HydraLoRA, Top-K, AdaMoLE)
    lora_shared_a: bool = False  # HydraLoRA: one shared A, lora_experts B heads
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
            _choice("lora target", site, LORA_SITES)
        if len(set(self.lora_targets)) != len(self.lora_targets):
            raise MoATrainError(f"lora_targets has duplicates: {self.lora_targets}")
        if self.lora_targets and self.lora_rank <= 0:
            raise MoATrainError(f"lora_rank must be > 0, got {self.lora_rank}")
        for site, r in dict(self.lora_rank_pattern).items():
            _choice("lora_rank_pattern site", site, LORA_SITES)
            if int(r) <= 0:
                raise MoATrainError(f"lora_rank_pattern[{site}] must be > 0, got {r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise MoATrainError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        for name in ("lora_experts", "pa_experts", "prompt_experts"):
            if getattr(self, name) < 1:
                raise MoATrainError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.pa_size < 0 or self.prompt_len < 0:
            raise MoATrainError("pa_size and prompt_len must be >= 0 (0 disables the expert)")
        _choice("pa_activation", self.pa_activation, PA_ACTIVATIONS)
        _choice("sparse_impl", self.sparse_impl, SPARSE_IMPLS)
        for key in self.site_modules:
            _choice("site_modules key", key, tuple(DEFAULT_SITE_MODULES))
        for name in ("lora_layers", "pa_layers", "prompt_layers"):
            parse_layers(getattr(self, name), None, name)  # syntax check now; range check at injection
        if not self.expert_types():
            raise MoATrainError(
                "the config enables no expert: set lora_targets, pa_size > 0 or prompt_len > 0"
            )
        n_block = self.max_block_experts()
        if self.router.kind != "none" and self.router.selection == "topk" and self.router.top_k > n_block:
            raise MoATrainError(f"router.top_k={self.router.top_k} exceeds the {n_block} experts of a block")
        n_site = max(self.lora_experts, self.pa_experts, self.prompt_experts)
        if n_site > 1 and self.site_router.selection == "topk" and self.site_router.top_k > n_site:
            raise MoATrainError(
                f"site_router.top_k={self.site_router.top_k} exceeds the {n_site} experts of a site"
            )
        if self.site_router.granularity != "token" or self.site_router.groups != "expert":
            raise MoATrainError("site_router supports granularity=token and groups=expert only")

    def expert_types(self) -> list[str]:
        types = []
        if self.lora_targets:
            types.append("lora")
        if self.prompt_len > 0:
            types.append("prompt")
        if self.pa_size > 0:
            types.append("pa")
        return types

    def max_block_experts(self) -> int:
        return len(self.lora_targets) + (self.prompt_len > 0) + (self.pa_size > 0)

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
