"""The values a ``model`` node may take, owned here and read without torch: the loader checks them
when it loads, and ``moa-train``/``moa-eval`` validation imports the same tuples (so they cannot drift)."""

from __future__ import annotations

SOURCES = ("smollm2", "hub", "arch", "tiny_random")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
# what load_base_model passes to transformers; flash_attention_2 is not offered (the adapters' attention
# hooks are tested with these two)
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
QUANTIZATIONS = ("nf4", "fp4", "int8")
