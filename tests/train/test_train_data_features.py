"""End to end on the tiny model: multi-turn chat records, packed rows, validation and MLflow in one run;
real_token_share of packed and padded runs; bad values of the data options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import TINY, train_in_process
from moa_train.errors import MoATrainError
from moa_train.train.loggers import read_metrics


def _chat_file(path: Path, count: int) -> Path:
    lines = []
    for i in range(count):
        a, b = i % 7 + 1, i % 5 + 2
        turns = [
            {"from": "human", "value": f"What is {a} + {b}?"},
            {"from": "gpt", "value": f"{a} + {b} = {a + b}"},
            {"from": "human", "value": "And doubled?"},
            {"from": "gpt", "value": f"{2 * (a + b)}"},
        ]
        record = {"conversations": turns} if i % 2 else {"messages": [
            {"role": {"human": "user", "gpt": "assistant"}[t["from"]], "content": t["value"]} for t in turns
        ]}  # fmt: skip
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow  # one tiny run with generation (~30 s on a free 2-core CPU)
def test_chat_records_packed_with_validation_logged_to_mlflow(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)
    train, test = _chat_file(tmp_path / "train.jsonl", 40), _chat_file(tmp_path / "test.jsonl", 4)
    summary = train_in_process(
        tmp_path / "run",
        TINY + [
            "data=custom", f"data.train_path={train}", f"data.test_path={test}", "data.answer_type=numeric",
            "data.max_len=128", "data.packing=true", "data.val_size=6", "trainer.eval_every_steps=1",
            "trainer.max_steps=2", "final_eval.max_records=1", "final_eval.base=false", "logger=mlflow",
        ],
    )  # fmt: skip
    assert summary["packing"] is True and summary["best_step"] in (1, 2)
    assert 0.8 < summary["real_token_share"] <= 1.0  # several ~60-token conversations per 128-token row
    assert "tuned_accuracy" in summary  # the final evaluation generated each conversation's last reply
    predictions = [
        json.loads(x) for x in (tmp_path / "run" / "final_eval_predictions.jsonl").read_text().splitlines()
    ]
    # the last reply is what is generated and scored (record 0: (1 + 2) doubled)
    assert (predictions[0]["instruction"], str(predictions[0]["gold"])) == ("And doubled?", "6")
    client = MlflowClient(tracking_uri=(tmp_path / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("moa_train").experiment_id])
    (run,) = runs
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [1, 2]
    train_steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert train_steps == [2]  # experiment=tiny logs every 2 steps
    logged = {k for r in read_metrics(tmp_path / "run") for k in r}
    assert {"val/loss", "train/loss"} <= logged


def test_padded_run_reports_its_real_token_share(tmp_path: Path) -> None:
    summary = train_in_process(tmp_path / "run", TINY + ["final_eval.enabled=false", "trainer.max_steps=2"])
    assert summary["packing"] is False and 0.3 < summary["real_token_share"] < 1.0


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("data.packing=maybe", "data.packing='maybe' must be true or false"),
        ("data.streaming=1", "data.streaming=1 must be true or false"),
    ],
)
def test_bad_data_flags(override: str, needle: str, compose) -> None:
    from moa_train.data.packing import check_flags

    with pytest.raises(MoATrainError) as err:
        check_flags(compose(TINY + [override]))
    assert needle in str(err.value) and "\n" not in str(err.value)
