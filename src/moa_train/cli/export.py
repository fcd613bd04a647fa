"""``moa-export``: a checkpoint whose experts are plain LoRA per site -> a PEFT LoRA checkpoint or a merged model.

Which configurations qualify: every LoRA site holds one expert and nothing gates it per token or per
input -- the LoRA baseline, MoSLoRA (its r x r mixer folded into B: B M A = (B M) A) and constant-gate
LoRA compositions (``router=none``, LoRA only). Each site's delta is then a fixed matrix (alpha/r) B A,
which PEFT's LoRA represents exactly and which adds into the frozen weight. Routed configurations (a
block or site router, prompt experts, parallel adapters, FFN experts) compute input-dependent mixtures
and have no such matrix: they are refused with the reason and the alternative (moa-eval,
``MoAModel.generate``).

    moa-export checkpoint=runs/my_lora_run format=peft out=exports/my_lora_peft
    moa-export checkpoint=runs/my_lora_run format=merged out=exports/my_lora_merged [dtype=bfloat16]

The output is written to a temporary sibling folder and renamed into place, so ``out`` either does not
exist or is complete; an existing non-empty ``out`` is refused, never overwritten. The command line is
Hydra's, as for moa-train and moa-eval (configs/export.yaml, help in configs/hydra/help/export.yaml).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from moa_train.core.config import MoAConfig
from moa_train.errors import MoATrainError
from moa_train.files import atomic_dir
from moa_train.rundir import resolve_checkpoint

__all__ = ["DTYPES", "FORMATS", "export", "lora_deltas", "routed_reason", "run_from_config"]

FORMATS = ("peft", "merged")
DTYPES = ("auto", "float32", "bfloat16", "float16")


def routed_reason(cfg: MoAConfig) -> str | None:
    """Why a configuration's adapters are not a fixed weight delta per site (None: they are)."""
    if cfg.router.kind != "none":
        unit = "input" if cfg.router.granularity == "instance" else "token"
        return f"its block router (router.kind={cfg.router.kind}) weighs the experts per {unit}"
    if cfg.prompt_len > 0:
        return "it has prompt experts (learned prompt vectors attended to, not a weight change)"
    if cfg.pa_size > 0:
        return "it has parallel adapters (a non-linear bottleneck beside the MLP, not a weight change)"
    if cfg.has_site_routers():
        return (
            f"its sites mix several experts with a per-token router (site_router.kind={cfg.site_router.kind})"
        )
    if not cfg.lora_targets:
        return "it has no LoRA experts"
    if "experts" in cfg.lora_targets:
        return "it has LoRA on the routed experts of an MoE base (per-expert deltas PEFT LoRA does not hold)"
    return None


