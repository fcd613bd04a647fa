"""Using a trained checkpoint: ``moa-generate`` (a JSONL file of prompts), ``moa-chat`` (the terminal) and
``moa-serve`` (an OpenAI-compatible HTTP API), all on one batching engine (:mod:`moa_train.serve.engine`).
See docs/serving.md."""
