"""Host services for plugins (ABI 1.1), exercised by a Swift and a C test plugin: LLM calls through
the gateway pipeline, layered config, tagged logs, middleware, per-plugin metrics and /metrics."""
import json
import socket
import shutil
import subprocess
import time

import httpx
import pytest

from conftest import SERVICES_SO, ResponseReader, compile_c_plugin, metric_value, raw_exchange, wait_for_log, PLUGINS_SRC

SWIFT = "services-test"
C = "services-c"


@pytest.fixture
def services(gateway, plugins_dir, services_c_so):
    """A gateway in front of the fake LLM with both service test plugins installed."""

    def _services(extra_config: str = "", env: dict | None = None, swift_manifest_extra: dict | None = None):
        plugins_dir.add(SWIFT, SERVICES_SO, toolchain="swift-6.3.1", **(swift_manifest_extra or {}))
        plugins_dir.add(C, services_c_so)
        return gateway(extra_config=extra_config, env=env)

    return _services


def test_llm_calls_go_through_the_gateway_pipeline_with_the_request_id(services, fake_llm):
    server = services()
    states = server.plugins()
    assert states[SWIFT]["state"] == "loaded" and states[C]["state"] == "loaded", states

    swift = server.client.post(f"/v1/plugins/{SWIFT}/ask", content=b"what is up", headers={"x-request-id": "plug-req-1"})
    assert swift.status_code == 200, swift.text
    assert swift.text == "Echo: what is up"
    assert swift.headers["x-tokens"] == "3+4"  # real usage from the upstream's counts
    (_, _, headers, sent), = fake_llm.calls("/api/chat")
    assert headers["x-request-id"] == "plug-req-1"
    assert sent["options"] == {"temperature": 0}

    c = server.client.post(f"/v1/plugins/{C}/ask", content=b'say "hi"', headers={"x-request-id": "plug-req-2"})
    assert c.status_code == 200, c.text
    completion = c.json()  # C gets the gateway's chat.completion JSON
    assert completion["object"] == "chat.completion"
    assert completion["choices"][0]["message"]["content"] == 'Echo: say "hi"'
    assert completion["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    assert fake_llm.calls("/api/chat")[-1][2]["x-request-id"] == "plug-req-2"

    # Same pipeline as clients: the identical request is now answered from the shared cache.
    upstream_calls = len(fake_llm.calls("/api/chat"))
    again = server.client.post(f"/v1/plugins/{C}/ask", content=b'say "hi"')
    assert again.json()["choices"] == completion["choices"]
    assert len(fake_llm.calls("/api/chat")) == upstream_calls
    client_view = server.client.post("/v1/chat/completions", headers={"x-team": "blue"},
                                     json={"model": "llama3.2:1b", "messages": [{"role": "user", "content": 'say "hi"'}]})
    assert client_view.headers["x-cache"] == "HIT"


def test_streamed_llm_calls_from_swift_and_c(services, fake_llm):
    server = services()
    swift = server.client.post(f"/v1/plugins/{SWIFT}/ask-stream", content=b"one two three")
    assert swift.status_code == 200
    assert swift.text == "Echo:| one| two| three|"  # one piece per upstream NDJSON line
    assert fake_llm.calls("/api/chat")[-1][3]["stream"] is True
    with server.client.stream("POST", f"/v1/plugins/{C}/ask-stream", content=b"four five") as response:
        assert response.status_code == 200
        pieces = [piece for piece in response.iter_text() if piece]
    assert "".join(pieces) == "Echo: four five"


def test_a_stream_that_fails_midway_reaches_the_client_cut_short(services, fake_llm):
    # A plugin's stream whose LLM call failed midway ended as if whole (respond_finish), so the
    # client took half an answer for all of it. ABI 1.2's respond_abort, which PluginKit calls for
    # a stream that throws, closes the connection without the body's proper end.
    server = services(extra_config=f"plugins: {{{SWIFT}: {{config: {{model: crash}}}}}}\n")
    for plugin, query in ((SWIFT, ""), (C, "?crash")):
        with pytest.raises(httpx.RemoteProtocolError):
            with server.client.stream("POST", f"/v1/plugins/{plugin}/ask-stream{query}", content=b"one two three") as response:
                assert response.status_code == 200
                for _ in response.iter_bytes():
                    pass
        wait_for_log(server, lambda l: l.get("msg") == "plugin ended its streamed answer as failed; connection closed" and l.get("plugin") == plugin)
        assert server.client.get(f"/v1/plugins/{plugin}").json()["metrics"]["errors"] == 1
    # Only a started answer can be aborted; the gateway serves on.
    assert server.client.get(f"/v1/plugins/{C}/abort-early").text == "abort before start returned 2"
    assert server.client.post(f"/v1/plugins/{C}/ask-stream", content=b"fine").text == "Echo: fine"


def test_llm_errors_reach_the_plugin_with_status_and_reason(services):
    server = services()
    response = server.client.get(f"/v1/plugins/{SWIFT}/ask-missing-model")
    assert response.status_code == 404
    assert 'model "missing" not found' in response.json()["error"]["message"]
    # The error's code and type reach the plugin (ABI 1.2), which can pass them on as they are.
    assert (response.json()["error"]["code"], response.json()["error"]["type"]) == ("model_not_found", "invalid_request_error")
    c = server.client.post(f"/v1/plugins/{C}/ask?missing", content=b"hi", headers={"x-request-id": "c-missing"})
    assert c.status_code == 404 and c.json()["error"]["code"] == "model_not_found" and c.json()["error"]["request_id"] == "c-missing", c.text
    summary = server.client.get(f"/v1/plugins/{SWIFT}").json()["metrics"]
    assert summary["llm_calls"] == 1 and summary["llm_errors"] == 1


def test_a_plugin_built_for_abi_1_1_gets_what_1_1_promised(gateway, plugins_dir, tmp_path):
    # 1.1 promised an empty response_json for a failed LLM call: a 1.1 plugin telling success by
    # it must not read the 1.2 error body as an answer.
    plugins_dir.add(C, compile_c_plugin(PLUGINS_SRC / "services_c.c", tmp_path / "services_c_11.so", "DESCRIPTOR_MINOR=1"))
    server = gateway()
    c = server.client.post(f"/v1/plugins/{C}/ask?missing", content=b"hi")
    assert c.status_code == 404 and c.headers["content-type"] == "text/plain" and 'model "missing" not found' in c.text, c.text


def test_config_precedence_manifest_then_file_then_environment(services):
    server = services(
        extra_config=f"""
            plugins:
              {SWIFT}:
                config: {{b: file, c: file, verbose: true}}
              {C}:
                config: {{mode: from-file, nested: {{x: 1}}}}
        """,
        env={"GATEHOUSE_PLUGIN_SERVICES_TEST_C": "env", "GATEHOUSE_PLUGIN_SERVICES_TEST_RETRIES": "5",
             "GATEHOUSE_PLUGIN_SERVICES_C_MODE": "from-env"},
        swift_manifest_extra={"config": "{a: manifest, b: manifest, c: manifest, retries: 1}"})
    assert server.client.get(f"/v1/plugins/{SWIFT}/config").json() == {
        "a": "manifest", "b": "file", "c": "env", "retries": 5, "verbose": True}
    assert server.client.get(f"/v1/plugins/{C}/config").json() == {"mode": "from-env", "nested": {"x": 1}}


def test_log_lines_carry_plugin_name_and_request_id(services):
    server = services()
    server.client.post(f"/v1/plugins/{SWIFT}/ask", content=b"hello", headers={"x-request-id": "log-swift-1"})
    server.client.get(f"/v1/plugins/{C}/ping", headers={"x-request-id": "log-c-1"})
    lines = server.log_lines()
    asking = next(l for l in lines if l.get("msg") == "asking")
    assert asking["plugin"] == SWIFT and asking["request_id"] == "log-swift-1" and asking["question_chars"] == "5"
    pinged = next(l for l in lines if l.get("msg") == "pinged")
    assert pinged["plugin"] == C and pinged["request_id"] == "log-c-1"
    assert pinged["kind"] == "ping" and pinged["language"] == "c" and pinged["level"] == "info"
    ready = next(l for l in lines if l.get("msg") == "services-test ready")
    assert ready["plugin"] == SWIFT and ready["model"] == "llama3.2:1b"


def test_middleware_blocks_chat_completions_without_the_header(services, fake_llm):
    server = services()
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    blocked = server.client.post("/v1/chat/completions", json=body)
    assert blocked.status_code == 403
    assert blocked.json()["error"]["message"] == "send X-Team: blue to use chat completions"
    assert blocked.headers["x-request-id"]
    assert fake_llm.calls("/api/chat") == []  # never reached the upstream
    wrong = server.client.post("/v1/chat/completions", json=body, headers={"x-team": "red"})
    assert wrong.status_code == 403
    allowed = server.client.post("/v1/chat/completions", json=body, headers={"x-team": "blue"})
    assert allowed.status_code == 200 and allowed.json()["choices"][0]["message"]["content"] == "Echo: x"
    assert server.client.get("/v1/models").status_code == 200  # outside the middleware's scope
    assert server.client.get("/health").status_code == 200
    middleware = server.client.get(f"/v1/plugins/{SWIFT}").json()["metrics"]["middleware"]
    assert middleware == {"invocations": 3, "short_circuits": 2}


def test_middleware_goes_away_with_its_plugin(services):
    server = services(extra_config=f"plugins: {{{SWIFT}: {{enabled: false}}}}\n")
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    assert server.client.post("/v1/chat/completions", json=body).status_code == 200


def test_middleware_of_a_plugin_whose_init_fails_is_removed(gateway, plugins_dir, tmp_path):
    failing = compile_c_plugin(PLUGINS_SRC / "services_c.c", tmp_path / "failing.so", "FAIL_AFTER_MIDDLEWARE")
    plugins_dir.add(C, failing)
    server = gateway()
    assert server.plugins()[C]["error"] == "init failed: failing after registering middleware"
    response = server.client.get(f"/v1/plugins/{C}/rewrite")
    assert response.status_code == 404  # its rewrite middleware (which sets 201) is gone
    assert "x-rewritten-by" not in response.headers


def test_response_middleware_rewrites_status_headers_and_body(services):
    server = services()
    response = server.client.get(f"/v1/plugins/{C}/rewrite", headers={"x-request-id": "mw-log-1"})
    assert response.status_code == 201
    assert response.text == "rewritten(200):original"
    assert response.headers["x-rewritten-by"] == "services-c"
    # Logged from the middleware without an exchange: still the request's line, and the plugin's.
    rewriting = wait_for_log(server, lambda l: l.get("msg") == "rewriting")
    assert rewriting["request_id"] == "mw-log-1" and rewriting["plugin"] == C, rewriting
    # The middleware's own content-length (3) was dropped: the connection stays in step.
    with httpx.Client(base_url=server.base) as one_connection:
        assert one_connection.get(f"/v1/plugins/{C}/rewrite").text == "rewritten(200):original"
        assert one_connection.get(f"/v1/plugins/{C}/ping").text == "pong"
    # A call kept past its function's return is refused (it crashed the gateway).
    assert server.client.get(f"/v1/plugins/{C}/stale-call").text == "stale call returned 2"  # GH_ERR_STATE
    assert int(response.headers["content-length"]) == len(response.text)
    assert server.client.get(f"/v1/plugins/{C}/ping").text == "pong"  # outside its prefix: untouched
    # Doubled slashes reach the same route, so they meet the same middleware: they escaped it
    # (a prefix compared as text), and the plugin was handed the path "/".
    for path in (f"//v1/plugins/{C}/rewrite", f"/v1/plugins//{C}//rewrite"):
        received, _ = raw_exchange(server.port, f"GET {path} HTTP/1.1\r\nHost: g\r\nConnection: close\r\n\r\n".encode(), until=None)
        assert received.startswith(b"HTTP/1.1 201"), received
        assert received.endswith(b"rewritten(200):original"), received


def test_a_swift_plugin_stream_faster_than_its_client_is_held_back_not_cut_off(services):
    # PluginKit writes a stream from a thread of its own, where the host may make it wait.
    server = services()
    with server.client.stream("GET", f"/v1/plugins/{SWIFT}/flood") as response:
        assert response.status_code == 200
        received = sum(len(piece) for piece in response.iter_bytes())  # fails on a body cut short
    assert received == 64 << 20
    assert not any("client too slow" in l.get("msg", "") for l in server.log_lines()), server.log()


def test_a_response_middleware_that_changes_nothing_leaves_the_framing_alone(services):
    server = services()
    got = server.client.get("/v1/models")
    assert got.status_code == 200 and "transfer-encoding" not in got.headers
    assert int(got.headers["content-length"]) == len(got.content)
    head = server.client.head("/v1/models")
    assert head.headers["content-length"] == got.headers["content-length"]  # HEAD keeps its GET's length
    # HTTP/1.0 keeps its connection when it asks: the answer has a length, so it need not close.
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        received = ResponseReader(sock).response()
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"Connection: keep-alive" in head and b"Connection: close" not in head, received
    assert json.loads(body)["object"] == "list"
    observed = wait_for_log(server, lambda l: l.get("msg", "").startswith("observed"))
    assert observed["msg"] == "observed", "framing was shown to the middleware"
    assert not any("reserved response header" in l.get("msg", "") for l in server.log_lines()), server.log()


def test_metrics_count_exactly_the_requests_made_and_pass_promtool(services, tmp_path):
    server = services()
    for _ in range(3):
        assert server.client.get(f"/v1/plugins/{C}/ping").status_code == 200
    assert server.client.get(f"/v1/plugins/{C}/nope").status_code == 404
    for question in (b"a", b"b"):
        assert server.client.post(f"/v1/plugins/{SWIFT}/ask", content=question).status_code == 200
    server.client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "q"}]},
                       headers={"x-team": "blue"})

    c_summary = server.client.get(f"/v1/plugins/{C}").json()
    assert c_summary["state"] == "loaded"
    m = c_summary["metrics"]
    assert m["requests"] == 4 and m["errors"] == 0 and m["in_flight"] == 0
    assert m["custom"] == {"pings": {"kind": "counter", "value": 3.0}, "queue_depth": {"kind": "gauge", "value": 3.0}}  # as declared; pings exported with _total
    assert m["loads"] == 1 and m["load_failures"] == 0
    s = server.client.get(f"/v1/plugins/{SWIFT}").json()["metrics"]
    assert s["requests"] == 2 and s["llm_calls"] == 2 and s["llm_tokens"] == {"prompt": 2, "completion": 4}
    assert s["custom"]["asks_total"]["value"] == 2.0 and s["custom"]["last_answer_chars"]["value"] == len("Echo: b")
    assert s["latency_ms"]["max"] >= s["latency_ms"]["mean"] > 0

    response = server.client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert metric_value(text, "gatehouse_plugin_requests_total", plugin=C, status="200") == 3
    assert metric_value(text, "gatehouse_plugin_requests_total", plugin=C, status="404") == 1
    assert metric_value(text, "gatehouse_plugin_custom_pings_total", plugin=C) == 3
    assert metric_value(text, "gatehouse_plugin_custom_queue_depth", plugin=C) == 3
    # Names that would fail promtool were refused at declaration, each with its reason.
    reasons = {l["metric"]: l["msg"] for l in server.log_lines() if l.get("msg", "").startswith("metric refused: ")}
    assert reasons == {
        "queue_count": "metric refused: a gauge's name cannot end in _count (Prometheus keeps that for histograms and summaries)",
        "lag_sum": "metric refused: a gauge's name cannot end in _sum (Prometheus keeps that for histograms and summaries)",
        "queue_gauge": "metric refused: the name cannot contain a metric type ('gauge')",
        "jobs_counter": "metric refused: the name cannot contain a metric type ('counter')",
        "wait_histogram": "metric refused: the name cannot contain a metric type ('histogram')",
        "latency_ms": "metric refused: the name cannot contain the abbreviated unit 'ms': spell the base unit (seconds, bytes)",
        "wait_milliseconds": "metric refused: the name uses 'milliseconds': use the base unit 'seconds'",
        "depth_total": "metric refused: a gauge's name cannot end in _total (Prometheus keeps that for counters)",
        "Bad-Name": "metric refused: the name must be 1 to 100 of a-z, 0-9 and _, not starting with a digit",
        "odd_kind": "metric refused: kind 7 is neither GH_METRIC_COUNTER nor GH_METRIC_GAUGE",
    }, reasons
    assert metric_value(text, "gatehouse_plugin_llm_calls_total", plugin=SWIFT) == 2
    assert metric_value(text, "gatehouse_plugin_llm_tokens_total", plugin=SWIFT, direction="completion") == 4
    assert metric_value(text, "gatehouse_plugin_request_duration_seconds_count", plugin=SWIFT) == 2
    assert metric_value(text, "gatehouse_plugin_middleware_invocations_total", plugin=SWIFT) == 1
    assert metric_value(text, "gatehouse_plugin_loads_total", plugin=C) == 1
    assert metric_value(text, "gatehouse_http_requests_total", route="/v1/chat/completions", method="POST", status="200") == 1
    assert metric_value(text, "gatehouse_cache_misses_total") == 3
    assert metric_value(text, "gatehouse_llm_tokens_total", direction="prompt") == 3
    assert metric_value(text, "gatehouse_upstream_request_duration_seconds_count", backend="ollama", operation="chat", outcome="ok") == 3

    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: `make test` installs Debian's prometheus package"
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_per_plugin_rate_limit_and_timeout(services, plugins_dir, tmp_path):
    never = compile_c_plugin(PLUGINS_SRC / "variant.c", tmp_path / "variant.so")
    plugins_dir.add("variant", never, timeout="30s")
    server = services(extra_config=f"""
        server: {{shutdown_timeout: 1s}}
        plugins:
          {C}: {{rate_limit: 1}}
          variant: {{timeout: 1s}}
    """)
    assert server.client.get(f"/v1/plugins/{C}/ping").status_code == 200
    limited = server.client.get(f"/v1/plugins/{C}/ping")
    assert limited.status_code == 429 and limited.headers["retry-after"] == "1"
    assert limited.json()["error"]["code"] == "plugin_rate_limit_exceeded"
    assert server.client.get(f"/v1/plugins/{SWIFT}/config").status_code == 200  # other plugins unaffected
    started = time.monotonic()
    timed_out = server.client.get("/v1/plugins/variant/never")
    assert timed_out.status_code == 504 and time.monotonic() - started < 4
    assert "within 1 s" in timed_out.json()["error"]["message"]
    assert server.client.get("/v1/plugins/variant").json()["metrics"]["errors"] == 1
