"""One module per expert type. Each returns the additive delta at its site; gating happens in MoALayer."""

from moa_train.core.experts.ffn import FFNExperts
from moa_train.core.experts.lora import LoRAExperts
from moa_train.core.experts.parallel_adapter import ParallelAdapter
from moa_train.core.experts.prompt import PromptExpert

__all__ = ["FFNExperts", "LoRAExperts", "ParallelAdapter", "PromptExpert"]
