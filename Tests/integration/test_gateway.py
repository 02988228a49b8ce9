"""The OpenAI-compatible gateway, driven by the official `openai` client, in front of a stand-in
upstream speaking Ollama's NDJSON or OpenAI's SSE."""
import base64
import concurrent.futures
import datetime
import gzip
import json
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
import types

import httpx
import openai
import pytest

from conftest import GATEHOUSE, ROOT, ResponseReader, free_port, metric_value, raw_exchange, stream_events, streamed_text, wait_for_log


# Where each backend's chat requests arrive at the fake upstream. With `openai`, chat completions
# are served by the NIO pass-through; with `ollama`, by the router: each test below covers both.
CHAT_PATH = {"ollama": "/api/chat", "openai": "/v1/chat/completions"}
both_backends = pytest.mark.parametrize("backend", ["ollama", "openai"])


def client_for(server, api_key="unused", **kwargs):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=api_key, **{"max_retries": 0, "timeout": 20, **kwargs})


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_non_streaming_chat_with_real_usage_and_mapped_parameters(gateway, fake_llm, backend):
    server = gateway(backend)
    client = client_for(server)
    completion = client.chat.completions.create(
        model="llama3.2:1b", messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there world"}],
        temperature=0, max_tokens=50, top_p=0.9, seed=7, stop=["\n\n"])
    assert completion.choices[0].message.content == "Echo: hello there world"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.object == "chat.completion"
    assert completion.usage.prompt_tokens == 5 and completion.usage.completion_tokens == 4
    assert completion.usage.total_tokens == 9

    if backend == "ollama":
        (_, _, _, sent), = fake_llm.calls("/api/chat")
        assert sent["stream"] is False
        assert sent["options"] == {"temperature": 0, "num_predict": 50, "top_p": 0.9, "seed": 7, "stop": ["\n\n"]}
        assert sent["messages"][1] == {"role": "user", "content": "hello there world"}
    else:
        (_, _, _, sent), = fake_llm.calls("/v1/chat/completions")
        assert sent["temperature"] == 0 and sent["max_tokens"] == 50 and sent.get("stream", False) is False
        assert sent["messages"][1] == {"role": "user", "content": "hello there world"}


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_streaming_chat_arrives_in_chunks_and_ends_with_done(gateway, fake_llm, backend):
    server = gateway(backend)
    client = client_for(server)
    stream = client.chat.completions.create(
        model="llama3.2:1b", messages=[{"role": "user", "content": "one two three four"}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    contents = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(contents) == 5  # "Echo:" + four words, one chunk each
    assert "".join(contents) == "Echo: one two three four"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    usage = [c.usage for c in chunks if c.usage]
    assert len(usage) == 1 and usage[0].prompt_tokens == 4 and usage[0].completion_tokens == 5

    # Raw SSE framing: data lines, [DONE] at the end.
    with server.client.stream("POST", "/v1/chat/completions", json={
            "model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}) as response:
        assert response.headers["content-type"] == "text/event-stream"
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert events and not any(event.get("choices") == [] for event in events), events  # no usage chunk: not asked for


@both_backends
@pytest.mark.parametrize("limit_field", ["max_tokens", "max_completion_tokens"])
def test_a_token_limit_cuts_the_answer_short_with_finish_reason_length(gateway, fake_llm, backend, limit_field):
    # Ollama reads only options.num_predict: either field must arrive there.
    server = gateway(backend)
    client = client_for(server)
    ask = {"model": "m", "messages": [{"role": "user", "content": "a b c d"}], limit_field: 2}
    whole = client.chat.completions.create(**ask)
    assert whole.choices[0].message.content == "Echo: a" and whole.choices[0].finish_reason == "length"
    chunks = list(client.chat.completions.create(**ask, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Echo: a"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    if backend == "ollama":
        assert [call[3]["options"]["num_predict"] for call in fake_llm.calls("/api/chat")] == [2, 2]


@both_backends
def test_the_router_paths_upstream_connections_are_pooled(gateway, fake_llm, backend):
    # Chat on Ollama, embeddings and models on both: through AsyncHTTPClient's pool, so one
    # request after another reuses one kept-alive upstream connection.
    server = gateway(backend)
    for index in range(3):
        assert server.client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": index}).status_code == 200
        assert server.client.post("/v1/embeddings", json={"model": "e", "input": f"text {index}"}).status_code == 200
        assert server.client.get("/v1/models").status_code == 200
    routed = {"ollama": ("/api/chat", "/api/embed", "/api/tags"), "openai": ("/v1/embeddings", "/v1/models")}[backend]
    peers = [port for (_, path, _, _), port in zip(fake_llm.requests, fake_llm.peers) if path in routed]
    assert len(peers) == 3 * len(routed), fake_llm.requests
    assert len(set(peers)) == 1, peers


@both_backends
def test_legacy_text_completions_whole_and_streamed(gateway, fake_llm, backend):
    server = gateway(backend)
    client = client_for(server)
    path = "/api/generate" if backend == "ollama" else "/v1/completions"
    whole = client.completions.create(model="m", prompt="hello there", max_tokens=5, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].text == "Echo: hello there"
    assert whole.choices[0].finish_reason == "stop" and whole.usage.prompt_tokens == 2 and whole.usage.completion_tokens == 3
    sent = fake_llm.calls(path)[-1][3]
    if backend == "ollama":
        assert sent["prompt"] == "hello there" and sent["stream"] is False
        assert sent["options"] == {"num_predict": 5, "temperature": 0}
    cut = client.completions.create(model="m", prompt="hello there", max_tokens=1)
    assert cut.choices[0].text == "Echo:" and cut.choices[0].finish_reason == "length"
    # Fill in the middle: the suffix reaches the upstream.
    client.completions.create(model="m", prompt="def f(", suffix=" return x")
    assert fake_llm.calls(path)[-1][3]["suffix"] == " return x"
    chunks = list(client.completions.create(model="m", prompt="hello there", stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Echo: hello there"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    # echo: the prompt before the answer, whole and streamed (Ollama has none: the gateway adds it).
    echoed = client.completions.create(model="m", prompt="hello there", echo=True)
    if backend == "ollama":
        assert echoed.choices[0].text == "hello thereEcho: hello there"
        assert "echo" not in fake_llm.calls(path)[-1][3]
        streamed = list(client.completions.create(model="m", prompt="hello there", echo=True, stream=True))
        assert "".join(c.choices[0].text for c in streamed if c.choices) == "hello thereEcho: hello there"
        for body, field in (({"echo": True, "logprobs": 2}, "echo"), ({"echo": "yes"}, "echo"), ({"best_of": 3}, "best_of")):
            refused = server.client.post("/v1/completions", json={"model": "m", "prompt": "x", **body})
            assert refused.status_code == 400 and refused.json()["error"]["code"] == f"invalid_{field}", refused.text
        assert client.completions.create(model="m", prompt="hello there", best_of=1).choices[0].text == "Echo: hello there"
    else:  # passed through as it came
        assert fake_llm.calls(path)[-1][3]["echo"] is True
    # The client's errors, named; an Ollama upstream takes only one string prompt.
    missing = server.client.post("/v1/completions", json={"model": "m"})
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "missing_prompt"
    listed = server.client.post("/v1/completions", json={"model": "m", "prompt": ["a", "b"]})
    if backend == "ollama":
        assert listed.status_code == 400 and listed.json()["error"]["code"] == "invalid_prompt"
    else:  # passed through as it came
        assert listed.status_code == 200 and listed.json()["choices"][0]["text"] == "Echo: a b"
    # Completion tokens counted from every answer, whole and streamed: 3 + 1 + 5 + 3 + 3 (echo)
    # (+ 3 echoed streamed and 3 with best_of for Ollama; + 3 for the list prompt for openai).
    metrics = server.client.get("/metrics").text
    assert metric_value(metrics, "gatehouse_llm_tokens_total", direction="completion") == (21 if backend == "ollama" else 18)
    if backend == "openai":
        # vLLM's continuous_usage_stats puts running totals on every chunk: the last counts,
        # as the pass-through and plugins take it (summed, these 3 tokens counted 1+2+3+3).
        prompt_before = metric_value(metrics, "gatehouse_llm_tokens_total", direction="prompt")
        running = list(client.completions.create(model="m", prompt="hello there", stream=True,
                                                  stream_options={"include_usage": True, "continuous_usage_stats": True}))
        assert running[-1].usage.completion_tokens == 3
        metrics = server.client.get("/metrics").text
        assert metric_value(metrics, "gatehouse_llm_tokens_total", direction="completion") == 18 + 3
        assert metric_value(metrics, "gatehouse_llm_tokens_total", direction="prompt") == prompt_before + 2


def test_streaming_tool_calls_and_tools_passed_through(gateway, fake_llm):
    server = gateway("ollama")
    client = client_for(server)
    tools = [{"type": "function", "function": {"name": "get_time", "description": "time",
                                               "parameters": {"type": "object", "properties": {"timezone": {"type": "string"}}}}}]
    completion = client.chat.completions.create(model="tools", messages=[{"role": "user", "content": "time?"}], tools=tools)
    call = completion.choices[0].message.tool_calls[0]
    assert completion.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_time" and json.loads(call.function.arguments) == {"timezone": "UTC"}
    assert fake_llm.calls("/api/chat")[0][3]["tools"] == tools

    # The assistant's tool call (content None) and the tool result go back to Ollama's shape.
    follow_up = client.chat.completions.create(model="tools", tools=tools, messages=[
        {"role": "user", "content": "time?"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "12:00"}])
    assert follow_up.choices[0].message.content == "The tool said: 12:00"
    sent = fake_llm.calls("/api/chat")[-1][3]["messages"]
    # With the call's id both ways, as Ollama's own /v1 sends them (results to two calls of one
    # function were told apart by order alone).
    assert sent[1]["tool_calls"] == [{"function": {"name": "get_time", "arguments": {"timezone": "UTC"}}, "id": call.id}]
    assert sent[2] == {"role": "tool", "content": "12:00", "tool_name": "get_time", "tool_call_id": call.id}
    # Ollama's call ids are kept (made up above, where the calls had none); a tool result
    # naming its function without a call id is named too.
    assert call.id.startswith("call_")
    with_id = client.chat.completions.create(model="tools-with-ids", messages=[{"role": "user", "content": "time?"}], tools=tools)
    assert with_id.choices[0].message.tool_calls[0].id == "call_ollama_7"
    client.chat.completions.create(model="tools", tools=tools, messages=[
        {"role": "user", "content": "time?"}, {"role": "tool", "name": "get_time", "content": "12:00"}])
    assert fake_llm.calls("/api/chat")[-1][3]["messages"][1] == {"role": "tool", "content": "12:00", "tool_name": "get_time"}

    stream = client.chat.completions.create(model="tools", messages=[{"role": "user", "content": "time?"}], tools=tools, stream=True)
    chunks = [c for c in stream if c.choices]
    calls = [tc for c in chunks if c.choices[0].delta.tool_calls for tc in c.choices[0].delta.tool_calls]
    # Ollama's arguments object becomes OpenAI's JSON text, and the stream ends for the tool call.
    assert [(call.function.name, json.loads(call.function.arguments)) for call in calls] == [("get_time", {"timezone": "UTC"})]
    assert calls[0].id and calls[0].type == "function" and calls[0].index == 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]


def test_ollama_tool_call_arguments_null_or_text_come_out_as_json_text(gateway):
    # A null (as Go writes a nil arguments map: a call without arguments) or a number aborted the whole
    # gateway: Foundation's JSON writer takes only an object or array at the top, fatally.
    server = gateway("ollama")
    client = client_for(server)
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}]
    question = [{"role": "user", "content": "time?"}]
    for model, arguments in (("tools-no-args", "{}"), ("tools-text-args", '{"timezone": "UTC"}')):
        whole = client.chat.completions.create(model=model, messages=question, tools=tools)
        assert whole.choices[0].message.tool_calls[0].function.arguments == arguments
        assert whole.choices[0].finish_reason == "tool_calls"
        stream = client.chat.completions.create(model=model, messages=question, tools=tools, stream=True)
        calls = [call for chunk in stream if chunk.choices and chunk.choices[0].delta.tool_calls
                 for call in chunk.choices[0].delta.tool_calls]
        assert [(call.function.name, call.function.arguments) for call in calls] == [("get_time", arguments)]
    assert server.client.get("/health").status_code == 200


def test_openai_backend_smooths_null_content_beside_tool_calls(gateway, fake_llm):
    server = gateway("openai")
    client = client_for(server)
    client.chat.completions.create(model="tools", messages=[
        {"role": "user", "content": "time?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "noon"}])
    sent = fake_llm.calls("/v1/chat/completions")[-1][3]
    assert sent["messages"][1]["content"] == ""


@pytest.mark.parametrize("backend", ["ollama", "openai"])
def test_models_and_embeddings(gateway, backend):
    server = gateway(backend)
    client = client_for(server)
    ids = [m.id for m in client.models.list()]
    assert ids == (["llama3.2:1b", "qwen3:0.6b", "hf.co/org/repo:Q4_K_M", "nomic-embed-text:latest"] if backend == "ollama" else ["smollm2"])
    for model_id in ids:
        model = client.models.retrieve(model_id)
        assert model.id == model_id and model.object == "model"
    if backend == "ollama":  # a name without its tag is the :latest one, as Ollama takes it in chat
        assert client.models.retrieve("nomic-embed-text").id == "nomic-embed-text:latest"
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("qwen3")  # no qwen3:latest
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    assert missing.value.body["code"] == "model_not_found" and missing.value.body["message"] == "the model 'no-such-model' does not exist"
    embedding = client.embeddings.create(model="nomic", input=["a b", "c"])
    assert len(embedding.data) == 2 and embedding.data[1].index == 1
    assert len(embedding.data[0].embedding) >= 2
    # Measured like chat: the upstream's time, and the input tokens as prompt tokens.
    metrics = server.client.get("/metrics").text
    assert metric_value(metrics, "gatehouse_upstream_request_duration_seconds_count", backend=backend, operation="embeddings", outcome="ok") == 1
    assert metric_value(metrics, "gatehouse_llm_tokens_total", direction="prompt") == 3


def test_ollama_embeddings_in_openai_encodings(gateway, fake_llm):
    server = gateway("ollama")
    client = client_for(server)
    # The SDK asks for base64 unless told otherwise: little-endian float32s, which it decodes.
    sdk = client.embeddings.create(model="nomic", input=["a b", "c"])
    assert fake_llm.calls("/api/embed")[-1][3] == {"model": "nomic", "input": ["a b", "c"]}
    assert [list(d.embedding) for d in sdk.data] == [pytest.approx([0.1, 0.2, 3.0]), pytest.approx([0.1, 0.2, 1.0])]
    raw = server.client.post("/v1/embeddings", json={"model": "nomic", "input": "a b", "encoding_format": "base64"}).json()
    assert struct.unpack("<3f", base64.b64decode(raw["data"][0]["embedding"])) == pytest.approx((0.1, 0.2, 3.0))
    # Floats when asked; `dimensions` reaches Ollama.
    floats = client.embeddings.create(model="nomic", input="a b", encoding_format="float", dimensions=2)
    assert fake_llm.calls("/api/embed")[-1][3]["dimensions"] == 2 and floats.data[0].embedding == [0.1, 0.2]
    # Ollama's own fields reach it from the SDK's extra_body.
    client.embeddings.create(model="nomic", input="a b", extra_body={"truncate": False, "options": {"num_ctx": 8192}})
    sent = fake_llm.calls("/api/embed")[-1][3]
    assert sent["truncate"] is False and sent["options"] == {"num_ctx": 8192}
    bad = server.client.post("/v1/embeddings", json={"model": "nomic", "input": "x", "encoding_format": "hex"})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_encoding_format"
    assert bad.json()["error"]["message"] == "'encoding_format' must be \"float\" or \"base64\" (got \"hex\")"
    # Ollama embeds text: token arrays (which OpenAI takes) are refused before reaching it.
    calls = len(fake_llm.calls("/api/embed"))
    for given, detail in (([[1, 2, 3]], "a list of token lists"), ([1, 2, 3], "a list of tokens"), (7, "7")):
        refused = server.client.post("/v1/embeddings", json={"model": "nomic", "input": given})
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_input"
        assert refused.json()["error"]["message"] == (
            f"'input' must be a string or a list of strings for Ollama (token arrays are not supported; got {detail})")
    assert server.client.post("/v1/embeddings", json={"model": "nomic", "input": []}).json()["error"]["message"] == (
        "'input' must not be an empty list")
    # Ollama takes "" for no input and answers no vector, which read as the upstream's fault (502).
    empty = server.client.post("/v1/embeddings", json={"model": "nomic", "input": ""})
    assert empty.status_code == 400 and empty.json()["error"]["message"] == "'input' must not be an empty string"
    assert len(fake_llm.calls("/api/embed")) == calls
    # A reply short of a vector per input is the upstream's fault, not an empty 200.
    short = server.client.post("/v1/embeddings", json={"model": "few-vectors", "input": ["a", "b"]})
    assert short.status_code == 502 and short.json()["error"]["code"] == "upstream_invalid"
    assert short.json()["error"]["message"] == "ollama sent an embeddings reply without one vector of numbers for each of the 2 inputs"
    garbage = server.client.post("/v1/embeddings", json={"model": "garbage", "input": "a"})
    assert garbage.status_code == 502 and garbage.json()["error"]["message"] == "ollama sent a reply that is not a JSON object"


def test_openai_list_replies_that_are_not_lists_are_the_upstreams_fault(gateway):
    # Passed through as they come, once seen to be answers: never a 200 carrying the upstream's garbage.
    server = gateway("openai")
    assert server.client.post("/v1/embeddings", json={"model": "nomic", "input": "a"}).json()["data"][0]["embedding"] == [0.5, 1.0]
    garbage = server.client.post("/v1/embeddings", json={"model": "garbage", "input": "a"})
    assert garbage.status_code == 502 and garbage.json()["error"]["code"] == "upstream_invalid"
    assert garbage.json()["error"]["message"] == "openai upstream sent a /v1/embeddings reply that is not a JSON object with a 'data' list"


@both_backends
def test_browser_pages_from_configured_origins_may_call_the_api(gateway, backend):
    # CORS: a page on an allowed origin gets its preflight answered (before auth: browsers
    # send preflights without the key) and may read every answer, errors included.
    app = "https://App.Example.com"
    server = gateway(backend, env={"API_KEY": "k"}, extra_config="server: {cors_origins: [https://app.example.com, 'http://localhost:3000']}\n")
    preflight = server.client.options("/v1/chat/completions", headers={
        "Origin": app, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os"})
    assert preflight.status_code == 204, preflight.text
    assert preflight.headers["access-control-allow-origin"] == app
    assert preflight.headers["access-control-allow-methods"] == "POST"
    assert preflight.headers["access-control-allow-headers"] == "authorization, content-type, x-stainless-os"
    assert preflight.headers["access-control-max-age"] == "600" and preflight.headers["vary"] == "Origin"
    assert "access-control-allow-credentials" not in preflight.headers and preflight.headers["x-request-id"]
    body = {"model": "m", "messages": [{"role": "user", "content": "from a page"}]}
    keyed = {"Origin": app, "Authorization": "Bearer k"}
    whole = server.client.post("/v1/chat/completions", json=body, headers=keyed)
    assert whole.json()["choices"][0]["message"]["content"] == "Echo: from a page"
    events = stream_events(server, "m", headers=keyed, text="from a page")
    assert streamed_text(events[:-1]) == "Echo: from a page"
    streamed = server.client.post("/v1/chat/completions", json={**body, "stream": True}, headers=keyed)
    for answer in (whole, streamed):
        assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == app and answer.headers["vary"] == "Origin"
        assert answer.headers["access-control-expose-headers"] == "X-Request-ID, X-Cache, Retry-After"
    refused = server.client.post("/v1/chat/completions", json=body, headers={"Origin": app})
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == app
    assert server.client.get("/v1/models", headers={**keyed, "Origin": "http://localhost:3000"}).headers[
        "access-control-allow-origin"] == "http://localhost:3000"
    # Another origin: its preflight is refused with the reason; its answers say nothing to the browser.
    other = server.client.options("/v1/chat/completions", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert other.status_code == 403 and other.json()["error"]["code"] == "origin_not_allowed"
    assert other.json()["error"]["message"] == (
        "origin https://evil.example may not call this API from a browser: it is not in server.cors_origins")
    # Preflights are requests like any: logged and counted (refused origins showed nowhere).
    logged = wait_for_log(server, lambda l: l.get("msg") == "request" and l.get("method") == "OPTIONS" and l.get("status") == "403")
    assert logged["path"] == "/v1/chat/completions" and logged["request_id"] == other.headers["x-request-id"], logged
    metrics = server.client.get("/metrics", headers={"Authorization": "Bearer k"}).text
    assert re.search(r'gatehouse_http_requests_total\{[^}]*method="OPTIONS"[^}]*status="204"[^}]*\} 1', metrics), metrics
    assert re.search(r'gatehouse_http_requests_total\{[^}]*method="OPTIONS"[^}]*status="403"[^}]*\} 1', metrics), metrics
    answer = server.client.post("/v1/chat/completions", json=body, headers={**keyed, "Origin": "https://evil.example"})
    assert answer.status_code == 200 and "access-control-allow-origin" not in answer.headers and answer.headers["vary"] == "Origin"
    assert "access-control-allow-origin" not in server.client.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"}).headers
    # Two Origin fields are no origin, on the pass-through as on the router (it took the first).
    doubled = server.client.post("/v1/chat/completions", json=body, headers=[("Authorization", "Bearer k"), ("Origin", app), ("Origin", app)])
    assert doubled.status_code == 200 and "access-control-allow-origin" not in doubled.headers


@both_backends
def test_cors_is_off_unless_configured_and_star_allows_every_origin(gateway, backend):
    server = gateway(backend)
    preflight = server.client.options("/v1/chat/completions", headers={"Origin": "https://a.example", "Access-Control-Request-Method": "POST"})
    # Without CORS an OPTIONS is just a method the route does not take.
    assert preflight.status_code == 405 and preflight.headers["allow"] == "POST" and "access-control-allow-origin" not in preflight.headers
    answer = server.client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
                                headers={"Origin": "https://a.example"})
    assert answer.status_code == 200 and not any(name.startswith("access-control-") for name in answer.headers)
    starred = gateway(backend, env={"GATEHOUSE_CORS_ORIGINS": "*"})
    answer = starred.client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
                                 headers={"Origin": "https://a.example"})
    assert answer.headers["access-control-allow-origin"] == "*" and "vary" not in answer.headers
    assert starred.client.options("/v1/models", headers={"Origin": "null", "Access-Control-Request-Method": "GET"}).status_code == 204


@both_backends
def test_api_key_auth(gateway, backend):
    server = gateway(backend, env={"API_KEY": "s3cret-key"})
    with pytest.raises(openai.AuthenticationError) as missing:
        client_for(server, api_key="wrong").chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert missing.value.status_code == 401
    assert missing.value.body["message"] == "invalid API key"
    assert client_for(server, api_key="s3cret-key").chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x"}]).choices[0].message.content == "Echo: x"

    body = {"model": "m", "messages": [{"role": "user", "content": "y"}]}
    none = server.client.post("/v1/chat/completions", json=body)
    assert none.status_code == 401 and none.json()["error"]["type"] == "authentication_error"
    assert "missing API key" in none.json()["error"]["message"]
    assert server.client.post("/v1/chat/completions", json=body, headers={"x-api-key": "s3cret-key"}).status_code == 200
    assert server.client.post("/v1/chat/completions", json=body, headers={"authorization": "bEaReR s3cret-key"}).status_code == 200
    assert server.client.post("/v1/chat/completions", json=body, headers={"authorization": "Basic s3cret-key"}).status_code == 401
    # Whitespace after a value is not part of it: the pass-through refused a key the router took.
    payload = json.dumps(body).encode()
    for path in ("/v1/chat/completions", "/v1/models"):
        method = "POST" if path.endswith("completions") else "GET"
        reply, _ = raw_exchange(server.port, f"{method} {path} HTTP/1.1\r\nHost: g\r\nX-API-Key: s3cret-key \t\r\n"
                                f"Content-Type: application/json\r\nContent-Length: {len(payload) if method == 'POST' else 0}\r\n"
                                f"Connection: close\r\n\r\n".encode() + (payload if method == "POST" else b""), until=None)
        assert reply.startswith(b"HTTP/1.1 200 "), (path, reply[:300])
    assert server.client.get("/health").status_code == 200
    assert server.client.get("/health/ready").status_code == 200
    assert server.client.get("/v1/models").status_code == 401
    assert "s3cret-key" not in server.log()


@both_backends
def test_the_upstream_key_goes_upstream_and_the_clients_key_never_does(start, plugins_dir, fake_llm, backend):
    chat = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    for upstream_key in ("up-key", None):
        key_line = f", api_key: {upstream_key}" if upstream_key else ""
        server = start(plugins_dir, config=f"upstream: {{backend: {backend}, url: \"{fake_llm.url}\"{key_line}}}\ncache: {{enabled: false}}\n",
                       env={"API_KEY": "client-key"})
        before = len(fake_llm.requests)
        assert server.client.post("/v1/chat/completions", json=chat, headers={"Authorization": "Bearer client-key"}).status_code == 200
        assert server.client.post("/v1/chat/completions", json={**chat, "stream": True}, headers={"X-API-Key": "client-key"}).status_code == 200
        assert server.client.get("/v1/models", headers={"Authorization": "Bearer client-key"}).status_code == 200
        seen = fake_llm.requests[before:]
        assert len(seen) == 3
        for _, _, headers, _ in seen:
            assert headers.get("authorization") == (f"Bearer {upstream_key}" if upstream_key else None), headers
            assert not any("client-key" in value for value in headers.values()), headers
        server.stop()


def test_rate_limit_answers_429_with_retry_after(gateway):
    server = gateway(extra_config="rate_limit: {requests_per_second: 0.5, burst: 3}\n")
    statuses = [server.client.get("/v1/models") for _ in range(8)]
    codes = [r.status_code for r in statuses]
    assert codes[:3] == [200, 200, 200]
    limited = [r for r in statuses if r.status_code == 429]
    assert len(limited) >= 4
    assert int(limited[0].headers["retry-after"]) >= 1
    error = limited[0].json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    # No key is configured, so a key the client sends names no one: a fresh one per request
    # still draws on the address's (empty) bucket.
    for attempt in range(3):
        with pytest.raises(openai.RateLimitError) as limited_error:
            client_for(server, api_key=f"fresh-key-{attempt}").models.list()
        assert limited_error.value.status_code == 429
    assert server.client.get("/health/live").status_code == 200  # never limited
    assert server.client.head("/health").status_code == 200 and server.client.head("/health/live").status_code == 200
    # Nor Prometheus' scrapes, which were refused just when clients were using the rate up.
    assert [server.client.get("/metrics").status_code for _ in range(3)] == [200] * 3
    time.sleep(2.1)
    assert server.client.get("/v1/models").status_code == 200  # refilled


@both_backends
def test_behind_a_trusted_proxy_the_forwarded_client_is_limited_and_logged(gateway, backend):
    limits = "rate_limit: {requests_per_second: 0.1, burst: 2}\ncache: {enabled: false}\n"
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}

    def statuses(server, client_ip, count=3):
        forwarded = {"X-Forwarded-For": f"6.6.6.6, {client_ip}"}  # the left part is whatever the client claimed
        return [server.client.post("/v1/chat/completions", json=body, headers=forwarded).status_code if i % 2 == 0
                else server.client.get("/v1/models", headers=forwarded).status_code for i in range(count)]

    proxied = gateway(backend, extra_config=limits + "server: {trusted_proxies: [127.0.0.1]}\n")
    # Each forwarded client has its own bucket, on chat completions and the router alike.
    assert statuses(proxied, "203.0.113.1") == [200, 200, 429]
    assert statuses(proxied, "203.0.113.2") == [200, 200, 429]
    # An IPv6 client by its /64: a fresh address from it is no fresh bucket (one host has them all).
    assert statuses(proxied, "2001:db8:1:2::a", 2) + statuses(proxied, "2001:db8:1:2::b", 1) == [200, 200, 429]
    assert statuses(proxied, "2001:db8:1:3::a", 1) == [200]
    deadline = time.monotonic() + 5  # access lines are written at the end of their loop's round
    while len(access := [l for l in proxied.log_lines() if l.get("msg") == "request" and l["path"] != "/health/live"]) < 10:
        assert time.monotonic() < deadline, access
        time.sleep(0.05)
    assert [l["client"] for l in access] == ["203.0.113.1"] * 3 + ["203.0.113.2"] * 3 + ["2001:db8:1:2::a"] * 2 + [
        "2001:db8:1:2::b", "2001:db8:1:3::a"], access
    proxied.stop()
    # Without trusted proxies the header means nothing: every request is the peer's.
    direct = gateway(backend, extra_config=limits)
    assert statuses(direct, "203.0.113.1", 2) + statuses(direct, "203.0.113.2", 1) == [200, 200, 429]
    assert {l["client"] for l in direct.log_lines() if l.get("msg") == "request"} == {"127.0.0.1"}  # the probe's too


@both_backends
def test_rate_limit_applies_to_chat_completions(gateway, backend):
    server = gateway(backend, extra_config="rate_limit: {requests_per_second: 0.5, burst: 2}\n")
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    responses = [server.client.post("/v1/chat/completions", json=body) for _ in range(4)]
    assert [r.status_code for r in responses] == [200, 200, 429, 429]
    assert int(responses[2].headers["retry-after"]) >= 1
    assert responses[2].json()["error"]["code"] == "rate_limit_exceeded"
    assert responses[2].json()["error"]["request_id"] == responses[2].headers["x-request-id"]
    # Router routes and the chat route draw on the same bucket.
    assert server.client.get("/v1/models").status_code == 429


@both_backends
def test_failed_key_checks_cost_the_address_tokens(gateway, backend):
    server = gateway(backend, env={"API_KEY": "right-key"}, extra_config="rate_limit: {requests_per_second: 0.5, burst: 3}\n")
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    guesses = [server.client.post("/v1/chat/completions", json=body, headers={"x-api-key": f"guess-{n}"}) for n in range(5)]
    assert [r.status_code for r in guesses] == [401, 401, 401, 429, 429]
    assert guesses[3].json()["error"]["code"] == "rate_limit_exceeded" and int(guesses[3].headers["retry-after"]) >= 1
    # The router's routes count failures in the same bucket.
    assert server.client.get("/v1/models", headers={"x-api-key": "guess-6"}).status_code == 429
    # The key's holders have their own bucket, untouched by the guesses from their address.
    ok = [server.client.post("/v1/chat/completions", json=body, headers={"x-api-key": "right-key"}) for _ in range(3)]
    assert [r.status_code for r in ok] == [200, 200, 200]
    assert server.client.get("/v1/models", headers={"authorization": "Bearer right-key"}).status_code == 429


@both_backends
def test_request_id_is_propagated_upstream_and_echoed(gateway, fake_llm, backend):
    server = gateway(backend)
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    response = server.client.post("/v1/chat/completions", json=body, headers={"x-request-id": "client-chose-this"})
    assert response.headers["x-request-id"] == "client-chose-this"
    assert fake_llm.calls(CHAT_PATH[backend])[-1][2]["x-request-id"] == "client-chose-this"

    generated = server.client.post("/v1/chat/completions", json={**body, "seed": 2})
    request_id = generated.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", request_id), request_id
    assert fake_llm.calls(CHAT_PATH[backend])[-1][2]["x-request-id"] == request_id
    streamed = server.client.post("/v1/chat/completions", json={**body, "stream": True}, headers={"x-request-id": "streamed-1"})
    assert streamed.headers["x-request-id"] == "streamed-1"
    assert fake_llm.calls(CHAT_PATH[backend])[-1][2]["x-request-id"] == "streamed-1"
    unacceptable = server.client.post("/v1/chat/completions", json=body, headers={"x-request-id": "bad id with spaces"})
    assert unacceptable.headers["x-request-id"] != "bad id with spaces"
    # One the log would mask as a key is replaced too: the logged id is always the one given out.
    keylike = server.client.post("/v1/chat/completions", json={**body, "seed": 4}, headers={"x-request-id": "sk-abcdefghijkl"})
    assert keylike.headers["x-request-id"] != "sk-abcdefghijkl"
    assert wait_for_log(server, lambda l: l.get("msg") == "request" and l.get("request_id") == keylike.headers["x-request-id"])
    # Two ids are one unusable value on every path (the pass-through took the first): a new id,
    # the one the upstream is sent.
    doubled_ids = [("x-request-id", "dup1"), ("x-request-id", "dup2")]
    doubled = server.client.post("/v1/chat/completions", json={**body, "seed": 3}, headers=doubled_ids)
    assert re.fullmatch(r"[0-9a-f-]{36}", doubled.headers["x-request-id"]), doubled.headers["x-request-id"]
    assert fake_llm.calls(CHAT_PATH[backend])[-1][2]["x-request-id"] == doubled.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f-]{36}", server.client.get("/v1/models", headers=doubled_ids).headers["x-request-id"])
    lines = [l for l in server.log_lines() if l.get("request_id") == request_id]
    assert any(l.get("msg") == "request" and l["status"] == "200" and l["path"] == "/v1/chat/completions" and "latency_ms" in l
               for l in lines)


@both_backends
def test_response_cache_hits_skip_the_upstream(gateway, fake_llm, backend):
    server = gateway(backend)
    body = {"model": "m", "messages": [{"role": "user", "content": "cache me"}], "temperature": 0}
    first = server.client.post("/v1/chat/completions", json=body)
    second = server.client.post("/v1/chat/completions", json=body)
    assert first.headers["x-cache"] == "MISS" and second.headers["x-cache"] == "HIT"
    assert first.json()["choices"] == second.json()["choices"]
    assert len(fake_llm.calls(CHAT_PATH[backend])) == 1
    other = server.client.post("/v1/chat/completions", json={**body, "temperature": 0.5})
    assert other.headers["x-cache"] == "MISS"
    streamed = server.client.post("/v1/chat/completions", json={**body, "stream": True})
    assert streamed.headers["x-cache"] == "BYPASS"
    assert len(fake_llm.calls(CHAT_PATH[backend])) == 3
    # Key order and whitespace do not matter: the key is over the canonical request.
    reordered = server.client.post("/v1/chat/completions", content=json.dumps(
        {"temperature": 0, "messages": body["messages"], "model": "m"}, indent=2), headers={"content-type": "application/json"})
    assert reordered.headers["x-cache"] == "HIT"
    assert len(fake_llm.calls(CHAT_PATH[backend])) == 3
    # Two hits, two misses (the stream bypassed the cache), in /metrics as in X-Cache.
    metrics = server.client.get("/metrics").text
    assert metric_value(metrics, "gatehouse_cache_hits_total") == 2
    assert metric_value(metrics, "gatehouse_cache_misses_total") == 2


@both_backends
def test_clients_cache_control_skips_the_cache(gateway, fake_llm, backend):
    # A client that distrusts a cached answer asks for a fresh one, as HTTP caches let it.
    server = gateway(backend)
    body = {"model": "m", "messages": [{"role": "user", "content": "fresh please"}]}
    post = lambda cache_control=None: server.client.post(
        "/v1/chat/completions", json=body, headers={"Cache-Control": cache_control} if cache_control else {})
    upstream_calls = lambda: len(fake_llm.calls(CHAT_PATH[backend]))
    assert post().headers["x-cache"] == "MISS" and post().headers["x-cache"] == "HIT" and upstream_calls() == 1
    # no-cache (any case, among other directives) goes upstream and stores the fresh answer.
    refreshed = post("max-stale=5, No-Cache")
    assert refreshed.status_code == 200 and refreshed.headers["x-cache"] == "REFRESH" and upstream_calls() == 2
    assert refreshed.json()["choices"][0]["message"]["content"] == "Echo: fresh please"
    assert post("max-age=0").headers["x-cache"] == "REFRESH" and upstream_calls() == 3
    assert post().headers["x-cache"] == "HIT" and upstream_calls() == 3
    # no-store goes upstream and stores nothing: the next plain request is still a miss.
    body = {"model": "m", "messages": [{"role": "user", "content": "do not keep this"}]}
    assert post("no-store").headers["x-cache"] == "BYPASS" and upstream_calls() == 4
    assert post().headers["x-cache"] == "MISS" and upstream_calls() == 5
    # The openai client sends it through extra_headers.
    answer = client_for(server).chat.completions.with_raw_response.create(
        model="m", messages=body["messages"], extra_headers={"Cache-Control": "no-cache"})
    assert answer.headers["x-cache"] == "REFRESH" and upstream_calls() == 6
    metrics = server.client.get("/metrics").text
    assert metric_value(metrics, "gatehouse_cache_skipped_total") == 4
    assert metric_value(metrics, "gatehouse_cache_hits_total") == 2
    assert metric_value(metrics, "gatehouse_cache_misses_total") == 2


@both_backends
def test_only_whole_answers_are_cached(gateway, fake_llm, backend):
    # An error sent with a 200, and a body cut short where the connection closed (no length),
    # were stored and replayed to every identical request for the TTL. They are not answers
    # either: with the openai backend both went on to the client as a 200 (the cut one given a
    # Content-Length that hid the cut), which the SDK could not read and did not retry.
    server = gateway(backend)
    for model in ("error-200", "cut-short"):
        body = {"model": model, "messages": [{"role": "user", "content": "x"}]}
        answers = [server.client.post("/v1/chat/completions", json=body) for _ in range(2)]
        assert [a.status_code for a in answers] == [502, 502], [a.text for a in answers]
        assert sum(1 for call in fake_llm.calls(CHAT_PATH[backend]) if call[3].get("model") == model) == 2
        error = answers[1].json()["error"]
        if model == "cut-short":
            assert error["code"] == "upstream_invalid", error
        else:  # in the upstream's words, each call its own
            assert error["code"] == "upstream_error" and error["message"].endswith("overloaded (call 2)"), error
    # The SDK retries a 502 (max_retries=1 here: two calls), as it could not retry the 200.
    calls_before = sum(1 for call in fake_llm.calls(CHAT_PATH[backend]) if call[3].get("model") == "cut-short")
    with pytest.raises(openai.InternalServerError):
        client_for(server, max_retries=1).chat.completions.create(model="cut-short", messages=[{"role": "user", "content": "x"}])
    assert sum(1 for call in fake_llm.calls(CHAT_PATH[backend]) if call[3].get("model") == "cut-short") == calls_before + 2
    metrics = server.client.get("/metrics").text
    assert metric_value(metrics, "gatehouse_cache_hits_total") == 0


@both_backends
def test_global_rate_is_not_spent_by_failed_key_checks(gateway, backend):
    # Requests without the key spent the global rate, and then every holder of the key got 429s.
    server = gateway(backend, env={"API_KEY": "right-key"},
                     extra_config="rate_limit: {requests_per_second: 100, global_requests_per_second: 0.01}\ncache: {enabled: false}\n")
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    guesses = [server.client.post("/v1/chat/completions", json=body, headers={"x-api-key": f"guess-{n}"}) for n in range(4)]
    assert [r.status_code for r in guesses] == [401] * 4
    ok = [server.client.post("/v1/chat/completions", json=body, headers={"x-api-key": "right-key"}) for _ in range(2)]
    assert [r.status_code for r in ok] == [200, 429]  # the global bucket holds one request, refilled in 100 s
    assert "global rate limit exceeded (0.01 requests/s for all clients together)" in ok[1].json()["error"]["message"]
    # 0 means no global limit (it let one request through, then refused all for a year).
    server.stop()
    server = gateway(backend, extra_config="rate_limit: {requests_per_second: 100, global_requests_per_second: 0}\n")
    assert [server.client.get("/v1/models").status_code for _ in range(3)] == [200] * 3


@both_backends
def test_cache_can_be_disabled(gateway, fake_llm, backend):
    server = gateway(backend, extra_config="cache: {enabled: false}\n")
    body = {"model": "m", "messages": [{"role": "user", "content": "again"}]}
    assert [server.client.post("/v1/chat/completions", json=body).headers["x-cache"] for _ in range(2)] == ["BYPASS", "BYPASS"]
    assert len(fake_llm.calls(CHAT_PATH[backend])) == 2


@both_backends
def test_client_errors_are_openai_shaped(gateway, backend):
    server = gateway(backend, extra_config="server: {max_body_bytes: 2000}\n")
    post = lambda content, **kw: server.client.post("/v1/chat/completions", content=content,
                                                     headers={"content-type": "application/json"}, **kw)
    cases = [
        (post(b'{"model": "m", "messages": ['), 400, "not valid JSON"),
        (post(b'[1, 2]'), 400, "must be a JSON object"),
        (post(b'{"messages": [{"role": "user", "content": "x"}]}'), 400, "missing required field 'model'"),
        (post(b'{"model": "m"}'), 400, "missing required field 'messages'"),
        (post(b'{"model": "m", "messages": []}'), 400, "'messages' must contain at least one message"),
        (post(b'{"model": "m", "messages": [{"content": "x"}]}'), 400, "item 0 must be an object with a string 'role'"),
        (post(b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}'), 400, "'temperature' must be"),
        (post(b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}'), 400, "'max_tokens' must be"),
        (post(json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 5000}]}).encode()), 413, "larger than"),
        # Chunked, so no Content-Length announces the size: counted as it arrives.
        (post(iter([b'{"model": "m", "messages": [{"role": "user", "content": "', b"x" * 3000, b'"}]}'])), 413, "larger than"),
        (server.client.post("/v1/embeddings", json={"input": "x"}), 400, "missing required field 'model'"),
        (server.client.post("/v1/embeddings", json={"model": "m"}), 400, "missing required field 'input'"),
        (server.client.post("/v1/embeddings", content=b"{", headers={"content-type": "application/json"}), 400, "must be a JSON object"),
        (server.client.get("/v1/chat/completion"), 404, "no route for GET /v1/chat/completion"),
        (post(b'{"model": "missing", "messages": [{"role": "user", "content": "x"}]}'), 404, 'model "missing" not found'),
    ]
    for response, status, text in cases:
        assert response.status_code == status, (text, response.status_code, response.text)
        error = response.json()["error"]
        assert text in error["message"], (text, error)
        assert error["type"] and error["request_id"] == response.headers["x-request-id"]
    with pytest.raises(openai.BadRequestError):
        client_for(server).chat.completions.create(model="m", messages=[])
    # A chunked body past the limit is refused when it passes it, not at its end (which may never
    # come): the pass-through read on for as long as the client sent, then answered.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n" + b"400\r\n" + b"x" * 1024 + b"\r\n" + b"400\r\n" + b"x" * 1024 + b"\r\n")
        head = ResponseReader(sock).response()  # the body's end is never sent
        assert head.startswith(b"HTTP/1.1 413 "), head
        assert b"connection: close" in head.lower() and b"larger than" in head, head


@both_backends
def test_a_known_path_with_the_wrong_method_is_405_naming_the_allowed_ones(gateway, backend):
    server = gateway(backend)
    cases = [
        ("GET", "/v1/chat/completions", "POST"),
        ("PUT", "/v1/completions", "POST"),
        ("POST", "/v1/models", "GET, HEAD"),
        ("DELETE", "/v1/models/some/model:tag", "GET, HEAD"),
        ("GET", "/v1/embeddings", "POST"),
        ("POST", "/health", "GET, HEAD"),
        ("OPTIONS", "/metrics", "GET, HEAD"),
    ]
    for method, path, allowed in cases:
        response = server.client.request(method, path)
        assert response.status_code == 405, (method, path, response.status_code, response.text)
        assert response.headers["allow"] == allowed, (method, path, response.headers)
        error = response.json()["error"]
        assert error["code"] == "method_not_allowed" and error["request_id"] == response.headers["x-request-id"]
        assert error["message"] == f"{method} is not allowed on {path}; it takes {allowed}", error
    # A path nothing serves stays a 404, whatever the method.
    assert server.client.post("/v1/chat/completion").status_code == 404
    assert server.client.delete("/nothing/here").json()["error"]["code"] == "route_not_found"
    # Logged like every answer.
    assert wait_for_log(server, lambda l: l.get("msg") == "request" and l.get("status") == "405" and l.get("method") == "OPTIONS")


def test_requests_no_route_takes_share_one_route_label(gateway):
    # An unknown path answered 404 was labelled "NotFound" (Hummingbird's marker), the same path
    # answered 401 before routing "unmatched": one label for "no route" keeps them one series.
    server = gateway("ollama", env={"API_KEY": "sekrit"})
    assert server.client.get("/nope").status_code == 401
    assert server.client.get("/nope", headers={"x-api-key": "sekrit"}).status_code == 404
    metrics = server.client.get("/metrics", headers={"x-api-key": "sekrit"}).text
    assert metric_value(metrics, "gatehouse_http_requests_total", route="unmatched", method="GET", status="401") == 1
    assert metric_value(metrics, "gatehouse_http_requests_total", route="unmatched", method="GET", status="404") == 1
    assert 'route="NotFound"' not in metrics

@both_backends
def test_head_answers_wherever_get_does_with_gets_headers(gateway, backend):
    server = gateway(backend)
    for path in ["/health", "/health/live", "/health/ready", "/v1/models", "/metrics"]:
        get = server.client.get(path)
        head = server.client.head(path)
        assert get.status_code == head.status_code == 200, (path, get.status_code, head.status_code)
        assert head.content == b"", path
        assert head.headers["content-type"] == get.headers["content-type"], path
        # /metrics grows between the two requests (the GET is counted): same length only elsewhere.
        if path != "/metrics":
            assert head.headers["content-length"] == get.headers["content-length"] == str(len(get.content)), path
    # Each HEAD is counted and logged as the request it was, and none is left in flight
    # (Hummingbird drops the GET answer's body unwritten, which once skipped the accounting).
    metrics = server.client.get("/metrics").text
    assert metric_value(metrics, "gatehouse_http_requests_in_flight") == 1  # the /metrics request itself
    assert metric_value(metrics, "gatehouse_http_requests_total", route="/health", method="HEAD", status="200") == 1
    assert metric_value(metrics, "gatehouse_http_requests_total", route="/v1/models", method="HEAD", status="200") == 1
    wait_for_log(server, lambda l: l.get("msg") == "request" and l.get("method") == "HEAD" and l.get("path") == "/health/ready")
    # A HEAD behind the key needs the key, as the GET does.
    keyed = gateway(backend, env={"API_KEY": "sekrit"})
    assert keyed.client.head("/v1/models").status_code == 401
    assert keyed.client.head("/v1/models", headers={"authorization": "Bearer sekrit"}).status_code == 200
    assert keyed.client.head("/health").status_code == 200


@both_backends
def test_a_streams_access_line_is_written_at_its_end_with_its_time_to_first_byte(gateway, backend):
    # As nginx's $request_time and Go's handlers measure: the whole stream, not its head; the
    # time to the head and first events (an LLM's time to first token) is its own field.
    server = gateway(backend)
    started = time.monotonic()
    events = stream_events(server, "slow-x", headers={"x-request-id": "long-stream"}, text="a b c d e f")
    duration_ms = (time.monotonic() - started) * 1000
    assert events[-1] == "[DONE]" and streamed_text(events[:-1]) == "Echo: a b c d e f"
    line = wait_for_log(server, lambda l: l.get("msg") == "request" and l.get("request_id") == "long-stream")
    assert line["status"] == "200"
    latency, ttfb = float(line["latency_ms"]), float(line["ttfb_ms"])
    # Seven tokens, each 0.2 s after the last: the stream lasts over a second; its first event
    # comes after one wait.
    assert 1200 <= latency <= duration_ms + 50, (latency, duration_ms)
    assert ttfb < 700 and ttfb < latency - 800, (ttfb, latency)
    # Whole answers have no ttfb_ms.
    server.client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}]},
                       headers={"x-request-id": "whole"})
    assert "ttfb_ms" not in wait_for_log(server, lambda l: l.get("msg") == "request" and l.get("request_id") == "whole")
    # The same times in /metrics: one stream's first byte; the durations of both requests.
    metrics = server.client.get("/metrics").text
    route = {"route": "/v1/chat/completions"}
    assert metric_value(metrics, "gatehouse_http_time_to_first_byte_seconds_count", **route) == 1
    assert metric_value(metrics, "gatehouse_http_time_to_first_byte_seconds_sum", **route) == pytest.approx(ttfb / 1000, abs=0.002)
    assert metric_value(metrics, "gatehouse_http_request_duration_seconds_count", **route) == 2
    assert metric_value(metrics, "gatehouse_http_request_duration_seconds_sum", **route) >= latency / 1000


@both_backends
def test_compressed_request_bodies_get_415_not_a_json_error(gateway, fake_llm, backend):
    server = gateway(backend)
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "squeezed"}]}).encode()
    for encoding, content in [("gzip", gzip.compress(body)), ("br", b"\x0b\x02\x80"), ("gzip, identity", gzip.compress(body))]:
        for path in ["/v1/chat/completions", "/v1/embeddings"]:
            response = server.client.post(path, content=content, headers={"content-type": "application/json", "content-encoding": encoding})
            assert response.status_code == 415, (encoding, path, response.status_code, response.text)
            assert response.headers["accept-encoding"] == "identity"
            error = response.json()["error"]
            assert error["code"] == "unsupported_content_encoding", error
            assert error["message"] == f"request bodies must not be compressed (Content-Encoding: {encoding}); send the JSON uncompressed"
    assert fake_llm.calls(CHAT_PATH[backend]) == []
    # identity is no encoding at all.
    plain = server.client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json", "content-encoding": "identity"})
    assert plain.status_code == 200, plain.text
    assert plain.json()["choices"][0]["message"]["content"] == "Echo: squeezed"


