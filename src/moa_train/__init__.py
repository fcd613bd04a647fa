"""moa_train: heterogeneous Mixture-of-Adapters (MoA, arXiv 2506.05928) on stock Hugging Face causal LMs."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moa_train.core.config import MoAConfig, RouterConfig
    from moa_train.core.model import MoAModel, get_moa_model
    from moa_train.errors import MoATrainError

__all__ = ["MoAConfig", "RouterConfig", "MoAModel", "MoATrainError", "get_moa_model"]
__version__ = "0.1.0"

# Lazy exports (PEP 562): `import moa_train` must not import torch, so that the console scripts can
# compose configs and report a bad option in well under a second; torch loads on first use.
_EXPORTS = {
    "MoAConfig": "moa_train.core.config",
    "RouterConfig": "moa_train.core.config",
    "MoATrainError": "moa_train.errors",
    "MoAModel": "moa_train.core.model",
    "get_moa_model": "moa_train.core.model",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moa_train' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
