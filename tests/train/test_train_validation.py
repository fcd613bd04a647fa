"""Validation during training: val/loss every N steps, router statistics kept apart, the best checkpoint,
early stopping, exact resume of all of it, and the one-line errors of the options."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from conftest import TINY, train_in_process
from core_helpers import randomize_adapters
from moa_train import MoAConfig, MoAModel
from moa_train.data import TrainCollator
from moa_train.errors import MoATrainError
from moa_train.train.loggers import read_metrics
from moa_train.train.validation import check_settings, split_validation, validation_loss
from tiny_models import tiny_model

BASE = TINY + [
    "final_eval.enabled=false",
    "scheduler=constant",  # a resumed run with another max_steps keeps the same learning rates
    "scheduler.warmup_steps=0",
    "trainer.log_every_steps=1",
    "trainer.save_every_steps=2",
    "trainer.keep_last=10",
    "trainer.heatmap_every_steps=null",
    "data.num_train=48",
    "data.val_size=8",
]
VALIDATED = BASE + ["trainer.eval_every_steps=2", "trainer.max_steps=8"]


def _by_step(run_dir: Path, prefix: str) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for record in read_metrics(run_dir):
        keys = {k: v for k, v in record.items() if k.startswith(prefix) and k != "router/heatmap"}
        if keys:
            out.setdefault(record["step"], {}).update(keys)
    return out


@pytest.mark.slow  # three tiny runs (~1 min on a free 2-core CPU)
def test_validation_logs_apart_keeps_best_and_resumes_exactly(tmp_path: Path) -> None:
    plain = train_in_process(tmp_path / "plain", BASE + ["trainer.max_steps=8"])
    full = train_in_process(tmp_path / "full", VALIDATED)
    val = _by_step(tmp_path / "full", "val/")
    assert sorted(val) == [2, 4, 6, 8]
    assert all(v["val/loss"] > 0 and "val/router/entropy" in v for v in val.values())
    # the validation pass changes nothing of training: same losses and training router statistics
    assert _by_step(tmp_path / "full", "train/loss") == _by_step(tmp_path / "plain", "train/loss")
    assert _by_step(tmp_path / "full", "router/") == _by_step(tmp_path / "plain", "router/")
    assert "best_step" not in plain
    losses = {step: v["val/loss"] for step, v in val.items()}
    best_step = min(losses, key=losses.get)
    assert (full["best_step"], full["best_metric"]) == (best_step, losses[best_step])
    assert full["stopped_early"] is False and full["best_metric_name"] == "val/loss"
    best = json.loads((tmp_path / "full" / "best" / "trainer_state.json").read_text())
    assert best["step"] == best_step
    assert (tmp_path / "full" / "best" / "adapter_model.safetensors").is_file()

    # resume from step 4 into a fresh folder: the rest of the run, best and all, is the same
    resumed = train_in_process(
        tmp_path / "resumed", VALIDATED + [f"resume={tmp_path / 'full' / 'checkpoints' / 'step-4'}"]
    )
    assert {k: resumed[k] for k in ("best_step", "best_metric", "step")} == {
        k: full[k] for k in ("best_step", "best_metric", "step")
    }
    assert _by_step(tmp_path / "resumed", "val/") == {s: v for s, v in val.items() if s > 4}


def test_early_stopping_saves_and_records_the_stop(tmp_path: Path) -> None:
    # no pass can improve by more than 100 nats: the first pass is the best, the next one stops the run
    summary = train_in_process(
        tmp_path / "run",
        VALIDATED
        + [
            "trainer.early_stopping.patience=1",
            "trainer.early_stopping.min_delta=100",
            "trainer.save_every_steps=3",
        ],
    )
    assert summary["stopped_early"] is True and summary["step"] == 4 and summary["best_step"] == 2
    assert (tmp_path / "run" / "checkpoints" / "step-4" / "trainer_state.json").is_file()  # saved at the stop
    assert json.loads((tmp_path / "run" / "final" / "trainer_state.json").read_text())["step"] == 4
    assert max(r["step"] for r in read_metrics(tmp_path / "run")) == 4
    # killed after the stop's checkpoint, before final/: the resume trains nothing more, records the same
    again = train_in_process(
        tmp_path / "again",
        VALIDATED + ["trainer.early_stopping.patience=1", "trainer.early_stopping.min_delta=100",
                     f"resume={tmp_path / 'run' / 'checkpoints' / 'step-4'}"],
    )  # fmt: skip
    assert (again["stopped_early"], again["step"], again["val/loss"]) == (True, 4, summary["val/loss"])
    assert not (tmp_path / "again" / "metrics.jsonl").exists() or not read_metrics(tmp_path / "again")


def test_a_run_resumed_from_its_last_checkpoint_reports_its_last_validation(tmp_path: Path) -> None:
    """Stopped after the last step's checkpoint, before final/ and the summary: the resume writes them,
    with the validation loss of the last pass (a sweep chooses its learning rate on it)."""
    args = [*VALIDATED, "trainer.max_steps=4"]
    full = train_in_process(tmp_path / "full", args)
    resumed = train_in_process(
        tmp_path / "resumed", [*args, f"resume={tmp_path / 'full' / 'checkpoints' / 'step-4'}"]
    )
    assert resumed["step"] == 4 and resumed["val/loss"] == full["val/loss"]
    assert (resumed["best_step"], resumed["best_metric"]) == (full["best_step"], full["best_metric"])


def test_validation_pass_leaves_training_telemetry_alone() -> None:
    model = MoAModel(tiny_model(), MoAConfig(router=dict(kind="swiglu"))).train()
    randomize_adapters(model)
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    model(input_ids=ids, attention_mask=torch.ones_like(ids))
    before = model.router_stats()
    examples = [{"input_ids": ids[0].tolist(), "labels": [-100] * 3 + ids[0, 3:].tolist()}]
    metrics = validation_loss(model, examples, TrainCollator(0), 2, contextlib.nullcontext(), "cpu")
    assert model.router_stats() == before and model.training
    with torch.no_grad():
        logits = model.eval()(input_ids=ids[:1], attention_mask=torch.ones_like(ids[:1])).logits
    expected = torch.nn.functional.cross_entropy(logits[0, 2:-1], ids[0, 3:])
    assert metrics["val/loss"] == pytest.approx(float(expected), rel=1e-5)
    assert metrics["val/router/entropy"] > 0 and "val/router/L0/entropy" not in metrics


def test_val_size_is_deterministic_and_disjoint() -> None:
    records = [{"instruction": f"q{i}", "input": "", "output": "a"} for i in range(50)]
    test = [{"instruction": "q3", "input": ""}]
    cfg = OmegaConf.create({"data": {"val_size": 0.2, "seed": 1}, "trainer": {}})
    first = split_validation({"train": records, "test": test}, cfg)
    again = split_validation({"train": records, "test": test}, cfg)
    assert first == again and len(first["train"]) == 40
    assert {r["instruction"] for r in first["val"]}.isdisjoint({r["instruction"] for r in first["train"]})
    assert "q3" not in {r["instruction"] for r in first["val"]}  # never a test record


BAD = {
    "data.val_size=0": "data.val_size=0 must be a record count",
    "data.val_size=1.5": "data.val_size=1.5 must be",
    "data.val_size=true": "data.val_size=True must be",
    "trainer.eval_every_steps=0": "trainer.eval_every_steps=0 must be a step count",
    "trainer.best_metric=val/acc": "trainer.best_metric='val/acc' is not known; choose val/loss or val/accuracy",
    "trainer.best_mode=lowest": "trainer.best_mode='lowest' is not known; choose min or max",
    "trainer.best_metric=val/accuracy": "needs trainer.val_accuracy_records > 0",
    "trainer.early_stopping.patience=0": "patience=0 must be a count >= 1",
    "trainer.early_stopping.min_delta=-1": "min_delta=-1 must be a number >= 0",
    "trainer.val_accuracy_records=-2": "trainer.val_accuracy_records=-2 must be",
}


@pytest.mark.parametrize("override", list(BAD))
def test_bad_validation_options_get_one_line(override: str, compose) -> None:
    cfg = compose(TINY + ["data.val_size=8", "trainer.eval_every_steps=2", override])
    with pytest.raises(MoATrainError) as err:
        check_settings(cfg)
    assert BAD[override] in str(err.value) and "\n" not in str(err.value)


def test_options_that_need_each_other(compose) -> None:
    for overrides, needle in (
        (["trainer.eval_every_steps=2"], "needs a validation split"),
        (["data.val_size=8", "trainer.early_stopping.patience=2"], "needs trainer.eval_every_steps"),
        (["data.val_size=8", "data.val_path=x.json"], "not both"),
    ):
        with pytest.raises(MoATrainError, match=needle):
            check_settings(compose(TINY + overrides))


def test_val_path_records_and_a_missing_file(tmp_path: Path) -> None:
    val = tmp_path / "val.jsonl"
    val.write_text(
        json.dumps({"instruction": "q1", "output": "a"})
        + "\n"
        + json.dumps({"instruction": "q9", "output": "b"})
        + "\n"
    )
    train = [{"instruction": f"q{i}", "input": "", "output": "a"} for i in range(5)]
    cfg = OmegaConf.create({"data": {"val_path": str(val)}, "trainer": {}})
    splits = split_validation({"train": train, "test": [{"instruction": "q9", "input": ""}]}, cfg)
    assert splits["train"] == train and [r["instruction"] for r in splits["val"]] == [
        "q1"
    ]  # q9 is a test record
    cfg = OmegaConf.create({"data": {"val_path": str(tmp_path / "nope.jsonl")}, "trainer": {}})
    with pytest.raises(MoATrainError, match="data file not found") as err:
        split_validation({"train": train, "test": []}, cfg)
    assert "\n" not in str(err.value)
