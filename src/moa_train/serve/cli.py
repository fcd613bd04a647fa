"""Console scripts ``moa-generate``, ``moa-chat`` and ``moa-serve``: Hydra composes configs/{generate,
chat,serve}.yaml (key=value overrides, ``--help``, ``--cfg job``) and errors come out as one ``error:``
line, as for ``moa-train`` and ``moa-eval`` (the same wrapper)."""

from __future__ import annotations

from typing import Any

import hydra
from omegaconf import DictConfig

from moa_train.cli.main import _guarded, _job

CONFIGS = "pkg://moa_train.configs"


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="generate")
def _generate(cfg: DictConfig) -> Any:
    # deferred: torch and transformers load after the config composes; keeps --help fast
    from moa_train.serve.generate import run

    return _job(run, cfg)


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="chat")
def _chat(cfg: DictConfig) -> Any:
    # deferred: torch and transformers load after the config composes; keeps --help fast
    from moa_train.serve.chat import run

    return _job(run, cfg)


@hydra.main(version_base="1.3", config_path=CONFIGS, config_name="serve")
def _serve(cfg: DictConfig) -> Any:
    # deferred: torch, transformers and fastapi load after the config composes
    from moa_train.serve.server import run

    return _job(run, cfg)


def generate_main() -> None:
    """``moa-generate``: answer a JSONL file of prompts with a checkpoint."""
    _guarded(_generate, "generate")


def chat_main() -> None:
    """``moa-chat``: talk to a checkpoint in the terminal."""
    _guarded(_chat, "chat")


def serve_main() -> None:
    """``moa-serve``: an OpenAI-compatible HTTP API for a checkpoint."""
    _guarded(_serve, "serve")
