"""The GPU check kit: scripts/device_kit.py (what the offline GPU machine gets), scripts/gpu_check.sh/.py.

The quick tests pin the dependency walk, the size limit, the JSON merge and the argument errors; the slow
one rehearses the whole device call on this CPU (scripts/gpu_check_rehearsal.sh: a fresh image-like
environment, the kit, no network) and needs the package index, like `make setup`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

# the checkout's root, wherever tests/ puts this file
REPO = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file())
sys.path.insert(0, str(REPO / "scripts"))

import device_kit  # noqa: E402
import gpu_check  # noqa: E402


def make_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    """A minimal wheel holding only its METADATA (what the kit reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    stem = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{stem}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{stem}.dist-info/METADATA", meta)
    return path


def test_markers_are_evaluated_for_the_target_python():
    lines = [
        "a>=1",
        'b; python_version < "3.9"',
        'c; extra == "docs"',
        'd; sys_platform == "win32"',
        'e; python_version >= "3.12"',
    ]

    def names(version: str) -> list[str]:
        env = device_kit.target_environment(version)
        return [r.name for r in device_kit.runtime_requirements(lines, env)]

    assert names("3.12") == ["a", "e"]
    assert names("3.11") == ["a"]


def test_dependency_walk_groups_and_stops_at_the_image(tmp_path, monkeypatch):
    """moa_train's closure minus the image, split into core / quant / loggers / sweep; a dependency that
    two groups need goes to core (it travels in every call; here dill reaches loggers/ first, then
    datasets needs it); nothing the image holds is fetched."""
    versions = {"hydra-core": "1.3.8", "omegaconf": "2.3.0", "antlr4-python3-runtime": "4.9.3", "dill": "0.4.0",
                "pydantic": "2.7", "pydantic-core": "2.0"}  # fmt: skip
    index = {
        "hydra-core": ["omegaconf<2.4,>=2.2", "packaging"],
        "omegaconf": ["antlr4-python3-runtime==4.9.*", "PyYAML>=5.1"],
        "antlr4-python3-runtime": [],
        "datasets": ["dill<0.4.2", "pandas", "numpy"],
        "dill": [],
        "wandb": ["pydantic<3,>=2.6", "click", "dill"],
        "pydantic": ["pydantic-core==2.0"],
        "pydantic-core": [],
        "bitsandbytes": ["torch<3,>=2.4", "numpy"],
        "hydra-optuna-sweeper": ["hydra-core>=1.1", "optuna"],
        "optuna": ["numpy"],
    }
    fetched: list[str] = []

    def fetch(self, spec: str, dest: Path) -> Path:
        name = spec.split("=")[0].split("<")[0].split(">")[0]
        fetched.append(name)
        return make_wheel(dest, name, versions.get(name, "1.0"), index[name])

    monkeypatch.setattr(device_kit.Builder, "fetch", fetch)
    out = tmp_path / "kit"
    args = argparse.Namespace(python_version="3.12", pins_from=None, groups=list(device_kit.GROUPS))
    builder = device_kit.Builder(args)
    requires = ["torch>=2.6", "wandb", "hydra-core>=1.3", "datasets", "hydra-optuna-sweeper>=1.2",
                "bitsandbytes>=0.45; extra == 'quant'", "pytest; extra == 'dev'"]  # fmt: skip
    builder.resolve(out, make_wheel(out / "core", "moa_train", "0.1.0", requires))
    groups = {name: group for name, (group, _) in builder.have.items()}
    assert groups == {
        "moa-train": "core", "hydra-core": "core", "omegaconf": "core", "antlr4-python3-runtime": "core",
        "datasets": "core", "dill": "core", "wandb": "loggers", "pydantic": "loggers", "pydantic-core": "loggers",
        "bitsandbytes": "quant", "hydra-optuna-sweeper": "sweep", "optuna": "sweep",
    }  # fmt: skip
    assert not {"torch", "packaging", "pyyaml", "pandas", "numpy", "click", "pytest"} & set(fetched)
    names = lambda group: sorted(p.name.split("-")[0] for p in (out / group).glob("*.whl"))  # noqa: E731
    assert names("loggers") == ["pydantic", "pydantic_core", "wandb"]
    assert names("sweep") == ["hydra_optuna_sweeper", "optuna"]
    assert builder.from_image["torch"] == {"<3,>=2.4", ">=2.6"}  # what the rehearsal installs as "the image"
    # without the optional groups, nothing of them is fetched
    fetched.clear()
    args.groups = ["core", "quant"]
    builder = device_kit.Builder(args)
    out2 = tmp_path / "kit2"
    builder.resolve(out2, make_wheel(out2 / "core", "moa_train", "0.1.0", ["wandb", "hydra-core"]))
    assert "wandb" not in fetched and "pydantic" not in fetched and "hydra-core" in fetched
    # the manifest says so, and gpu_check's env step then expects wandb to be absent
    assert builder.left_out == {"wandb": "loggers"}


def test_kit_over_the_limit_fails_and_names_the_call(tmp_path, capsys):
    out = tmp_path / "kit"
    for group, mib in (("core", 5), ("quant", 50), ("loggers", 30)):
        (out / group).mkdir(parents=True)
        with open(out / group / f"{group}.whl", "wb") as f:
            f.truncate(mib * device_kit.MIB)  # sparse: the size is what counts
    args = argparse.Namespace(python_version="3.12", platform=["manylinux_2_28_x86_64"], pins_from=None,
                              groups=["core", "quant", "loggers"], source=REPO)  # fmt: skip
    builder = device_kit.Builder(args)
    manifest = device_kit.report(out, 60, builder)
    assert manifest["calls"]["gpu_check"]["bytes"] == 55 * device_kit.MIB
    assert manifest["calls"]["loggers"] == {"groups": ["core", "loggers"], "bytes": 35 * device_kit.MIB}
    with pytest.raises(SystemExit, match="exceeds 50 MiB"):
        device_kit.report(out, 50, builder)
    assert "OVER THE LIMIT" in capsys.readouterr().out


def test_merge_keeps_failures_and_skips_apart(tmp_path):
    work = tmp_path / "work"
    (work / "bench").mkdir(parents=True)
    (work / "bench" / "result.json").write_text(
        json.dumps({"ratio_vs_peft_lora": {"soft_moa": {"step_s": 1.02}}})
    )
    (work / "fsdp1.log").write_text("line\n" * 40 + "RuntimeError: NCCL error\n")
    steps = [
        {"name": "bench", "status": "passed", "seconds": 12.5, "reason": ""},
        {"name": "nf4_ffn", "status": "skipped", "seconds": 0, "reason": "bitsandbytes is not installed"},
        {"name": "fsdp1", "status": "failed", "seconds": 3.0, "reason": "exit status 1"},
    ]
    (work / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    report = gpu_check.merge(work, tmp_path / "out" / "gpu_check.json", "cuda", 20.0)
    assert json.loads((tmp_path / "out" / "gpu_check.json").read_text()) == report
    by_name = {s["name"]: s for s in report["steps"]}
    assert report["passed"] is False
    assert (
        by_name["fsdp1"]["log_tail"][-1] == "RuntimeError: NCCL error"
        and len(by_name["fsdp1"]["log_tail"]) == 25
    )
    assert "log_tail" not in by_name["nf4_ffn"] and by_name["nf4_ffn"]["reason"].startswith("bitsandbytes")
    assert "soft_moa step x1.02" in gpu_check.headline(by_name["bench"])
    (work / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps[:2]))
    assert gpu_check.merge(work, tmp_path / "ok.json", "cuda", 1.0)["passed"] is True  # a skip is no failure


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "tpu"], "error: --device must be cuda or cpu"),
        (["--python", "no-such-python3"], "error: python 'no-such-python3' not found"),
        (["--kit", "/no/such/kit", "--python", sys.executable], "error: kit folder /no/such/kit not found"),
        (["--budget-s", "soon"], "error: --budget-s takes whole seconds"),
    ],
)
def test_gpu_check_bad_arguments(args, message):
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), *args], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(message)


@pytest.mark.slow
def test_rehearsal_of_the_device_call(tmp_path):
    """The device call end to end on CPU: fresh image-like venv, kit for its Python, no network."""
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check_rehearsal.sh"), str(tmp_path)],
        capture_output=True, text=True, timeout=5400,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rehearsal passed" in proc.stdout


def test_scripts_import_what_exists():
    """gpu_check.py and device_kit.py reach into moa_train (the model loader, the tokenizer conversion):
    a module move must move these imports too, or the GPU check would fail on the device, not here."""
    import importlib
    import re

    found = 0
    for script in ("gpu_check.py", "device_kit.py"):
        text = (REPO / "scripts" / script).read_text()
        for module, names in re.findall(r"from (moa_train[\w.]*) import ([\w, ]+)", text):
            imported = importlib.import_module(module)
            for name in names.split(","):
                assert hasattr(imported, name.strip()), f"{script}: {module} has no {name.strip()}"
                found += 1
    assert found >= 4  # load_base_model, smollm2_dir, smollm2_tokenizer_dir, MoAConfig, get_moa_model
