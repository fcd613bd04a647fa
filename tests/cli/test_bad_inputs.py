"""Bad input of every kind (command line, config values, data, checkpoints, resume, eval, report) ends in
a non-zero exit with exactly one ``error:`` line and no traceback, and never changes a finished run.

The entry points run in this process (``sys.argv`` patched) so that ~80 cases take seconds; a few real
subprocesses check the same from the console scripts.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import run_cli
from moa_train.bench import main as bench_main
from moa_train.cli.main import eval_main, export_main, train_main
from moa_train.report import main as report_main
from moa_train.serve.cli import chat_main, generate_main, serve_main

RUN = [
    "experiment=tiny",
    "final_eval.enabled=false",
    "trainer.max_steps=2",
    "trainer.save_every_steps=2",
    "trainer.log_every_steps=1",
]


def invoke(main: Callable[..., object], argv: list[str], cwd: Path) -> tuple[int, str]:
    """Run a console script's main in this process; (exit status, stdout + stderr)."""
    out, err = io.StringIO(), io.StringIO()
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv = ["prog", *argv]
    os.chdir(cwd)
    code: object = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                hydra_mains = (train_main, eval_main, generate_main, chat_main, serve_main)
                result = main() if main in hydra_mains else main(argv)
                code = result if isinstance(result, int) else 0
            except SystemExit as exc:
                code = exc.code
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    return (code if isinstance(code, int) else 1), err.getvalue() + out.getvalue()


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) with the hash of its bytes."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished tiny run (2 steps, a step checkpoint and final/)."""
    root = tmp_path_factory.mktemp("finished")
    run = root / "run"
    code, output = invoke(train_main, [*RUN, f"hydra.run.dir={run}"], root)
    assert code == 0, output[-3000:]
    assert (run / "final" / "trainer_state.json").is_file() and (run / "config.yaml").is_file()
    return run


# ----------------------------------------------------------------------------------------------------
# What a case does to a copy of the finished run, or which data file it writes
# ----------------------------------------------------------------------------------------------------


def _write(rel: str, data: bytes | str) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        path = run / rel
        path.write_bytes(data if isinstance(data, bytes) else data.encode())

    return apply


def _truncate(rel: str) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        path = run / rel
        path.write_bytes(path.read_bytes()[:40])

    return apply


def _remove(rel: str) -> Callable[[Path], None]:
    return lambda run: (run / rel).unlink()


def _edit_json(rel: str, change: Callable[[object], object]) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        path = run / rel
        path.write_text(json.dumps(change(json.loads(path.read_text()))))

    return apply


def _unfinished(run: Path) -> None:
    """The run as a kill left it: a step checkpoint, no final/."""
    shutil.rmtree(run / "final")
    (run / "summary.json").unlink()


def _code_in_config(run: Path) -> None:
    text = (run / "config.yaml").read_text().replace("trust_remote_code: false", "trust_remote_code: true")
    (run / "config.yaml").write_text(text)


def _code_in_adapter_config(node: str) -> Callable[[Path], None]:
    def change(data: dict) -> dict:
        data["model"] = {**data["model"], "trust_remote_code": True}
        return data

    return _edit_json(f"{node}/adapter_config.json", change)


def _state(change: Callable[[dict], object]) -> Callable[[Path], None]:
    return _edit_json("checkpoints/step-2/trainer_state.json", change)


def _extra_key(data: dict) -> dict:
    return {**data, "surprise": 1}


def _negative_step(data: dict) -> dict:
    return {**data, "step": -3}


def _bad_rank(data: dict) -> dict:
    return {**data, "moa_config": {**data["moa_config"], "lora_rank": "abc"}}


