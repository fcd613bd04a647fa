"""The one W&B start-up, shared by training (``logger=wandb``) and ``moa-eval``: one rule for the mode,
a bounded online start, and an offline fallback so that a machine without network keeps its metrics."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

WANDB_INIT_TIMEOUT = 15  # seconds before an online W&B start gives up (wandb's own default is 90)


def wandb_mode(mode: str | None) -> str:
    """``auto`` (or unset): WANDB_MODE if set, online with an API key (env or ~/.netrc), else offline."""
    if mode not in (None, "", "auto"):
        return str(mode)
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        if "api.wandb.ai" in netrc.read_text():
            return "online"
    except OSError:
        pass
    return "offline"


def start_wandb(*, mode: str | None, run_id: str | None = None, **init: Any) -> Any:
    """``wandb.init`` with ``mode`` resolved by :func:`wandb_mode`, resuming ``run_id`` when given.

    Online, the start gives up after ``WANDB_INIT_TIMEOUT`` seconds (bad key, no network, server down)
    and the run continues offline (files under ``dir``/wandb/). ``init``: wandb.init's other arguments
    (project, entity, name, dir, config, job_type, ...).
    """
    # deferred: wandb is heavy and only needed when a run reports to it
    import wandb

    resolved = wandb_mode(mode)
    kwargs = dict(init, id=run_id, resume="allow" if run_id else None)
    kwargs.setdefault("project", None)
    kwargs["project"] = kwargs["project"] or "moa_train"
    if resolved == "online":
        kwargs["settings"] = wandb.Settings(init_timeout=WANDB_INIT_TIMEOUT)
    try:
        return wandb.init(mode=resolved, **kwargs)
    except Exception as exc:  # no network, bad key, server down: keep the metrics locally
        if resolved == "offline":
            raise
        log.warning("wandb init failed (%s); logging offline to %s/wandb", exc, kwargs.get("dir"))
        kwargs.pop("settings", None)
        return wandb.init(mode="offline", **kwargs)
