"""The chat pass-through (POST /v1/chat/completions to an `openai` backend, served in the NIO
pipeline): what it must get right beyond the gateway behaviour test_gateway.py checks for both
paths — request order on pipelined connections, upstream keep-alive and its one retry, SSE split
at any byte, clients that leave mid-stream, Connection: close, metrics and the access log, and
stepping aside while a plugin middleware applies."""
import contextlib
import http.client
import io
import json
import re
import shutil
import signal
import socket
import socketserver
import struct
import subprocess
import threading
import time

import httpx
import pytest

from conftest import SERVICES_SO, ResponseReader, raw_exchange, stream_events, streamed_text, wait_for_log
from test_plugin_services import metric_value

BODY = {"model": "m", "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
def openai_gateway(gateway):
    def _start(extra_config: str = "cache: {enabled: false}\n", env=None):
        return gateway("openai", extra_config=extra_config, env=env)
    return _start


def in_flight(server) -> float:
    """Requests in flight, not counting the /metrics request that reads the gauge."""
    return metric_value(server.client.get("/metrics").text, "gatehouse_http_requests_in_flight") - 1


def post_bytes(body: dict, *, path="/v1/chat/completions", extra_headers="") -> bytes:
    data = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: gatehouse\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n{extra_headers}\r\n").encode() + data


@contextlib.contextmanager
def raw_upstream(start, plugins_dir, handler, backend="openai", upstream_extra=""):
    """A gateway in front of a socketserver upstream answering with `handler`; yields the gateway.
    `upstream_extra` adds to the upstream section (", timeout: 2s")."""
    upstream = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    upstream.daemon_threads = True
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    try:
        yield start(plugins_dir, config=f"upstream: {{backend: {backend}, url: 'http://127.0.0.1:{upstream.server_address[1]}'{upstream_extra}}}\n"
                                        "cache: {enabled: false}\n")
    finally:
        upstream.shutdown()
        upstream.server_close()


def read_request(sock: socket.socket) -> bool:
    """Reads one request (head and Content-Length body) off an upstream's socket; False if the
    peer closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return False
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
    while len(rest) < length:
        rest += sock.recv(65536)
    return True


def test_pipelined_requests_are_answered_in_order(openai_gateway):
    server = openai_gateway()
    # A slow streamed chat first, then a router request: the router must not answer first.
    slow = post_bytes({**BODY, "model": "slow-model", "stream": True})
    health = b"GET /health HTTP/1.1\r\nHost: gatehouse\r\n\r\n"
    received, _ = raw_exchange(server.port, slow + health, until=b'{"status":"ok"}')
    assert received.count(b"HTTP/1.1 200 OK") == 2, received
    assert received.index(b"data: [DONE]") < received.index(b'{"status":"ok"}')
    # A router request that goes upstream first, then a chat: answers in request order again.
    models = b"GET /v1/models HTTP/1.1\r\nHost: gatehouse\r\n\r\n"
    received, _ = raw_exchange(server.port, models + post_bytes(BODY) + health, until=b'{"status":"ok"}')
    assert received.count(b"HTTP/1.1 200 OK") == 3, received
    assert received.index(b"smollm2") < received.index(b"Echo: hello") < received.index(b'{"status":"ok"}')


def test_upstream_connections_are_kept_alive_and_reused(openai_gateway, fake_llm):
    server = openai_gateway()
    for index in range(5):
        response = server.client.post("/v1/chat/completions", json={**BODY, "seed": index})
        assert response.status_code == 200
    chat_peers = [port for (_, path, _, _), port in zip(fake_llm.requests, fake_llm.peers) if path == "/v1/chat/completions"]
    assert len(chat_peers) == 5
    # One client connection is served on one event loop, whose pool reuses one upstream connection.
    assert len(set(chat_peers)) == 1, chat_peers


def test_upstream_requests_carry_their_fields_and_whole_bodies(openai_gateway, fake_llm):
    # The pass-through writes the upstream head itself: every field must be there, and bodies
    # small (copied behind the head) and large (sent after it) must arrive whole.
    server = openai_gateway(env={"GATEHOUSE_UPSTREAM_API_KEY": "upstream-key-1"})
    small = {**BODY, "seed": 1}
    large = {"model": "m", "messages": [{"role": "user", "content": "word " * 8000}]}
    for name, body in (("small", small), ("large", large)):
        response = server.client.post("/v1/chat/completions", json=body, headers={"x-request-id": f"up-{name}"})
        assert response.status_code == 200, response.text
    # Streams without stream_options get include_usage spliced in (so the gateway can count
    # their tokens), behind the head for a small body, in a body of its own for a large one.
    for name, body in (("small-stream", {**small, "stream": True}), ("large-stream", {**large, "stream": True})):
        with server.client.stream("POST", "/v1/chat/completions", json=body, headers={"x-request-id": f"up-{name}"}) as response:
            assert response.status_code == 200
            assert response.read().endswith(b"data: [DONE]\n\n")
    chats = fake_llm.calls("/v1/chat/completions")
    assert [body for (_, _, _, body) in chats] == [
        small, large,
        {**small, "stream": True, "stream_options": {"include_usage": True}},
        {**large, "stream": True, "stream_options": {"include_usage": True}}]
    assert [headers["x-request-id"] for (_, _, headers, _) in chats] == ["up-small", "up-large", "up-small-stream", "up-large-stream"]
    for _, _, headers, _ in chats:
        assert headers["authorization"] == "Bearer upstream-key-1"
        assert headers["host"] == f"127.0.0.1:{fake_llm.port}"
        assert headers["content-type"] == "application/json"
        assert headers["accept"] == "application/json, text/event-stream"


class _OneAnswerPerConnection(socketserver.BaseRequestHandler):
    """An OpenAI-compatible upstream that answers the first request on a connection with
    keep-alive, then closes the connection when a second request arrives on it, as a server
    does when its keep-alive timeout fires just as the gateway reuses the connection."""
    connections = 0
    reset = False
    # Seconds between reading the second request and closing: past the gateway's retry window,
    # the loss is no keep-alive race but a failure mid-generation.
    delay = 0.0
    # Bytes sent back for the second request before the close (the start of an answer).
    partial = b""

    def handle(self):
        type(self).connections += 1
        if not read_request(self.request):
            return
        reply = json.dumps({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
                            "choices": [{"index": 0, "message": {"role": "assistant", "content": "fresh"},
                                         "finish_reason": "stop"}],
                            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
        self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
                             + str(len(reply)).encode() + b"\r\n\r\n" + reply)
        self.request.recv(65536)  # the next request on this connection: close without answering
        time.sleep(type(self).delay)
        if type(self).partial:
            self.request.sendall(type(self).partial)
            time.sleep(0.1)
        if type(self).reset:
            self.request.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST, not FIN


@pytest.mark.parametrize("reset", [False, True], ids=["closed", "reset"])
def test_a_reused_connection_lost_at_the_upstream_is_retried_once(start, plugins_dir, reset):
    _OneAnswerPerConnection.connections = 0
    _OneAnswerPerConnection.reset = reset
    with raw_upstream(start, plugins_dir, _OneAnswerPerConnection) as server:
        for _ in range(3):
            response = server.client.post("/v1/chat/completions", json=BODY)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"] == "fresh"
        # Each reuse met a closed connection and went to a new one.
        assert _OneAnswerPerConnection.connections == 3


@pytest.mark.parametrize("delay, partial", [(1.5, b""), (0.0, b"HTTP/1.1 200 OK\r\nContent-Ty"), (0.0, b"HTTP/1.1 100 Continue\r\n\r\n")],
                         ids=["mid-generation", "part-of-a-head", "interim"])
def test_a_reused_connection_lost_once_the_upstream_had_the_request_is_not_retried(start, plugins_dir, delay, partial):
    # Lost 1.5 s after the request went out, or within the retry window but after the upstream
    # began to answer, the upstream had read the request: sending it again would run (and bill)
    # the generation twice, within a fresh timeout as it was.
    _OneAnswerPerConnection.connections = 0
    _OneAnswerPerConnection.reset = False
    _OneAnswerPerConnection.delay = delay
    _OneAnswerPerConnection.partial = partial
    try:
        with raw_upstream(start, plugins_dir, _OneAnswerPerConnection) as server:
            assert server.client.post("/v1/chat/completions", json=BODY).status_code == 200
            lost = server.client.post("/v1/chat/completions", json=BODY)
            assert lost.status_code == 502, lost.text
            assert lost.json()["error"]["message"].startswith("upstream closed the connection")
            assert _OneAnswerPerConnection.connections == 1
    finally:
        _OneAnswerPerConnection.delay = 0.0
        _OneAnswerPerConnection.partial = b""


def test_events_split_at_any_byte_arrive_whole(openai_gateway):
    server = openai_gateway()

    def stream_lines(model):
        with server.client.stream("POST", "/v1/chat/completions", json={**BODY, "model": model, "stream": True,
                                                                          "messages": [{"role": "user", "content": "a b c"}]}) as r:
            assert r.status_code == 200
            return [line for line in r.iter_lines() if line]

    split, whole = stream_lines("split"), stream_lines("m")
    assert len(split) == 7 and split[-1] == "data: [DONE]"
    assert [json.loads(l[6:])["choices"] for l in split[:-1]] == [json.loads(l[6:])["choices"] for l in whole[:-1]]


def _chunk_event(text: str) -> str:
    return json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m",
                       "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})


_USAGE_EVENT = json.dumps({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [],
                           "usage": {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}})


class _CannedEvents(socketserver.BaseRequestHandler):
    """An OpenAI-compatible upstream that answers every request with one fixed SSE body, sent
    in one write with a Content-Length, so the gateway gets all of its events in one read."""
    body = b""

    def handle(self):
        if not read_request(self.request):
            return
        self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n"
                             b"Content-Length: " + str(len(self.body)).encode() + b"\r\n\r\n" + self.body)


@pytest.mark.parametrize("with_usage", [False, True], ids=["plain", "with-usage"])
def test_every_event_form_in_one_read_is_relayed_as_the_client_expects(start, plugins_dir, with_usage):
    # Runs of events already in the client's form are copied whole; every other form (comments,
    # event: lines, no space after data:, CRLF, a usage chunk to parse) breaks a run. The client
    # must get each data payload as "data: X\n\n", nothing else, and [DONE] once.
    events = [
        ": a comment\n\n",
        f"data: {_chunk_event('one')}\n\n",
        f"data: {_chunk_event('two')}\n\n",
        "event: message\n",
        f"data:{_chunk_event('three')}\n\n",
        f"data: {_chunk_event('four')}\r\n\r\n",
        f"data: {_chunk_event('five')}\n\n",
        f"data: {_chunk_event('six')}\n\n",
        *([f"data: {_USAGE_EVENT}\n\n"] if with_usage else []),
        f"data: {_chunk_event('seven')}\n\n",
        "data: [DONE]\n\n",
    ]
    _CannedEvents.body = "".join(events).encode()
    with raw_upstream(start, plugins_dir, _CannedEvents) as server:
        words = ["one", "two", "three", "four", "five", "six", "seven"]
        for include_usage in (False, True):
            request = {**BODY, "stream": True, **({"stream_options": {"include_usage": True}} if include_usage else {})}
            response = server.client.post("/v1/chat/completions", json=request)
            assert response.status_code == 200, response.text
            expected = [f"data: {_chunk_event(w)}\n\n" for w in words]
            if with_usage and include_usage:
                expected.insert(6, f"data: {_USAGE_EVENT}\n\n")
            assert response.text == "".join(expected) + "data: [DONE]\n\n"


def test_an_error_event_after_chunks_in_the_same_read_ends_the_stream(start, plugins_dir):
    # The chunks already re-framed from this read go out first, then the gateway's error event
    # (naming the upstream's message), then [DONE]; nothing after the upstream's error is relayed.
    _CannedEvents.body = (f"data: {_chunk_event('one')}\n\n"
                          f"data: {_chunk_event('two')}\n\n"
                          'data: {"error": {"message": "model ran out of memory"}}\n\n'
                          f"data: {_chunk_event('never')}\n\n"
                          "data: [DONE]\n\n").encode()
    with raw_upstream(start, plugins_dir, _CannedEvents) as server:
        response = server.client.post("/v1/chat/completions", json={**BODY, "stream": True})
        assert response.status_code == 200, response.text
        events = [line[6:] for line in response.text.split("\n\n") if line]
        assert events[:2] == [_chunk_event("one"), _chunk_event("two")]
        error = json.loads(events[2])["error"]
        assert error["code"] == "upstream_error"
        assert "model ran out of memory" in error["message"]
        assert error["request_id"] == response.headers["x-request-id"]
        assert events[3:] == ["[DONE]"]


@pytest.mark.parametrize("body", [b"", b": only a comment\n\n", b"data: a partial li"], ids=["empty", "comment", "partial"])
def test_a_stream_without_events_is_a_502_since_nothing_was_sent(start, plugins_dir, body):
    # The head waits for the first events to share their buffer; with none (an empty body, a
    # comment, an unfinished line, which SSE discards), nothing has reached the client, so the
    # failure is the answer's status, as OpenAI's are before a stream begins, and SDKs retry by it.
    _CannedEvents.body = body
    with raw_upstream(start, plugins_dir, _CannedEvents) as server:
        response = server.client.post("/v1/chat/completions", json={**BODY, "stream": True}, headers={"x-request-id": "no-events"})
        assert response.status_code == 502, response.text
        assert response.headers["content-type"] == "application/json"
        assert response.headers["x-request-id"] == "no-events"
        assert int(response.headers["content-length"]) == len(response.content)
        assert response.json() == {"error": {
            "message": "openai upstream ended the stream without sending any event", "type": "api_error",
            "code": "upstream_invalid", "param": None, "request_id": "no-events"}}
        # The connection stays in step: the next request on it is answered.
        assert server.client.get("/health/live").status_code == 200


_REPLY = json.dumps({"id": "c", "object": "chat.completion", "created": 1, "model": "m",
                     "choices": [{"index": 0, "message": {"role": "assistant", "content": "framed"}, "finish_reason": "stop"}],
                     "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()


class _CannedReply(socketserver.BaseRequestHandler):
    """An upstream that answers every request on a connection with `reply`'s bytes, as they are,
    and counts its connections."""
    reply = b""
    connections = 0

    def handle(self):
        type(self).connections += 1
        while read_request(self.request):
            self.request.sendall(self.reply)
            if b"Content-Length" not in self.reply and b"chunked" not in self.reply:
                return  # a body without a length ends with the connection


@pytest.mark.parametrize("reply, reason", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello", "Content-Length values disagree (5 and 6)"),
    (b"HTTP/1.1 200 OK\r\nX-A: a\r\n folded\r\nContent-Length: 2\r\n\r\n{}", "obsolete line folding"),
    (b"HTTP/2 200\r\n\r\n", 'status line is not HTTP/1.x: \\"HTTP/2 200\\"'),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5x\r\nhello\r\n0\r\n\r\n",
     "chunk size line has something other than an extension after the size"),
], ids=["lengths-disagree", "folded", "http2", "chunk-size"])
def test_a_malformed_upstream_reply_is_a_502_naming_the_fault(start, plugins_dir, reply, reason):
    _CannedReply.reply = reply
    with raw_upstream(start, plugins_dir, _CannedReply) as server:
        for stream in (False, True):
            response = server.client.post("/v1/chat/completions", json={**BODY, "stream": stream})
            # A stream whose body is at fault before its first event is refused as a whole
            # answer is: nothing has reached the client.
            assert response.status_code == 502, response.text
            error = response.json()["error"]
            assert error["code"] == "upstream_error"
            assert error["message"].startswith("upstream request failed: malformed HTTP response: ")
            assert reason in json.dumps(error)
        assert server.client.get("/health/live").status_code == 200


class _MalformedSecondReply(socketserver.BaseRequestHandler):
    """An upstream whose first answer on a connection is sound and kept alive, and whose second
    is malformed; it counts the requests it reads."""
    requests = 0

    def handle(self):
        sound = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(_REPLY), _REPLY)
        for reply in (sound, b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"):
            if not read_request(self.request):
                return
            type(self).requests += 1
            self.request.sendall(reply)
        self.request.recv(65536)


def test_a_malformed_reply_on_a_reused_connection_is_not_sent_again(start, plugins_dir):
    # A reused connection that fails before answering may be a stale keep-alive, retried once
    # on a new one; a malformed answer is not that, and retrying would only repeat the call.
    _MalformedSecondReply.requests = 0
    with raw_upstream(start, plugins_dir, _MalformedSecondReply) as server:
        assert server.client.post("/v1/chat/completions", json=BODY).status_code == 200
        response = server.client.post("/v1/chat/completions", json=BODY)
        assert response.status_code == 502, response.text
        assert 'Content-Length \\"x\\" is not a length' in response.text
        assert _MalformedSecondReply.requests == 2


@pytest.mark.parametrize("reply, reused", [
    (b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + _REPLY, False),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(_REPLY), _REPLY), True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\nX-T: t\r\n\r\n" % (len(_REPLY), _REPLY), True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s\r\n" % (len(_REPLY), _REPLY), False),
], ids=["http-1.0-until-close", "interim-100", "chunked-with-trailer", "bytes-after-the-end"])
def test_every_framing_of_a_reply_is_read_and_only_clean_ones_keep_the_connection(start, plugins_dir, reply, reused):
    _CannedReply.reply = reply
    _CannedReply.connections = 0
    with raw_upstream(start, plugins_dir, _CannedReply) as server:
        for _ in range(3):
            response = server.client.post("/v1/chat/completions", json=BODY)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["message"]["content"] == "framed"
        # Kept alive: one connection for the three; otherwise each request needed its own.
        assert _CannedReply.connections == (1 if reused else 3)


class _Received:
    """Bytes already read from a socket, for http.client to parse response by response."""

    class _File(io.BytesIO):
        def close(self):  # http.client closes the file after each body; the next response follows
            pass

    def __init__(self, data: bytes):
        self.file = self._File(data)

    def makefile(self, *_):
        return self.file


def test_head_requests_between_chats_get_bodiless_answers(openai_gateway):
    # Pass-through answers are written below NIO's encoder, so the encoder is not told request
    # methods; the pass-through keeps router answers to HEAD bodiless, or the next response on
    # the connection would be read from the middle of a body.
    server = openai_gateway()
    payload = (b"HEAD /no-such-route HTTP/1.1\r\nHost: x\r\n\r\n" + post_bytes({**BODY, "stream": True})
               + b"HEAD /no-such-route HTTP/1.1\r\nHost: x\r\n\r\n" + post_bytes(BODY)
               + b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    received, closed = raw_exchange(server.port, payload, None)
    assert closed
    sock = _Received(received)
    answers = []
    for method in ("HEAD", "POST", "HEAD", "POST", "GET"):
        response = http.client.HTTPResponse(sock, method=method)
        response.begin()
        answers.append((response.status, response.read()))
    assert [status for status, _ in answers] == [404, 200, 404, 200, 200]
    assert answers[0][1] == b"" and answers[2][1] == b""
    assert answers[1][1].endswith(b"data: [DONE]\n\n")
    assert json.loads(answers[3][1])["object"] == "chat.completion"
    assert json.loads(answers[4][1]) == {"status": "ok"}
    assert sock.file.read() == b""


def test_a_client_leaving_mid_stream_frees_the_request(openai_gateway):
    server = openai_gateway()
    with httpx.stream("POST", server.base + "/v1/chat/completions", timeout=10,
                      json={**BODY, "model": "slow-model", "stream": True,
                            "messages": [{"role": "user", "content": "a b c d e f g h"}]}) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
    deadline = time.monotonic() + 5
    while in_flight(server) != 0:
        assert time.monotonic() < deadline, "the abandoned stream is still counted in flight"
        time.sleep(0.05)
    assert server.client.post("/v1/chat/completions", json=BODY).status_code == 200


def test_connection_close_and_http_1_0_are_honoured(openai_gateway):
    server = openai_gateway()
    received, closed = raw_exchange(server.port, post_bytes(BODY, extra_headers="Connection: close\r\n"), until=None)
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"connection: close" in head.lower()
    assert json.loads(body)["choices"][0]["message"]["content"] == "Echo: hello"
    assert closed
    # HTTP/1.0 without keep-alive: a 1.0 answer, then the server closes; a stream too.
    for body, marker in ((BODY, b"Echo: hello"), ({**BODY, "stream": True}, b"data: [DONE]")):
        request = post_bytes(body).replace(b"HTTP/1.1", b"HTTP/1.0", 1)
        received, closed = raw_exchange(server.port, request, until=None)
        assert received.startswith(b"HTTP/1.0 200 OK") and marker in received and closed, received


def test_metrics_and_access_log(openai_gateway, tmp_path):
    server = openai_gateway()
    for _ in range(2):
        assert server.client.post("/v1/chat/completions", json=BODY).status_code == 200
    streamed = server.client.post("/v1/chat/completions", json={**BODY, "stream": True})
    assert streamed.status_code == 200 and streamed.text.endswith("data: [DONE]\n\n")
    bad = server.client.post("/v1/chat/completions", content=b"{", headers={"x-request-id": "bad-json-1"})
    assert bad.status_code == 400

    text = server.client.get("/metrics").text
    requests = lambda status: metric_value(text, "gatehouse_http_requests_total", route="/v1/chat/completions", method="POST",
                                          status=status)
    assert requests("200") == 3 and requests("400") == 1
    assert metric_value(text, "gatehouse_upstream_request_duration_seconds_count", backend="openai", operation="chat", outcome="ok") == 2
    assert metric_value(text, "gatehouse_upstream_request_duration_seconds_count", backend="openai", operation="chat_stream", outcome="ok") == 1
    # "hello" is one prompt token; "Echo: hello" two completion tokens; three answers.
    assert metric_value(text, "gatehouse_llm_tokens_total", direction="prompt") == 3
    assert metric_value(text, "gatehouse_llm_tokens_total", direction="completion") == 6
    assert metric_value(text, "gatehouse_http_requests_in_flight") == 1  # the /metrics request itself
    assert metric_value(text, "gatehouse_http_time_to_first_byte_seconds_count", route="/v1/chat/completions") == 1  # the stream
    checked = subprocess.run([shutil.which("promtool"), "check", "metrics"], input=text, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    access = [l for l in server.log_lines() if l.get("msg") == "request" and l.get("path") == "/v1/chat/completions"]
    assert [l["status"] for l in access] == ["200", "200", "200", "400"]
    assert all(re.fullmatch(r"\d+\.\d{3}", l["latency_ms"]) and l["method"] == "POST" and l["request_id"] for l in access)
    assert access[-1]["request_id"] == "bad-json-1"


def test_plugin_middleware_takes_chat_completions_to_the_router(openai_gateway, plugins_dir, fake_llm):
    # The services test plugin registers a middleware that blocks chat completions without X-Team.
    plugins_dir.add("services-test", SERVICES_SO, toolchain="swift-6.3.1")
    server = openai_gateway()
    blocked = server.client.post("/v1/chat/completions", json=BODY)
    assert blocked.status_code == 403 and blocked.json()["error"]["message"] == "send X-Team: blue to use chat completions"
    assert fake_llm.calls("/v1/chat/completions") == []
    allowed = server.client.post("/v1/chat/completions", json=BODY, headers={"x-team": "blue"})
    assert allowed.status_code == 200 and allowed.json()["choices"][0]["message"]["content"] == "Echo: hello"


def test_the_routers_openai_streams_judge_their_endings_as_the_pass_through_does(openai_gateway, plugins_dir, fake_llm):
    # With the services test plugin's middleware, chat completions go through the router's
    # OpenAI backend (AsyncHTTPClient), whose stream reader must end streams as the pass-through does.
    plugins_dir.add("services-test", SERVICES_SO, toolchain="swift-6.3.1")
    server = openai_gateway()
    team = {"x-team": "blue"}
    silent = server.client.post("/v1/chat/completions", headers=team,
                                json={"model": "silent", "messages": [{"role": "user", "content": "hello"}], "stream": True})
    assert silent.status_code == 502  # nothing was sent: the failure is the status
    assert silent.json()["error"]["message"] == "openai upstream ended the stream without sending any event"
    truncated = stream_events(server, "truncated", team, text="hello")  # events without [DONE]: complete
    assert truncated[-1] == "[DONE]" and not any("error" in json.loads(e) for e in truncated[:-1])
    assert streamed_text(truncated[:-1]) == "Echo: hello"
    assert len(fake_llm.calls("/v1/chat/completions")) == 2


@pytest.mark.parametrize("path", ["pass-through", "router"])
def test_a_stream_without_usage_is_counted_and_said_once(openai_gateway, plugins_dir, path):
    # llama.cpp's server sends no usage chunk, even when asked: the stream is passed on whole,
    # its tokens cannot be counted, and the gateway says so (a counter; one warning per process).
    if path == "router":  # the services test plugin's middleware takes chat completions to the router
        plugins_dir.add("services-test", SERVICES_SO, toolchain="swift-6.3.1")
    server = openai_gateway()
    team = {"x-team": "blue"}
    for attempt in range(2):
        events = stream_events(server, "no-usage", {**team, "x-request-id": f"no-usage-{attempt}"}, text="hello")
        assert events[-1] == "[DONE]" and streamed_text(events[:-1]) == "Echo: hello"
    counted = stream_events(server, "m", team, text="hello")  # usage sent: counted, not a stream without usage
    assert streamed_text(counted[:-1]) == "Echo: hello"
    metrics = server.client.get("/metrics").text
    assert metric_value(metrics, "gatehouse_upstream_streams_without_usage_total", backend="openai") == 2
    assert metric_value(metrics, "gatehouse_llm_tokens_total", direction="completion") == 2  # the last stream's
    warning = wait_for_log(server, lambda l: l.get("level") == "warning" and "without reporting its token usage" in l.get("msg", ""))
    assert warning["backend"] == "openai" and warning["request_id"] == "no-usage-0"  # the router's had none
    assert len([l for l in server.log_lines() if "without reporting its token usage" in l.get("msg", "")]) == 1


def test_concurrent_clients_each_get_their_own_answers(openai_gateway):
    # Answers and upstream requests are flushed when the event loop has handled every socket
    # ready in its round, so one round carries many clients' answers: each must reach its own
    # connection, whole, streamed or not.
    server = openai_gateway(env={"RATE_LIMIT_RPS": "0"})
    failures = []

    def client(index):
        with httpx.Client(base_url=server.base, timeout=10) as http:
            for round_ in range(12):
                text = f"client {index} round {round_}"
                body = {**BODY, "messages": [{"role": "user", "content": text}], "stream": round_ % 3 == 0}
                response = http.post("/v1/chat/completions", json=body, headers={"x-request-id": f"c{index}-r{round_}"})
                if response.status_code != 200 or response.headers["x-request-id"] != f"c{index}-r{round_}":
                    failures.append((index, round_, response.status_code, response.headers.get("x-request-id")))
                elif body["stream"]:
                    events = [line[6:] for line in response.text.split("\n\n") if line.startswith("data: ")]
                    content = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in events[:-1])
                    if events[-1] != "[DONE]" or content != f"Echo: {text}":
                        failures.append((index, round_, content))
                elif response.json()["choices"][0]["message"]["content"] != f"Echo: {text}":
                    failures.append((index, round_, response.text))

    threads = [threading.Thread(target=client, args=(index,)) for index in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(thread.is_alive() for thread in threads), "a client is still waiting for an answer"
    assert failures == []


class _Firehose(socketserver.BaseRequestHandler):
    """An upstream that answers a chat request with a stream that does not end (SSE, or NDJSON
    on Ollama's /api/chat), as fast as the gateway takes it, up to `limit` bytes; `sent` counts
    what the gateway took."""
    limit = 160 * 1024 * 1024
    sent = 0

    def handle(self):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.request.recv(65536)
            if not chunk:
                return
            data += chunk
        text = "x" * 1000
        if data.startswith(b"POST /api/chat"):
            kind = b"application/x-ndjson"
            event = json.dumps({"model": "m", "message": {"role": "assistant", "content": text}, "done": False}).encode() + b"\n"
        else:
            kind = b"text/event-stream"
            event = f"data: {_chunk_event(text)}\n\n".encode()
        block = (b"%x\r\n" % len(event) + event + b"\r\n") * 64
        self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: " + kind + b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        self.request.settimeout(30)
        with contextlib.suppress(OSError):
            while type(self).sent < self.limit:
                self.request.sendall(block)
                type(self).sent += len(block)


def _unread_stream(server) -> socket.socket:
    """A connection that asked `server` for a stream, read its head and then reads nothing."""
    client = socket.create_connection(("127.0.0.1", server.port))
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    client.sendall(post_bytes({**BODY, "stream": True}))
    assert client.recv(4096).startswith(b"HTTP/1.1 200 OK")
    return client


@pytest.mark.parametrize("backend", ["openai", "ollama"], ids=["pass-through", "router"])
def test_a_client_that_stops_reading_a_stream_stops_the_upstream(start, plugins_dir, backend):
    # Back-pressure from client to upstream: the pass-through's upstream handler was inbound
    # only, so NIO never asked it whether to read, and its holding reads did nothing; a client
    # that stopped reading had the gateway take (and keep in memory) the whole stream.
    _Firehose.sent = 0
    with raw_upstream(start, plugins_dir, _Firehose, backend=backend) as server, _unread_stream(server) as client:
        # Nothing read: what the upstream manages to send must stop at what the sockets'
        # buffers hold (a few MB each way on loopback), not run to the limit. It stops when it
        # has not moved for a second (the debug build's router path is slow to fill those
        # buffers when the machine is busy).
        taken, deadline = -1, time.monotonic() + 20
        while _Firehose.sent != taken:
            assert time.monotonic() < deadline, "the upstream was still being read"
            taken = _Firehose.sent
            time.sleep(1)
        assert taken < 48 * 1024 * 1024, f"the gateway took {taken} bytes of a stream its client was not reading"
        # Reading again resumes it (once the buffers between have drained).
        client.settimeout(10)
        deadline = time.monotonic() + 20
        while _Firehose.sent == taken:
            assert time.monotonic() < deadline, "reading again did not resume the upstream"
            assert client.recv(1 << 20)
        assert server.client.get("/health").status_code == 200


def test_a_client_that_takes_nothing_for_the_timeout_is_ended_without_blaming_the_upstream(start, plugins_dir):
    # Held reads stop the upstream's bytes: its "silence" is then the client's stall, which
    # ended the stream as "upstream sent nothing for 2 s", an error counted against the upstream.
    _Firehose.sent = 0
    with raw_upstream(start, plugins_dir, _Firehose, upstream_extra=", timeout: 2s") as server, _unread_stream(server):
        wait_for_log(server, lambda l: l.get("msg") == "client stopped reading its stream", timeout=10)
        assert not [l for l in server.log_lines() if l.get("msg") == "stream failed"], server.log()
        assert server.client.get("/health").status_code == 200


def test_a_client_that_takes_nothing_for_the_timeout_loses_its_connection_on_the_router_path(start, plugins_dir):
    # Back-pressure stopped the upstream (whose read timeout then ended the upstream call), but
    # the route stayed parked in its write and the connection open for good, with megabytes of
    # answer queued for a client that took none of it: server.idle_timeout counts only
    # connections between requests.
    _Firehose.sent = 0
    with raw_upstream(start, plugins_dir, _Firehose, backend="ollama", upstream_extra=", timeout: 2s") as server, \
            _unread_stream(server) as client:
        closing = wait_for_log(server, lambda l: l.get("msg") == "client took nothing of its answer for the send timeout; closing the connection",
                               timeout=15)
        assert closing["timeout_s"] == "3 s" and closing["client"] == "127.0.0.1", closing
        # The connection is closed: what was sent before drains, then the end (or a reset).
        client.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            while client.recv(1 << 20):
                pass
        wait_for_log(server, lambda l: l.get("msg") == "request" and l.get("path") == "/v1/chat/completions")
        assert server.client.get("/health").status_code == 200


def test_requests_pipelined_behind_an_answer_wait_in_the_socket_not_in_memory(openai_gateway):
    # Parts read behind an answer in progress wait in a queue; reading went on regardless, so a
    # client pipelining behind a long stream (a chunked body that never ends, or requests by the
    # million) filled the gateway's memory as fast as it could send.
    server = openai_gateway()
    words = " ".join(["w"] * 25)  # the fake streams a word every 0.2 s: about 5 s
    with socket.create_connection(("127.0.0.1", server.port)) as client:
        client.sendall(post_bytes({**BODY, "model": "slow-model", "stream": True,
                                   "messages": [{"role": "user", "content": words}]}))
        assert client.recv(4096).startswith(b"HTTP/1.1 200 OK")
        client.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gatehouse\r\nContent-Type: application/json\r\n"
                       b"Transfer-Encoding: chunked\r\n\r\n")
        block = b"10000\r\n" + b" " * 0x10000 + b"\r\n"
        client.setblocking(False)
        sent, deadline = 0, time.monotonic() + 2.5
        while time.monotonic() < deadline and sent < 160 * 1024 * 1024:
            try:
                sent += client.send(block)
            except BlockingIOError:
                time.sleep(0.01)
        assert sent < 48 * 1024 * 1024, f"the gateway read {sent} bytes pipelined behind an answer"
        # The stream in progress is answered whole.
        client.setblocking(True)
        client.settimeout(15)
        received = b""
        while b"data: [DONE]" not in received:
            chunk = client.recv(65536)
            assert chunk, received[-300:]
            received += chunk
        assert received.count(b'"delta"') >= 26, received[-300:]  # "Echo:", 25 words, the finish
    assert server.client.get("/health").status_code == 200


def test_whole_requests_pipelined_before_a_malformed_one_are_answered_before_its_400(openai_gateway):
    # The parser's rejection was answered next and the whole requests queued before it dropped,
    # so the client read the 400 as the answer to the request it had sent before the bad one.
    server = openai_gateway()
    slow = post_bytes({**BODY, "model": "slow-model", "stream": True})
    health = b"GET /health HTTP/1.1\r\nHost: gatehouse\r\n\r\n"
    models = b"GET /v1/models HTTP/1.1\r\nHost: gatehouse\r\n\r\n"
    for pipeline in (slow + health + post_bytes(BODY), models + post_bytes(BODY) + health):
        received, closed = raw_exchange(server.port, pipeline + b"NOT HTTP\r\n\r\n", until=None)
        heads = re.findall(rb"HTTP/1\.1 (\d{3})", received)
        assert heads == [b"200", b"200", b"200", b"400"], received
        assert closed
        assert received.rindex(b"HTTP/1.1 400") > max(received.index(b'{"status":"ok"}'), received.index(b"Echo: hello"))


class _HeadThenPause(socketserver.BaseRequestHandler):
    """An upstream whose stream sends its head, then thinks for 3 s before the first event (a
    long prompt); `abandoned` is set when the gateway hangs up meanwhile."""
    abandoned = threading.Event()
    head_sent = threading.Event()

    def handle(self):
        if not read_request(self.request):
            return
        self.request.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        type(self).head_sent.set()
        self.request.settimeout(3)
        with contextlib.suppress(socket.timeout):
            if self.request.recv(1) == b"":
                type(self).abandoned.set()


def test_a_client_leaving_before_its_streams_first_event_gets_the_499(start, plugins_dir):
    # The upstream's head had come, the client's had not (it waits for the first events): the
    # half-closed client got the connection closed with nothing sent, logged as a 200.
    _HeadThenPause.abandoned.clear()
    _HeadThenPause.head_sent.clear()
    with raw_upstream(start, plugins_dir, _HeadThenPause) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(post_bytes({**BODY, "stream": True}))
            assert _HeadThenPause.head_sent.wait(5)
            time.sleep(0.2)  # for the gateway to read that head
            sock.shutdown(socket.SHUT_WR)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 499 Client Closed Request\r\n") and b"\r\nConnection: close" in head, received
        assert json.loads(body)["error"]["code"] == "client_closed_request"
        assert _HeadThenPause.abandoned.wait(2), "the upstream call went on"
        wait_for_log(server, lambda l: l.get("msg") == "request" and l.get("status") == "499")


def test_graceful_shutdown_answers_a_chat_queued_behind_a_router_response(openai_gateway):
    # The shutdown went to the router, which closed the connection after its response: the chat
    # request pipelined behind it had been read and was never answered.
    server = openai_gateway("cache: {enabled: false}\nserver: {shutdown_timeout: 20s}\n", env={"TIMEOUT": "20s"})
    embed = json.dumps({"model": "ponder", "input": "x"}).encode()  # the upstream thinks 5 s first
    pipeline = (b"POST /v1/embeddings HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                % (len(embed), embed)) + post_bytes(BODY)
    result = {}
    reader = threading.Thread(target=lambda: result.update(zip(("received", "closed"), raw_exchange(server.port, pipeline, until=None, timeout=20))))
    reader.start()
    time.sleep(1)
    server.process.send_signal(signal.SIGTERM)
    reader.join(20)
    heads = re.findall(rb"HTTP/1\.1 (\d{3})", result["received"])
    assert heads == [b"200", b"200"], result["received"][-500:]
    assert b"Echo: hello" in result["received"] and result["closed"]
    last_head = result["received"][result["received"].rindex(b"HTTP/1.1 200"):].partition(b"\r\n\r\n")[0]
    assert b"\r\nConnection: close" in last_head
    assert server.process.wait(20) == 0


@pytest.mark.parametrize("path", ["/v1/chat/completions", "//v1/chat/completions"])
def test_requests_the_key_or_rate_refuses_are_answered_before_their_bodies(openai_gateway, path):
    # The pass-through read a request's body (up to max_body_bytes, 10 MiB) before it checked
    # the key and the rate: anyone could have it hold 10 MiB per connection by never sending
    # the last byte. The router path (doubled slash) refused at the head already.
    server = openai_gateway(env={"API_KEY": "right-key"}, extra_config="rate_limit: {requests_per_second: 0.01, burst: 1}\ncache: {enabled: false}\n")
    started = (f"POST {path} HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\nContent-Length: 5000000\r\n").encode()
    partial_body = b'{"model": "m", "messages": [' + b" " * 1000
    received, closed = raw_exchange(server.port, started + b"X-API-Key: wrong-key\r\n\r\n" + partial_body, until=None, timeout=5)
    assert received.startswith(b"HTTP/1.1 401") and closed, received
    assert b'"code":"invalid_api_key"' in received and b"connection: close" in received.lower(), received
    # The key's holder spends the one token, whole; the next request, its body unfinished, gets the 429 at once.
    assert server.client.post("/v1/chat/completions", json=BODY, headers={"X-API-Key": "right-key"}).status_code == 200
    received, closed = raw_exchange(server.port, started + b"X-API-Key: right-key\r\n\r\n" + partial_body, until=None, timeout=5)
    assert received.startswith(b"HTTP/1.1 429") and closed, received
    assert b"retry-after: " in received.lower(), received
    # A refused request that comes whole (the usual one: head and body in one write, so in one
    # read) keeps its connection. (One whose body comes in a later read is answered at once and
    # the connection closes, so the head and the body go in one send here.)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        reader = ResponseReader(sock)
        for _ in range(2):
            sock.sendall(post_bytes(BODY, path=path, extra_headers="X-API-Key: wrong-key\r\n"))
            answer = reader.response()
            assert answer.startswith(b"HTTP/1.1 429 "), answer  # the address spent its token on the first guess
            assert b"connection: close" not in answer.lower(), answer


def test_repeated_key_fields_are_judged_alike_on_both_paths(openai_gateway):
    # The pass-through read the first of two X-API-Key fields; the router joins them (as
    # HTTP says to), which no key matches.
    server = openai_gateway(env={"API_KEY": "right-key"})
    for path in ("/v1/chat/completions", "//v1/chat/completions"):
        for first, second in (("right-key", "wrong-key"), ("wrong-key", "right-key")):
            request = post_bytes(BODY, path=path, extra_headers=f"X-API-Key: {first}\r\nX-API-Key: {second}\r\nConnection: close\r\n")
            received, _ = raw_exchange(server.port, request, until=None)
            assert received.startswith(b"HTTP/1.1 401"), (path, received)
