"""moa-serve with the official ``openai`` client, moa-generate and moa-chat end to end, and the one-line
errors of the three commands, on one tiny trained run shared by the whole session."""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from conftest import OFFLINE_ENV, REPO, TINY, compose_config, console_script, train_in_process
from moa_train.serve.cli import chat_main, generate_main, serve_main

MAINS = {"moa-generate": generate_main, "moa-chat": chat_main, "moa-serve": serve_main}

# A larger init than the tiny model's default, and a few steps at a high learning rate: the answers then
# differ from prompt to prompt (so equality checks can fail) and the experts matter.
TINY_SERVED = TINY + [
    "final_eval.enabled=false",
    "trainer.max_steps=2",
    "optimizer.lr=0.05",
    "+model.arch.initializer_range=0.5",
    "trainer.cpu_threads=1",
]
PROMPTS = [f"Question {i}: what is {i} + {3 * i}?" + " really" * (i % 3) for i in range(8)]


@pytest.fixture(scope="module", autouse=True)
def keep_threads() -> Any:
    import torch

    before = torch.get_num_threads()  # cpu_threads=1 below sets the process-wide count
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def served_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("served") / "run"
    train_in_process(run_dir, TINY_SERVED)
    return run_dir


def invoke(main: Any, argv: list[str], cwd: Path) -> tuple[int, str]:
    """Run a console script's main in this process (``sys.argv`` patched): (exit status, stderr + stdout)."""
    out, err = io.StringIO(), io.StringIO()
    old_argv, old_cwd = sys.argv, os.getcwd()
    sys.argv, code = ["prog", *argv], 0
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
    return code, err.getvalue() + out.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(url: str, alive: Any, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            pytest.fail("moa-serve stopped before answering /health")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as reply:
                if json.load(reply)["status"] == "ok":
                    return
        except OSError:
            time.sleep(0.2)
    pytest.fail("moa-serve did not answer /health in time")


def serve_args(run: Path, port: int) -> list[str]:
    return [f"checkpoint={run}", f"port={port}", "cpu_threads=1", "max_new_tokens=12"]


@pytest.fixture(scope="module")
def server(served_run: Path) -> Any:
    """moa-serve as the console script sets it up (settings, port, model, engine, uvicorn), its server
    loop on a thread of this process: the HTTP path is the real one, without a second interpreter."""
    from moa_train.serve.server import start

    port = free_port()
    uvicorn_server, sock, engine, _ = start(compose_config(serve_args(served_run, port), config_name="serve"))
    thread = threading.Thread(target=uvicorn_server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, thread.is_alive)
        yield {"url": url, "port": port, "engine": engine}
    finally:
        uvicorn_server.should_exit = True
        thread.join(30)
        engine.stop(cancel=True, timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def client(server: dict) -> Any:
    import openai

    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0, timeout=120)


def model_id(client: Any) -> str:
    return client.models.list().data[0].id


def test_models_and_chat(client: Any, served_run: Path) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [f"{served_run.parent.name}/{served_run.name}"]
    reply = client.chat.completions.create(
        model=models[0].id, messages=[{"role": "user", "content": "What is 2 + 3?"}], max_tokens=8
    )
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 8 and reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_equals_non_streamed(client: Any) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    whole = client.chat.completions.create(model=model_id(client), messages=messages, max_tokens=10)
    stream = client.chat.completions.create(
        model=model_id(client),
        messages=messages,
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and text
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1  # really streamed
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_and_concurrent_equal_alone(client: Any) -> None:
    name = model_id(client)

    def complete(prompt: str) -> str:
        return client.completions.create(model=name, prompt=prompt, max_tokens=10).choices[0].text

    alone = [complete(p) for p in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(complete, PROMPTS))
    assert together == alone
    assert len(set(alone)) > 4  # different prompts, different answers: the check can fail
    usage = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=10).usage
    assert usage.completion_tokens == 10 or usage.completion_tokens < 10


def test_a_client_that_disconnects_cancels_its_stream(server: dict) -> None:
    import http.client

    engine = server["engine"]
    before = engine.stats["generated_tokens"]
    connection = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=60)
    body = json.dumps({"prompt": "hi", "max_tokens": 1800, "stream": True})
    connection.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    assert connection.getresponse().readline().startswith(b"data: ")  # generating
    connection.sock.close()
    connection.close()
    deadline = time.monotonic() + 60
    while engine.stats["generated_tokens"] == before and time.monotonic() < deadline:
        time.sleep(0.05)  # the batch ends once the cancel is seen
    assert 0 < engine.stats["generated_tokens"] - before < 1800


