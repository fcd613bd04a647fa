"""Experiment logging behind one small interface: W&B, TensorBoard or nothing, plus a JSONL mirror.

``make_logger(cfg.logger, run_dir, config)`` returns a :class:`RunLogger`; the trainer only calls
``log(metrics, step)``, ``log_image(key, path, step)`` and ``close()``. Whatever the backend,
every call is also appended to ``<run dir>/metrics.jsonl`` (one JSON object per call, the same keys),
which is what tests and scripts read back. A backend failure never stops training: it is logged
once as a warning and that backend is switched off.
"""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

from moa_train.errors import MoATrainError
from moa_train.tracking import WANDB_INIT_TIMEOUT, start_wandb  # noqa: F401 (WANDB_INIT_TIMEOUT re-exported)
from moa_train.train.mlflow_backend import MlflowBackend
from moa_train.train.options import LOGGERS

log = logging.getLogger(__name__)


class Backend:
    """An external logger. Subclasses override what they support."""

    name = "none"

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image(self, key: str, path: Path, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class WandbBackend(Backend):
    """Weights & Biases. Offline (files under <run dir>/wandb/) when there is no API key."""

    name = "wandb"

    def __init__(self, cfg: Any, run_dir: Path, config: dict[str, Any], resume_id: str | None) -> None:
        import wandb  # deferred: only logger=wandb needs it

        self._wandb = wandb
        self.run = start_wandb(
            mode=str(cfg.get("mode", "auto")),
            run_id=resume_id,
            project=cfg.get("project"),
            entity=cfg.get("entity"),
            group=cfg.get("group"),
            tags=list(cfg.get("tags") or []),
            name=run_dir.name,
            dir=str(run_dir),
            config=config,
        )
        self.id = getattr(self.run, "id", None)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        self.run.log({key: self._wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


class TensorBoardBackend(Backend):
    """TensorBoard event files in <run dir>/tensorboard/."""

    name = "tensorboard"

    def __init__(self, run_dir: Path) -> None:
        # deferred: optional extra (tensorboard)
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, global_step=step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        # deferred: matplotlib is heavy; only an image log needs it
        import matplotlib.image

        image = matplotlib.image.imread(str(path))[..., :3]  # RGBA float in [0, 1] -> RGB
        self.writer.add_image(key, image, global_step=step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class RunLogger:
    """The trainer's logger: one optional backend + the always-on ``metrics.jsonl`` mirror."""

    def __init__(self, backend: Backend, run_dir: Path) -> None:
        self.backend = backend
        self.jsonl_path = run_dir / "metrics.jsonl"
        self._file = open(self.jsonl_path, "a", encoding="utf-8")  # append: a resumed run continues it

    def log(self, metrics: dict[str, float], step: int) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self._write({"step": step, **{k: (v if math.isfinite(v) else str(v)) for k, v in clean.items()}})
        self._call("log", clean, step)

    def log_image(self, key: str, path: Path, step: int) -> None:
        self._write({"step": step, key: str(path)})
        self._call("log_image", key, path, step)

    def close(self) -> None:
        self._call("close")
        self._file.close()

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()  # a killed run keeps everything logged so far

    def _call(self, method: str, *args: Any) -> None:
        try:
            getattr(self.backend, method)(*args)
        except Exception as exc:  # logging must never end a training run
            log.warning("%s logger failed in %s (%s); switching it off", self.backend.name, method, exc)
            self.backend = Backend()


def make_logger(cfg: Any, run_dir: Path, config: dict[str, Any], resume_id: str | None = None) -> RunLogger:
    """Build the logger named by ``cfg.name`` (wandb | tensorboard | none) for ``run_dir``."""
    name = str(cfg.get("name", "none"))
    backend: Backend
    try:
        if name == "wandb":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # wandb's import-time deprecation chatter
                backend = WandbBackend(cfg, run_dir, config, resume_id)
        elif name == "tensorboard":
            backend = TensorBoardBackend(run_dir)
        elif name == "mlflow":
            backend = MlflowBackend(cfg, run_dir, config, resume_id)
        elif name == "none":
            backend = Backend()
        else:
            raise MoATrainError(f"logger={name!r} is not known; choose one of {', '.join(LOGGERS)}")
    except ImportError as exc:
        log.warning("logger=%s is not installed (%s); only metrics.jsonl is written", name, exc)
        backend = Backend()
    except MoATrainError:
        raise
    except Exception as exc:
        log.warning("logger=%s failed to start (%s); only metrics.jsonl is written", name, exc)
        backend = Backend()
    return RunLogger(backend, run_dir)


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of ``<run dir>/metrics.jsonl`` (for tests, scripts and the sweep summary)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except ValueError:
            if i < len(lines) - 1:
                raise
            # the last line cut short by a kill: the run stopped mid-write, the earlier lines hold
    return records