@both_backends
def test_the_readiness_probe_reports_its_own_time_limit(start, plugins_dir, backend):
    # An upstream that takes connections and never answers: the probe gives up after its own
    # 3 s, and said "did not answer within 600 s" (upstream.timeout's figure).
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        server = start(plugins_dir, config=f"upstream: {{backend: {backend}, url: 'http://127.0.0.1:{silent.getsockname()[1]}', timeout: 600s}}\n")
        started = time.monotonic()
        ready = server.client.get("/health/ready", timeout=30)
        assert ready.status_code == 503 and time.monotonic() - started < 10, ready.text
        assert ready.json()["reason"].startswith("upstream did not answer within 3 s ("), ready.json()


@both_backends
def test_upstream_unreachable_timeout_and_failure(start, plugins_dir, fake_llm, backend):
    dead_port = free_port()
    server = start(plugins_dir, config=f"upstream: {{backend: {backend}, url: 'http://127.0.0.1:{dead_port}', timeout: 1s}}\n")
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    unreachable = server.client.post("/v1/chat/completions", json=body)
    assert unreachable.status_code == 502
    assert unreachable.json()["error"]["code"] == "upstream_unreachable"
    assert "connection refused" in unreachable.json()["error"]["message"]
    stream = server.client.post("/v1/chat/completions", json={**body, "stream": True})
    assert stream.status_code == 502 and stream.json()["error"]["code"] == "upstream_unreachable"
    ready = server.client.get("/health/ready")
    assert ready.status_code == 503 and ready.json()["status"] == "unavailable" and "unreachable" in ready.json()["reason"]
    assert f"127.0.0.1:{dead_port}" in ready.json()["reason"]  # for the operator
    assert server.client.get("/health/live").status_code == 200
    # With a key guarding the API, the probe (which needs none) does not tell anyone where the upstream is.
    keyed = start(plugins_dir, config=f"upstream: {{backend: {backend}, url: 'http://127.0.0.1:{dead_port}', timeout: 1s}}\nauth: {{api_key: k}}\n")
    hidden = keyed.client.get("/health/ready").json()
    assert hidden["reason"] == "upstream unreachable (the gateway's log has the details)", hidden
    assert f"127.0.0.1:{dead_port}" in wait_for_log(keyed, lambda l: l.get("msg") == "upstream not ready")["error"]
    # Nor a failed lookup's host and port, which the reason named before the URL.
    unresolved = start(plugins_dir, config=f"upstream: {{backend: {backend}, url: 'http://internal-llm.invalid:8123', timeout: 1s}}\nauth: {{api_key: k}}\n")
    hidden = unresolved.client.get("/health/ready").json()
    assert hidden["status"] == "unavailable" and "internal-llm" not in hidden["reason"] and "8123" not in hidden["reason"], hidden

    slow = start(plugins_dir, config=f"upstream: {{backend: {backend}, url: '{fake_llm.url}', timeout: 1s}}\n")
    started = time.monotonic()
    timed_out = slow.client.post("/v1/chat/completions", json={**body, "model": "hang"})
    assert timed_out.status_code == 504 and timed_out.json()["error"]["code"] == "upstream_timeout"
    assert "within 1 s" in timed_out.json()["error"]["message"] and time.monotonic() - started < 5
    broken = slow.client.post("/v1/chat/completions", json={**body, "model": "broken"})
    assert broken.status_code == 502 and "llama runner process has terminated" in broken.json()["error"]["message"]
    broken_stream = slow.client.post("/v1/chat/completions", json={**body, "model": "broken", "stream": True})
    assert broken_stream.status_code == 502 and "llama runner process has terminated" in broken_stream.json()["error"]["message"]
    assert slow.client.get("/health/ready").json() == {"status": "ready", "backend": backend}
    # The gateway still answers after every failure above.
    assert slow.client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"] == "Echo: x"
    # The failed calls are timed too, by outcome (only the successful ones were: the slowest,
    # a timeout, never reached the upstream latency), on both paths.
    metrics = slow.client.get("/metrics").text
    duration = lambda operation, outcome: metric_value(
        metrics, "gatehouse_upstream_request_duration_seconds_count", backend=backend, operation=operation, outcome=outcome)
    assert (duration("chat", "error"), duration("chat_stream", "error"), duration("chat", "ok")) == (2, 1, 1)
    assert metric_value(metrics, "gatehouse_upstream_request_duration_seconds_sum", backend=backend, operation="chat", outcome="error") >= 1