def test_router_extension_field(server: dict) -> None:
    body = {"prompt": "hello", "max_tokens": 4, "moa_router": True}
    reply = post(server["url"] + "/v1/completions", body)
    summary = reply["moa_router"][0]
    assert summary["layers"] == [0, 1] and len(summary["mean_gate"][0]) == len(summary["experts"])


def post(url: str, body: Any, raw: bytes | None = None) -> Any:
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return json.load(reply)
    except urllib.error.HTTPError as error:
        return {"status": error.code, **json.load(error)}


def test_malformed_requests_get_4xx_and_the_server_stays_up(server: dict, client: Any) -> None:
    import openai

    url = server["url"] + "/v1"
    assert post(url + "/chat/completions", None, raw=b"{not json")["status"] == 400
    assert post(url + "/chat/completions", {"messages": "hi"})["status"] == 400
    assert post(url + "/chat/completions", {"messages": [{"role": "robot", "content": "x"}]})["status"] == 400
    assert post(url + "/completions", {"prompt": "x", "max_tokens": 0})["status"] == 400
    assert post(url + "/completions", {"prompt": "x", "temperature": -1})["status"] == 400
    too_long = post(url + "/completions", {"prompt": "x " * 3000, "max_tokens": 10})
    assert too_long["status"] == 400 and "too many tokens" in too_long["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="not-this-one", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model_id(client), prompt="x", max_tokens=-3)
    with urllib.request.urlopen(server["url"] + "/health", timeout=10) as reply:
        assert json.load(reply)["status"] == "ok"
    assert client.completions.create(model=model_id(client), prompt="still here", max_tokens=2).choices


def test_port_in_use_is_one_line(served_run: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        code, out = invoke(serve_main, [f"checkpoint={served_run}", f"port={port}"], tmp_path)
    lines = out.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: cannot listen on 127.0.0.1:"), out


@pytest.mark.slow
def test_sigterm_finishes_in_flight_requests_and_exits_0(served_run: Path, tmp_path: Path) -> None:
    """The console script in its own process: SIGTERM with a request in flight."""
    import openai

    port = free_port()
    proc = subprocess.Popen(
        [console_script("moa-serve"), *serve_args(served_run, port)],
        cwd=tmp_path, env={**os.environ, **OFFLINE_ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, lambda: proc.poll() is None, timeout=300)
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(client.completions.create, prompt="a long answer please", max_tokens=12,
                                  model=client.models.list().data[0].id)  # fmt: skip
            time.sleep(0.2)
            proc.send_signal(signal.SIGTERM)
            assert pending.result(timeout=120).choices[0].finish_reason in ("stop", "length")
        assert proc.wait(timeout=60) == 0
        assert "moa-serve: stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- moa-generate and moa-chat (in this process: what the console scripts run after composing) ----------


def generate(run: Path, source: Path, output: Path, *extra: str) -> None:
    from moa_train.serve.generate import run as generate_run

    cfg = compose_config(
        [f"checkpoint={run}", f"input={source}", f"output={output}", "max_new_tokens=6", "progress=false",
         "max_batch_size=2", "cpu_threads=1", *extra],
        config_name="generate",
    )  # fmt: skip
    generate_run(cfg)


def test_generate_end_to_end_and_resume(served_run: Path, tmp_path: Path) -> None:
    records = [{"prompt": p, "id": i} for i, p in enumerate(PROMPTS[:4])]
    records.append({"messages": [{"role": "user", "content": "Hi"}], "id": 4})
    records.append({"instruction": "Add 2 and 3", "input": "", "id": 5})
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in records))
    full = tmp_path / "full.jsonl"
    generate(served_run, source, full, "router_stats=true")
    lines = [json.loads(line) for line in full.read_text().splitlines()]
    assert [line["id"] for line in lines] == list(range(6))
    for record, line in zip(records, lines):
        assert {k: line[k] for k in record} == record  # the input's fields are kept
        assert 0 < line["completion_tokens"] <= 6 and line["prompt_tokens"] > 0
        assert line["finish_reason"] in ("stop", "length") and isinstance(line["text"], str)
        assert len(line["router"]["mean_gate"]) == 2
    # an interrupted run: 3 lines written, a 4th torn mid-write; the re-run keeps them and completes
    resumed = tmp_path / "resumed.jsonl"
    text = full.read_text().splitlines(keepends=True)
    resumed.write_text("".join(text[:3]) + text[3][:20])
    generate(served_run, source, resumed, "router_stats=true")
    assert resumed.read_text() == full.read_text()
    assert (tmp_path / "resumed.jsonl.partial").read_text() == text[3][:20]
    before = resumed.stat().st_mtime_ns
    generate(served_run, source, resumed, "router_stats=true")  # all done: nothing to do
    assert resumed.stat().st_mtime_ns == before


def test_generate_refuses_output_of_another_input(served_run: Path, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"prompt": "a"}) + "\n")
    output = tmp_path / "out.jsonl"
    output.write_text(json.dumps({"prompt": "b", "text": "x"}) + "\n")
    with pytest.raises(ValueError, match="does not answer record 1"):
        generate(served_run, source, output)
    assert output.read_text() == json.dumps({"prompt": "b", "text": "x"}) + "\n"  # untouched


