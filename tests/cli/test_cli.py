"""The console scripts: config resolution from any folder, one-line errors, dry runs."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

from conftest import REPO, TINY, run_cli


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    assert lines[-1].startswith("error: "), stderr[-2000:]
    return lines[-1]


def test_configs_resolve_from_the_console_script_in_any_folder(tmp_path: Path) -> None:
    result = run_cli("moa-train", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "name: quickstart" in result.stdout and "lora_targets:" in result.stdout
    help_text = run_cli("moa-train", "--help", cwd=tmp_path).stdout
    for group in (
        "experts",
        "router",
        "optimizer",
        "scheduler",
        "trainer",
        "logger",
        "launcher",
        "experiment",
    ):
        assert f"{group}: " in help_text, group
    evaluation = run_cli("moa-eval", "--cfg", "job", cwd=tmp_path)
    assert evaluation.returncode == 0, evaluation.stderr


def test_unknown_option_is_one_line_with_the_choices(tmp_path: Path) -> None:
    result = run_cli("moa-train", "router=nope", cwd=tmp_path)
    assert result.returncode == 2
    line = _error_line(result.stderr)
    assert "Could not find 'router/nope'" in line and "Available options in 'router'" in line
    assert "soft_swiglu" in line and "sparse" in line
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_bad_value_is_one_line_and_traceback_only_on_request(tmp_path: Path) -> None:
    args = [*TINY, "dry_run=true", "moa.router.kind=bogus"]
    result = run_cli("moa-train", *args, cwd=tmp_path)
    assert result.returncode == 2
    assert "router.kind='bogus' is not known" in _error_line(result.stderr)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # nothing but the error line
    full = run_cli("moa-train", *args, cwd=tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert full.returncode == 2 and "Traceback" in full.stderr
    debug = run_cli("moa-train", *args, "debug=default", cwd=tmp_path)
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_moa_eval_reports_errors_the_same_way(tmp_path: Path) -> None:
    result = run_cli("moa-eval", "no_such_key=1", cwd=tmp_path)
    assert result.returncode == 2
    assert "no_such_key" in _error_line(result.stderr)
    missing = run_cli("moa-eval", f"checkpoint={tmp_path / 'nowhere'}", cwd=tmp_path)  # raised inside the job
    assert missing.returncode == 2 and "checkpoint not found" in _error_line(missing.stderr)
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr


def test_dry_run_prints_trainable_parameters_by_type(tmp_path: Path) -> None:
    """Llama-3.1-8B shapes on the meta device: Soft MoA has 24,520,288 trainable parameters (spec F.2)."""
    result = run_cli(
        "moa-train", "experiment=math_soft", "model=llama3_1_8b_arch", "dry_run=true", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert re.search(r"^trainable_params=(\d+)$", result.stdout, re.M).group(1) == "24520288"
    parts = {k: int(v) for k, v in re.findall(r"^  (\w+)=(\d+)$", result.stdout, re.M)}
    assert parts == {"lora": 11534336, "pa": 4325888, "prompt": 1311744, "router": 7348320}
    assert not list(tmp_path.rglob("checkpoints")), "a dry run must not train"


def test_configs_resolve_from_a_wheel(tmp_path: Path) -> None:
    """The wheel ships configs/ as moa_train.configs and the packaged data (checked from the unpacked wheel)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("moa_train-*.whl")
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    assert (site / "moa_train" / "configs" / "train.yaml").is_file()
    assert (site / "moa_train" / "configs" / "router" / "sparse.yaml").is_file()
    packaged = site / "moa_train" / "data" / "commonsense_mix"  # data=commonsense_mix needs no download
    assert {"commonsense_mix.jsonl.xz", "DATA_LICENSE", "README.md"} <= {p.name for p in packaged.iterdir()}
    code = (
        "import sys, moa_train; assert moa_train.__file__.startswith(sys.argv[1]), moa_train.__file__; "
        "sys.argv = ['moa-train', '--cfg', 'job', 'experiment=tiny']; "
        "from moa_train.cli.main import train_main; train_main()"
    )
    work = tmp_path / "elsewhere"
    work.mkdir()
    result = subprocess.run(
        [sys.executable, "-c", code, str(site)],
        cwd=work, capture_output=True, text=True,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "name: tiny" in result.stdout


def test_bad_trainer_values_fail_before_the_model_loads(tmp_path: Path) -> None:
    for override, expected in (
        ("trainer.progress_bar=sometimes", "trainer.progress_bar='sometimes' is not known"),
        ("trainer.precision=int8", "trainer.precision='int8' is not known"),
        ("data.train_path=/nonexistent/train.json", "data file not found: /nonexistent/train.json"),
    ):
        extra = ["data=custom"] if override.startswith("data.") else []
        run_dir = tmp_path / override.split("=")[0]
        result = run_cli("moa-train", *TINY, *extra, override, f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert result.returncode == 2, override
        assert expected in _error_line(result.stderr)
        assert not run_dir.exists(), "a failed start must write nothing (not even its run dir)"