@both_backends
def test_readiness_calls_the_upstream_at_most_once_a_second(gateway, fake_llm, backend):
    # /health/ready needs no key and spends no rate: each probe went upstream, so anyone could
    # make the gateway call the upstream (a paid API's quota too) as fast as they could ask.
    server = gateway(backend, extra_config="auth: {api_key: k}\n")
    probe = "/api/version" if backend == "ollama" else "/v1/models"
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: server.client.get("/health/ready"), range(40)))
    assert all(answer.status_code == 200 for answer in answers)
    assert 1 <= len(fake_llm.calls(probe)) <= 3, len(fake_llm.calls(probe))
    time.sleep(1.1)
    before = len(fake_llm.calls(probe))
    assert server.client.get("/health/ready").json() == {"status": "ready", "backend": backend}
    assert len(fake_llm.calls(probe)) == before + 1


@both_backends
def test_past_the_upstream_connection_limit_a_request_waits_then_gets_503_busy(start, plugins_dir, fake_llm, backend):
    # The connections AsyncHTTPClient opens are limited: chat on the Ollama backend, embeddings
    # (and models, plugins' calls) on both. The openai backend's plain-HTTP chat pass-through is not.
    server = start(plugins_dir, config=f"upstream: {{backend: {backend}, url: '{fake_llm.url}', timeout: 4s, connect_timeout: 1s,"
                                       f" max_connections: 2}}\n")
    path, body = {"ollama": ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "x"}]}),
                  "openai": ("/v1/embeddings", {"model": "m", "input": "x"})}[backend]
    holders = [threading.Thread(target=server.client.post, args=(path,), kwargs={"json": {**body, "model": "hang"}}) for _ in range(2)]
    for holder in holders:
        holder.start()
    deadline = time.monotonic() + 5
    upstream_path = {"ollama": "/api/chat", "openai": "/v1/embeddings"}[backend]
    while len([c for c in fake_llm.calls(upstream_path) if c[3].get("model") == "hang"]) < 2:
        assert time.monotonic() < deadline, "the two hanging requests did not reach the upstream"
        time.sleep(0.05)
    started = time.monotonic()
    busy = server.client.post(path, json=body)
    waited = time.monotonic() - started
    assert busy.status_code == 503, busy.text
    assert busy.headers["retry-after"] == "1"
    error = busy.json()["error"]
    assert error["code"] == "upstream_busy" and "(upstream.max_connections) is in use" in error["message"], error
    assert 0.8 < waited < 3.5, waited  # it waited the connect timeout for a connection, no longer
    for holder in holders:
        holder.join()
    # The hanging calls timed out (504) and gave their connections back.
    again = server.client.post(path, json=body)
    assert again.status_code == 200, again.text


