"""Base causal LMs for MoA: the cached SmolLM2 default, hub checkpoints, and random-init architectures.

``load_base_model(model_cfg)`` reads the Hydra ``model`` group node (see ``configs/model/*.yaml``):

=====================  =========================================================================
field                  meaning
=====================  =========================================================================
``name``               short label (run names, checkpoints' record of the base model)
``source``             ``smollm2`` | ``hub`` | ``arch`` | ``tiny_random``
``name_or_path``       hub id or local directory (``hub`` only)
``dtype``              ``float32`` | ``bfloat16`` | ``float16`` (weights of the loaded model)
``attn_implementation`` ``sdpa`` (default) | ``eager``
``arch``               inline transformers config dict incl. ``model_type`` (``arch``/``tiny_random``)
``tokenizer``          where the tokenizer comes from: null = the model's own, ``smollm2``, or a hub
                       id / local directory
``meta_device``        build an ``arch`` model on the meta device (shapes only, for dry runs)
``init_seed``          seed of the random init (``arch`` on a real device, ``tiny_random``)
``quantization``       null | ``nf4`` | ``fp4`` | ``int8``: a frozen bitsandbytes base (QLoRA style);
                       its non-quantized weights and the 4-bit compute/storage dtype are ``dtype``
=====================  =========================================================================

The SmolLM2 default (``source=smollm2``) is converted from its GGUF by :mod:`moa_train.models.smollm2`.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import constants
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors.torch import save_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, GenerationConfig

from moa_train.errors import MoATrainError
from moa_train.models.options import ATTN_IMPLEMENTATIONS, DTYPE_NAMES, QUANTIZATIONS, SOURCES
from moa_train.models.progress import no_progress_bars
from moa_train.models.smollm2 import smollm2_dir, smollm2_tokenizer_dir

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """Field of a dict or DictConfig; missing and None both give ``default``."""
    value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    return default if value is None else value


def _plain(value: Any) -> Any:
    """DictConfig/ListConfig -> plain containers (transformers configs must not hold OmegaConf nodes)."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return dict(value) if isinstance(value, Mapping) else value


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16`` (one-line error for anything else)."""
    if isinstance(name, torch.dtype):
        return name
    key = str(name).removeprefix("torch.")
    if key not in DTYPES:
        raise MoATrainError(f"model.dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[key]


def ensure_pad_token(tokenizer: Any) -> Any:
    """Give the tokenizer a pad token (its EOS when it has none); padding side is left to callers."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise MoATrainError("the tokenizer has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# ----------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------


def load_tokenizer(spec: str) -> Any:
    """``smollm2`` (the cached SmolLM2 tokenizer) or a hub id / local directory; with a pad token."""
    if spec == "smollm2":
        return ensure_pad_token(AutoTokenizer.from_pretrained(smollm2_tokenizer_dir()))
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError) as exc:
        raise _unavailable(spec, "model.tokenizer", exc) from None
    return ensure_pad_token(tokenizer)


