"""Quiet loading: transformers' progress bars are noise in a run's log."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator

from transformers.utils import logging as hf_logging


@contextlib.contextmanager
def no_progress_bars() -> Iterator[None]:
    """Turn transformers' progress bars off for the block (restored afterwards)."""
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """Hide all progress bars of the GGUF conversion (it prints one line of its own)."""
    # the GGUF dequantiser uses a bare tqdm on sys.stderr; logging handlers keep the real stream
    with no_progress_bars(), contextlib.redirect_stderr(io.StringIO()):
        yield