def lora_deltas(model: Any) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Per target module (its name in the HF model): (A [r, in], B [out, r], scale) with B M A folded.

    ``model`` is a MoAModel of a configuration :func:`routed_reason` accepts.
    """
    # deferred: core.inject loads transformers; a bad option fails before it loads
    from moa_train.core.inject import find_decoder_layers, model_family

    base = model.base_model
    names = {id(m): n for n, m in base.named_modules()}
    cfg: MoAConfig = model.moa_config
    out: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    family = model_family(base, cfg)
    fused = sorted(set(cfg.lora_targets) & set(family.fused))
    if fused:
        raise MoATrainError(
            f"LoRA on '{fused[0]}' adapts a slice of {family.name}'s fused {family.fused[fused[0]].path}; a PEFT "
            "LoRA adapts whole modules, so this checkpoint cannot be exported (evaluate it with moa-eval)"
        )
    for layer, moa in zip(find_decoder_layers(base, cfg), model._moa_layers):
        if moa is None:
            continue
        if moa.router is not None or moa.prompt is not None or moa.pa is not None:
            raise MoATrainError("internal: a routed layer reached lora_deltas")  # routed_reason guards this
        for site, expert in moa.lora.items():
            if expert.router is not None:
                raise MoATrainError("internal: a routed site reached lora_deltas")
            module = layer.get_submodule(family.path(site))
            b = expert.B.detach().float()
            if expert.mixer is not None:
                b = b @ expert.mixer.detach().float()  # MoSLoRA: B M A = (B M) A
            out[names[id(module)]] = (expert.A.detach().float().clone(), b.clone(), float(expert.scale))
    return out


def _peft_model(base: nn.Module, deltas: dict, cfg: MoAConfig, base_name: str) -> Any:
    """A PEFT LoRA model over ``base`` holding exactly ``deltas`` (rank and alpha per module)."""
    # deferred: peft is heavy and only the peft format needs it
    from peft import LoraConfig, get_peft_model

    r0, alpha0 = cfg.lora_rank, float(cfg.lora_alpha)
    rank_pattern, alpha_pattern = {}, {}
    for name, (a, _, scale) in deltas.items():
        r = a.shape[0]
        if (r, scale) != (r0, alpha0 / r0):
            # PEFT matches pattern keys as regular expressions against the module name
            rank_pattern[re.escape(name)] = r
            alpha_pattern[re.escape(name)] = scale * r
    config = LoraConfig(
        r=r0,
        lora_alpha=alpha0,
        lora_dropout=float(cfg.lora_dropout),
        target_modules=sorted(deltas),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        bias="none",
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(base, config)
    inner = peft_model.base_model.model
    with torch.no_grad():
        for name, (a, b, _) in deltas.items():
            module = inner.get_submodule(name)
            module.lora_A["default"].weight.copy_(a)
            module.lora_B["default"].weight.copy_(b)
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    return peft_model


def _merge(base: nn.Module, deltas: dict) -> None:
    """W += scale * B A for every target module (in fp32, then the weight's dtype)."""
    with torch.no_grad():
        for name, (a, b, scale) in deltas.items():
            weight = base.get_submodule(name).weight
            merged = weight.float() + scale * (b.to(weight.device) @ a.to(weight.device))
            weight.copy_(merged.to(weight.dtype))


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MoATrainError(
            f"out={out} already exists and is not empty; choose a new folder (nothing was written)"
        )


def export(
    checkpoint: str | os.PathLike[str], fmt: str, out: str | os.PathLike[str], dtype: str = "auto"
) -> Path:
    """Write ``checkpoint`` as a PEFT LoRA adapter (``fmt='peft'``) or a merged model (``'merged'``) to ``out``.

    Everything that can be checked without the model is checked first (format, dtype, out, the
    checkpoint's config and base model); nothing is written until the export is complete.
    """
    # deferred: core.model loads transformers; a bad option fails before it loads
    from moa_train.core.model import MoAModel

    if fmt not in FORMATS:
        raise MoATrainError(f"format={fmt!r} is not known; choose {' or '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise MoATrainError(f"dtype={dtype!r} is not known; choose one of {', '.join(DTYPES)}")
    out = Path(out).expanduser()
    _check_out(out)
    ckpt = resolve_checkpoint(checkpoint)
    data = MoAModel.read_config(ckpt)
    if "moa_config" not in data:
        raise MoATrainError(
            f"{ckpt / 'adapter_config.json'} has no 'moa_config'; it is not a moa_train adapter"
        )
    cfg = MoAConfig.from_dict(data["moa_config"])
    reason = routed_reason(cfg)
    if reason:
        raise MoATrainError(
            f"{ckpt} cannot be exported as LoRA: {reason}, so its adapters are no fixed weight delta; "
            f"evaluate it with moa-eval checkpoint={checkpoint}, generate with MoAModel.generate"
        )
    node = data.get("model")
    if not isinstance(node, dict) or not node:
        raise MoATrainError(f"{ckpt / 'adapter_config.json'} does not record its base model ('model'); "
                            "export needs the checkpoint of a moa-train run")  # fmt: skip
    if node.get("quantization") not in (None, "none", {}):
        raise MoATrainError(
            "the checkpoint's base model is quantized; LoRA deltas merge only into full-precision weights"
        )

    # deferred: the model stack loads only after the config validates
    from moa_train.eval.checkpoints import base_model_node
    from moa_train.models.base import load_base_model

    node = base_model_node(OmegaConf.create({"model": {}}), data)  # refuses code loading from the file
    base, tokenizer = load_base_model(node)
    model = MoAModel.from_pretrained(base, ckpt)
    deltas = lora_deltas(model)
    if not deltas:
        raise MoATrainError(f"{ckpt} has no LoRA site in any layer (lora_layers); there is nothing to export")
    base = model.unload()  # the plain HF model again: hooks and experts removed
    # complete or absent: written into a temp folder beside ``out``, renamed into place at the end
    with atomic_dir(out, keep_theirs=False) as tmp:
        if fmt == "peft":
            base_name = str(node.get("name_or_path") or node.get("name") or "")
            # the embeddings are never a target: no look-up of the base model's config (no network)
            _peft_model(base, deltas, cfg, base_name).save_pretrained(str(tmp), save_embedding_layers=False)
        else:
            _merge(base, deltas)
            if dtype != "auto":
                base.to(getattr(torch, dtype))
            base.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        _check_out(out)  # again: another process may have created it meanwhile
    return out


def run_from_config(cfg: DictConfig) -> Path:
    """The ``moa-export`` job: ``cfg`` is the composed ``export`` config (configs/export.yaml), validated."""
    missing = [k for k in ("checkpoint", "format", "out") if not cfg.get(k)]
    if missing:
        raise MoATrainError(
            f"moa-export needs {', '.join(k + '=...' for k in missing)}; see moa-export --help"
        )
    out = export(cfg.checkpoint, cfg.format, cfg.out, cfg.dtype)
    print(f"wrote {cfg.format} export of {cfg.checkpoint} to {out}")
    return out