def _stream_refused(server, model, status=502):
    """The error a streamed request for `model` was answered with, before any event (asserted)."""
    response = server.client.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "x"}], "stream": True})
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    return response.json()["error"]


@both_backends
def test_a_stream_the_upstream_ends_too_early_is_an_error(gateway, backend):
    server = gateway(backend)
    # A clean HTTP ending without a single event is not an empty answer: it is an upstream
    # failure, and since nothing has reached the client yet, its status says so (as OpenAI's
    # errors before a stream begins do), which clients retry by.
    error = _stream_refused(server, "silent")
    assert error["code"] == "upstream_invalid" and error["type"] == "api_error"
    assert error["message"] == {"ollama": 'ollama ended the stream before its final message ("done": true)',
                                "openai": "openai upstream ended the stream without sending any event"}[backend]
    truncated = stream_events(server, "truncated")
    assert truncated[-1] == "[DONE]"
    if backend == "ollama":
        # Ollama always ends with a "done": true line: without it the answer was cut short.
        assert streamed_text(truncated[:-2]) == "Echo: a b c"
        assert json.loads(truncated[-2])["error"]["message"] == 'ollama ended the stream before its final message ("done": true)'
    else:
        # Events but no [DONE]: a lax OpenAI-compatible server's complete answer, passed on whole.
        assert streamed_text(truncated[:-1]) == "Echo: a b c"
        assert not any("error" in json.loads(e) for e in truncated[:-1])
        # A server that ignores "stream": true and answers JSON: said so, not an empty success.
        assert _stream_refused(server, "plain-json")["message"] == (
            "openai upstream answered the stream request with Content-Type application/json, not text/event-stream")
    # The gateway goes on serving.
    assert streamed_text(stream_events(server, "m")[:-1]) == "Echo: a b c"


@both_backends
def test_an_upstream_base_url_ending_in_v1_works(gateway, fake_llm, backend):
    # As OpenAI's SDKs and vLLM's docs spell base URLs; the gateway adds /v1/... itself.
    server = gateway(backend, env={"GATEHOUSE_UPSTREAM_URL": fake_llm.url + "/v1/"})
    client = client_for(server)
    assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": "via v1"}]).choices[0].message.content == "Echo: via v1"
    chunks = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "streamed"}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Echo: streamed"
    assert [m.id for m in client.models.list()]
    assert fake_llm.requests and not any(path.startswith("/v1/v1") for _, path, *_ in fake_llm.requests)


def test_an_upstream_base_url_naming_another_api_version_is_used_as_it_is(gateway, fake_llm):
    # Google's OpenAI-compatible base URL: OpenAI's SDKs add /chat/completions to it, and so
    # must the gateway, on the pass-through (chat) and the router (models, embeddings) alike.
    server = gateway("openai", env={"GATEHOUSE_UPSTREAM_URL": fake_llm.url + "/v1beta/openai/"})
    client = client_for(server)
    assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": "to google"}]).choices[0].message.content == "Echo: to google"
    chunks = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "streamed"}], stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Echo: streamed"
    assert [m.id for m in client.models.list()] == ["smollm2"]
    assert len(client.embeddings.create(model="e", input=["a", "b"]).data) == 2
    assert server.client.get("/health/ready").status_code == 200
    paths = {path for _, path, *_ in fake_llm.requests}
    assert {"/v1beta/openai/chat/completions", "/v1beta/openai/models", "/v1beta/openai/embeddings"} <= paths, paths
    assert not any(path.startswith("/v1/") or "/openai/v1" in path for path in paths), paths


@both_backends
def test_upstream_error_statuses_and_bad_replies_get_precise_errors(gateway, backend):
    server = gateway(backend)

    def chat(model, stream=False):
        return server.client.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": "a b c d"}], "stream": stream})

    for stream in (False, True):
        denied = chat("denied", stream)
        assert denied.status_code == 502 and denied.json()["error"]["code"] == "upstream_auth"
        assert denied.json()["error"]["message"] == f"{backend} refused the gateway's credentials: Incorrect API key provided"
        busy = chat("busy", stream)
        assert busy.status_code == 429 and busy.json()["error"]["code"] == "upstream_rate_limited"
        assert busy.json()["error"]["message"] == f"{backend} is rate limiting: Rate limit reached for requests"
        assert busy.headers["retry-after"] == "7"  # the upstream's wait, passed on for the client's SDK
        # Overloaded is not broken: a 503, for the client to come back.
        overloaded = chat("overloaded", stream)
        assert overloaded.status_code == 503 and overloaded.json()["error"]["code"] == "upstream_unavailable"
        assert overloaded.json()["error"]["message"] == (
            f"{backend} is unavailable: server busy, please try again.  maximum pending requests exceeded")
        assert "retry-after" not in overloaded.headers
    garbage = chat("garbage")
    assert garbage.status_code == 502 and garbage.json()["error"]["code"] == "upstream_invalid"
    assert garbage.json()["error"]["message"] == {"ollama": "ollama sent a reply that is not a JSON object",
                                                  "openai": "openai upstream sent a reply that is not a JSON object"}[backend]
    # The backend's own error in the middle of a stream: the tokens so far, then the error event.
    crashed = stream_events(server, "crash")
    assert crashed[-1] == "[DONE]"
    assert streamed_text(crashed[:-2]) == "Echo: a"
    assert json.loads(crashed[-2])["error"]["code"] == "upstream_error"
    assert "model runner crashed" in json.loads(crashed[-2])["error"]["message"]
    assert chat("m").json()["choices"][0]["message"]["content"] == "Echo: a b c d"


@both_backends
def test_the_upstream_key_quoted_back_by_the_upstream_is_masked(gateway, backend):
    # An upstream that quotes the key it was sent in its error: the message went on to the
    # client, and into the log, as it was (a key not shaped sk-… or Bearer … is not masked by pattern).
    secret, own_key = "gh-upstream-secret-4711", "gh-gateway-key-0815"
    server = gateway(backend, env={"GATEHOUSE_UPSTREAM_API_KEY": secret, "API_KEY": own_key})
    server.client.headers["authorization"] = f"Bearer {own_key}"
    # The gateway's own key, wherever it shows up in a line (a client pasting it into a URL), is masked too.
    assert server.client.get(f"/v1/models/{own_key}", headers={"x-request-id": "keyed-url"}).status_code == 404
    assert wait_for_log(server, lambda l: l.get("request_id") == "keyed-url")["path"] == "/v1/models/[REDACTED]"
    for stream in (False, True):
        denied = server.client.post("/v1/chat/completions", json={"model": "denied", "messages": [{"role": "user", "content": "x"}], "stream": stream},
                                    headers={"x-request-id": f"denied-{stream}"})
        assert denied.status_code == 502
        assert denied.json()["error"]["message"] == f"{backend} refused the gateway's credentials: Incorrect API key provided (key [REDACTED])"
        # The reason is in the log too (the access line has only the status), under the request's id.
        failed = wait_for_log(server, lambda l: l.get("msg") == "request failed" and l.get("request_id") == f"denied-{stream}")
        assert failed["level"] == "warning" and failed["code"] == "upstream_auth" and failed["status"] == "502", failed
        assert failed["error"] == denied.json()["error"]["message"]
    # An error sent with a 200 (Ollama's path read it without masking), and one whose code is the key.
    error_200 = server.client.post("/v1/chat/completions", json={"model": "error-200", "messages": [{"role": "user", "content": "x"}]})
    assert error_200.status_code == 502 and error_200.json()["error"]["message"].endswith(" (key [REDACTED])"), error_200.text
    key_as_code = server.client.post("/v1/chat/completions", json={"model": "key-as-code", "messages": [{"role": "user", "content": "x"}]})
    assert key_as_code.status_code == 400 and key_as_code.json()["error"]["code"] == "[REDACTED]", key_as_code.text
    crashed = stream_events(server, "crash", headers={"x-request-id": "crash-1"})
    assert json.loads(crashed[-2])["error"]["message"].endswith("model runner crashed (key [REDACTED])"), crashed[-2]
    failed = wait_for_log(server, lambda l: l.get("msg") == "stream failed")
    assert failed["request_id"] == "crash-1" and failed["level"] == "error", failed  # the request's line, as every one
    assert secret not in server.log() and own_key not in server.log()


@both_backends
def test_an_upstream_answer_past_the_gateways_limit_is_a_precise_502(gateway, backend):
    # The gateway reads a whole answer into memory only up to 64 MiB; past that it stops reading
    # and says why, on the router (Ollama, embeddings) as on the pass-through (openai chat).
    server = gateway(backend)
    paths = ["/v1/chat/completions", "/v1/embeddings"]
    for path in paths:
        body = {"model": "huge", "messages": [{"role": "user", "content": "x"}]} if "chat" in path else {"model": "huge", "input": "x"}
        reply = server.client.post(path, json=body)
        assert reply.status_code == 502, (path, reply.text[:200])
        error = reply.json()["error"]
        assert error["code"] == "upstream_too_large", (path, error)
        assert error["message"].startswith("upstream reply is larger than 64 MiB, the most the gateway reads for one answer ("), error
    assert server.client.post(paths[0], json={"model": "m", "messages": [{"role": "user", "content": "after"}]}).json()[
        "choices"][0]["message"]["content"] == "Echo: after"


@both_backends
def test_a_stream_line_past_the_gateways_limit_ends_the_stream_with_a_precise_error(gateway, backend):
    # A stream's line is held whole until it ends; one that runs on past 64 MiB ends the stream
    # with an error event instead of growing (the router's NDJSON reader for Ollama, the
    # pass-through's SSE relay for openai), and the gateway keeps serving.
    server = gateway(backend)
    events = stream_events(server, "huge")
    assert events[-1] == "[DONE]"
    assert streamed_text(events[:-2]) == "Echo:", events[:3]
    error = json.loads(events[-2])["error"]
    assert error["code"] == "upstream_too_large", error
    assert error["message"] == "upstream sent a stream line longer than 64 MiB, the most the gateway holds for one line"
    assert server.client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "after"}]}).json()[
        "choices"][0]["message"]["content"] == "Echo: after"


def test_chat_fields_ollama_cannot_honour_are_refused_not_dropped(gateway, fake_llm):
    # Ollama's own /v1 drops these silently; the answer would be to a different request.
    # And the one Ollama has that OpenAI lacks gets through.
    server = gateway("ollama")
    client = client_for(server)
    before = len(fake_llm.calls("/api/chat"))
    for fields, code in (({"logit_bias": {"50256": -100}}, "invalid_logit_bias"),
                         ({"functions": [{"name": "f", "parameters": {"type": "object"}}]}, "invalid_functions"),
                         ({"modalities": ["text", "audio"]}, "invalid_modalities")):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], **fields)
        assert refused.value.body["code"] == code, refused.value.body
    assert len(fake_llm.calls("/api/chat")) == before  # none reached the upstream
    assert client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], logit_bias={}).choices[0].message.content == "Echo: x"
    # Ollama's own options (num_ctx has no OpenAI name) reach it from the SDK's extra_body.
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], max_tokens=7,
                                   extra_body={"options": {"num_ctx": 8192}})
    assert fake_llm.calls("/api/chat")[-1][3]["options"] == {"num_ctx": 8192, "num_predict": 7}


def test_tool_choice_on_ollama_narrows_the_tools_offered(gateway, fake_llm):
    # Ollama has no tool_choice: the gateway offers only the named function, or says it is unknown.
    server = gateway("ollama")
    tools = [{"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": {}}}}
             for name in ("get_time", "get_weather")]
    client = client_for(server)
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], tools=tools,
                                   tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert [t["function"]["name"] for t in fake_llm.calls("/api/chat")[-1][3]["tools"]] == ["get_weather"]
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "y"}], tools=tools, tool_choice="none")
    assert "tools" not in fake_llm.calls("/api/chat")[-1][3]
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "z"}], tools=tools,
                                       tool_choice={"type": "function", "function": {"name": "get_news"}})
    assert unknown.value.body["message"] == "'tool_choice' names function 'get_news', which is not in 'tools'"
    assert unknown.value.body["code"] == "invalid_tool_choice"
    assert len(fake_llm.calls("/api/chat")) == 2
    # The gateway's own 400, before anything went upstream, is no failed upstream call.
    assert 'outcome="error"' not in server.client.get("/metrics").text
    # OpenAI's allowed_tools rules the others out: they were offered all the same.
    client.chat.completions.create(model="m", messages=[{"role": "user", "content": "w"}], tools=tools, tool_choice={
        "type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": [{"type": "function", "function": {"name": "get_time"}}]}})
    assert [t["function"]["name"] for t in fake_llm.calls("/api/chat")[-1][3]["tools"]] == ["get_time"]