def _unavailable(ref: str, field: str, exc: BaseException) -> MoATrainError:
    """One-line error for a hub id / directory that cannot be loaded."""
    offline = bool(constants.HF_HUB_OFFLINE)
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    local = Path(ref).expanduser()
    if local.exists():
        return MoATrainError(f"{field}={ref} cannot be loaded: {first}")
    if offline or "offline" in first.lower() or "connect" in first.lower() or "cache" in first.lower():
        return MoATrainError(
            f"model '{ref}' is not available offline; download it or pass {field}=<local dir>"
        )
    return MoATrainError(f"model '{ref}' cannot be loaded ({first}); download it or pass {field}=<local dir>")


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def load_base_model(model_cfg: Any, empty: bool = False) -> tuple[torch.nn.Module, Any]:
    """Load ``(model, tokenizer)`` for a ``model`` config node (dict or DictConfig).

    ``empty``: build the model on the meta device without reading weights (the FSDP ranks that get rank
    0's weights). The tokenizer always has a pad token (EOS when it had none); padding side is left to callers.
    """
    source = str(_get(model_cfg, "source", "hub"))
    if source not in SOURCES:
        raise MoATrainError(f"model.source must be one of {', '.join(SOURCES)}, got {source!r}")
    dtype = resolve_dtype(_get(model_cfg, "dtype", "float32"))
    attn = str(_get(model_cfg, "attn_implementation", "sdpa"))
    if attn not in ATTN_IMPLEMENTATIONS:
        raise MoATrainError(
            f"model.attn_implementation must be one of {', '.join(ATTN_IMPLEMENTATIONS)}, got {attn!r}"
        )
    quantization = quantization_config(model_cfg, dtype)
    if empty and quantization is not None:
        raise MoATrainError("a quantized base is quantized while loading: every rank must load it")
    if source == "smollm2":
        model, tokenizer = _load_smollm2(model_cfg, dtype, attn, quantization, empty)
    elif source == "hub":
        model, tokenizer = _load_hub(model_cfg, dtype, attn, quantization, empty)
    else:
        model, tokenizer = _build_from_arch(model_cfg, dtype, attn, source == "tiny_random", empty)
        if quantization is not None:
            model = _quantize_built(model, quantization, dtype, attn)
    generation = getattr(model, "generation_config", None)
    if generation is not None and generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def _load_smollm2(
    model_cfg: Any, dtype: torch.dtype, attn: str, quantization: Any, empty: bool
) -> tuple[torch.nn.Module, Any]:
    directory = smollm2_dir()
    if empty:
        model = _empty_from_pretrained_config(str(directory), dtype, attn, False)
    else:
        model = _from_pretrained(str(directory), dtype, attn, False, quantization)
    tokenizer = load_tokenizer(str(_get(model_cfg, "tokenizer", "smollm2")))
    return model, tokenizer


def _load_hub(
    model_cfg: Any, dtype: torch.dtype, attn: str, quantization: Any, empty: bool
) -> tuple[torch.nn.Module, Any]:
    ref = _get(model_cfg, "name_or_path")
    if not ref:
        raise MoATrainError("model.name_or_path is required for model.source=hub (a hub id or a local dir)")
    ref = str(Path(ref).expanduser()) if str(ref).startswith(("~", ".", "/")) else str(ref)
    trust = bool(_get(model_cfg, "trust_remote_code", False))
    try:
        # the config is small: fail on a missing model before touching the tokenizer or weights
        AutoConfig.from_pretrained(ref, trust_remote_code=trust)
        if empty:
            model = _empty_from_pretrained_config(ref, dtype, attn, trust)
        else:
            model = _from_pretrained(ref, dtype, attn, trust, quantization)
    except (OSError, ValueError) as exc:
        raise _unavailable(ref, "model.name_or_path", exc) from None
    tokenizer = load_tokenizer(str(_get(model_cfg, "tokenizer", ref)))
    return model, tokenizer


def build_arch_config(model_cfg: Any, attn: str = "sdpa") -> Any:
    """transformers config from the inline ``arch`` dict (must name its ``model_type``)."""
    arch = _plain(_get(model_cfg, "arch"))
    if not isinstance(arch, dict) or "model_type" not in arch:
        raise MoATrainError("model.arch must be a mapping with a model_type (e.g. {model_type: llama, ...})")
    fields = dict(arch)
    model_type = fields.pop("model_type")
    try:
        config = AutoConfig.for_model(model_type, **fields)
    except (ValueError, TypeError) as exc:
        raise MoATrainError(f"model.arch is not a valid {model_type} config: {exc}") from None
    config._attn_implementation = attn
    return config


def _build_from_arch(
    model_cfg: Any, dtype: torch.dtype, attn: str, tiny: bool, empty: bool = False
) -> tuple[torch.nn.Module, Any]:
    """Random-init model of the inline architecture; meta device for shape-only dry runs."""
    config = build_arch_config(model_cfg, attn)
    tokenizer = load_tokenizer(str(_get(model_cfg, "tokenizer", "smollm2")))
    if tiny and config.vocab_size < len(tokenizer):
        raise MoATrainError(
            f"model.arch.vocab_size={config.vocab_size} is smaller than the tokenizer ({len(tokenizer)} tokens)"
        )
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        if getattr(config, key, None) is None and getattr(tokenizer, key, None) is not None:
            setattr(config, key, getattr(tokenizer, key))
    if empty or (bool(_get(model_cfg, "meta_device", False)) and not tiny):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
        return model, tokenizer
    # fork_rng: a fixed init without disturbing the caller's global RNG stream
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(_get(model_cfg, "init_seed", 0)))
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    return model, tokenizer


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied weights counted once; works on the meta device)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ----------------------------------------------------------------------------------------------------
# Quantized (bitsandbytes) and empty (meta) bases; placing a base on its device
# ----------------------------------------------------------------------------------------------------


