"""`dsexport serve`: the real server (uvicorn on 127.0.0.1, an ephemeral port) over the embedded
model's bundle, driven by the official openai client, every response checked with the client's
own pydantic models."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import types
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from dsexport import EMBEDDED_MODEL
from dsexport.core.errors import NumericalError
from dsexport.runtime import Engine
from dsexport.serve.app import make_server_state
from dsexport.serve.server import ServerThread

KEY = "test-key-7f3a"
MODEL = "tiny"
HELLO = [{"role": "user", "content": "And God said unto Moses,"}]
ERROR_FIELDS = {"message", "type", "param", "code"}


def _build(path, **kwargs):
    from dsexport.build import BuildConfig, build_bundle

    build_bundle(BuildConfig(EMBEDDED_MODEL, path, **kwargs))
    return path


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return _build(tmp_path_factory.mktemp("serve") / "tiny")


@pytest.fixture(scope="module")
def reference(bundle):
    """The same bundle generating one request at a time: what every response must equal."""
    return Engine.load(bundle, threads=1)


def _start(bundle, **options):
    engine = Engine.load(bundle, threads=2, **options.pop("load", {}))
    app, scheduler = make_server_state(engine, MODEL, **options)
    server = ServerThread(app).start()
    return types.SimpleNamespace(url=server.url, engine=engine, scheduler=scheduler, server=server)


def _stop(served):
    served.server.stop()
    served.scheduler.close()


@pytest.fixture(scope="module")
def served(bundle):
    s = _start(bundle, parallel=4, max_queue=12, api_key=KEY, max_body_bytes=1 << 20)
    yield s
    _stop(s)


def client(served, key=KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0, timeout=60)


def http(served, method, path, body=None, key=KEY, content_type="application/json"):
    """(status, headers, parsed JSON or text) of a plain HTTP request."""
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    headers = {"Content-Type": content_type} if data is not None else {}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(served.url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            status, hdrs, raw = r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        status, hdrs, raw = e.code, e.headers, e.read()
    try:
        return status, hdrs, json.loads(raw)
    except ValueError:
        return status, hdrs, raw.decode()


def chat(c, **kwargs) -> ChatCompletion:
    """A non-streaming chat completion, validated from the server's raw JSON."""
    raw = c.chat.completions.with_raw_response.create(model=MODEL, **{"messages": HELLO, **kwargs})
    return ChatCompletion.model_validate(raw.http_response.json())


def completion(c, **kwargs) -> Completion:
    raw = c.completions.with_raw_response.create(model=MODEL, **kwargs)
    return Completion.model_validate(raw.http_response.json())


def stream_chat(c, **kwargs) -> list[ChatCompletionChunk]:
    chunks = c.chat.completions.create(model=MODEL, stream=True, **{"messages": HELLO, **kwargs})
    return [ChatCompletionChunk.model_validate(chunk.to_dict()) for chunk in chunks]


def _text(chunks) -> str:
    return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)


def _wait_idle(scheduler, timeout=10.0):
    deadline = time.monotonic() + timeout
    while scheduler._rows or scheduler.running_rows:
        assert time.monotonic() < deadline, "the scheduler did not free its rows"
        time.sleep(0.01)


def _ticket(scheduler, job_id):
    return next(t for t in reversed(scheduler.recent) if t.job.id == job_id)


# ---- the endpoints ----------------------------------------------------------------------------
def test_models_health_and_keys(served):
    c = client(served)
    models = c.models.list()
    assert [Model.model_validate(m.to_dict()).id for m in models.data] == [MODEL]
    assert Model.model_validate(c.models.retrieve(MODEL).to_dict()).owned_by == "dsexport"
    status, _, body = http(served, "GET", "/health", key=None)  # no key needed
    assert status == 200 and body["status"] == "ok"
    with pytest.raises(openai.AuthenticationError) as e:
        client(served, key="wrong-key").models.list()
    assert e.value.status_code == 401 and set(e.value.body) == ERROR_FIELDS
    assert e.value.body["code"] == "invalid_api_key"
    for path in ("/v1/models", "/metrics"):  # no key: 401 everywhere but /health
        status, _, body = http(served, "GET", path, key=None)
        assert status == 401 and set(body["error"]) == ERROR_FIELDS