def test_ollama_refuses_what_it_cannot_take_instead_of_dropping_it(gateway, fake_llm):
    # Ollama fetches no image URLs, takes no audio and answers one choice: the client hears so
    # before anything reaches the model, instead of an answer to a question it did not ask.
    server = gateway("ollama", extra_config="cache: {enabled: false}\n")
    client = client_for(server)
    png = "data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode()
    client.chat.completions.create(model="m", messages=[{"role": "developer", "content": "Be brief."}, {"role": "user", "content": [
        {"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": png}}]}])
    instructions, sent = fake_llm.calls("/api/chat")[-1][3]["messages"]
    assert sent["content"] == "what is this?" and base64.b64decode(sent["images"][0]) == b"\x89PNG fake"
    # OpenAI's developer role is Ollama's system role (its chat templates would leave it out).
    assert instructions == {"role": "system", "content": "Be brief."}
    before = len(fake_llm.calls("/api/chat"))
    refusals = [
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]}, "invalid_image",
         "'messages' item 1, content part 0: Ollama takes images only as base64 data URLs of JPEG, PNG or WebP "
         "(data:image/png;base64,…), not a URL to fetch"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}]}]},
         "unsupported_content",
         "'messages' item 0, content part 0 has type 'input_audio', which Ollama cannot take (only 'text' and 'image_url')"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "invalid_n",
         "'n' must be 1 for Ollama, which answers one choice per request (got 2)"),
        ({"messages": [{"role": "user", "content": "hi"}], "stop": 5}, "invalid_stop",
         "'stop' must be a string or a list of strings (got 5)"),
        ({"messages": [{"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
         "invalid_tool_call_arguments", "'messages' item 0, tool call 0: 'function.arguments' is not a JSON object"),
    ]
    for body, code, message in refusals:
        for stream in (False, True):
            response = server.client.post("/v1/chat/completions", json={"model": "m", "stream": stream, **body})
            assert response.status_code == 400, response.text
            assert response.json()["error"]["code"] == code and response.json()["error"]["message"] == message
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="m", n=3, messages=[{"role": "user", "content": "hi"}])
    assert refused.value.body["code"] == "invalid_n"
    assert len(fake_llm.calls("/api/chat")) == before


def test_ollama_logprobs_come_back_in_openai_shapes(gateway, fake_llm):
    # Ollama (since 0.12.11) gives each token's logprob and alternatives when asked.
    server = gateway("ollama", extra_config="cache: {enabled: false}\n")
    client = client_for(server)
    ask = {"model": "m", "messages": [{"role": "user", "content": "a b"}], "logprobs": True, "top_logprobs": 2}
    choice = client.chat.completions.create(**ask).choices[0]
    assert fake_llm.calls("/api/chat")[-1][3]["logprobs"] is True and fake_llm.calls("/api/chat")[-1][3]["top_logprobs"] == 2
    assert [(t.token, t.logprob) for t in choice.logprobs.content] == [("Echo:", 0.0), (" a", -0.25), (" b", -0.5)]
    assert choice.logprobs.content[1].bytes == list(b" a")
    assert [(t.token, t.logprob) for t in choice.logprobs.content[1].top_logprobs] == [(" a", -0.25), ("<alt>", -3.0)]
    chunks = [c for c in client.chat.completions.create(**ask, stream=True) if c.choices and c.choices[0].logprobs]
    assert [t.token for c in chunks for t in c.choices[0].logprobs.content] == ["Echo:", " a", " b"]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Echo: a b"
    # Not asked, not sent: the choice's logprobs is null, as OpenAI's.
    plain = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "c"}]).choices[0]
    assert plain.logprobs is None and "logprobs" not in fake_llm.calls("/api/chat")[-1][3]
    # Legacy text completions ask with a number and get tokens, token_logprobs, top_logprobs, text_offset.
    text = client.completions.create(model="m", prompt="x y", logprobs=1).choices[0]
    assert fake_llm.calls("/api/generate")[-1][3]["top_logprobs"] == 1 and text.text == "Echo: x y"
    assert text.logprobs.tokens == ["Echo:", " x", " y"] and text.logprobs.token_logprobs == [0.0, -0.25, -0.5]
    assert text.logprobs.top_logprobs == [{"Echo:": 0.0}, {" x": -0.25}, {" y": -0.5}] and text.logprobs.text_offset == [0, 5, 7]
    streamed = [c.choices[0].logprobs for c in client.completions.create(model="m", prompt="x y", logprobs=0, stream=True)
                if c.choices and c.choices[0].logprobs]
    assert [(l.tokens, l.text_offset) for l in streamed] == [(["Echo:"], [0]), ([" x"], [5]), ([" y"], [7])]
    for body, field in (({**ask, "top_logprobs": 21}, "top_logprobs"), ({**ask, "logprobs": "yes"}, "logprobs")):
        refused = server.client.post("/v1/chat/completions", json=body)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == f"invalid_{field}", refused.text
    refused = server.client.post("/v1/completions", json={"model": "m", "prompt": "x", "logprobs": True})
    assert refused.status_code == 400 and refused.json()["error"]["message"] == "'logprobs' must be an integer from 0 to 20 (got true)"


def test_ollama_reasoning_maps_to_and_from_think(gateway, fake_llm):
    server = gateway("ollama", extra_config="cache: {enabled: false}\n")
    client = client_for(server)
    ask = {"model": "thinker", "messages": [{"role": "user", "content": "hi"}]}
    # The model's thinking comes back as `reasoning`, beside the answer, as Ollama's /v1 sends it.
    answer = client.chat.completions.create(**ask, reasoning_effort="low").choices[0].message
    assert answer.content == "Echo: hi" and answer.model_extra["reasoning"] == "Let me think."
    assert fake_llm.calls("/api/chat")[-1][3]["think"] == "low"
    chunks = list(client.chat.completions.create(**ask, stream=True, extra_body={"reasoning": {"effort": "high"}}))
    assert fake_llm.calls("/api/chat")[-1][3]["think"] == "high"
    assert "".join(c.choices[0].delta.model_extra.get("reasoning") or "" for c in chunks if c.choices) == "Let me think."
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Echo: hi"
    # "none" turns thinking off; without an effort, the model's default (no `think` sent).
    answer = client.chat.completions.create(**ask, reasoning_effort="none").choices[0].message
    assert fake_llm.calls("/api/chat")[-1][3]["think"] is False and "reasoning" not in (answer.model_extra or {})
    client.chat.completions.create(**ask)
    assert "think" not in fake_llm.calls("/api/chat")[-1][3]
    # An earlier answer's reasoning goes back to Ollama as `thinking`.
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Echo: hi", "reasoning": "Let me think."},
               {"role": "user", "content": "again"}]
    client.chat.completions.create(model="thinker", messages=history)
    assert fake_llm.calls("/api/chat")[-1][3]["messages"][1]["thinking"] == "Let me think."
    # An effort Ollama does not know is the client's error, named.
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**ask, extra_body={"reasoning_effort": "extreme"})
    assert refused.value.body["code"] == "invalid_reasoning_effort" and '(got "extreme")' in refused.value.body["message"]


@both_backends
def test_an_upstream_errors_code_and_param_reach_the_client(gateway, backend):
    # What a client acts on (shorten the prompt; stop retrying an account out of credit) is in
    # OpenAI's code, not in the status: kept, on the pass-through and the router alike.
    server = gateway(backend)
    client = client_for(server, max_retries=0)
    ask = {"messages": [{"role": "user", "content": "a b c d e f g h i"}]}
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as too_long:
            client.chat.completions.create(model="too-long", stream=stream, **ask)
        error = too_long.value.body
        assert error["message"] == f"{backend} rejected the request: This model's maximum context length is 8 tokens. However, your messages resulted in 9 tokens."
        # Ollama says it in text only: the gateway's own code, and no param.
        expected = ("context_length_exceeded", "messages") if backend == "openai" else ("upstream_rejected", None)
        assert (error["code"], error.get("param")) == expected and too_long.value.param == expected[1]
        with pytest.raises(openai.RateLimitError) as no_quota:
            client.chat.completions.create(model="no-quota", stream=stream, **ask)
        # (Sent in OpenAI's shape on Ollama's routes too, as a proxy in front of Ollama may.)
        assert no_quota.value.code == "insufficient_quota"
        assert no_quota.value.body["param"] is None
    with pytest.raises(openai.BadRequestError) as legacy:  # the router's path for the openai backend
        client.completions.create(model="too-long", prompt="a b c")
    assert legacy.value.code == ("context_length_exceeded" if backend == "openai" else "upstream_rejected")
    # The gateway's own refusals name the field too.
    with pytest.raises(openai.BadRequestError) as too_hot:
        client.chat.completions.create(model="m", temperature=5, **ask)
    assert (too_hot.value.code, too_hot.value.param) == ("invalid_temperature", "temperature")
    missing = server.client.post("/v1/chat/completions", json={"model": "m"}).json()["error"]
    assert (missing["code"], missing["param"]) == ("missing_messages", "messages")


def test_request_validation_errors_sent_as_500_are_the_clients_400(gateway):
    # llama-cpp-python answers request validation errors with HTTP 500; they are the client's to fix.
    server = gateway("openai")
    for stream in (False, True):
        response = server.client.post(
            "/v1/chat/completions", json={"model": "invalid", "messages": [{"role": "user", "content": "x"}], "stream": stream})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "upstream_rejected" and error["type"] == "invalid_request_error"
        assert error["message"].startswith("openai rejected the request (it answered HTTP 500, but as a validation error): [{'type'")
        assert "'loc': ('body', 'top_p')" in error["message"]
    # A 500 that is not about the request stays a gateway failure.
    broken = server.client.post("/v1/chat/completions", json={"model": "broken", "messages": [{"role": "user", "content": "x"}]})
    assert broken.status_code == 502 and broken.json()["error"]["code"] == "upstream_error"


@both_backends
def test_a_client_leaving_mid_stream_stops_the_upstream_generating(gateway, fake_llm, backend):
    server = gateway(backend, extra_config="cache: {enabled: false}\n")
    words = " ".join(["word"] * 20)  # 21 tokens 0.2 s apart: 4 s if nobody hangs up
    with server.client.stream("POST", "/v1/chat/completions", json={
            "model": "slow-model", "stream": True, "messages": [{"role": "user", "content": words}]}) as response:
        assert next(response.iter_lines()).startswith("data: ")
    # The gateway closes its upstream connection, so the upstream's next writes fail (a real
    # Ollama or llama.cpp server then stops generating) rather than being read to the end.
    deadline = time.monotonic() + 3
    while not fake_llm.abandoned:
        assert time.monotonic() < deadline, "the upstream went on streaming to the gateway"
        time.sleep(0.05)
    assert fake_llm.abandoned == [CHAT_PATH[backend]]
    # A client that only shuts its sending side mid-stream has gone too (README): the router
    # wrote on to it, the upstream generating to the end, while the pass-through stopped. The
    # trailing slash takes the router on both backends.
    for target in ("/v1/chat/completions", "/v1/chat/completions/"):
        before = len(fake_llm.abandoned)
        data = json.dumps({"model": "slow-model", "stream": True, "messages": [{"role": "user", "content": words}]}).encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(b"POST %s HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                         % (target.encode(), len(data), data))
            received = b""
            while b"data: " not in received:
                received += sock.recv(65536)
            sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + 3
            while len(fake_llm.abandoned) == before:
                assert time.monotonic() < deadline, f"{target}: the upstream went on generating for a client that left"
                time.sleep(0.05)
            while chunk := sock.recv(65536):  # and the gateway closes, without the stream's end
                received += chunk
            assert b"[DONE]" not in received, target


@both_backends
def test_a_client_that_leaves_before_its_answer_gets_the_upstream_call_abandoned(gateway, fake_llm, backend):
    # "ponder" thinks 5 s before its first byte, as a model over a long prompt or in Ollama's queue
    # does, and stops if the caller hangs up, as Ollama does. A client that leaves meanwhile must
    # not keep it busy for nobody: the gateway hangs up on the upstream too.
    server = gateway(backend, extra_config="cache: {enabled: false}\n")
    chat = {"model": "ponder", "messages": [{"role": "user", "content": "x"}]}
    chat_path = CHAT_PATH[backend]
    text_path = {"ollama": "/api/generate", "openai": "/v1/completions"}[backend]

    def abandoned_within(seconds, path, count):
        deadline = time.monotonic() + seconds
        while fake_llm.abandoned.count(path) < count:
            assert time.monotonic() < deadline, f"the upstream went on working for a client that left ({fake_llm.abandoned})"
            time.sleep(0.05)

    # The SDK's own timeout, whole and streamed (and legacy completions, and embeddings): it closes the connection.
    for count, stream in enumerate([False, True], start=1):
        with pytest.raises(openai.APITimeoutError):
            client_for(server, timeout=1).chat.completions.create(**chat, stream=stream)
        abandoned_within(3, chat_path, count)
    with pytest.raises(openai.APITimeoutError):
        client_for(server, timeout=1).completions.create(model="ponder", prompt="x")
    abandoned_within(3, text_path, 1)
    with pytest.raises(openai.APITimeoutError):
        client_for(server, timeout=1).embeddings.create(model="ponder", input="x")
    abandoned_within(3, {"ollama": "/api/embed", "openai": "/v1/embeddings"}[backend], 1)

    # An upstream that sends its stream's head at once and then thinks (llama.cpp's and vLLM's
    # servers do): the route has answered by then, and only the wait for the first event can
    # notice the client leaving. It did not, and the upstream worked on for nobody.
    for path, call in [
            (chat_path, lambda c: c.chat.completions.create(**{**chat, "model": "ponder-streaming"}, stream=True)),
            (text_path, lambda c: c.completions.create(model="ponder-streaming", prompt="x", stream=True))]:
        before = fake_llm.abandoned.count(path)
        with pytest.raises(openai.APITimeoutError):
            for _ in call(client_for(server, timeout=1)):
                pass
        abandoned_within(3, path, before + 1)

    # A client that shuts down its sending side is taken to have gone too, as nginx and Go's
    # net/http take it: the upstream call is abandoned, and the answer (which a half-closed
    # client can still read) is the 499, then the close.
    for count, stream in enumerate([False, True], start=3):
        calls = len(fake_llm.calls(chat_path))
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            data = json.dumps({**chat, "stream": stream}).encode()
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
            deadline = time.monotonic() + 3
            while len(fake_llm.calls(chat_path)) == calls:  # the upstream is pondering
                assert time.monotonic() < deadline
                time.sleep(0.05)
            sock.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 499 Client Closed Request\r\n") and b"\r\nConnection: close" in head, received
        assert json.loads(body)["error"]["code"] == "client_closed_request", received
        abandoned_within(3, chat_path, count)
    # Other requests are answered as usual: a health probe piped through `nc -N` half-closes too.
    reply, _ = raw_exchange(server.port, b"GET /health HTTP/1.1\r\nHost: g\r\n\r\n", until=None, half_close=True)
    assert reply.startswith(b"HTTP/1.1 200 OK") and reply.endswith(b'{"status":"ok"}'), reply

    def client_closed_lines():
        return [l for l in server.log_lines() if l.get("msg") == "request" and l.get("status") == "499"]
    deadline = time.monotonic() + 5  # access lines reach the log at the end of their loop's round
    while len(client_closed_lines()) < 8:  # 2 + 1 + 1 SDK timeouts, 2 streams left before their first event, 2 half-closes
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    assert not [l for l in server.log_lines() if l.get("level") == "error"], server.log()
    # The gateway serves on.
    assert client_for(server).chat.completions.create(model="m", messages=chat["messages"]).choices[0].message.content == "Echo: x"


@both_backends
def test_an_upstream_redirect_is_reported_not_followed(gateway, fake_llm, backend):
    # AsyncHTTPClient followed it, resending the POST as a GET without its body: the answer to
    # that (a 404 or 405 from wherever it led) said nothing of the redirect.
    server = gateway(backend)
    for path, body in (("/v1/chat/completions", {"model": "moved", "messages": [{"role": "user", "content": "x"}]}),
                       ("/v1/embeddings", {"model": "moved", "input": "x"})):
        answer = server.client.post(path, json=body)
        assert answer.status_code == 502, answer.text
        error = answer.json()["error"]
        assert error["code"] == "upstream_redirect" and "HTTP 301" in error["message"], error
    assert not [call for call in fake_llm.requests if call[0] == "GET" and call[1] not in ("/api/version", "/v1/models", "/api/tags")]


@both_backends
def test_a_whole_answer_is_bounded_by_the_timeout_body_included(gateway, backend):
    # AsyncHTTPClient's deadline ends with the response head: a body dripping in (never silent
    # for the 1 s read timeout) ran for its 3 s. The router path takes Ollama's chat, and both
    # backends' embeddings.
    server = gateway(backend, env={"TIMEOUT": "1s"})
    started = time.monotonic()
    if backend == "ollama":
        answer = server.client.post("/v1/chat/completions", json={"model": "drip", "messages": [{"role": "user", "content": "x"}]})
    else:
        answer = server.client.post("/v1/embeddings", json={"model": "drip", "input": "x"})
    assert answer.status_code == 504, answer.text
    assert answer.json()["error"]["code"] == "upstream_timeout" and "within 1 s" in answer.json()["error"]["message"]
    assert time.monotonic() - started < 2.5


@both_backends
def test_streams_are_bounded_by_silence_not_by_total_length(gateway, backend):
    server = gateway(backend, env={"TIMEOUT": "1s"})
    body = {"messages": [{"role": "user", "content": "a b c d e f g h"}], "stream": True}
    # 9 tokens 0.2 s apart: 1.8 s in all, longer than the 1 s timeout, never silent for 1 s.
    with server.client.stream("POST", "/v1/chat/completions", json={**body, "model": "slow-long"}) as response:
        lines = [line for line in response.iter_lines() if line]
    text = "".join(json.loads(l[6:])["choices"][0]["delta"].get("content") or "" for l in lines[:-1]
                   if json.loads(l[6:])["choices"])
    assert text == "Echo: a b c d e f g h" and lines[-1] == "data: [DONE]"
    # Two tokens, then silence: the stream ends with an error event after 1 s, then [DONE].
    started = time.monotonic()
    with server.client.stream("POST", "/v1/chat/completions", json={**body, "model": "stall"}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert time.monotonic() - started < 10
    error = json.loads(lines[-2][6:])["error"]
    assert error["code"] == "upstream_timeout" and "sent nothing for 1 s" in error["message"]
    assert lines[-1] == "data: [DONE]"


@both_backends
def test_expect_100_continue_is_answered_before_the_body(gateway, backend):
    server = gateway(backend, extra_config="server: {max_body_bytes: 2000}\ncache: {enabled: false}\n")
    chat = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]}).encode()
    embed = json.dumps({"model": "m", "input": "hello"}).encode()

    def head(path, body, version="1.1"):
        return (f"POST {path} HTTP/{version}\r\nHost: g\r\nContent-Type: application/json\r\n"
                f"Expect: 100-continue\r\nContent-Length: {len(body)}\r\n\r\n").encode()

    for path, body in (("/v1/chat/completions", chat), ("/v1/embeddings", embed)):
        expected = b"Echo: hello" if path.endswith("completions") else b"embedding"
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            reader = ResponseReader(sock)
            # The body is held back until the 100 arrives (curl waits 1 s for it, then sends anyway).
            sock.sendall(head(path, body))
            assert reader.head().startswith(b"HTTP/1.1 100 Continue\r\n")
            # The next head sent with this body, before the answer: its 100 follows that answer.
            sock.sendall(body + head(path, body))
            first = reader.response()
            assert first.startswith(b"HTTP/1.1 200 ") and expected in first, first
            assert reader.head().startswith(b"HTTP/1.1 100 Continue\r\n")
            sock.sendall(body)
            second = reader.response()
            assert second.startswith(b"HTTP/1.1 200 ") and expected in second, second
    # No invitation to an HTTP/1.0 client (RFC 9110): it is answered when its body comes.
    with socket.create_connection(("127.0.0.1", server.port), timeout=1.5) as sock:
        sock.sendall(head("/v1/chat/completions", chat, "1.0"))
        with pytest.raises(socket.timeout):
            sock.recv(65536)
        sock.settimeout(10)
        sock.sendall(chat)
        final = ResponseReader(sock).response()
        assert re.match(rb"HTTP/1\.0 200 ", final), final
    # A body declared over the limit is refused at once, without the body (which the client
    # never sends), and the connection closes: whatever came next would be read as that body.
    for path in ("/v1/chat/completions", "/v1/embeddings"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(head(path, b"x" * 2001))
            reader = ResponseReader(sock)
            final = reader.response()
            assert final.startswith(b"HTTP/1.1 413 "), final
            assert b"\r\nconnection: close\r\n" in final.lower(), final
            assert json.loads(final.partition(b"\r\n\r\n")[2])["error"]["code"] == "body_too_large"
            assert sock.recv(65536) == b""  # closed
    metrics = server.client.get("/metrics").text
    assert 'status="413"' in metrics  # counted as every answer is


@both_backends
def test_a_request_refused_before_its_held_back_body_closes_the_connection(gateway, backend):
    # A client holding back a body declared over the limit gets no 100, so whatever refuses the
    # request does so before the body: the key check first (the router's order), then the size.
    # Either way the body never comes, and the connection must end with the answer.
    server = gateway(backend, extra_config="server: {max_body_bytes: 2000}\ncache: {enabled: false}\n", env={"API_KEY": "sekret"})
    for path in ("/v1/chat/completions", "/v1/embeddings"):
        for key, status in (("", b"401"), ("Authorization: Bearer sekret\r\n", b"413")):
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                sock.sendall((f"POST {path} HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n{key}"
                              "Expect: 100-continue\r\nContent-Length: 2001\r\n\r\n").encode())
                final = ResponseReader(sock).response()
                assert final.startswith(b"HTTP/1.1 " + status + b" "), final
                assert b"\r\nconnection: close\r\n" in final.lower(), final
                assert sock.recv(65536) == b""
    # A client that stops waiting for the 100 and sends its body anyway still gets the 413.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer sekret\r\nExpect: 100-continue\r\nContent-Length: 2001\r\n\r\n" + b"x" * 1000)
        assert ResponseReader(sock).response().startswith(b"HTTP/1.1 413 ")
    # The refused requests' bodies, cut off by the close, are not further requests, malformed.
    wait_for_log(server, lambda l: l.get("msg") == "request" and l.get("status") == "413" and l.get("path") == "/v1/embeddings")
    # A later request's line, as a mark: the connections above had closed before it was sent.
    server.client.get("/health", headers={"x-request-id": "after-the-refusals"})
    wait_for_log(server, lambda l: l.get("request_id") == "after-the-refusals")
    assert not [l for l in server.log_lines() if l.get("msg") == "request rejected by the HTTP parser"], server.log()


@both_backends
def test_a_body_sent_after_its_request_was_refused_is_drained_not_reset(gateway, backend):
    # A client that does not wait for the 100 sends its body while the gateway refuses the
    # request: closing with that body unread would reset the connection, and a reset can
    # destroy the 413 before the client reads it. The connection closes lingering instead:
    # the answer, the sending side closed, the rest read and dropped.
    server = gateway(backend, extra_config="server: {max_body_bytes: 2000}\ncache: {enabled: false}\n")
    size = 30 * 1024 * 1024
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % size)
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head)
        sock.sendall(b"x" * size)  # failed (reset, broken pipe) when the connection closed at once
        reader = ResponseReader(sock)
        assert reader.response().startswith(b"HTTP/1.1 413 ")
        assert sock.recv(65536) == b""  # the gateway's sending side is closed
    # A client that waits for the 100, gets the 413 instead, and then sends its body anyway and
    # never closes: what it sends is dropped, without a reset, for the linger time (5 s), then
    # the connection closes.
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sock.sendall(head)
        reader = ResponseReader(sock)
        assert reader.response().startswith(b"HTTP/1.1 413 ")
        started = time.monotonic()
        assert sock.recv(65536) == b""
        sock.sendall(b"y" * 1000)  # still read and dropped: no reset yet
        deadline = time.monotonic() + 12
        while True:
            try:
                sock.sendall(b"z" * 1000)
            except (ConnectionResetError, BrokenPipeError):
                break
            assert time.monotonic() < deadline, "the lingering connection was never closed"
            time.sleep(0.1)
        assert time.monotonic() - started > 3
    # The gateway goes on serving, and said nothing of a malformed request.
    assert server.client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
    assert not [l for l in server.log_lines() if l.get("msg") == "request rejected by the HTTP parser"]
    # A body the parser rejects midway (a chunk size that is not one) is answered 400, and the
    # client, still sending, is read to its end too (the router's path stopped reading it, and
    # the pass-through reset it), then the connection closes.
    for path in ("/v1/chat/completions", "/v1/embeddings"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
                         "Transfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":\r\nZZZ\r\n".encode())
            sock.sendall(b"x" * size)
            sock.shutdown(socket.SHUT_WR)
            answer = ResponseReader(sock).response()
            assert answer.startswith(b"HTTP/1.1 400 ") and b"\r\nconnection: close\r\n" in answer.lower(), answer
            assert b"invalid chunk size" in answer, answer
            assert sock.recv(65536) == b""
    # An answer that ends the connection (the client sent Connection: close) given before the
    # body was read (no such route; GET only): the client, still sending, is read to its end,
    # not left stalled until the idle timeout as the router's path left it. (Chunked: a declared
    # length over the limit is answered 413 first.)
    for path, status in (("/v1/nothing", b"404"), ("/v1/models", b"405")):
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\nConnection: close\r\n"
                         f"Transfer-Encoding: chunked\r\n\r\n{size:x}\r\n".encode())
            sock.sendall(b"x" * size)
            sock.shutdown(socket.SHUT_WR)
            assert ResponseReader(sock).response().startswith(b"HTTP/1.1 " + status + b" ")
            assert sock.recv(65536) == b""
    # So is a head over the limit (431), its client still sending it.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: g\r\nX-Big: " + b"a" * size)
        sock.shutdown(socket.SHUT_WR)
        assert ResponseReader(sock).response().startswith(b"HTTP/1.1 431 ")
        assert sock.recv(65536) == b""