def quantization_config(model_cfg: Any, dtype: torch.dtype) -> Any:
    """``BitsAndBytesConfig`` for ``model.quantization`` (None when unset).

    4-bit weights are stored in ``dtype`` (``bnb_4bit_quant_storage``): FSDP shards floating tensors of
    one dtype per unit, and a uint8 storage would be left out of the sharding (scale_out.md §1).
    """
    kind = _get(model_cfg, "quantization")
    if kind is None:
        return None
    if kind not in QUANTIZATIONS:
        raise MoATrainError(
            f"model.quantization={kind!r} is not known; choose one of {', '.join(QUANTIZATIONS)} or null"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise MoATrainError(f"model.quantization={kind} needs bitsandbytes: pip install bitsandbytes")
    # bitsandbytes' CPU backend warns at import that an optional hub kernel package is absent; the
    # built-in kernels it falls back to are what the CPU runs use, so the warning is noise here
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=kind,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def _from_pretrained(ref: str, dtype: torch.dtype, attn: str, trust: bool, quantization: Any) -> Any:
    extra: dict[str, Any] = {}
    if quantization is not None:
        extra["quantization_config"] = quantization
        # bitsandbytes quantizes on the device the weights land on
        extra["device_map"] = {"": torch.cuda.current_device() if torch.cuda.is_available() else "cpu"}
    with no_progress_bars():  # a per-tensor bar is noise in a run's log
        return AutoModelForCausalLM.from_pretrained(
            ref, dtype=dtype, attn_implementation=attn, trust_remote_code=trust, **extra
        )


def _empty_from_pretrained_config(ref: str, dtype: torch.dtype, attn: str, trust: bool) -> Any:
    """The architecture of a saved model on the meta device, with its generation config (no weights)."""
    config = AutoConfig.from_pretrained(ref, trust_remote_code=trust)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=attn, trust_remote_code=trust
        )
    with contextlib.suppress(OSError, ValueError):
        model.generation_config = GenerationConfig.from_pretrained(ref)
    return model


def _quantize_built(model: torch.nn.Module, quantization: Any, dtype: torch.dtype, attn: str) -> Any:
    """Quantize a random-init model the way a hub checkpoint is: save it, load it with the bnb config."""
    with tempfile.TemporaryDirectory(prefix="moa-quantize-") as tmp, no_progress_bars():
        # not save_pretrained: under torch.distributed it writes on rank 0 only, and every rank loads here
        model.config.to_json_file(str(Path(tmp) / "config.json"))
        save_model(model, str(Path(tmp) / "model.safetensors"), metadata={"format": "pt"})
        generation = model.generation_config
        quantized = _from_pretrained(tmp, dtype, attn, False, quantization)
    quantized.generation_config = generation
    return quantized


def is_quantized(model: torch.nn.Module) -> bool:
    return getattr(model, "hf_quantizer", None) is not None or bool(getattr(model, "is_quantized", False))


def place_base(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move a base to ``device`` in the compute ``dtype``; a meta (empty) base stays where it is.

    A quantized base keeps its packed weights; its other floating weights (embeddings, norms, LM head)
    take ``dtype`` and its 4-bit layers compute in ``dtype``.
    """
    if any(p.is_meta for p in model.parameters()):
        return
    if not is_quantized(model):
        model.to(device=device, dtype=dtype)
        return
    if next(model.parameters()).device.type != torch.device(device).type:
        if getattr(model, "is_loaded_in_8bit", False):
            raise MoATrainError("an int8 base cannot move between devices; load it on the training device")
        model.to(device)  # 4-bit layers move their packed weights with their quantization state
    for module in model.modules():
        if hasattr(module, "compute_dtype"):  # bitsandbytes Linear4bit
            module.compute_dtype = dtype
        for param in module.parameters(recurse=False):
            if type(param).__name__ not in ("Params4bit", "Int8Params") and param.is_floating_point():
                param.data = param.data.to(dtype)
