"""Every command shown to users works: the examples of each ``--help`` and each command in the code blocks
of README.md and docs/*.md.

Fast (default suite): each moa-* command composes and passes validation in-process (its keys exist,
its values are in range) -- the check that catches a wrong key such as ``router.load_balance_coef``.
Slow: each command that can run offline on a CPU runs as a subprocess and must exit 0: moa-train as a
dry run (validation, model build, parameter count; long runs stay long otherwise), moa-eval / moa-export /
moa-report on a tiny run made here. The moa-generate / moa-chat / moa-serve examples (--help and docs)
are composed and their values checked (fast) and run on a tiny checkpoint (slow; moa-serve until it
answers GET /health, then SIGTERM). moa-bench's
documented commands must parse; tests/bench/ runs the benchmark. A documented command that cannot run
here says so on its own line with a comment starting ``# needs`` (e.g. ``# needs 8 GPUs``); those are
composed and validated only.
"""

from __future__ import annotations

import functools
import os
import re
import shlex
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from conftest import FIXTURES, OFFLINE_ENV, REPO, console_script, run_cli
from moa_train.bench.runner import build_parser
from moa_train.cli.keys import check_keys, override_error
from moa_train.cli.validate import validate
from moa_train.errors import one_line
from moa_train.serve.load import check_settings

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
HELP_COMMANDS = ("moa-train", "moa-eval", "moa-export", "moa-generate", "moa-chat", "moa-serve")  # Hydra ones
# (moa-report's and moa-bench's argparse --help print no examples; their documented commands are below)
ROOTS = {"moa-train": "train", "moa-eval": "eval", "moa-export": "export", "moa-generate": "generate",
         "moa-chat": "chat", "moa-serve": "serve"}  # fmt: skip
RUN_HERE = ("moa-train", "moa-eval", "moa-export", "moa-report")  # the others: tests/serve/
VALIDATED = {"train", "eval", "export"}  # roots with a rule table in cli/validate.py
SERVING = {"generate", "chat", "serve"}  # values checked by serve.load.check_settings
PIPED = re.compile(r"^echo .*?\| ")  # echo "..." | moa-chat ...: the command is what follows the pipe
PLACEHOLDER = re.compile(r"<[^<>\s]+(?: [^<>\s]+)*>")


def _logical_lines(block: str) -> list[str]:
    """Lines of a code block with trailing-backslash continuations joined."""
    lines, current = [], ""
    for raw in block.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        lines.append(current + line)
        current = ""
    if current:
        lines.append(current)
    return lines


def doc_commands() -> list[tuple[str, str, str]]:
    """(file:line label, command without its comment, the comment) for every moa-* command in a code block.

    A command whose next line in the block starts with ``error:`` is an example of an error: its comment
    is that line."""
    found = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for match in re.finditer(r"```[a-z]*\n(.*?)```", text, re.S):
            start = text[: match.start()].count("\n") + 2
            lines = _logical_lines(match.group(1))
            for offset, line in enumerate(lines):
                stripped = line.strip().removeprefix("$ ")
                if not stripped.startswith("moa-"):
                    continue
                command, _, comment = stripped.partition(" #")
                following = lines[offset + 1].strip() if offset + 1 < len(lines) else ""
                if following.startswith("error:"):
                    comment = following
                found.append((f"{path.name}:{start + offset}", command.strip(), comment.strip()))
    return found


@functools.cache
def help_text(command: str) -> str:
    """What ``command --help`` prints (the console script, once per test session)."""
    done = run_cli(command, "--help", cwd=REPO)
    assert done.returncode == 0, done.stderr
    return done.stdout


def help_commands() -> list[tuple[str, str, str]]:
    """Example lines (and the key=value list of the "Any value" line) of each command's --help."""
    found = []
    for command in HELP_COMMANDS:
        for line in help_text(command).splitlines():
            stripped = PIPED.sub("", line.strip())
            if stripped.startswith(command + " ") or stripped == command:
                text, _, comment = stripped.partition(" #")
                found.append((f"{command} --help", text.strip(), comment.strip()))
            if stripped.startswith("Any value: key=value ("):
                inner = stripped.split("(", 1)[1].split(")", 1)[0]
                scored = " checkpoint=runs/<run dir>" if command == "moa-eval" else ""  # a value needs a run
                for pair in inner.split(", "):
                    found.append((f"{command} --help", f"{command}{scored} {pair}", ""))
    return found