@both_backends
def test_http_1_0_clients_and_connection_close_are_honoured(gateway, backend):
    server = gateway(backend, extra_config="cache: {enabled: false}\n")

    def chat(version, stream=False, extra=""):
        body = json.dumps({"model": "m", "stream": stream, "messages": [{"role": "user", "content": "hello"}]}).encode()
        return (f"POST /v1/chat/completions HTTP/{version}\r\nContent-Type: application/json\r\n{extra}"
                f"Content-Length: {len(body)}\r\n\r\n").encode() + body

    def until_closed(payload: bytes) -> tuple[bytes, list[bytes], bytes]:
        """Sends `payload` and reads until the server closes (which it must, within 10 s):
        the status line, the header lines, the body."""
        received, _ = raw_exchange(server.port, payload, until=None)
        head, _, body = received.partition(b"\r\n\r\n")
        status, *fields = head.split(b"\r\n")
        return status, [f.lower() for f in fields], body

    # HTTP/1.0 without keep-alive: a 1.0 answer, then the close (router and chat alike).
    for request in (b"GET /health HTTP/1.0\r\n\r\n", chat("1.0")):
        status, fields, body = until_closed(request)
        assert status == b"HTTP/1.0 200 OK" and b"connection: close" in fields, (status, fields)
        assert b"status" in body or b"Echo: hello" in body
    # A 1.0 stream cannot be chunked: the SSE bytes as they are, ended by the close.
    status, fields, body = until_closed(chat("1.0", stream=True, extra="Connection: keep-alive\r\n"))
    assert status == b"HTTP/1.0 200 OK" and not any(f.startswith(b"transfer-encoding") for f in fields), fields
    assert body.startswith(b"data: {") and body.endswith(b"data: [DONE]\n\n"), body
    assert "".join(json.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in body.decode().split("\n\n")
                   if e.startswith("data: {")) == "Echo: hello"
    # `close` in any case ends an HTTP/1.1 connection.
    status, fields, _ = until_closed(b"GET /health HTTP/1.1\r\nHost: g\r\nConnection: Close\r\n\r\n")
    assert status == b"HTTP/1.1 200 OK" and b"connection: close" in fields
    # An HTTP/1.0 keep-alive is confirmed and kept: two requests on one connection.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        reader = ResponseReader(sock)
        for request in (b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", chat("1.0", extra="Connection: keep-alive\r\n")):
            sock.sendall(request)
            response = reader.response()
            assert response.startswith(b"HTTP/1.0 200 OK\r\n") and b"\r\nconnection: keep-alive\r\n" in response.lower(), response


@both_backends
def test_requests_the_http_parser_rejects_get_openai_shaped_errors(gateway, backend):
    server = gateway(backend, extra_config="cache: {enabled: false}\n")

    def responses(payload: bytes) -> list[tuple[int, dict, bytes]]:
        """Sends `payload`, reads until the server closes (which it must): each response's status,
        lower-cased header fields and body."""
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(payload)
            reader, answers = ResponseReader(sock), []
            while True:
                try:
                    response = reader.response()
                except AssertionError:  # closed
                    assert reader.buffer == b"", reader.buffer
                    return answers
                head, _, body = response.partition(b"\r\n\r\n")
                status, *lines = head.decode().split("\r\n")
                answers.append((int(status.split()[1]), dict(l.lower().split(": ", 1) for l in lines), body))

    def error_of(answer, status, code):
        assert answer[0] == status, answer
        assert answer[1]["content-type"] == "application/json" and answer[1]["connection"] == "close", answer
        error = json.loads(answer[2])["error"]
        assert error["code"] == code and error["request_id"] == answer[1]["x-request-id"], error
        return error["message"]

    chunked = "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    [big] = responses(b"GET /health HTTP/1.1\r\nHost: g\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
    assert "too large (the limit is 80 KB)" in error_of(big, 431, "header_too_large")
    [garbage] = responses(b"NOT HTTP AT ALL\r\n\r\n")
    assert error_of(garbage, 400, "malformed_http") == "malformed HTTP request: invalid method"
    for path in ("/v1/chat/completions", "/v1/embeddings"):
        [bad_chunk] = responses(f"POST {path} HTTP/1.1\r\nHost: g\r\nX-Request-ID: cut-{path[4:8]}\r\n{chunked}".encode())
        assert bad_chunk[0] == 400 and json.loads(bad_chunk[2])["error"]["message"] == "malformed HTTP request: invalid chunk size in the chunked body"
        # Every line about it has the request's id (the pass-through's parser line had a new one).
        assert bad_chunk[1]["x-request-id"] == f"cut-{path[4:8]}", bad_chunk
        wait_for_log(server, lambda l: l.get("msg") == "request" and l.get("request_id") == f"cut-{path[4:8]}" and l["status"] == "400")
        about = [l for l in server.log_lines() if "invalid chunk size" in l.get("reason", "")]
        assert all(l["request_id"] in ("cut-chat", "cut-embe") for l in about), about
        # HTTP/1.0 has no transfer codings: llhttp decodes the chunks, but the framing is faulty
        # (RFC 9112 §6.1; an HTTP/1.0 hop would frame it otherwise), so it is refused, as nginx
        # does, keep-alive or not. The request behind it is not read as one; the one before is answered.
        chat_body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
        refused = (f"POST {path} HTTP/1.0\r\nHost: g\r\nConnection: keep-alive\r\nContent-Type: application/json\r\n"
                   f"Transfer-Encoding: chunked\r\n\r\n{len(chat_body):x}\r\n").encode() + chat_body + b"\r\n0\r\n\r\n"
        health = b"GET /health HTTP/1.1\r\nHost: g\r\n\r\n"
        first, second = responses(health + refused + health)
        assert first[0] == 200, first
        assert error_of(second, 400, "malformed_http") == (
            "malformed HTTP request: an HTTP/1.0 request cannot use Transfer-Encoding (send Content-Length, or use HTTP/1.1)")
        # A transfer coding besides chunked: llhttp took it and the coded body was read as plain JSON.
        for codings in ("gzip, chunked", "identity,chunked"):
            coded = (f"POST {path} HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
                     f"Transfer-Encoding: {codings}\r\n\r\n{len(chat_body):x}\r\n").encode() + chat_body + b"\r\n0\r\n\r\n"
            [unsupported] = responses(coded)
            assert error_of(unsupported, 501, "unsupported_transfer_encoding") == (
                "unsupported Transfer-Encoding: the gateway takes only chunked (send the body uncompressed)")
    # An HTTP/1.1 request needs exactly one Host (RFC 9112 §3.2), on either path.
    for head in (b"GET /health HTTP/1.1\r\n", b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n",
                 b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 2\r\n"):
        [hostless] = responses(head + b"\r\n" + (b"{}" if head.startswith(b"POST") else b""))
        assert error_of(hostless, 400, "malformed_http") == "malformed HTTP request: an HTTP/1.1 request needs exactly one Host header"
    # Behind a request still being answered: that answer first, then the error.
    health, after = responses(b"GET /health HTTP/1.1\r\nHost: g\r\n\r\nNOT HTTP\r\n\r\n")
    assert health[0] == 200 and error_of(after, 400, "malformed_http")
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
    chat, after = responses(b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
                            b"Content-Length: %d\r\n\r\n%sNOT HTTP\r\n\r\n" % (len(body), body))
    assert chat[0] == 200 and b"Echo: hi" in chat[2] and "connection" not in chat[1], chat
    assert error_of(after, 400, "malformed_http")
    deadline = time.monotonic() + 5  # log lines are written at the end of their loop's round
    while sum(l.get("msg") == "request rejected by the HTTP parser" for l in server.log_lines()) < 9:  # big, garbage, two HTTP/1.0, three hosts, two after
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    # Everything else keeps serving.
    assert client_for(server).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}]).choices[0].message.content == "Echo: hi"


@both_backends
def test_idle_client_connections_are_closed(gateway, backend):
    server = gateway(backend, extra_config="server: {idle_timeout: 1s}\ncache: {enabled: false}\n")
    chat = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hello"}]}).encode()

    def closed_after(payload: bytes) -> tuple[float, bytes]:
        """Sends `payload`, then reads until the server closes; the seconds that took and what was read."""
        started = time.monotonic()
        received, _ = raw_exchange(server.port, payload, until=None, timeout=15)
        return time.monotonic() - started, received

    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % len(chat))
    # Silent from the start; a head cut off; a body cut off; idle after a keep-alive answer.
    for payload in (b"", request[:30], request + chat[:10], request + chat):
        elapsed, received = closed_after(payload)
        assert 0.9 <= elapsed < 10, (payload, elapsed)
        if payload == request + chat:
            assert received.startswith(b"HTTP/1.1 200 ") and b"Echo: hello" in received
        else:
            assert received == b"", received
    # The requests the close cut off are logged for what they were, not as malformed syntax.
    wait_for_log(server, lambda l: l.get("msg") == "request rejected by the HTTP parser")
    reasons = {l["reason"] for l in server.log_lines() if l.get("msg") == "request rejected by the HTTP parser"}
    assert reasons == {"malformed HTTP request: the connection ended before the request did"}, reasons
    # An answer slower than the idle timeout is not cut off, whole (9 tokens, 1.8 s) or streamed.
    body = {"model": "slow-model", "messages": [{"role": "user", "content": "a b c d e f g h"}]}
    slow = server.client.post("/v1/chat/completions", json=body)
    assert slow.status_code == 200 and slow.json()["choices"][0]["message"]["content"] == "Echo: a b c d e f g h"
    events = stream_events(server, "slow-model", text="a b c d e f g h")
    assert streamed_text(events[:-1]) == "Echo: a b c d e f g h" and events[-1] == "[DONE]"
    # A router route on the same rule.
    elapsed, received = closed_after(b"GET /health HTTP/1.1\r\nHost: g\r\n\r\n")
    assert received.startswith(b"HTTP/1.1 200 ") and 0.9 <= elapsed < 10


def start_tls_gateway(tmp_path, fake_llm, backend="openai", env=None):
    """A gateway serving TLS with a new self-signed certificate for localhost, in front of the
    fake LLM; returns (process, port, an SSL context trusting the certificate) once it answers."""
    cert, key = make_certificate(tmp_path, "localhost")
    port = free_port()
    env = {"TLS_ENABLED": "true", "TLS_CERT_FILE": str(cert), "TLS_KEY_FILE": str(key),
           "GATEHOUSE_BACKEND": backend, "OLLAMA_HOST": fake_llm.url, **(env or {})}
    process = subprocess.Popen([GATEHOUSE, "serve", "--port", str(port), "--plugins-dir", str(tmp_path)],
                               env={**env, "PATH": "/usr/bin:/bin"}, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    context = ssl.create_default_context(cafile=str(cert))
    deadline = time.monotonic() + 20
    while True:
        try:
            httpx.get(f"https://localhost:{port}/health", verify=context)
            return process, port, context
        except httpx.TransportError:
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.1)


