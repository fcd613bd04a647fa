"""The packaged Hydra configs of moa-train / moa-eval (the top-level configs/ folder; see pyproject)."""