def test_greedy_chat_equals_engine_generate(served, reference):
    reply = chat(client(served), max_tokens=24, temperature=0)
    expected = reference.generate(reference.encode_chat(HELLO), max_new_tokens=24)
    choice = reply.choices[0]
    assert choice.message.content == expected.text and choice.message.role == "assistant"
    assert choice.finish_reason == "length" and reply.object == "chat.completion" and reply.model == MODEL
    assert reply.id.startswith("chatcmpl-") and abs(reply.created - time.time()) < 60
    assert reply.usage.prompt_tokens == len(expected.prompt_ids) and reply.usage.completion_tokens == 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 24
    assert reply.timings["ttft_s"] >= reply.timings["queue_s"] >= 0  # extension: where the time went


def test_streaming_matches_non_streaming_and_holds_stop_strings(served):
    c = client(served)
    full = chat(c, max_tokens=20, temperature=0).choices[0].message.content
    chunks = stream_chat(c, max_tokens=20, temperature=0, stream_options={"include_usage": True})
    assert len({ch.id for ch in chunks}) == 1 and all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert _text(chunks) == full and len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) > 3
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert all(ch.usage is None for ch in chunks[:-1])
    # a stop string of several tokens: nothing of it reaches the client, in any chunk
    words = full.split()
    stop = " ".join(words[4:6])  # e.g. "the children": starts mid-text, spans tokens
    cut = full[: full.index(stop)]
    chunks = stream_chat(c, max_tokens=20, temperature=0, stop=[stop, "zzzz"])
    assert _text(chunks) == cut and stop not in _text(chunks)
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["stop"]
    assert chat(c, max_tokens=20, temperature=0, stop=stop).choices[0].message.content == cut


def test_legacy_completions_with_text_and_token_ids(served, reference):
    c = client(served)
    prompt = "In the beginning God"
    by_text = completion(c, prompt=prompt, max_tokens=10, temperature=0)
    ids = reference.encode(prompt)
    by_ids = completion(c, prompt=ids, max_tokens=10, temperature=0)
    expected = reference.generate(ids, max_new_tokens=10).text
    assert by_text.choices[0].text == by_ids.choices[0].text == expected
    assert by_text.object == "text_completion" and by_text.id.startswith("cmpl-")
    assert by_text.usage.prompt_tokens == len(ids)
    both = completion(c, prompt=[prompt, "def main("], max_tokens=6, temperature=0)
    assert [ch.index for ch in both.choices] == [0, 1] and both.choices[0].text == expected[: len(both.choices[0].text)]
    assert both.choices[1].text == reference.generate("def main(", max_new_tokens=6).text
    assert completion(c, prompt=prompt, temperature=0).usage.completion_tokens == 16  # OpenAI's default max_tokens
    chunks = [_completion_chunk(ch) for ch in
              c.completions.create(model=MODEL, prompt=ids, max_tokens=10, temperature=0, stream=True)]
    assert "".join(ch.choices[0].text for ch in chunks) == expected
    assert [ch.choices[0].finish_reason for ch in chunks][-1] == "length"


def _completion_chunk(chunk) -> Completion:
    """A legacy completion's stream chunk. The client types it as Completion, whose finish_reason
    must be set, but OpenAI (and this server) send null until the last chunk: validate the rest."""
    data = chunk.to_dict()
    finish = [ch.get("finish_reason") for ch in data["choices"]]
    checked = Completion.model_validate({**data, "choices": [{**ch, "finish_reason": ch.get("finish_reason") or "stop"}
                                                             for ch in data["choices"]]})
    for choice, reason in zip(checked.choices, finish):
        choice.finish_reason = reason
    return checked


def test_max_tokens_and_max_completion_tokens_stop_at_exactly_n(served):
    c = client(served)
    for kwargs, n in (({"max_tokens": 7}, 7), ({"max_completion_tokens": 5}, 5)):
        reply = chat(c, temperature=0, **kwargs)
        assert reply.usage.completion_tokens == n and reply.choices[0].finish_reason == "length"
        chunks = stream_chat(c, temperature=0.8, seed=1, stream_options={"include_usage": True}, **kwargs)
        assert chunks[-1].usage.completion_tokens == n


def test_seeds_reproduce_and_n_samples_differ(served, reference):
    c = client(served)
    one = chat(c, max_tokens=12, temperature=1.0, seed=11)
    assert chat(c, max_tokens=12, temperature=1.0, seed=11).choices[0].message.content == one.choices[0].message.content
    expected = reference.generate(reference.encode_chat(HELLO), max_new_tokens=12, temperature=1.0, seed=11).text
    assert one.choices[0].message.content == expected
    two = chat(c, max_tokens=12, temperature=1.0, seed=11, n=2)
    texts = [ch.message.content for ch in two.choices]
    assert [ch.index for ch in two.choices] == [0, 1] and texts[0] == expected and texts[0] != texts[1]
    assert two.usage.completion_tokens == 24 and two.usage.prompt_tokens == one.usage.prompt_tokens