def test_tls_with_a_self_signed_certificate(tmp_path, fake_llm):
    process, port, context = start_tls_gateway(tmp_path, fake_llm)
    try:
        response = httpx.get(f"https://localhost:{port}/health", verify=context)
        assert response.status_code == 200 and response.json() == {"status": "ok"}
        # TLS 1.2 and later only (1.0 and 1.1 were accepted: NIOSSL's default minimum).
        for version, accepted in (("-tls1_1", False), ("-tls1", False), ("-tls1_2", True)):
            handshake = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", version, "-cipher", "DEFAULT:@SECLEVEL=0"],
                                       input="", capture_output=True, text=True, timeout=20)
            assert ("Cipher is " in handshake.stdout and "Cipher is (NONE)" not in handshake.stdout) == accepted, (version, handshake.stdout[-400:])
        assert response.http_version == "HTTP/1.1"
        # Chat completions (served by the pass-through for this backend) over TLS, whole and streamed.
        with httpx.Client(base_url=f"https://localhost:{port}", verify=context) as tls:
            body = {"model": "m", "messages": [{"role": "user", "content": "over tls"}]}
            completion = tls.post("/v1/chat/completions", json=body)
            assert completion.status_code == 200 and completion.json()["choices"][0]["message"]["content"] == "Echo: over tls"
            with tls.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as streamed:
                lines = [line for line in streamed.iter_lines() if line]
            assert lines[-1] == "data: [DONE]" and len(lines) == 6
        with pytest.raises(httpx.TransportError):
            httpx.get(f"https://localhost:{port}/health", verify=True)  # untrusted by the system store
        # Plain HTTP is not served: it gets a 400 saying so, in plain HTTP, and the close.
        plain = httpx.get(f"http://127.0.0.1:{port}/health", headers={"Connection": "keep-alive"})
        assert plain.status_code == 400 and plain.headers["connection"] == "close"
        assert plain.json()["error"]["code"] == "plain_http_on_tls_port" and "use https://" in plain.json()["error"]["message"]
        # Also to a client still sending a large body: the connection lingers, not reset under its answer.
        posted = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", content=b"x" * 2_000_000, timeout=20)
        assert posted.status_code == 400 and posted.json()["error"]["code"] == "plain_http_on_tls_port"
        # TLS still works after that, and the refusal is counted.
        assert httpx.get(f"https://localhost:{port}/health", verify=context).status_code == 200
        metrics = httpx.get(f"https://localhost:{port}/metrics", verify=context).text
        assert metric_value(metrics, "gatehouse_http_requests_total", route="unparsed", method="unknown", status="400") == 2
        # An idle keep-alive connection whose client never reads it (urllib3's pool) does not
        # hold the shutdown: closing waited 5 s (NIOSSL's default) for the client's close_notify.
        with socket.create_connection(("127.0.0.1", port)) as raw, context.wrap_socket(raw, server_hostname="localhost") as idle:
            idle.sendall(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n")
            assert idle.recv(65536).startswith(b"HTTP/1.1 200")
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            assert process.wait(20) == 0
            assert time.monotonic() - started < 3.5
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(20)


@both_backends
def test_tls_clients_still_waiting_at_the_shutdown_deadline_are_told_it_is_stopping(tmp_path, fake_llm, backend):
    # Over TLS the pass-through waited for an input-closed event that never comes (NIOSSL
    # refuses a half-close): the client saw the connection drop, and the log said 499.
    process, port, context = start_tls_gateway(tmp_path, fake_llm, backend, env={"SHUTDOWN_TIMEOUT": "1s", "GATEHOUSE_CACHE_ENABLED": "false"})
    answers = []

    def ask():
        answers.append(httpx.post(f"https://localhost:{port}/v1/chat/completions", verify=context, timeout=30,
                                  json={"model": "hang", "messages": [{"role": "user", "content": "x"}]}))

    waiting = threading.Thread(target=ask, daemon=True)
    waiting.start()
    deadline = time.monotonic() + 10
    while not [call for call in fake_llm.requests if call[3] and call[3].get("model") == "hang"]:
        assert time.monotonic() < deadline, "the request never reached the upstream"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    waiting.join(15)
    assert answers and answers[0].status_code == 503, answers and answers[0].text
    assert answers[0].json()["error"]["code"] == "server_shutting_down"
    assert process.wait(15) == 0


def make_certificate(directory, name, days=1):
    """A self-signed certificate for localhost (subject CN=name) and its key, as PEM files;
    `days` below 1 makes one that has expired (`req -x509` takes no such period)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    if days >= 1:
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                        "-days", str(days), "-subj", f"/CN={name}", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                       check=True, capture_output=True)
    else:
        request = directory / f"{name}.csr"
        subprocess.run(["openssl", "req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(request),
                        "-subj", f"/CN={name}"], check=True, capture_output=True)
        subprocess.run(["openssl", "x509", "-req", "-in", str(request), "-signkey", str(key), "-days", str(days), "-out", str(cert)],
                       check=True, capture_output=True)
    return cert, key


def test_tls_certificate_reloads_on_sighup(tmp_path, fake_llm):
    # A renewed certificate is served without a restart; a bad one never replaces a good one.
    first, second = make_certificate(tmp_path, "first"), make_certificate(tmp_path, "second")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(first[0], cert), shutil.copy(first[1], key)
    port, log_path = free_port(), tmp_path / "gatehouse.log"
    env = {"TLS_ENABLED": "true", "TLS_CERT_FILE": str(cert), "TLS_KEY_FILE": str(key), "GATEHOUSE_BACKEND": "openai",
           "OLLAMA_HOST": fake_llm.url, "PATH": "/usr/bin:/bin"}
    with open(log_path, "w") as log:
        process = subprocess.Popen([GATEHOUSE, "serve", "--port", str(port), "--plugins-dir", str(tmp_path)],
                                   env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)

    def served_certificate():
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, context.wrap_socket(raw) as tls:
            return tls.getpeercert(binary_form=True)

    def der(path):
        return ssl.PEM_cert_to_DER_cert(path.read_text())

    def log_messages():
        return [json.loads(line).get("msg", "") for line in log_path.read_text().splitlines() if line.startswith("{")]

    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                assert served_certificate() == der(first[0])
                break
            except OSError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.1)
        trusts_first = ssl.create_default_context(cafile=str(first[0]))
        with httpx.Client(base_url=f"https://localhost:{port}", verify=trusts_first) as kept:
            assert kept.get("/health").status_code == 200
            shutil.copy(second[0], cert), shutil.copy(second[1], key)
            process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 10
            while served_certificate() != der(second[0]):
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.05)
            assert "SIGHUP: reloaded the TLS certificate; new connections get it" in log_messages()
            # The connection opened before keeps its certificate and goes on serving.
            assert kept.get("/health").status_code == 200
        trusts_second = ssl.create_default_context(cafile=str(second[0]))
        completion = httpx.post(f"https://localhost:{port}/v1/chat/completions", verify=trusts_second,
                                json={"model": "m", "messages": [{"role": "user", "content": "renewed"}]})
        assert completion.json()["choices"][0]["message"]["content"] == "Echo: renewed"
        # A key that does not match the certificate: refused, said, and the served one stays.
        shutil.copy(first[1], key)
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "SIGHUP: TLS certificate not reloaded; still serving the previous one" not in log_messages():
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        failure = [json.loads(l) for l in log_path.read_text().splitlines() if "not reloaded" in l][-1]
        assert f"cannot use TLS certificate {cert} with key {key}" in failure["error"]
        assert served_certificate() == der(second[0]) and process.poll() is None
        # An expired certificate (with its own key): refused too, where it replaced the valid one.
        expired = make_certificate(tmp_path, "expired", days=-1)
        shutil.copy(expired[0], cert), shutil.copy(expired[1], key)
        process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not (failures := [json.loads(l) for l in log_path.read_text().splitlines() if "not reloaded" in l][1:]):
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        assert failures[0]["error"].startswith(f"TLS certificate {cert} expired at "), failures
        assert served_certificate() == der(second[0]) and process.poll() is None
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0


def test_an_expired_certificate_at_start_up_is_served_with_a_warning(tmp_path):
    # Nothing else is there to serve, so it is served; but nothing said it had expired.
    cert, key = make_certificate(tmp_path, "expired", days=-1)
    port = free_port()
    env = {"TLS_ENABLED": "true", "TLS_CERT_FILE": str(cert), "TLS_KEY_FILE": str(key), "PATH": "/usr/bin:/bin"}
    log_path = tmp_path / "gatehouse.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([GATEHOUSE, "serve", "--port", str(port), "--plugins-dir", str(tmp_path)],
                                   env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while '"msg":"listening"' not in log_path.read_text():
            assert time.monotonic() < deadline and process.poll() is None, log_path.read_text()
            time.sleep(0.1)
        [warning] = [json.loads(l) for l in log_path.read_text().splitlines() if "TLS certificate expired at" in l]
        assert warning["level"] == "warning" and warning["cert_file"] == str(cert), warning
        assert warning["msg"].endswith(": clients that check certificates will refuse it"), warning
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0


def test_sighup_without_tls_keeps_serving(gateway):
    server = gateway("openai")
    server.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while not any(l.get("msg", "").startswith("SIGHUP: nothing to reload") for l in server.log_lines()):
        assert time.monotonic() < deadline and server.process.poll() is None, server.log()
        time.sleep(0.05)
    assert server.client.get("/health").status_code == 200 and server.process.poll() is None


def test_sighup_reopens_the_log_file_after_rotation(gateway, tmp_path):
    log = tmp_path / "gatehouse-access.log"
    server = gateway("openai", env={"LOG_FILE": str(log)})
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}

    def lines(path):
        text = path.read_text() if path.is_file() else ""  # the reopened file appears when the signal is handled
        return [json.loads(raw) for raw in text.splitlines() if raw.startswith("{")]

    def wait_for(path, predicate):
        deadline = time.monotonic() + 10  # access lines reach the file at the end of their loop's round
        while not any(predicate(line) for line in lines(path)):
            assert time.monotonic() < deadline and server.process.poll() is None, lines(path)
            time.sleep(0.05)

    def request(request_id):
        # Through the pass-through (chat) and the router (models): both write access lines.
        assert server.client.post("/v1/chat/completions", json=body, headers={"x-request-id": request_id}).status_code == 200
        assert server.client.get("/v1/models", headers={"x-request-id": request_id + "-models"}).status_code == 200

    request("before")
    wait_for(log, lambda l: l.get("request_id") == "before-models")
    # logrotate's create mode: the file is renamed; until told, the gateway writes on into it.
    rotated = tmp_path / "gatehouse-access.log.1"
    log.rename(rotated)
    request("renamed")
    wait_for(rotated, lambda l: l.get("request_id") == "renamed-models")
    server.process.send_signal(signal.SIGHUP)
    wait_for(log, lambda l: l.get("msg") == "SIGHUP: reopened the log file" and l.get("log_file") == str(log))
    request("after")
    wait_for(log, lambda l: l.get("request_id") == "after-models")
    wait_for(log, lambda l: l.get("request_id") == "after" and l.get("path") == "/v1/chat/completions")
    assert not any(l.get("request_id", "").startswith("after") for l in lines(rotated))
    assert {l.get("request_id") for l in lines(rotated)} >= {"before", "renamed", "renamed-models"}

    # copytruncate: the file is emptied under the gateway, which appends from its new end.
    log.write_bytes(b"")
    request("truncated")
    wait_for(log, lambda l: l.get("request_id") == "truncated-models")
    assert log.read_bytes().startswith(b"{"), log.read_bytes()[:80]

    # A path that cannot be opened: said, and the open file goes on being written.
    log.rename(rotated)
    log.mkdir()
    server.process.send_signal(signal.SIGHUP)
    wait_for(rotated, lambda l: l.get("msg") == "SIGHUP: log file not reopened; still writing to the one open"
             and "Is a directory" in l.get("error", ""))
    request("kept")
    wait_for(rotated, lambda l: l.get("request_id") == "kept-models")
    assert server.process.poll() is None


def test_tls_with_unreadable_certificate_fails_start_with_key_named(tmp_path):
    result = subprocess.run([GATEHOUSE, "serve", "--port", str(free_port()), "--plugins-dir", str(tmp_path)],
                            env={"TLS_ENABLED": "1", "TLS_CERT_FILE": "/nonexistent.pem", "TLS_KEY_FILE": "/nonexistent.key"},
                            capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert result.returncode != 0
    # Reported with the other configuration problems (before logging starts), naming both names.
    assert result.stderr.startswith("gatehouse: invalid configuration: "), result.stderr
    assert "key 'server.tls.cert_file (TLS_CERT_FILE)': cannot read /nonexistent.pem: no such file" in result.stderr
    # Files that exist but cannot serve: the reason, not NIOSSL's bare error name.
    key = tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(tmp_path / "cert.pem"),
                    "-days", "1", "-subj", "/CN=localhost"], check=True, capture_output=True)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(tmp_path / "other.key"),
                    "-out", str(tmp_path / "other.pem"), "-days", "1", "-subj", "/CN=other"], check=True, capture_output=True)
    (tmp_path / "not.pem").write_text("hello\n")
    for cert, expected in (("not.pem", "not a PEM certificate"), ("other.pem", "the key is not the certificate's")):
        result = subprocess.run([GATEHOUSE, "serve", "--port", str(free_port()), "--plugins-dir", str(tmp_path)],
                                env={"TLS_ENABLED": "1", "TLS_CERT_FILE": str(tmp_path / cert), "TLS_KEY_FILE": str(key)},
                                capture_output=True, text=True, timeout=30, cwd=tmp_path)
        assert result.returncode != 0 and expected in result.stderr, result.stderr


def stream_in_background(server, model, text):
    """Starts a streamed chat on a thread; returns (thread, lines received, errors) once two lines came."""
    received, errors = [], []

    def consume():
        try:
            with httpx.stream("POST", server.base + "/v1/chat/completions", timeout=40, json={
                    "model": model, "messages": [{"role": "user", "content": text}], "stream": True}) as r:
                for line in r.iter_lines():
                    if line:
                        received.append(line)
        except Exception as error:  # noqa: BLE001 - recorded for the caller's assertions
            errors.append(error)

    reader = threading.Thread(target=consume, daemon=True)
    reader.start()
    deadline = time.monotonic() + 10
    while len(received) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(received) >= 2, "stream never started"
    return reader, received, errors


@both_backends
def test_graceful_shutdown_lets_a_stream_in_flight_finish(gateway, backend):
    server = gateway(backend, extra_config="server: {shutdown_timeout: 20s}\n")
    reader, received, errors = stream_in_background(server, "slow-model", "a b c d e f g h")
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(httpx.TransportError):  # no longer accepting
        httpx.get(server.base + "/health", timeout=2)
    reader.join(30)
    assert not errors
    assert received[-1] == "data: [DONE]"
    text = "".join(json.loads(l[6:])["choices"][0]["delta"].get("content") or "" for l in received[:-1]
                   if json.loads(l[6:])["choices"])
    assert text == "Echo: a b c d e f g h"
    assert server.process.wait(20) == 0
    assert any(l.get("msg") == "shutdown complete" for l in server.log_lines())


@both_backends
def test_an_answer_finished_during_the_drain_says_the_connection_closes(gateway, backend):
    # A keep-alive request whose answer is written after the signal: the router's (every route
    # with the ollama backend) came without `Connection: close`, then the connection closed, so
    # a client sending its next request on it got nothing back.
    server = gateway(backend)
    body = json.dumps({"model": "slow-model", "messages": [{"role": "user", "content": "a b c d"}]}).encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.3)  # the upstream answers after 0.8 s
        server.process.send_signal(signal.SIGTERM)
        answer = ResponseReader(sock).response()
    assert answer.startswith(b"HTTP/1.1 200 ") and b"Echo: a b c d" in answer, answer
    assert b"\r\nconnection: close\r\n" in answer.split(b"\r\n\r\n")[0].lower() + b"\r\n", answer
    assert server.process.wait(20) == 0


@both_backends
def test_sigint_with_a_stalled_stream_ends_at_the_shutdown_timeout(gateway, backend):
    server = gateway(backend, extra_config="server: {shutdown_timeout: 1s}\n")
    stream_in_background(server, "stall", "a b c d")
    # The upstream now stalls for 30 s: the shutdown must not wait for it past its 1 s budget.
    started = time.monotonic()
    server.process.send_signal(signal.SIGINT)
    server.process.wait(15)
    assert time.monotonic() - started < 5
    stopping = [l for l in server.log_lines() if l.get("msg") == "requests drained; shutting plugins down"]
    assert len(stopping) == 1 and float(stopping[0]["drain_timeout_s"]) < 0.5, stopping
    # The signal is in the log when it comes, not only once the drain is over (a 30 s drain was silent).
    at = lambda line: datetime.datetime.fromisoformat(line["ts"].replace("Z", "+00:00")).timestamp()
    [signalled] = [l for l in server.log_lines() if l.get("msg") == "shutting down: no new connections; requests in flight may finish"]
    assert signalled["drain_timeout_s"] == "1.000" and at(stopping[0]) - at(signalled) > 0.8, (signalled, stopping)
    assert any(l.get("msg") == "shutdown complete" for l in server.log_lines())


@both_backends
def test_a_body_declared_over_the_limit_is_refused_before_it_is_sent(gateway, backend):
    # Without Expect: 100-continue, the router read up to max_body_bytes (10 MiB by default)
    # before its 413; the pass-through answered from the head. Both do now, for every route.
    server = gateway(backend, extra_config="server: {max_body_bytes: 1000000}\n")
    for path in ("/v1/chat/completions", "/v1/embeddings", "/v1/plugins/none/x"):
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\nContent-Length: 5000000\r\n\r\n".encode()
                         + b"{" + b" " * 1000)
            answer = ResponseReader(sock).response()  # before the rest of the body (a timeout otherwise)
            assert answer.startswith(b"HTTP/1.1 413 "), (path, answer)
            assert b'"code":"body_too_large"' in answer.replace(b" ", b"") and b"connection: close" in answer.lower(), answer


@both_backends
def test_nothing_is_answered_after_a_request_that_closes_the_connection(gateway, backend):
    # Bytes pipelined behind `Connection: close` got an unsolicited 400 malformed_http on the
    # router path; RFC 9112 says the response to that request is the last.
    server = gateway(backend)
    chat = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}]}).encode()
    for first in (b"GET /health HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n",
                  b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nConnection: close\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(chat)).encode() + b"\r\n\r\n" + chat):
        received, closed = raw_exchange(server.port, first + b"GET /health HTTP/1.1\r\nHost: g\r\n\r\n", until=None)
        assert closed and received.count(b"HTTP/1.1 ") == 1 and received.startswith(b"HTTP/1.1 200 "), received
    assert not [l for l in server.log_lines() if l.get("msg") == "request rejected by the HTTP parser"]


@both_backends
def test_requests_the_parser_rejects_are_counted(gateway, backend):
    # They were logged but missing from gatehouse_http_requests_total.
    server = gateway(backend)
    for payload, status in ((b"GARBAGE\r\n\r\n", b"400"), (b"GET /v1/models HTTP/1.1\r\nX-Big: " + b"x" * 90_000 + b"\r\n\r\n", b"431"),
                            (b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", b"400")):
        received, _ = raw_exchange(server.port, payload, until=None)
        assert received.startswith(b"HTTP/1.1 " + status), received
    metrics = server.client.get("/metrics").text
    assert metric_value(metrics, "gatehouse_http_requests_total", route="unparsed", method="unknown", status="400") == 2
    assert metric_value(metrics, "gatehouse_http_requests_total", route="unparsed", method="unknown", status="431") == 1


@both_backends
def test_a_second_signal_during_the_drain_stops_at_once(gateway, backend):
    server = gateway(backend, extra_config="server: {shutdown_timeout: 60s}\n", env={"TIMEOUT": "60s"})
    stream_in_background(server, "stall", "a b c d")  # stalls for 30 s, within the upstream timeout
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert server.process.poll() is None  # draining: the stream may still finish
    server.process.send_signal(signal.SIGINT)  # a second Ctrl-C: it went unheard until the 60 s ran out
    server.process.wait(20)
    assert time.monotonic() - started < 15


@both_backends
def test_clients_still_waiting_at_the_shutdown_deadline_are_told_it_is_stopping(gateway, backend):
    # The pass-through answered "499 the client closed the connection", which was false, and a
    # 4xx an SDK does not retry.
    server = gateway(backend, extra_config="server: {shutdown_timeout: 1s}\ncache: {enabled: false}\n")
    answers = []

    def ask():
        answers.append(httpx.post(server.base + "/v1/chat/completions", timeout=30,
                                  json={"model": "hang", "messages": [{"role": "user", "content": "x"}]}))

    waiting = threading.Thread(target=ask, daemon=True)
    waiting.start()
    time.sleep(0.5)  # the request reaches the upstream, which never answers
    reader, received, errors = stream_in_background(server, "stall", "a b c d")
    server.process.send_signal(signal.SIGTERM)
    waiting.join(15)
    reader.join(15)
    assert answers and answers[0].status_code == 503, answers and answers[0].text
    assert answers[0].json()["error"]["code"] == "server_shutting_down"
    assert not errors, errors
    assert '"code":"server_shutting_down"' in received[-2] and received[-1] == "data: [DONE]", received[-3:]
    assert server.process.wait(15) == 0
    # Logged as what the client was told, under the id it was given (the router's said 499).
    request_id = answers[0].headers["x-request-id"]
    assert answers[0].json()["error"]["request_id"] == request_id
    access = [l for l in server.log_lines() if l.get("msg") == "request" and l.get("request_id") == request_id]
    assert [l["status"] for l in access] == ["503"], access


@pytest.mark.parametrize("how", ["yaml", "env", "flag"])
def test_the_bind_address_is_configurable(start, plugins_dir, how):
    # 127.0.0.2 is loopback too on Linux, but a listener bound to it is not reached through 127.0.0.1.
    config, env, args = {"yaml": ("server: {host: 127.0.0.2}\n", None, ()), "env": ("", {"GATEHOUSE_HOST": "127.0.0.2"}, ()),
                         "flag": ("", None, ("--host", "127.0.0.2"))}[how]
    server = start(plugins_dir, config=config, env=env, extra_args=args, host="127.0.0.2")
    assert server.client.get("/health/live").status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{server.port}/health/live", timeout=2)
    started = [l for l in server.log_lines() if l.get("msg") == "listening"]
    assert started and started[0]["address"] == f"127.0.0.2:{server.port}", started


def test_the_version_is_told_by_the_command_the_start_line_and_metrics(start, plugins_dir):
    header = (ROOT / "Sources/PluginABI/include/gatehouse_plugin.h").read_text()
    abi = ".".join(re.search(rf"#define GATEHOUSE_ABI_{part} (\d+)", header).group(1) for part in ("MAJOR", "MINOR"))
    printed = subprocess.run([GATEHOUSE, "--version"], capture_output=True, text=True, timeout=30)
    assert printed.returncode == 0, printed.stderr
    match = re.fullmatch(rf"gatehouse (\d+\.\d+\.\d+) \(plugin ABI {re.escape(abi)}\)\n", printed.stdout)
    assert match, printed.stdout
    version = match.group(1)
    server = start(plugins_dir)
    assert next(l for l in server.log_lines() if l.get("msg") == "listening")["version"] == version
    assert metric_value(server.client.get("/metrics").text, "gatehouse_build_info", version=version, plugin_abi=abi) == 1


def test_the_open_files_soft_limit_is_raised_to_the_hard_limit(start, plugins_dir):
    import resource
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    assert hard > 256, "this test needs a hard limit above 256"
    # As under a service manager whose soft limit is low: the gateway raises its own.
    server = start(plugins_dir, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)))
    limits = next(l for l in open(f"/proc/{server.process.pid}/limits") if l.startswith("Max open files")).split()
    assert limits[3:5] == [str(hard), str(hard)], limits
    listening = next(l for l in server.log_lines() if l.get("msg") == "listening")
    assert listening["open_files_limit"] == str(hard)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _answered_within(sock: socket.socket, seconds: float) -> bytes:
    sock.settimeout(seconds)
    try:
        return sock.recv(4096)
    except socket.timeout:
        return b""


def test_connections_past_max_connections_wait_in_the_backlog_until_one_closes(start, plugins_dir):
    server = start(plugins_dir, env={"GATEHOUSE_MAX_CONNECTIONS": "3"})
    listening = next(l for l in server.log_lines() if l.get("msg") == "listening")
    assert listening["max_connections"] == "3"
    assert server.client.get("/health/live").status_code == 200  # the test client's own keep-alive connection: 1 of 3
    held = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(2)]
    try:
        time.sleep(0.3)  # both accepted: the limit is reached
        waiting = socket.create_connection(("127.0.0.1", server.port))  # the kernel completes it; Gatehouse does not accept it
        waiting.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _answered_within(waiting, 1.0) == b"", "a connection past the limit was served"
        held.pop().close()
        assert _answered_within(waiting, 5.0).startswith(b"HTTP/1.1 200"), "the waiting connection was not accepted when one closed"
        waiting.close()
    finally:
        for sock in held:
            sock.close()
    warning = wait_for_log(server, lambda l: l.get("msg", "").startswith("client connection limit reached"))
    assert warning["level"] == "warning" and warning["max_connections"] == "3"
    metrics = server.client.get("/metrics").text
    assert metric_value(metrics, "gatehouse_client_connections_max") == 3
    assert metric_value(metrics, "gatehouse_client_connection_limit_reached_total") >= 1
    assert 1 <= metric_value(metrics, "gatehouse_client_connections") <= 3


def test_the_default_connection_limit_keeps_clear_of_the_open_files_limit(start, plugins_dir):
    import resource
    # 64 descriptors: a few dozen client connections would exhaust them.
    server = start(plugins_dir, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)))
    listening = next(l for l in server.log_lines() if l.get("msg") == "listening")
    limit = int(listening["max_connections"])
    assert 1 <= limit <= 32, listening
    flood = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(100)]
    try:
        wait_for_log(server, lambda l: l.get("msg", "").startswith("client connection limit reached"))
        time.sleep(0.5)
        assert not any("out of file descriptors" in l.get("msg", "") for l in server.log_lines()), server.log()
    finally:
        for sock in flood:
            sock.close()
    # A new connection is accepted once the flood's have gone.
    assert httpx.get(f"{server.base}/health/live", timeout=10).status_code == 200
    assert metric_value(server.client.get("/metrics").text, "gatehouse_client_connections_max") == limit


def test_out_of_file_descriptors_pauses_accepting_instead_of_spinning(start, plugins_dir):
    import resource
    # No connection limit, and few descriptors: accept(2) fails with EMFILE while connections queue.
    server = start(plugins_dir, env={"GATEHOUSE_MAX_CONNECTIONS": "0"},
                   preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)))
    flood = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(100)]
    try:
        time.sleep(0.5)
        before = _cpu_seconds(server.process.pid)
        time.sleep(2)
        used = _cpu_seconds(server.process.pid) - before
        # Spinning on accept takes a whole core (2 s here); a retry every 100 ms takes almost nothing.
        assert used < 0.5, f"{used:.2f} s of CPU in 2 s while out of descriptors"
        warning = wait_for_log(server, lambda l: l.get("msg", "").startswith("cannot accept connections: out of file descriptors"))
        assert warning["level"] == "warning" and "errno 24" in warning["error"], warning
    finally:
        for sock in flood:
            sock.close()
    # Descriptors freed: accepting resumes (the queued connections, closed by now, are accepted and dropped).
    deadline = time.monotonic() + 10
    while True:
        try:
            response = httpx.get(f"{server.base}/health/live", timeout=2)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, server.log()
    assert response.status_code == 200
    assert metric_value(httpx.get(f"{server.base}/metrics", timeout=5).text, "gatehouse_accept_failures_total") >= 1


def test_port_in_use_is_one_clear_line_before_any_plugin_starts(gateway, plugins_dir, c_echo_so, tmp_path):
    plugins_dir.add("echo-c", c_echo_so, library_name="libecho_c.so")
    server = gateway()
    assert server.plugins()["echo-c"]["state"] == "loaded"
    # The second one is given the same plugins: it must stop before initialising any of them.
    result = subprocess.run([GATEHOUSE, "serve", "--port", str(server.port), "--plugins-dir", str(plugins_dir.path)],
                            capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert result.returncode != 0
    assert f"cannot listen on 127.0.0.1:{server.port}: the address is already in use " \
           f"(another Gatehouse may be running on 127.0.0.1:{server.port})" in result.stderr
    assert "plugin loaded" not in result.stdout and "echo-c" not in result.stdout, result.stdout
    assert server.client.get("/health").status_code == 200


@pytest.mark.parametrize("host, reason", [
    ("192.0.2.1", "the address is not one of this machine's"),  # TEST-NET-1: on no interface here
    ("no-such-host.invalid", "the host name does not resolve"),
])
def test_an_address_it_cannot_listen_on_is_one_clear_line(tmp_path, host, reason):
    # Port 0 is found out by the server's bind; a given port already by the check before plugins start.
    for port in (0, free_port()):
        result = subprocess.run([GATEHOUSE, "serve", "--host", host, "--port", str(port), "--plugins-dir", str(tmp_path)],
                                capture_output=True, text=True, timeout=30, cwd=tmp_path)
        assert result.returncode != 0
        assert f"gatehouse: cannot listen on {host}:{port}: {reason} (server.host, GATEHOUSE_HOST or --host)" in result.stderr, result.stderr


def test_invalid_configuration_fails_start_naming_the_key(tmp_path):
    (tmp_path / "gatehouse.yaml").write_text("server:\n  port: lots\nupstream:\n  backend: gpt\n")
    result = subprocess.run([GATEHOUSE, "serve"], capture_output=True, text=True, timeout=30, cwd=tmp_path,
                            env={"RATE_LIMIT_RPS": "fast"})
    assert result.returncode != 0
    assert "gatehouse.yaml:2: key 'server.port': must be an integer" in result.stderr
    assert "key 'upstream.backend': must be one of ollama, openai" in result.stderr
    assert "environment: key 'RATE_LIMIT_RPS'" in result.stderr
    # The flag too: 99999 would have been truncated to port 34463 and served there.
    flag = subprocess.run([GATEHOUSE, "serve", "--port", "99999"], capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert flag.returncode != 0 and "--port must be between 0 and 65535 (got 99999)" in flag.stderr, flag.stderr


def test_dotenv_and_environment_layering(start, plugins_dir, fake_llm, tmp_path):
    (tmp_path / ".env").write_text(f"OLLAMA_HOST={fake_llm.url}\nAPI_KEY=from-dotenv\n")
    server = start(plugins_dir, env={"API_KEY": "from-env"})
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert server.client.post("/v1/chat/completions", json=body, headers={"x-api-key": "from-dotenv"}).status_code == 401
    assert server.client.post("/v1/chat/completions", json=body, headers={"x-api-key": "from-env"}).status_code == 200


def test_an_empty_variable_does_not_take_away_the_dotenv_key(start, plugins_dir, fake_llm, tmp_path):
    # Compose's `API_KEY: ${API_KEY}`, with API_KEY unset on the host, passes it empty: taken as
    # set, it turned off the key in .env, and authentication with it.
    (tmp_path / ".env").write_text(f"OLLAMA_HOST={fake_llm.url}\nAPI_KEY=from-dotenv\n")
    server = start(plugins_dir, env={"API_KEY": ""})
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert server.client.post("/v1/chat/completions", json=body).status_code == 401
    assert server.client.post("/v1/chat/completions", json=body, headers={"x-api-key": "from-dotenv"}).status_code == 200


def test_start_up_errors_name_their_source_and_repeat_no_key(tmp_path):
    # A value wrong in .env is blamed on .env, not on an environment the operator then searches.
    (tmp_path / ".env").write_text("PORT=abc\n")
    # A key pasted into the wrong field is quoted back as the value the field got: redacted.
    (tmp_path / "gatehouse.yaml").write_text("upstream:\n  url: sk-proj-AbCdEf1234567890\n")
    result = subprocess.run([GATEHOUSE, "serve"], capture_output=True, text=True, timeout=30, cwd=tmp_path, env={})
    assert result.returncode != 0
    assert ".env: key 'PORT': must be an integer" in result.stderr, result.stderr
    assert "key 'upstream.url'" in result.stderr and "AbCdEf1234567890" not in result.stderr, result.stderr
    listed = subprocess.run([GATEHOUSE, "plugins", "list"], capture_output=True, text=True, timeout=30, cwd=tmp_path, env={})
    assert listed.returncode != 0 and "key 'upstream.url'" in listed.stderr and "AbCdEf1234567890" not in listed.stderr, listed.stderr
    # An unwritable log file names the setting; an empty one is standard output.
    (tmp_path / ".env").unlink()
    (tmp_path / "gatehouse.yaml").write_text("logging: {file: /nonexistent/dir/g.log}\n")
    result = subprocess.run([GATEHOUSE, "serve"], capture_output=True, text=True, timeout=30, cwd=tmp_path, env={})
    assert result.returncode != 0 and "(logging.file, LOG_FILE)" in result.stderr, result.stderr
    # A plugins directory that is not there: one readable line, not Foundation's error paragraph.
    listed = subprocess.run([GATEHOUSE, "plugins", "list", "--plugins-dir", str(tmp_path / "none")], capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert listed.returncode != 0 and listed.stderr.strip().endswith("none: no such directory"), listed.stderr


def test_an_empty_log_file_setting_is_standard_output_and_a_missing_plugins_dir_one_clear_line(start, plugins_dir, tmp_path):
    missing = types.SimpleNamespace(path=tmp_path / "none")
    server = start(missing, config="logging: {file: ''}\nplugins: {guard: {enabled: true}}\n")  # standard output: the captured log
    assert server.client.get("/health").status_code == 200
    line = wait_for_log(server, lambda l: l.get("msg") == "cannot read the plugins directory; serving without plugins")
    assert line["error"] == "no such directory", line
    # A plugin the config enables is named too (a policy plugin was dropped without a word of its own).
    warned = wait_for_log(server, lambda l: l.get("msg") == "config mentions a plugin that is not in the plugins directory")
    assert warned["plugin"] == "guard" and warned["directory"] == str(tmp_path / "none"), warned


def test_a_dotenv_saved_with_crlf_line_ends_is_read_line_by_line(start, plugins_dir, fake_llm, tmp_path):
    # Saved by a Windows editor (byte-order mark, CRLF): each line its own variable, the key
    # without a stray carriage return, so the client's key is accepted.
    (tmp_path / ".env").write_bytes(f"\ufeffOLLAMA_HOST={fake_llm.url}\r\nAPI_KEY=\"from-dotenv\" # quoted\r\n".encode())
    server = start(plugins_dir)
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert server.client.post("/v1/chat/completions", json=body, headers={"x-api-key": "from-dotenv"}).status_code == 200
    assert server.client.post("/v1/chat/completions", json=body).status_code == 401


def test_a_dotenv_line_it_cannot_read_stops_start_up_naming_the_line(tmp_path):
    (tmp_path / ".env").write_text("PORT=9000\nAPI_KEY=\"unterminated\n")
    result = subprocess.run([GATEHOUSE, "serve"], capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert result.returncode != 0
    assert ".env:2: key 'API_KEY': the value's opening \" is never closed" in result.stderr, result.stderr
