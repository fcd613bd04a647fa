"""MLflow as a logger backend (``logger=mlflow``): the same metrics, router telemetry and heat-map images
that W&B gets, through ``mlflow.tracking.MlflowClient`` (mlflow-skinny is enough; no server needed).

Where runs go: ``logger.tracking_uri`` when given (``http://host:5000``, ``sqlite:///mlflow.db``,
``databricks``, ...), else ``MLFLOW_TRACKING_URI`` when set, else a local file store ``./mlruns`` in the
folder moa-train was started from (MLflow's own default; ``mlflow ui`` started there shows the runs).
MLflow 3 keeps the file store in maintenance mode and refuses it unless ``MLFLOW_ALLOW_FILE_STORE`` is
set; moa_train sets it for the default store only (a file store needs no database server, which is what
a local default should need).

The client is used rather than the ``mlflow.start_run`` fluent API: the fluent API keeps one global
active run per process, which a Hydra sweep running several jobs in one process would share.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

MAX_PARAMS_PER_BATCH = 100  # MLflow's limit for log_batch
MAX_PARAM_CHARS = 500  # long values (lists of paths) are cut; the full config is an artifact too
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")  # MLflow metric/param names allow these characters only


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else ``file:<cwd>/mlruns``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or (Path.cwd() / "mlruns").resolve().as_uri()


def _flatten(node: Any, prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    if isinstance(node, dict):
        for key, value in node.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
    else:
        flat[prefix[:-1]] = str(node)[:MAX_PARAM_CHARS]
    return flat


class MlflowBackend:
    """One MLflow run per moa_train run; ``resume_id`` (the id saved in checkpoints) continues it. The
    same methods as ``loggers.Backend`` (duck-typed: this module is imported by loggers, not the reverse)."""

    name = "mlflow"

    def __init__(self, cfg: Any, run_dir: Path, config: dict[str, Any], resume_id: str | None) -> None:
        # deferred: optional extra [mlflow]
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = cfg.get("tracking_uri") or default_tracking_uri()
        if str(uri).startswith("file:") or "://" not in str(uri):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # see the module doc
        self.tracking_uri = str(uri)
        self.client = MlflowClient(tracking_uri=self.tracking_uri)
        name = str(cfg.get("experiment") or "moa_train")
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        if resume_id:
            self.client.update_run(resume_id, status="RUNNING")
            self.id = resume_id
            return
        tags = {f"tag.{t}": "1" for t in (cfg.get("tags") or [])}
        run = self.client.create_run(
            experiment_id, run_name=run_dir.name, tags={"run_dir": str(run_dir), **tags}
        )
        self.id = run.info.run_id
        params = [Param(_UNSAFE.sub("_", k), v) for k, v in _flatten(config).items()]
        for i in range(0, len(params), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.id, params=params[i : i + MAX_PARAMS_PER_BATCH])

    def log(self, metrics: dict[str, float], step: int) -> None:
        # deferred: optional extra [mlflow]
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(_UNSAFE.sub("_", k), float(v), now, int(step)) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):  # MLflow's per-call metric limit
            self.client.log_batch(self.id, metrics=batch[i : i + 1000])

    def log_image(self, key: str, path: Path, step: int) -> None:
        # artifacts under the key (router/heatmap/<file>); the file name carries the step already
        self.client.log_artifact(self.id, str(path), artifact_path=_UNSAFE.sub("_", key))

    def close(self) -> None:
        self.client.set_terminated(self.id)