def test_chat_with_piped_stdin(served_run: Path) -> None:
    from moa_train.serve.chat import run as chat_run

    cfg = compose_config(
        [f"checkpoint={served_run}", "max_new_tokens=5", "cpu_threads=1"], config_name="chat"
    )
    stdout = io.StringIO()
    chat_run(cfg, io.StringIO("Hello\n/router\n/reset\nWhat is 2 + 2?\n/exit\nnever sent\n"), stdout)
    out = stdout.getvalue()
    assert "layer " in out and "mean gate over" in out  # the /router table of the first answer
    assert "(new conversation)" in out and not out.startswith("moa-chat:")  # piped: no banner
    table = out[out.index("layer ") : out.index("(new conversation)")]
    assert len(table.splitlines()) == 4  # header, 2 layers, the token count


@pytest.mark.slow
def test_chat_console_script_with_a_pipe(served_run: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [console_script("moa-chat"), f"checkpoint={served_run}", "max_new_tokens=5", "cpu_threads=1"],
        input="Hello\n/router\n", capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, **OFFLINE_ENV}, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "mean gate over" in proc.stdout


@pytest.mark.parametrize(
    "command, args, message",
    [
        (
            "moa-generate",
            ["checkpoint=/no/such/run", "input=in.jsonl", "output=o.jsonl"],
            "checkpoint not found",
        ),
        ("moa-generate", ["input=bad.jsonl", "output=o.jsonl"], "bad.jsonl line 2 is not valid JSON"),
        ("moa-chat", ["checkpoint=/no/such/run"], "checkpoint not found"),
        ("moa-serve", ["checkpoint=/no/such/run"], "checkpoint not found"),
        ("moa-serve", ["port=99999"], "port must be an integer"),
        ("moa-generate", ["temperature=-1", "input=in.jsonl", "output=o.jsonl"], "temperature must be"),
    ],
)
def test_bad_inputs_are_one_line(
    served_run: Path, tmp_path: Path, command: str, args: list[str], message: str
) -> None:
    (tmp_path / "in.jsonl").write_text('{"prompt": "a"}\n')
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    if not any(a.startswith("checkpoint=") for a in args):
        args = [f"checkpoint={served_run}", *args]
    code, out = invoke(MAINS[command], args, tmp_path)
    lines = out.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out
    assert not (tmp_path / "o.jsonl").exists()


def documented_commands() -> list[tuple[str, str]]:
    """(where, command) for every moa-generate / moa-chat / moa-serve line in the docs' code blocks and
    in the commands' --help examples."""
    found = []
    sources = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    sources += [REPO / "configs" / "hydra" / "help" / f"{n}.yaml" for n in ("generate", "chat", "serve")]
    for path in sources:
        text = path.read_text(encoding="utf-8")
        blocks = re.findall(r"```[a-z]*\n(.*?)```", text, re.S) if path.suffix == ".md" else [text]
        for block in blocks:
            for line in block.splitlines():
                stripped = line.strip()
                if re.match(r"^(echo .*\| )?moa-(generate|chat|serve) ", stripped):
                    found.append((path.name, stripped.split(" #")[0].split("| ")[-1]))
    return found


def test_documented_commands_compose_and_validate(served_run: Path) -> None:
    from moa_train.serve.load import check_settings

    commands = documented_commands()
    assert {c.split()[0] for _, c in commands} == set(MAINS)  # each command is documented with examples
    for where, command in commands:
        name, *args = shlex.split(re.sub(r"<[^<>\s]+>", "x", command))
        args = [a for a in args if not a.startswith("checkpoint=")] + [f"checkpoint={served_run}"]
        cfg = compose_config(args, config_name=name.removeprefix("moa-"))
        check_settings(cfg)  # values in range (the checkpoint exists: the fixture's)
        assert cfg.checkpoint == str(served_run), where