def _overrides(command: str) -> tuple[str, list[str]]:
    """(command name, its Hydra overrides) with placeholders such as <timestamp> filled in."""
    tokens = shlex.split(PLACEHOLDER.sub("x", command))
    name, args = tokens[0], [t for t in tokens[1:] if t not in ("...", "-m", "--multirun")]
    return name, [a for a in args if "=" in a]


def _sweep_first(overrides: list[str]) -> list[str]:
    """A sweep's first job: a,b,c -> a; choice(a, b) -> a; [tag(log, ] interval(a, b) -> a (lists in [...]
    stay whole)."""
    first = []
    for o in overrides:
        key, eq, value = o.partition("=")
        search = re.search(r"(?:choice|interval|range)\(\s*([^,)]+)", value)
        if eq and search:
            first.append(f"{key}={search.group(1).strip()}")
        else:
            first.append(o if "[" in o else o.split(",")[0])
    return first


def _composes(command: str) -> None:
    name, overrides = _overrides(command)
    root = ROOTS.get(name)
    if root is None:
        return
    if root in SERVING:  # the checkpoint is read at start only; base = the base model alone
        overrides = [o for o in overrides if not o.startswith("checkpoint=")] + ["checkpoint=base"]
    cfg = compose(root, overrides=_sweep_first(overrides), return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    if str(sweeper.get("_target_", "")).endswith("BasicSweeper") and sweeper.get("params"):
        # a sweep preset's own lists (sweep=leaderboard): its first job, the command line winning
        given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
        first = [f"{k}={str(v).split(',')[0]}" for k, v in sweeper.params.items() if k not in given]
        cfg = compose(root, overrides=first + _sweep_first(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # ${hydra:...} in a config resolves as inside the job
    with open_dict(cfg):
        del cfg["hydra"]
    check_keys(cfg, root)
    if root in VALIDATED:
        validate(cfg, root)
    if root in SERVING:
        check_settings(cfg)


def _no_rates_yet() -> bool:
    """The committed chosen-rates block of configs/sweep/leaderboard_seeds.yaml is empty."""
    from moa_train.report.leaderboard import rates_block

    config = Path(__file__).resolve().parents[2] / "configs" / "sweep" / "leaderboard_seeds.yaml"
    return config.read_text(encoding="utf-8").endswith(rates_block({}))


def _check(label: str, command: str, comment: str, failures: list[str]) -> None:
    """Compose and validate ``command``; an error example must fail with its documented line."""
    try:
        _composes(command)
    except Exception as exc:  # collect all, report every broken example at once
        root = ROOTS.get(command.split()[0], "train")
        line = one_line(override_error(exc, root) or exc)  # as the console script prints it
        if (
            "sweep=leaderboard_seeds" in command
            and _no_rates_yet()
            and line.startswith(
                "sweep=leaderboard_seeds has no chosen rates yet; run sweep=leaderboard first"
            )
        ):
            return  # phase 2 before any search has finished: the documented one-line refusal
        if not comment.startswith("error:"):
            failures.append(f"{label}: {command}: {line}")
        elif comment.removeprefix("error: ").split(";")[0] not in line:
            failures.append(f"{label}: {command}: printed {line!r}, the docs show {comment!r}")
        return
    if comment.startswith("error:"):
        failures.append(f"{label}: {command}: the docs show an error, but it composes and validates")


# ---- fast: every documented command composes and validates ------------------------------------------------


@pytest.fixture
def hydra_configs():
    """Hydra initialised once per test on the packaged configs (composing is then cheap); function
    scope, after conftest's autouse fixture has cleared Hydra's singletons."""
    import moa_train.cli.main  # noqa: F401  (registers the run-dir resolvers used by configs/hydra)

    GlobalHydra.instance().clear()
    with initialize_config_module("moa_train.configs", version_base="1.3"):
        yield
    GlobalHydra.instance().clear()


def test_documented_commands_compose_and_validate(hydra_configs) -> None:
    commands, failures = doc_commands(), []
    assert len(commands) > 40  # README and docs/ hold about 60
    for label, command, comment in commands:
        _check(label, command, comment, failures)
    assert not failures, "\n".join(failures)


def test_help_examples_compose_and_validate(hydra_configs) -> None:
    commands = help_commands()
    assert {c.split()[0] for _, c, _ in commands} == set(HELP_COMMANDS)
    failures: list[str] = []
    for label, command, comment in commands:
        _check(label, command, comment, failures)
    assert not failures, "\n".join(failures)


# key=value named in a help's prose ("a hub model: model=qwen3_0_6b"); not keys: the help's own
# "group=option" / "key=value" and moa-serve's request field stream=true
PROSE_PAIR = re.compile(r"(?<![\w.=-])([a-z_][a-z0-9_.]*)=([A-Za-z0-9_.]+)")
NOT_KEYS = {"group", "key", "stream"}


def test_help_prose_values_exist(hydra_configs) -> None:
    """Each key=value in a help's prose is a key and an option of that command, or of moa-train (export's
    help names router=none): it composes and its keys are known."""
    failures, checked = [], 0
    for command in HELP_COMMANDS:
        for line in help_text(command).splitlines():
            text = PIPED.sub("", line.strip())
            if text.startswith(command + " ") or text.startswith("Any value:"):
                continue  # the examples: test_help_examples_compose_and_validate
            for key, value in PROSE_PAIR.findall(text):
                if key in NOT_KEYS:
                    continue
                checked += 1
                errors = []
                for root in dict.fromkeys((ROOTS[command], "train")):  # or a training setting it names
                    try:
                        check_keys(compose(root, overrides=[f"{key}={value}"]), root)
                        break
                    except Exception as exc:
                        errors.append(one_line(exc))
                else:
                    failures.append(f"{command} --help: {key}={value}: {errors[0]}")
    assert checked >= 5 and not failures, "\n".join(failures)


def test_documented_bench_commands_parse() -> None:
    """moa-bench's documented commands use flags it has (running them takes minutes: tests/bench/)."""
    commands = [c for _, c, _ in doc_commands() if c.split()[0] == "moa-bench"]
    assert commands
    for command in commands:
        build_parser().parse_args(shlex.split(command)[1:])


# ---- slow: the commands run ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny MoA run, a tiny LoRA run (exportable) and a tiny two-job sweep, made once."""
    root = tmp_path_factory.mktemp("doc_examples")
    runs = {"moa": root / "runs" / "moa", "lora": root / "runs" / "lora"}
    for key, extra in (("moa", []), ("lora", ["experts=lora_r16", "router=none"])):
        done = run_cli("moa-train", "experiment=tiny", *extra, f"hydra.run.dir={runs[key]}", cwd=root)
        assert done.returncode == 0, done.stderr[-2000:]
    done = run_cli("moa-train", "-m", "experiment=tiny", "seed=0,1", "final_eval.enabled=false",
                   f"hydra.sweep.dir={root / 'multirun'}", cwd=root)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    runs["sweep"] = root / "multirun"
    runs["cwd"] = root
    return runs


def runnable(command: str, runs: dict[str, Path]) -> list[str]:
    """The argv that runs ``command`` here: checkpoints and runs are the tiny ones made here, the
    LLM-Adapters folder is the test slice, repository paths are absolute; moa-train runs as a dry run
    (validation, model build, parameter count) and moa-eval on 2 items per dataset with 8 new tokens."""
    argv = shlex.split(PLACEHOLDER.sub("x", command))
    name, out = argv[0], [argv[0]]
    for arg in argv[1:]:
        key, eq, value = arg.partition("=")
        if key in ("checkpoint", "resume") and value not in ("", "null"):
            base = runs["lora" if name == "moa-export" else "moa"]
            parts = []
            for one in value.split(","):  # a -m list
                tail = "/final" if one.rstrip("/").endswith("final") else ""
                tail = "/checkpoints/step-8" if "/checkpoints/" in one else tail
                if key == "resume" and not tail:  # a bare run dir: an interrupted run, its newest step
                    tail = "/checkpoints/step-4"
                parts.append(f"{base}{tail}")
            arg = f"{key}={','.join(parts)}"
        elif eq and ("LLM-Adapters" in value or "llm_adapters" in value):
            arg = re.sub(
                r"[^\[\],=]*(LLM-Adapters/dataset|llm_adapters)", str(FIXTURES / "llm_adapters"), arg
            )
        elif name == "moa-report" and not arg.startswith("-"):
            arg = str(runs["sweep"])
        if arg != "...":
            out.append(arg)
    if name == "moa-train" and not {"--help", "--cfg"} & set(out) and "dry_run=true" not in out:
        out.append("dry_run=true")
    if name == "moa-eval":  # 2 items per dataset, short answers: a check that it runs, not a score
        out += [
            "eval.limit=2",
            "max_new_tokens=8",
            *(["eval.skip_missing=true"] if "eval=commonsense8" in out else []),
        ]
    return out


@pytest.mark.slow
def test_documented_commands_run(tiny_runs: dict[str, Path]) -> None:
    import shutil

    failures, ran = [], 0
    for label, command, comment in doc_commands() + help_commands():
        if comment.startswith(("needs", "error:")) or command.split()[0] not in RUN_HERE:
            continue
        argv = runnable(command, tiny_runs)
        shutil.rmtree(tiny_runs["cwd"] / "exports", ignore_errors=True)  # export refuses a non-empty out
        # repository paths (tests/fixtures/...) are documented relative to the repository root
        cwd = REPO if any("=tests/" in a for a in argv) else tiny_runs["cwd"]
        done = run_cli(argv[0], *argv[1:], cwd=cwd)
        ran += 1
        if done.returncode != 0:
            failures.append(f"{label}: {' '.join(argv)}: {done.stderr.strip()[-400:]}")
    assert ran > 30 and not failures, "\n".join(failures)


def serving_examples() -> list[tuple[str | None, str]]:
    """(text piped on stdin or None, command) for each moa-generate / moa-chat / moa-serve example of the
    --help texts and the docs (``echo "..." | moa-chat ...`` pipes the echoed line)."""
    found: list[tuple[str | None, str]] = []
    for name in ("moa-generate", "moa-chat", "moa-serve"):
        for line in help_text(name).splitlines():
            match = re.match(r"^(?:echo (\".*?\"|\S+) \| )?(moa-\S+ .*)$", line.strip())
            if match and match.group(2).startswith(name + " "):
                piped = shlex.split(match.group(1))[0] + "\n" if match.group(1) else None
                found.append((piped, match.group(2).partition(" #")[0].strip()))
    found += [
        (None, c) for _, c, _ in doc_commands() if c.split()[0] in ("moa-generate", "moa-chat", "moa-serve")
    ]
    return list(dict.fromkeys(found))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve_until_healthy_then_stop(argv: list[str], cwd: Path) -> str:
    """Start moa-serve, wait for GET /health, stop it with SIGTERM; '' if it exited 0, else its stderr."""
    port = _free_port()
    argv = [a for a in argv if not a.startswith("port=")] + [f"port={port}"]
    proc = subprocess.Popen([console_script(argv[0]), *argv[1:]], cwd=cwd, env={**os.environ, **OFFLINE_ENV},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return "" if code == 0 else f"exit {code}: {proc.stderr.read().strip()[-400:]}"


@pytest.mark.slow
def test_serving_examples_run(tmp_path: Path) -> None:
    """Each moa-generate / moa-chat example runs on a tiny checkpoint and exits 0; each moa-serve example
    serves (GET /health answers) and stops with status 0 on SIGTERM (on a free port)."""
    run = tmp_path / "run"
    done = run_cli(
        "moa-train", "experiment=tiny", "final_eval.enabled=false", f"hydra.run.dir={run}", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-2000:]
    examples, failures = serving_examples(), []
    assert {c.split()[0] for _, c in examples} == {"moa-generate", "moa-chat", "moa-serve"}
    for number, (piped, command) in enumerate(examples):
        argv = shlex.split(PLACEHOLDER.sub("x", command))
        argv = [f"checkpoint={run}" if a.startswith("checkpoint=") else a for a in argv]
        cwd = tmp_path / f"example{number}"  # each example its own folder: outputs are not shared
        cwd.mkdir()
        (cwd / "prompts.jsonl").write_text('{"prompt": "What is 3 + 4?"}\n{"instruction": "Add 2 and 2."}\n')
        if argv[0] == "moa-serve":
            problem = _serve_until_healthy_then_stop(argv, cwd)
        else:
            result = subprocess.run([console_script(argv[0]), *argv[1:]], cwd=cwd, input=piped or "",
                                    env={**os.environ, **OFFLINE_ENV}, capture_output=True, text=True,
                                    timeout=600)  # fmt: skip
            problem = (
                "" if result.returncode == 0 else f"exit {result.returncode}: {result.stderr.strip()[-400:]}"
            )
        if problem:
            failures.append(f"{command}: {problem}")
    assert not failures, "\n".join(failures)