def _then(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def apply(run: Path) -> None:
        for step in steps:
            step(run)

    return apply


STEP = "checkpoints/step-2"
RECORD = {"instruction": "Add 2 and 3.", "input": "", "output": "5", "answer": "5"}


@dataclass
class Case:
    id: str
    main: Callable[..., object]
    argv: list[str]
    copy: Callable[[Path], None] | None = None  # applied to a copy of the finished run ({copy})
    data: bytes | str | None = None  # written to {data}


def _train(id: str, *argv: str, **kw: object) -> Case:
    return Case(id, train_main, [*RUN, *argv], **kw)  # type: ignore[arg-type]


def _custom_data(id: str, data: bytes | str, *argv: str) -> Case:
    return _train(id, "data=custom", "data.train_path={data}", *argv, data=data)


CASES = [
    # ---- the command line ---------------------------------------------------------------------
    Case("bare-equals", train_main, ["=3"]),
    Case("unknown-group-option", train_main, ["router=nope"]),
    Case("unknown-key", train_main, ["no_such_key=1"]),
    _train("unknown-trainer-key", "trainer.nope=1"),
    _train("unparsable-override", "trainer.max_steps=[1,"),
    _train("run-dir-under-a-file", "hydra.run.dir={tmp}/a_file/run"),
    _train("run-dir-is-a-finished-run", "hydra.run.dir={run}"),
    _train("name-escapes-runs", "name=../elsewhere"),
    # ---- config values ---------------------------------------------------------------------------
    _train("max-steps-text", "trainer.max_steps=abc"),
    _train("max-steps-negative", "trainer.max_steps=-5"),
    _train("max-steps-zero", "trainer.max_steps=0"),
    _train("seed-text", "seed=abc"),
    _train("seed-negative", "seed=-1"),
    _train("lr-negative", "optimizer.lr=-0.001"),
    _train("lr-nan", "optimizer.lr=nan"),
    _train("lr-inf", "optimizer.lr=inf"),
    _train("lr-and-blr-unset", "optimizer.lr=null", "optimizer.blr=null"),
    _train("betas-one-value", "optimizer.betas=[0.9]"),
    _train("betas-out-of-range", "optimizer.betas=[0.9,1.5]"),
    _train("eps-zero", "optimizer.eps=0"),
    _train("weight-decay-negative", "optimizer.weight_decay=-1"),
    _train("optimizer-unknown", "optimizer.name=sgd"),
    _train("micro-batch-zero", "trainer.micro_batch_size=0"),
    _train("micro-batch-negative", "trainer.micro_batch_size=-2"),
    _train("effective-batch-not-a-multiple", "trainer.effective_batch_size=3"),
    _train("log-every-zero", "trainer.log_every_steps=0"),
    _train("save-every-negative", "trainer.save_every_steps=-1"),
    _train("keep-last-zero", "trainer.keep_last=0"),
    _train("grad-clip-negative", "trainer.grad_clip=-1"),
    _train("precision-unknown", "trainer.precision=int8"),
    _train("progress-bar-unknown", "trainer.progress_bar=sometimes"),
    _train("epochs-zero", "trainer.epochs=0"),
    _train("heatmap-every-zero", "trainer.heatmap_every_steps=0"),
    _train("cpu-threads-zero", "trainer.cpu_threads=0"),
    _train("device-unknown", "trainer.device=tpu"),
    _train("scheduler-unknown", "scheduler.name=step"),
    _train("warmup-negative", "scheduler.warmup_steps=-1"),
    _train("warmup-both", "scheduler.warmup_epochs=1.0"),
    _train("lora-rank-text", "moa.lora_rank=abc"),
    _train("lora-rank-zero", "moa.lora_rank=0"),
    _train("lora-dropout-one", "moa.lora_dropout=1.5"),
    _train("router-kind-unknown", "moa.router.kind=bogus"),
    _train("router-top-k-zero", "moa.router.top_k=0"),
    _train("heads-do-not-divide", "model.arch.num_attention_heads=3"),
    _train("model-dtype-unknown", "model.dtype=int4"),
    _train("batch-split-over-processes", "launcher=accelerate", "trainer.effective_batch_size=2"),
    _train("num-processes-zero", "launcher=accelerate", "launcher.num_processes=0"),
    _train("logger-mode-unknown", "logger=wandb", "logger.mode=sometimes"),
    _train("final-eval-batch-zero", "final_eval.batch_size=0"),
    _train("max-len-one", "data.max_len=1"),
    _train("data-seed-negative", "data.seed=-1"),
    _train("num-train-zero", "data.num_train=0"),
    _train("final-eval-decoding-unknown", "final_eval.enabled=true", "final_eval.decoding=nope"),
    _train("final-eval-split-missing", "final_eval.enabled=true", "final_eval.split=validation"),
    # ---- data ----------------------------------------------------------------------------------
    _train("data-file-missing", "data=custom", "data.train_path={tmp}/missing.json"),
    _train("data-path-is-a-folder", "data=custom", "data.train_path={tmp}"),
    _custom_data("data-not-utf8", b'[{"instruction": "caf\xe9", "output": "1", "answer": "1"}]'),
    _custom_data("data-not-json", "[{not json"),
    _custom_data("data-an-object", json.dumps({"records": [RECORD]})),
    _custom_data("data-record-a-list", json.dumps([["Add 2 and 3.", "5"]] * 8)),
    _custom_data("data-field-a-dict", json.dumps([{**RECORD, "instruction": {"text": "Add"}}] * 8)),
    _custom_data("data-field-a-list", json.dumps([{**RECORD, "output": ["5"]}] * 8)),
    _custom_data("data-no-output", json.dumps([{"instruction": "Add 2 and 3."}] * 8)),
    _custom_data("data-empty", "[]"),
    _custom_data(
        "data-too-long-for-max-len",
        json.dumps([{**RECORD, "instruction": "word " * 80}] * 8),
        "data.max_len=16",
    ),  # fmt: skip
    # ---- resume and checkpoints -------------------------------------------------------------------
    Case("resume-nowhere", train_main, ["resume={tmp}/nowhere"]),
    Case("resume-not-a-run", train_main, ["resume={tmp}"]),
    Case("resume-finished", train_main, ["resume={copy}"], copy=lambda run: None),
    Case("resume-finished-same-command", train_main, [*RUN, "resume={copy}"], copy=lambda run: None),
    Case(
        "resume-no-checkpoint",
        train_main,
        ["resume={copy}"],
        copy=_then(_unfinished, lambda run: shutil.rmtree(run / STEP)),
    ),  # fmt: skip
    Case("resume-changed-rank", train_main, ["resume={copy}", "moa.lora_rank=4"], copy=_unfinished),
    Case("resume-changed-data-seed", train_main, ["resume={copy}", "data.seed=3"], copy=_unfinished),
    Case("resume-changed-router", train_main, [*RUN, "resume={copy}", "router=sparse"], copy=_unfinished),
    Case("resume-changed-model", train_main, ["resume={copy}", "model=smollm2_135m"], copy=_unfinished),
    Case("resume-trust-remote-code", train_main, ["resume={copy}"], copy=_then(_unfinished, _code_in_config)),
    Case(
        "resume-config-not-yaml",
        train_main,
        ["resume={copy}"],
        copy=_then(_unfinished, _write("config.yaml", "a: [unclosed\n")),
    ),  # fmt: skip
    Case(
        "resume-config-not-utf8",
        train_main,
        ["resume={copy}"],
        copy=_then(_unfinished, _write("config.yaml", b"name: \xff\xfe\n")),
    ),  # fmt: skip
    Case(
        "resume-config-a-list",
        train_main,
        ["resume={copy}"],
        copy=_then(_unfinished, _write("config.yaml", "- 1\n- 2\n")),
    ),  # fmt: skip
    Case(
        "resume-state-unknown-key", train_main, ["resume={copy}"], copy=_then(_unfinished, _state(_extra_key))
    ),
    Case(
        "resume-state-a-list", train_main, ["resume={copy}"], copy=_then(_unfinished, _state(lambda d: [d]))
    ),
    Case(
        "resume-state-negative-step",
        train_main,
        ["resume={copy}"],
        copy=_then(_unfinished, _state(_negative_step)),
    ),  # fmt: skip
    Case(
        "resume-state-not-json",
        train_main,
        ["resume={copy}"],
        copy=_then(_unfinished, _write(f"{STEP}/trainer_state.json", "{")),
    ),  # fmt: skip
    Case(
        "resume-truncated-weights",
        train_main,
        ["resume={copy}"],
        copy=_then(_unfinished, _truncate(f"{STEP}/adapter_model.safetensors")),
    ),  # fmt: skip
    Case(
        "resume-garbage-optimizer",
        train_main,
        ["resume={copy}"],
        copy=_then(_unfinished, _write(f"{STEP}/optimizer.safetensors", b"\x00garbage" * 20)),
    ),  # fmt: skip
    Case(
        "resume-missing-optimizer-json",
        train_main,
        ["resume={copy}"],
        copy=_then(_unfinished, _remove(f"{STEP}/optimizer.json")),
    ),  # fmt: skip
    Case(
        "resume-missing-rng",
        train_main,
        ["resume={copy}"],
        copy=_then(_unfinished, _remove(f"{STEP}/rng-rank0.safetensors")),
    ),  # fmt: skip
    Case(
        "resume-world-size-differs",
        train_main,
        ["resume={copy}"],
        copy=_then(_unfinished, _state(lambda d: {**d, "world_size": 2})),
    ),  # fmt: skip
    # ---- moa-eval ----------------------------------------------------------------------------------
    Case("eval-checkpoint-nowhere", eval_main, ["checkpoint={tmp}/nowhere"]),
    Case(
        "eval-limit-zero",
        eval_main,
        ["checkpoint={copy}", "eval=heldout", "eval.limit=0"],
        copy=lambda run: None,
    ),
    Case("eval-precision-unknown", eval_main, ["checkpoint={copy}", "precision=int8"], copy=lambda run: None),
    Case("eval-cap-zero", eval_main, ["checkpoint={copy}", "max_new_tokens_cap=0"], copy=lambda run: None),
    Case("eval-unknown-key", eval_main, ["no_such_key=1"]),
    Case("eval-batch-size-zero", eval_main, ["batch_size=0"]),
    Case("eval-batch-size-text", eval_main, ["batch_size=many"]),
    Case("eval-num-beams-zero", eval_main, ["decoding.num_beams=0"]),
    Case("eval-top-p-above-one", eval_main, ["decoding=paper", "decoding.top_p=1.5"]),
    Case("eval-limit-negative", eval_main, ["eval.limit=-3"]),
    Case(
        "eval-adapter-config-a-list",
        eval_main,
        ["checkpoint={copy}/final", "eval=heldout"],
        copy=_write("final/adapter_config.json", "[1, 2]"),
    ),  # fmt: skip
    Case(
        "eval-adapter-config-not-json",
        eval_main,
        ["checkpoint={copy}/final", "eval=heldout"],
        copy=_write("final/adapter_config.json", "{"),
    ),  # fmt: skip
    Case(
        "eval-truncated-weights",
        eval_main,
        ["checkpoint={copy}/final", "eval=heldout"],
        copy=_truncate("final/adapter_model.safetensors"),
    ),  # fmt: skip
    Case(
        "eval-moa-config-bad-rank",
        eval_main,
        ["checkpoint={copy}/final", "eval=heldout"],
        copy=_edit_json("final/adapter_config.json", _bad_rank),
    ),
    Case(
        "eval-trust-remote-code",
        eval_main,
        ["checkpoint={copy}/final", "eval=heldout"],
        copy=_code_in_adapter_config("final"),
    ),  # fmt: skip
    # ---- moa-report, moa-bench -------------------------------------------------------------------
    Case("report-no-arguments", report_main, []),
    Case("report-folder-missing", report_main, ["{tmp}/nowhere"]),
    Case("report-a-file", report_main, ["{tmp}/a_file"]),
    Case("report-unknown-flag", report_main, ["{tmp}", "--bogus"]),
    Case("report-no-jobs", report_main, ["{tmp}"]),
    Case("bench-unknown-flag", bench_main, ["--bogus"]),
    # ---- unknown keys, also added with + (named with the nearest valid key), in every command ----
    _train("plus-misspelled-key", "+trainer.max_step=10"),
    _train("plus-misplaced-key", "+router.load_balance_coef=0.01"),
    _train("misplaced-key", "router.load_balance_coef=0.01"),
    _train("plus-unknown-site-router-key", "+moa.site_router.topk=3"),
    _train("plus-unknown-top-level-key", "+lr=0.1"),
    _train("flash-attention-on-cpu", "model.attn_implementation=flash_attention_2"),
    Case("eval-plus-train-key", eval_main, ["+trainer.max_steps=1"]),
    Case("eval-misspelled-key", eval_main, ["batchsize=3"]),
    Case("eval-tensorboard-logger", eval_main, ["logger=tensorboard"]),
    Case("export-no-arguments", export_main, []),
    Case("export-misspelled-key", export_main, ["checkpoint={run}", "formt=peft", "out={tmp}/out"]),
    Case("export-plus-unknown-key", export_main, ["checkpoint={run}", "format=peft", "out={tmp}/out", "+merge=1"]),
    Case("export-format-unknown", export_main, ["checkpoint={run}", "format=gguf", "out={tmp}/out"]),
    Case("export-dtype-unknown", export_main, ["checkpoint={run}", "format=merged", "out={tmp}/out", "dtype=int4"]),
    Case("export-routed-checkpoint", export_main, ["checkpoint={copy}", "format=peft", "out={tmp}/out"],
         copy=lambda run: None),
    Case("export-out-not-empty", export_main, ["checkpoint={copy}", "format=peft", "out={run}"], copy=lambda run: None),
    Case("export-checkpoint-nowhere", export_main, ["checkpoint={tmp}/nowhere", "format=peft", "out={tmp}/out"]),
    Case("generate-plus-unknown-key", generate_main, ["+foo=1"]),
    Case("chat-misspelled-key", chat_main, ["max_new_token=3"]),
    Case("serve-plus-unknown-key", serve_main, ["+foo=1"]),
    Case("eval-plus-unknown-key", eval_main, ["+foo=1"]),
    Case("eval-plus-misspelled-eval-key", eval_main, ["+eval.limt=2"]),
    Case("eval-mlflow-logger", eval_main, ["logger=mlflow"]),
    Case("export-plus-unknown-top-level-key", export_main, ["+foo=1"]),
]  # fmt: skip

NEAREST = [  # (command, argv, the key the error line must name); also one error line and status 2
    (train_main, ["+trainer.max_step=10"], "did you mean trainer.max_steps?"),
    (train_main, ["+router.load_balance_coef=0.01"], "did you mean moa.router.load_balance_coef?"),
    (train_main, ["router.load_balance_coef=0.01"], "did you mean moa.router.load_balance_coef?"),
    (train_main, ["+moa.site_router.topk=3"], "did you mean moa.site_router.top_k?"),
    (train_main, ["trainer.maxsteps=3"], "did you mean trainer.max_steps?"),
    (eval_main, ["batchsize=3"], "did you mean batch_size?"),
    (export_main, ["formt=peft"], "did you mean format?"),
    (chat_main, ["+max_new_token=3"], "did you mean max_new_tokens?"),
    (serve_main, ["+model.nmae=x"], "did you mean model.name?"),
    (train_main, ["+model.nmae=x"], "did you mean model.name?"),
    (train_main, ["+data.max_lenght=5"], "did you mean data.max_len?"),
    (train_main, ["+optimizer.betaz=[0.9,0.9]"], "did you mean optimizer.betas?"),
    (train_main, ["optimizer.learning_rate=1e-3"], "did you mean optimizer.lr?"),
    (train_main, ["+learning_rate=1e-3"], "did you mean optimizer.lr?"),
    (eval_main, ["+eval.limt=2"], "did you mean eval.limit?"),
    (export_main, ["+model.nmae=x"], "moa-export --cfg job` lists every key"),  # never a hydra.* key
    (report_main, ["--no-plto", "somewhere"], "did you mean --no-plot?"),  # the argparse commands too
    (bench_main, ["--quik"], "did you mean --quick?"),
]


def test_enough_cases() -> None:
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_error_line(case: Case, finished: Path, tmp_path: Path) -> None:
    before = snapshot(finished.parent)
    (tmp_path / "a_file").write_text("not a folder\n")
    values = {"run": str(finished), "tmp": str(tmp_path), "copy": str(tmp_path / "copy"), "data": ""}
    if case.copy is not None:
        shutil.copytree(finished, tmp_path / "copy")
        case.copy(tmp_path / "copy")
    if case.data is not None:
        path = tmp_path / "train.json"
        path.write_bytes(case.data if isinstance(case.data, bytes) else case.data.encode())
        values["data"] = str(path)
    argv = [a.format(**values) for a in case.argv]
    work = tmp_path / "work"
    work.mkdir()
    code, output = invoke(case.main, argv, work)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 2, output[-2000:]  # a user error, not the last line of defence (status 1)
    assert len(errors) == 1, output[-2000:]
    assert "HYDRA_FULL_ERROR" not in errors[0], errors[0]  # named by a check, not an escaped exception
    assert "Traceback" not in output, output[-3000:]
    assert snapshot(finished.parent) == before, "the finished run changed"
    assert not (work / "runs").exists() or not any((work / "runs").rglob("config.yaml"))


@pytest.mark.parametrize(("main", "argv", "named"), NEAREST, ids=[" ".join(a) for _, a, _ in NEAREST])
def test_unknown_keys_name_the_nearest_valid_key(main, argv: list[str], named: str, tmp_path: Path) -> None:
    code, output = invoke(main, argv, tmp_path)
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and named in errors[0], output[-2000:]


def test_documented_free_form_maps_take_new_keys(compose) -> None:
    """data.task_types (dataset -> LoRAMoE task type) is the user's own map: a new key is not refused."""
    from moa_train.cli.validate import validate

    validate(compose(["experiment=math_loramoe_lbc", "+data.task_types.gsm8k=1"]), "train")
    validate(compose(["experiment=math_loramoe_lbc", "data.task_type_field=kind"]), "train")  # documented key


def test_console_scripts_report_the_same_way(finished: Path, tmp_path: Path) -> None:
    """The real console scripts: one line, non-zero exit, the finished run untouched."""
    before = snapshot(finished.parent)
    for name, args in (
        ("moa-train", [*RUN, "trainer.max_steps=abc"]),
        ("moa-train", [*RUN, f"hydra.run.dir={finished}"]),
        ("moa-eval", [f"checkpoint={tmp_path / 'nowhere'}"]),
        ("moa-report", [str(tmp_path / "nowhere")]),
        ("moa-train", ["+trainer.max_step=10"]),
        ("moa-export", ["+foo=1"]),
    ):
        result = run_cli(name, *args, cwd=tmp_path)
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert result.returncode != 0 and len(lines) == 1, result.stderr[-2000:]
        assert "error:" not in result.stdout, result.stdout[-2000:]
        assert "Traceback" not in result.stderr + result.stdout
    assert snapshot(finished.parent) == before
    assert not (tmp_path / "runs").exists(), "a failed start left a run folder"


@pytest.mark.parametrize(
    "exc, status, line",
    [
        (
            RuntimeError("something nobody checked"),
            1,
            "error: something nobody checked (RuntimeError); set HYDRA_FULL_ERROR=1 for the traceback",
        ),
        (KeyboardInterrupt(), 130, "error: interrupted (KeyboardInterrupt)"),  # Ctrl-C outside the loop
    ],
)
def test_unexpected_exception_is_one_line_with_its_type(
    tmp_path: Path, monkeypatch, exc: BaseException, status: int, line: str
) -> None:
    """The last line of defence: an exception no check foresaw still becomes one line."""
    import moa_train.train.recipe

    def boom(*args: object, **kwargs: object) -> None:
        raise exc

    monkeypatch.setattr(moa_train.train.recipe, "_train", boom)
    code, output = invoke(train_main, [*RUN, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert code == status
    assert [x for x in output.splitlines() if x.startswith("error:")] == [line]
    assert "Traceback" not in output


@pytest.mark.parametrize("damage", [b"\xff\xfe{", b"[1, 2]", b"{not json"])
def test_damaged_job_files_are_listed_not_fatal(tmp_path: Path, damage: bytes) -> None:
    """moa-report and the sweep table list a job with a damaged summary.json as failed, naming it."""
    from moa_train.cli.sweep import collect_rows

    sweep = tmp_path / "sweep"
    for job, summary in (("0", damage), ("1", b'{"status": "completed", "tuned_accuracy": 0.5}')):
        (sweep / job / ".hydra").mkdir(parents=True)
        (sweep / job / ".hydra" / "overrides.yaml").write_text(f"- seed={job}\n")
        (sweep / job / "summary.json").write_bytes(summary)
    (sweep / "1" / ".hydra" / "overrides.yaml").write_bytes(b"\xff[unclosed")
    rows = collect_rows(sweep)
    assert rows[0]["status"].startswith("failed") and rows[1]["status"] == "completed"
    code, output = invoke(report_main, [str(sweep)], tmp_path)
    assert code == 0 and "Traceback" not in output, output[-2000:]
    assert str(sweep / "0" / "summary.json") in (sweep / "report.md").read_text()