def test_logprobs_shapes(served):
    c = client(served)
    reply = chat(c, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == 6 and "".join(t.token for t in content) == reply.choices[0].message.content
    for t in content:
        assert len(t.top_logprobs) == 3 and t.logprob <= 0 and bytes(t.bytes).decode() == t.token
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
        assert t.top_logprobs[0].token == t.token and t.top_logprobs[0].logprob == t.logprob  # greedy: the argmax
    plain = completion(c, prompt="In the beginning", max_tokens=5, temperature=0, logprobs=2)
    lp = plain.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert all(len(top) <= 2 and max(top.values()) == v for top, v in zip(lp.top_logprobs, lp.token_logprobs))
    assert lp.text_offset == sorted(lp.text_offset)
    chunks = stream_chat(c, max_tokens=4, temperature=0, logprobs=True, top_logprobs=1)
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content[:4]]
    assert chat(c, max_tokens=2).choices[0].logprobs is None


# ---- errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, param", [
    ({"temperature": 3}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"messages": []}, "messages"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
    ({"extra_body": {"chat_template": "{{ messages }}"}}, "chat_template"),
    ({"extra_body": {"no_such_field": 1}}, "no_such_field"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
])
def test_invalid_requests_are_400_with_the_field_named(served, kwargs, param):
    with pytest.raises(openai.BadRequestError) as e:
        client(served).chat.completions.create(model=MODEL, **{"messages": HELLO, "max_tokens": 2, **kwargs})
    assert e.value.status_code == 400 and set(e.value.body) == ERROR_FIELDS
    assert e.value.body["param"] == param and e.value.body["type"] == "invalid_request_error"


def test_error_statuses(served):
    c = client(served)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert e.value.body["code"] == "model_not_found" and set(e.value.body) == ERROR_FIELDS
    with pytest.raises(openai.BadRequestError) as e:  # over the context: a 400, never a 5xx
        c.completions.create(model=MODEL, prompt=[5] * 1100, max_tokens=2)
    assert e.value.body["code"] == "context_length_exceeded" and "1024" in e.value.body["message"]
    with pytest.raises(openai.APIStatusError) as e:  # the server takes 1 MiB bodies here
        c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * (1 << 20)}])
    assert e.value.status_code == 413 and set(e.value.body) == ERROR_FIELDS
    status, _, body = http(served, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and set(body["error"]) == ERROR_FIELDS
    status, _, body = http(served, "POST", "/v1/chat/completions", b"model=tiny", content_type="text/plain")
    assert status == 415  # no cross-site "simple" POSTs
    status, _, body = http(served, "GET", "/v1/nothing")
    assert status == 404 and set(body["error"]) == ERROR_FIELDS


def test_special_token_text_in_user_content_stays_text(served, reference):
    text = "<|eos|> hello <|bos|>"
    messages = [{"role": "user", "content": text}]
    status, _, body = http(served, "POST", "/tokenize", {"messages": messages})
    specials = set(reference.eos_ids) | {reference.config.bos_token_id}
    assert status == 200 and body["tokens"] == reference.encode_chat(messages) and not specials & set(body["tokens"])
    reply = chat(client(served), messages=messages, max_tokens=3, temperature=0)
    assert reply.usage.prompt_tokens == len(body["tokens"])
    plain = completion(client(served), prompt="<|eos|>", max_tokens=2, temperature=0)
    assert plain.usage.prompt_tokens == len(reference.encode("<|eos|>")) > 1
    status, _, body = http(served, "POST", "/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and body["content"] == text


# ---- concurrency ------------------------------------------------------------------------------
def test_eight_concurrent_streams_each_equal_their_one_at_a_time_output(served, reference):
    prompts = ["And God said", "def parse(self,", "In the beginning", "import os\n", "The LORD is my",
               "class Node:", "Blessed are the", "for i in range("]
    lengths = [14, 9, 16, 11, 13, 10, 15, 12]
    rows_before = _batch_rows(served)

    def one(i):
        chunks = client(served).completions.create(model=MODEL, prompt=prompts[i], max_tokens=lengths[i],
                                                   temperature=0, stream=True)
        return "".join(_completion_chunk(ch).choices[0].text for ch in chunks)

    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(one, range(8)))
    assert got == [reference.generate(p, max_new_tokens=n).text for p, n in zip(prompts, lengths)]
    count, single = _batch_rows(served)
    assert count - rows_before[0] > single - rows_before[1]  # some steps decoded several rows together


def _batch_rows(served) -> tuple[float, float]:
    """(steps, steps that decoded at most one row) from /metrics."""
    _, _, text = http(served, "GET", "/metrics")
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines() if line.startswith("dsexport_batch_rows")}
    return values.get("dsexport_batch_rows_count", 0), values.get('dsexport_batch_rows_bucket{le="1"}', 0)


