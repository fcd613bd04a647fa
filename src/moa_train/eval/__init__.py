"""Generation-based evaluation (LLM-Adapters protocol, method spec E) shared by the quickstart and moa-eval.

One concern per module:

- :mod:`~moa_train.eval.decoding`: decoding presets (configs/decoding/*.yaml);
- :mod:`~moa_train.eval.generation`: batched, length-sorted, left-padded generation with timing;
- :mod:`~moa_train.eval.scoring`: answer rules, token budgets and :func:`evaluate_records`, the one
  generate -> extract -> score implementation;
- :mod:`~moa_train.eval.router_analysis`: router statistics over the generated tokens (spec F.3);
- :mod:`~moa_train.eval.sources`: the data of the moa-eval presets;
- :mod:`~moa_train.eval.checkpoints`: checkpoint / run-dir resolution and model loading;
- :mod:`~moa_train.eval.outputs`: results files, the markdown table, W&B;
- :mod:`~moa_train.eval.run`: :func:`run_from_config`, the body of ``moa-eval``.
"""

from moa_train.data.answers import extract_answer
from moa_train.eval.checkpoints import resolve_checkpoint
from moa_train.eval.decoding import DecodingConfig
from moa_train.eval.generation import GenerationOutput, generate
from moa_train.eval.outputs import markdown_table
from moa_train.eval.run import run_from_config
from moa_train.eval.scoring import evaluate_records
from moa_train.eval.sources import load_eval_records, load_llm_adapters_file

__all__ = [
    "DecodingConfig",
    "GenerationOutput",
    "evaluate_records",
    "extract_answer",
    "generate",
    "load_eval_records",
    "load_llm_adapters_file",
    "markdown_table",
    "resolve_checkpoint",
    "run_from_config",
]
