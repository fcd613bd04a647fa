"""moa_train: heterogeneous Mixture-of-Adapters (MoA, arXiv 2506.05928) on stock Hugging Face causal LMs."""

from moa_train.config import MoAConfig, RouterConfig
from moa_train.errors import MoATrainError
from moa_train.model import MoAModel, get_moa_model

__all__ = ["MoAConfig", "RouterConfig", "MoAModel", "MoATrainError", "get_moa_model"]
__version__ = "0.1.0"
