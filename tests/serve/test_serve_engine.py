"""The serving engine on tiny random models: batched answers equal answers alone (greedy and seeded
sampling, soft / sparse / instance-level routers), stop strings and streaming, the per-request router
summary against a plain forward, nucleus filtering against its definition, the queue and its limits."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch

from moa_train import MoAConfig, get_moa_model
from moa_train.serve.engine import (
    Engine,
    EngineStopped,
    QueueFull,
    Request,
    SamplingParams,
    _top_p_filter,
)
from tiny_models import char_tokenizer, tiny_model

PROMPTS = [
    "hello",
    "a much longer prompt, with padding",
    "x",
    "12+3=",
    "what is it",
    "zz top!",
    "q?",
    "abcdefghijklmnopqrs",
]
ROUTERS = {
    "soft": {"kind": "swiglu"},
    "sparse": {"kind": "swiglu", "selection": "threshold", "max_threshold": 0.5},
    "instance": {"kind": "swiglu", "granularity": "instance"},
}


@pytest.fixture(autouse=True)
def one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: intra-op threads only cost time on a busy machine
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok() -> Any:
    return char_tokenizer()


def model_of(kind: str) -> torch.nn.Module:
    base = tiny_model(seed=0)
    base.generation_config.eos_token_id = 2  # the char tokenizer's </s>
    if kind == "plain":
        return base
    prompt_len = 3 if kind == "soft" else 0
    model = get_moa_model(
        base, MoAConfig(lora_rank=4, pa_size=8, prompt_len=prompt_len, router=ROUTERS[kind])
    )
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # fresh adapters are near no-ops
        torch.manual_seed(1)
        for param in model.adapter_state_dict().values():
            param.normal_(0.0, 0.3)
    return model.eval()


def requests(tok: Any, params: SamplingParams, router: bool = False) -> list[Request]:
    return [Request(tok(p)["input_ids"], params, router=router) for p in PROMPTS]


@pytest.mark.parametrize("kind", ["plain", "soft", "sparse", "instance"])
def test_batched_greedy_equals_alone(tok: Any, kind: str) -> None:
    engine = Engine(model_of(kind), tok)
    params = SamplingParams(max_new_tokens=12)
    alone = []
    for request in requests(tok, params):
        engine.run_batch([request])
        alone.append((request.tokens, request.text, request.finish_reason))
    batch = requests(tok, params)
    engine.run_batch(batch)
    assert [(r.tokens, r.text, r.finish_reason) for r in batch] == alone
    assert len({tuple(t) for t, _, _ in alone}) > 4  # the answers differ: the check can fail


def test_seeded_sampling_is_the_same_in_any_batch(tok: Any) -> None:
    engine = Engine(model_of("soft"), tok)
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9, seed=7)
    alone = Request(tok("hello")["input_ids"], params)
    engine.run_batch([alone])
    batch = requests(tok, params)  # PROMPTS[0] == "hello", with greedy and other seeds beside it
    batch[1] = Request(batch[1].prompt_ids, SamplingParams(max_new_tokens=10))
    batch[2] = Request(batch[2].prompt_ids, SamplingParams(max_new_tokens=10, temperature=0.5, seed=8))
    engine.run_batch(batch)
    assert batch[0].tokens == alone.tokens
    other = Request(tok("hello")["input_ids"], SamplingParams(max_new_tokens=10, temperature=1.0, seed=8))
    engine.run_batch([other])
    assert other.tokens != alone.tokens  # the seed matters


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.log(torch.tensor([0.5, 0.05, 0.3, 0.15]))
    kept = torch.isfinite(_top_p_filter(logits, 0.7))
    assert kept.tolist() == [True, False, True, False]  # 0.5 + 0.3 >= 0.7
    kept = torch.isfinite(_top_p_filter(logits, 0.81))
    assert kept.tolist() == [True, False, True, True]
    assert torch.equal(_top_p_filter(logits, 1.0), logits)


def test_stop_strings_and_streaming(tok: Any) -> None:
    engine = Engine(model_of("soft"), tok)
    free = Request(tok("hello")["input_ids"], SamplingParams(max_new_tokens=16))
    engine.run_batch([free])
    stop = free.text[5:7]  # a stop string the answer reaches
    assert len(stop) == 2
    pieces: list[str] = []
    cut = Request(
        tok("hello")["input_ids"], SamplingParams(max_new_tokens=16, stop=(stop,)), on_text=pieces.append
    )
    engine.run_batch([cut])
    assert cut.text == free.text[: free.text.find(stop)]
    assert cut.finish_reason == "stop"
    assert "".join(pieces) == cut.text
    assert stop not in "".join(pieces)
    pieces = []
    streamed = Request(tok("hello")["input_ids"], SamplingParams(max_new_tokens=16), on_text=pieces.append)
    engine.run_batch([streamed])
    assert len(pieces) > 1 and "".join(pieces) == free.text
    assert free.finish_reason == "length" and len(free.tokens) == 16


def test_router_summary_is_the_mean_gate_of_a_plain_forward(tok: Any) -> None:
    """Per request, the mean gate over its real tokens; a teacher-forced forward of prompt + answer
    (the last token never enters a forward) gives the same numbers."""
    model = model_of("soft")
    engine = Engine(model, tok)
    batch = requests(tok, SamplingParams(max_new_tokens=6), router=True)
    engine.run_batch(batch)
    for request in batch[:3]:
        ids = torch.tensor([request.prompt_ids + request.tokens[:-1]])
        with torch.no_grad(), model.capture_gates(primary_only=True) as gates:
            model(input_ids=ids)
        expected = [g[0].mean(0).tolist() for g in gates]
        summary = request.router_summary
        assert summary["tokens"] == ids.shape[1]
        assert summary["layers"] == [0, 1] and len(summary["experts"]) == len(expected[0])
        got = torch.tensor(summary["mean_gate"])
        assert torch.allclose(got, torch.tensor(expected), atol=2e-4), (got, expected)


def test_queue_bounds_and_stop(tok: Any) -> None:
    engine = Engine(model_of("plain"), tok, max_queue=2)  # not started: requests stay queued
    params = SamplingParams(max_new_tokens=3)
    engine.submit(Request([5, 6], params))
    engine.submit(Request([5, 6], params))
    with pytest.raises(QueueFull):
        engine.submit(Request([5, 6], params))
    engine.start()
    engine.stop()  # finishes the queued requests, then takes no more
    with pytest.raises(EngineStopped):
        engine.submit(Request([5, 6], params))


def test_worker_batches_concurrent_requests(tok: Any) -> None:
    engine = Engine(model_of("sparse"), tok, max_batch_size=8, batch_wait_s=0.2).start()
    params = SamplingParams(max_new_tokens=8)
    alone = []
    for request in requests(tok, params):
        engine.run_batch([request])
        alone.append(request.tokens)
    engine.stats["max_batch"] = 0
    submitted = requests(tok, params)
    threads = [threading.Thread(target=engine.submit, args=(r,)) for r in submitted]
    for thread in threads:
        thread.start()
    for request in submitted:
        assert request.done.wait(60)
    engine.stop()
    assert [r.tokens for r in submitted] == alone
    assert engine.stats["max_batch"] > 1  # they really shared forwards


def test_sampling_params_are_checked() -> None:
    for bad in (
        SamplingParams(max_new_tokens=0),
        SamplingParams(temperature=-1.0),
        SamplingParams(top_p=0.0),
        SamplingParams(stop=("",)),
    ):
        with pytest.raises(ValueError):
            bad.check()


def test_eos_ends_a_row_unless_ignored(tok: Any) -> None:
    model = model_of("plain")
    engine = Engine(model, tok)
    free = Request(tok("hello")["input_ids"], SamplingParams(max_new_tokens=12))
    engine.run_batch([free])
    eos = free.tokens[4]  # make a token the answer produces an EOS of the model's generation config
    first = free.tokens.index(eos)
    model.generation_config.eos_token_id = [2, eos]
    engine = Engine(model, tok)
    stopped = Request(tok("hello")["input_ids"], SamplingParams(max_new_tokens=12))
    ignored = Request(tok("hello")["input_ids"], SamplingParams(max_new_tokens=12, ignore_eos=True))
    engine.run_batch([stopped, ignored, Request(tok("other")["input_ids"], SamplingParams(max_new_tokens=3))])
    assert stopped.tokens == free.tokens[: first + 1] and stopped.finish_reason == "stop"
    assert ignored.tokens == free.tokens and ignored.finish_reason == "length"


# ---- the HTTP app in this process (fastapi's TestClient): API key, full queue, shutdown -------------------


def app_client(tok: Any, key: str | None = None, max_queue: int = 8, start: bool = True) -> Any:
    from fastapi.testclient import TestClient

    from moa_train.serve.load import Loaded
    from moa_train.serve.server import Service, build_app

    model = model_of("soft")
    loaded = Loaded(model, tok, "tiny", None, "fp32", "alpaca", 256)
    engine = Engine(model, tok, max_queue=max_queue)
    if start:
        engine.start()
    service = Service(loaded, engine, SamplingParams(max_new_tokens=4), None)
    return TestClient(build_app(service, key)), engine


def test_api_key_is_required_when_set(tok: Any) -> None:
    client, engine = app_client(tok, key="sesame")
    body = {"prompt": "hi", "max_tokens": 2}
    assert client.post("/v1/completions", json=body).status_code == 401
    wrong = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    assert client.get("/health").status_code == 200  # health needs no key
    ok = client.post("/v1/completions", json=body, headers={"Authorization": "Bearer sesame"})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2
    engine.stop()


def test_full_queue_is_503_and_a_stopped_engine_too(tok: Any) -> None:
    client, engine = app_client(tok, max_queue=1, start=False)  # no worker: the first request stays queued
    engine.submit(Request([5, 6], SamplingParams(max_new_tokens=2)))
    full = client.post("/v1/completions", json={"prompt": "hi"})
    assert full.status_code == 503 and "queue is full" in full.json()["error"]["message"]
    engine.start()
    engine.stop()
    stopping = client.post("/v1/completions", json={"prompt": "hi"})
    assert stopping.status_code == 503 and stopping.json()["error"]["type"] == "server_shutting_down"
