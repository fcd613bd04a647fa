"""logger=mlflow: a run logged to a local store is read back with the MLflow client."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

pytest.importorskip("mlflow")


def test_mlflow_backend_logs_metrics_images_and_resumes(tmp_path: Path, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    from moa_train.train.loggers import make_logger

    monkeypatch.chdir(tmp_path)  # the default store is ./mlruns
    run_dir = tmp_path / "runs" / "r1"
    run_dir.mkdir(parents=True)
    cfg = OmegaConf.create({"name": "mlflow", "experiment": "tiny", "tracking_uri": None})
    logger = make_logger(cfg, run_dir, {"trainer": {"lr": 0.1, "paths": ["a", "b"]}})
    logger.log({"train/loss": 2.0, "router/entropy_mean": 0.5}, 1)
    logger.log({"train/loss": 1.5, "val/loss": 1.7}, 2)
    image = run_dir / "heatmap-step-2.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    logger.log_image("router/heatmap", image, 2)
    run_id = logger.backend.id
    logger.close()

    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert run.data.params["trainer.lr"] == "0.1"
    history = [(m.step, m.value) for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(history) == [(1, 2.0), (2, 1.5)]
    assert run.data.metrics["val/loss"] == 1.7 and run.data.metrics["router/entropy_mean"] == 0.5
    assert [a.path for a in client.list_artifacts(run_id, "router/heatmap")] == [
        "router/heatmap/heatmap-step-2.png"
    ]

    # a resumed run continues the same MLflow run (the id travels in the checkpoint)
    again = make_logger(cfg, run_dir, {}, resume_id=run_id)
    again.log({"train/loss": 1.0}, 3)
    again.close()
    assert len(client.get_metric_history(run_id, "train/loss")) == 3
    assert (run_dir / "metrics.jsonl").read_text().count("train/loss") == 3  # the JSONL mirror too


def test_logger_mlflow_without_the_client_is_refused_in_one_line(compose, monkeypatch) -> None:
    import importlib.util

    from moa_train.cli.validate import validate
    from moa_train.errors import MoATrainError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    with pytest.raises(MoATrainError) as err:
        validate(compose(["experiment=tiny", "logger=mlflow"]))
    assert 'pip install "moa_train[mlflow]"' in str(err.value) and "\n" not in str(err.value)
