"""``moa-chat``: a terminal conversation with a checkpoint, answers streamed as they are generated.

Each turn goes through the base model's chat template with the whole conversation so far. Commands:
``/reset`` starts a new conversation, ``/router`` prints which experts the last answer used (mean gate
per layer x expert over its prompt and answer tokens), ``/exit`` (or end of input) quits. With a pipe on
standard input every line is one user turn, and only the answers are printed (no prompt, no banner).
"""

from __future__ import annotations

import sys
from typing import Any, TextIO

from omegaconf import DictConfig

from moa_train.errors import MoATrainError
from moa_train.serve.engine import Request
from moa_train.serve.load import chat_ids, check_settings, load, sampling_from_config

HELP = "commands: /reset (new conversation), /router (experts of the last answer), /exit"


def router_table(summary: dict[str, Any] | None) -> str:
    """A compact layer x expert table of mean gates (the ``router`` field of a request)."""
    if not summary:
        return "no router data: this model has no routed experts (or no answer yet)"
    experts = summary["experts"]
    width = max(6, *(len(e) for e in experts))
    lines = ["layer " + " ".join(f"{e:>{width}}" for e in experts)]
    for layer, row in zip(summary["layers"], summary["mean_gate"]):
        lines.append(f"{layer:>5} " + " ".join(f"{v:>{width}.3f}" for v in row))
    lines.append(f"(mean gate over {summary['tokens']} tokens of the last prompt and answer)")
    return "\n".join(lines)


def run(cfg: DictConfig, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    check_settings(cfg)
    system = cfg.get("system")
    if system is not None and not isinstance(system, str):
        raise MoATrainError(f"system must be a string, got {system!r}")
    sampling = sampling_from_config(cfg)
    loaded = load(cfg)
    if not getattr(loaded.tokenizer, "chat_template", None):
        raise MoATrainError(
            "the base model's tokenizer has no chat template; use moa-generate with 'prompt' records"
        )
    interactive = stdin.isatty()
    engine = loaded.engine(cfg)
    routed = hasattr(loaded.model, "capture_gates")
    history: list[dict[str, str]] = []
    last_router: dict[str, Any] | None = None

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    if interactive:
        write(f"moa-chat: {loaded.name} ({HELP})\n")
    while True:
        if interactive:
            write("> ")
        line = stdin.readline()
        if not line:  # end of input
            if interactive:
                write("\n")
            return
        text = line.rstrip("\n")
        command = text.strip()
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return
        if command == "/reset":
            history, last_router = [], None
            write("(new conversation)\n")
            continue
        if command == "/router":
            write(router_table(last_router) + "\n")
            continue
        if command in ("/help", "/?"):
            write(HELP + "\n")
            continue
        messages = ([{"role": "system", "content": system}] if system else []) + history
        messages.append({"role": "user", "content": text})
        ids = chat_ids(loaded.tokenizer, messages)
        request = Request(ids, sampling, router=routed, on_text=write)
        try:
            engine.run_batch([request])
        except KeyboardInterrupt:
            request.cancel()
            write("\n(interrupted)\n")
            continue
        write("\n")
        if request.finish_reason == "length" and interactive:
            write(f"(answer cut at max_new_tokens={sampling.max_new_tokens})\n")
        history += [{"role": "user", "content": text}, {"role": "assistant", "content": request.text}]
        last_router = request.router_summary