def test_a_closed_stream_frees_the_engine_within_one_step(served, reference):
    c = client(served)
    stream = c.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=900, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    first = [next(stream) for _ in range(4)]
    stream.close()
    _wait_idle(served.scheduler)
    ticket = _ticket(served.scheduler, first[0].id)
    assert ticket.outcome == "cancelled" and ticket.generated_after_cancel == 0
    assert ticket.generated < 300  # stopped long before its 900 tokens
    assert chat(c, max_tokens=3, temperature=0).choices[0].finish_reason == "length"  # the engine is free


def test_a_full_queue_gives_429_and_cancelling_a_queued_request_leaves_the_running_one(bundle, reference):
    s = _start(bundle, parallel=1, max_queue=1)
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
        running = c.completions.create(model=MODEL, prompt="And God said", max_tokens=150, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
        queued = c.completions.create(model=MODEL, prompt="In the beginning", max_tokens=150, stream=True)
        with pytest.raises(openai.RateLimitError) as e:
            c.completions.create(model=MODEL, prompt="x", max_tokens=2)
        assert e.value.status_code == 429 and int(e.value.response.headers["retry-after"]) >= 1
        assert e.value.body["code"] == "queue_full" and set(e.value.body) == ERROR_FIELDS
        queued.close()  # it waits for the one row: cancelling it leaves the running request alone
        text = "".join(ch.choices[0].text for ch in running)
        assert text == reference.generate("And God said", max_new_tokens=150, ignore_eos=True).text
        _wait_idle(s.scheduler)
        outcomes = sorted(t.outcome for t in s.scheduler.recent)
        assert outcomes == ["cancelled", "ok"] and min(t.generated for t in s.scheduler.recent) == 0
    finally:
        _stop(s)


def test_an_engine_error_mid_stream_reaches_the_client(served):
    backend, calls = served.engine.backend, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 3:
            raise NumericalError("the onnxruntime decoder produced non-finite logits (NaN/Inf)")
        return type(backend).forward(backend, *args, **kwargs)

    backend.forward = failing
    try:
        stream = client(served).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=50, stream=True)
        got = []
        with pytest.raises(openai.APIError, match="non-finite"):
            got.extend(stream)
        assert got and _text(got)  # some text came first
        calls.clear()
        calls.extend([1] * 10)
        with pytest.raises(openai.InternalServerError) as e:
            chat(client(served), max_tokens=5)
        assert e.value.body["code"] == "engine_error" and set(e.value.body) == ERROR_FIELDS
    finally:
        del backend.forward
    assert chat(client(served), max_tokens=3).usage.completion_tokens == 3  # the server recovered
    assert http(served, "GET", "/health")[0] == 200


def test_metrics_are_prometheus_text(served):
    chat(client(served), max_tokens=3)
    status, headers, text = http(served, "GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    for name in ("dsexport_time_to_first_token_seconds_count", "dsexport_time_per_output_token_seconds_bucket",
                 "dsexport_queue_depth", "dsexport_request_tokens_per_second_sum", "dsexport_generated_tokens_total"):
        assert name in text
    ttft = [line for line in text.splitlines() if line.startswith("dsexport_time_to_first_token_seconds_count")]
    assert float(ttft[0].split()[-1]) >= 1


