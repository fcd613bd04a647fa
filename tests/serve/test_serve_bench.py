"""The serving benchmark runs end to end on the tiny model, reports every cell and its ratios, and
refuses bad arguments with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moa_train.errors import MoATrainError
from moa_train.serve.bench import main, parse


@pytest.fixture(autouse=True)
def keep_threads():
    before = torch.get_num_threads()  # threads=1 below sets the process-wide count
    yield
    torch.set_num_threads(before)


def test_tiny_run_reports_cells_ratios_and_targets(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "serving.json"
    main(["model=tiny", "requests=4", "new_tokens=3", "concurrency=[1,2]", "threads=1", f"out={out}"])
    report = json.loads(out.read_text())
    for variant in ("peft_lora_r16", "soft_moa", "sparse_moa"):
        for level in ("c1", "c2"):
            cell = report["results"][variant][level]
            assert cell["tokens"] == 4 * 3  # EOS ignored: every answer is exactly new_tokens long
            assert cell["tokens_per_s"] == pytest.approx(cell["tokens"] / cell["seconds"], rel=0.02)
    peft, soft = report["results"]["peft_lora_r16"]["c2"], report["results"]["soft_moa"]["c2"]
    assert report["ratios"]["soft_moa_c2_vs_peft"] == pytest.approx(
        soft["tokens_per_s"] / peft["tokens_per_s"], abs=2e-3
    )
    assert set(report["targets"]) == {"soft_c16_vs_peft_c16", "batching_gain_soft"}
    assert "batching gain" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["concurrency=[0]"], "concurrency must be"),
        (["variants=[soft_moa]"], "must include peft_lora_r16"),
        (["model=gpt5"], "model='gpt5' is not known"),
        (["speed=fast"], "unknown key(s) speed"),
        (["requests"], "is not key=value"),
    ],
)
def test_bad_arguments(argv: list[str], message: str) -> None:
    with pytest.raises(MoATrainError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse(argv)