# ---- paged bundles: what only an expert-aware server can say -------------------------------------
def test_paged_bundle_reports_expert_cache_per_response_and_routing_on_metrics(tmp_path_factory, reference):
    path = _build(tmp_path_factory.mktemp("serve-paged") / "tiny", paged=True)
    s = _start(path, parallel=2, max_queue=2, load={"expert_cache_mb": 4.0})  # about a fifth of the experts
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
        reply = c.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
        body = ChatCompletion.model_validate(reply.http_response.json())
        expected = reference.generate(reference.encode_chat(HELLO), max_new_tokens=12).text
        assert body.choices[0].message.content == expected  # same tokens whatever is resident
        cache = body.expert_cache
        assert 0 <= cache["hit_rate"] < 1 and cache["bytes_read_per_token"] > 0 and cache["stall_s"] >= 0
        assert cache["decode_steps"] >= 11 and cache["experts_per_layer_step"] >= 1
        _, _, text = http(s, "GET", "/metrics", key=None)
        routed = [line for line in text.splitlines() if line.startswith("dsexport_expert_routing_total{")]
        assert len(routed) == 3 and all(float(line.split()[-1]) > 0 for line in routed)  # 3 MoE layers
        imbalance = [float(line.split()[-1]) for line in text.splitlines()
                     if line.startswith("dsexport_expert_routing_imbalance{")]
        assert imbalance and all(x >= 1 for x in imbalance)
        assert "dsexport_expert_cache_hit_rate" in text and "dsexport_experts_per_layer_step_count" in text
    finally:
        _stop(s)


def test_concurrent_requests_do_not_block_health(served):
    """The event loop stays responsive while the worker decodes."""
    done = threading.Event()

    def long():
        chat(client(served), max_tokens=200, temperature=0, extra_body={"ignore_eos": True})
        done.set()

    t = threading.Thread(target=long)
    t.start()
    time.sleep(0.2)
    start = time.perf_counter()
    assert http(served, "GET", "/health", key=None)[0] == 200
    assert time.perf_counter() - start < 1.0
    t.join(60)
    assert done.is_set()


def test_mtp_drafting_reports_its_acceptance(bundle, reference):
    s = _start(bundle, parallel=4, max_queue=2, load={"draft": "mtp"})
    try:
        c = openai.OpenAI(base_url=s.url + "/v1", api_key="none", max_retries=0, timeout=60)
        reply = chat(c, max_tokens=20, temperature=0)
        assert reply.choices[0].message.content == reference.generate(reference.encode_chat(HELLO),
                                                                      max_new_tokens=20).text
        draft = reply.draft
        assert draft["mode"] == "mtp" and draft["drafted"] > 0 and 0 <= draft["acceptance_rate"] <= 1
        assert draft["decoder_runs"] < 20  # two tokens per decoder run when a draft is accepted
        with pytest.raises(openai.BadRequestError) as e:  # drafting is per sequence
            chat(c, max_tokens=2, n=2)
        assert e.value.body["param"] == "n"
        _, _, text = http(s, "GET", "/metrics", key=None)
        assert metric_value(text, "dsexport_draft_tokens_total") == draft["drafted"]
        assert metric_value(text, "dsexport_draft_accepted_total") == draft["accepted"]
    finally:
        _stop(s)


def metric_value(text: str, name: str) -> float:
    return float(next(line for line in text.splitlines() if line.startswith(name + " ")).split()[-1])


# ---- the command line -----------------------------------------------------------------------
def test_the_serve_command_listens_and_answers(bundle):
    proc = subprocess.Popen([sys.executable, "-c", "from dsexport.cli import main; main()", "serve", str(bundle),
                             "--port", "0", "--threads", "1", "--log-level", "warning"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "DSEXPORT_API_KEY": KEY})
    try:
        line = proc.stderr.readline()
        match = re.search(r"(http://127\.0\.0\.1:\d+)/v1", line)
        assert match, line + proc.stderr.read()
        served = types.SimpleNamespace(url=match.group(1))
        assert http(served, "GET", "/health", key=None)[0] == 200
        assert http(served, "GET", "/v1/models", key=None)[0] == 401  # the key came from DSEXPORT_API_KEY
        assert http(served, "GET", "/v1/models")[2]["data"][0]["id"] == bundle.name
    finally:
        proc.terminate()
        proc.wait(30)


def test_without_the_extra_the_command_names_it(run_cli, monkeypatch, bundle):
    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("starlette", "uvicorn"):
                raise ImportError(f"{name} is not installed")

    monkeypatch.setattr(sys, "meta_path", [Refuse(), *sys.meta_path])
    for name in [m for m in sys.modules if m.split(".")[0] in ("starlette", "uvicorn")]:
        monkeypatch.delitem(sys.modules, name)
    code, _, err = run_cli("serve", bundle)
    expected = 'error: `dsexport serve` needs starlette and uvicorn: pip install "dsexport[serve]"'
    assert code == 2 and err.strip().splitlines() == [expected]
