"""The plugin host against real .so files: Swift and C echo, refusals with reasons, async and streaming C answers."""
import concurrent.futures
import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import ECHO_SO, GATEHOUSE, ROOT, compile_c_plugin, wait_for_log

VARIANT_C = Path(__file__).parent / "plugins" / "variant.c"
SWIFT_ECHO_MANIFEST = {"toolchain": "swift-6.3.1"}


@pytest.fixture(scope="session")
def variants(tmp_path_factory):
    """Compiled variants of the C test plugin, by name."""
    out = tmp_path_factory.mktemp("variants")
    build = lambda name, *defines, **kw: compile_c_plugin(VARIANT_C, out / f"{name}.so", *defines, **kw)
    return {
        "ok": build("ok"),
        "descriptor_v2": build("descriptor_v2", "DESCRIPTOR_MAJOR=2"),
        "entry_v2": build("entry_v2", "ENTRY_V2", export_list=False),
        "fail_init": build("fail_init", "FAIL_INIT", 'PLUGIN_NAME="init-fails"'),
        "misnamed": build("misnamed", 'PLUGIN_NAME="someone-else"'),
        "slow_shutdown": build("slow_shutdown", "SLOW_SHUTDOWN=120", 'PLUGIN_NAME="slow-shutdown"'),
    }


def post_echo(server, name, body: bytes, content_type: str):
    return server.client.post(f"/v1/plugins/{name}/echo", content=body, headers={"content-type": content_type})


def test_swift_and_c_echo_answer_with_body_and_content_type(plugins_dir, start, c_echo_so):
    plugins_dir.add("echo", ECHO_SO, library_name="libecho.so", **SWIFT_ECHO_MANIFEST)
    plugins_dir.add("echo-c", c_echo_so, library_name="libecho_c.so")
    server = start(plugins_dir, env={"DEBUG": "true"})  # echo-c logs each echo at debug
    states = server.plugins()
    assert states["echo"]["state"] == "loaded", states["echo"]
    assert states["echo-c"]["state"] == "loaded", states["echo-c"]
    assert states["echo"]["sha256"] == hashlib.sha256(ECHO_SO.read_bytes()).hexdigest()
    assert states["echo"]["abi"] == 1 and states["echo"]["loaded_at"]

    binary = bytes(range(256)) * 400  # 100 KiB with every byte value, NULs included
    for name in ("echo", "echo-c"):
        response = post_echo(server, name, binary, "application/x-test")
        assert response.status_code == 200, response.text
        assert response.content == binary
        assert response.headers["content-type"] == "application/x-test"
        assert response.headers["x-echo-plugin-version"] == "1.0.0"
        assert response.headers["x-request-id"]

        text = post_echo(server, name, "grüße".encode(), "text/plain; charset=utf-8")
        assert text.text == "grüße" and text.headers["content-type"] == "text/plain; charset=utf-8"

        empty = post_echo(server, name, b"", "application/json")
        assert empty.status_code == 200 and empty.content == b""

        wrong_method = server.client.get(f"/v1/plugins/{name}/echo")
        assert wrong_method.status_code == 405
        assert "POST" in wrong_method.json()["error"]["message"]

    # Each request's id reaches the plugin's log lines.
    server.client.post("/v1/plugins/echo-c/echo", content=b"x", headers={"content-type": "text/plain", "x-request-id": "echo-log-1"})
    echoing = wait_for_log(server, lambda l: l.get("msg") == "echoing" and l.get("request_id") == "echo-log-1")
    assert echoing["plugin"] == "echo-c" and echoing["level"] == "debug"
    assert '"plugin":"echo"' in server.log() and "echo ready" in server.log()


def test_request_id_is_honoured_and_unknown_routes_are_openai_errors(plugins_dir, start, c_echo_so):
    plugins_dir.add("echo-c", c_echo_so, library_name="libecho_c.so")
    server = start(plugins_dir)
    response = server.client.post("/v1/plugins/echo-c/echo", content=b"hi", headers={"x-request-id": "req-abc-123"})
    assert response.headers["x-request-id"] == "req-abc-123"

    missing = server.client.get("/v1/nothing-here")
    assert missing.status_code == 404
    error = missing.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == "route_not_found" and error["param"] is None and "/v1/nothing-here" in error["message"] and error["request_id"]

    unknown_plugin = server.client.post("/v1/plugins/nope/echo", content=b"x")
    assert unknown_plugin.status_code == 404
    assert unknown_plugin.json()["error"]["message"] == "no plugin named nope"


def test_many_concurrent_requests_to_both_plugins(plugins_dir, start, c_echo_so):
    plugins_dir.add("echo", ECHO_SO, library_name="libecho.so", **SWIFT_ECHO_MANIFEST)
    plugins_dir.add("echo-c", c_echo_so, library_name="libecho_c.so")
    server = start(plugins_dir, config="rate_limit: {requests_per_second: 100000}\n")

    def one(i):
        name = "echo" if i % 2 else "echo-c"
        body = f"request {i}".encode() * (i + 1)
        response = post_echo(server, name, body, "text/plain")
        return response.status_code == 200 and response.content == body

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(200)))
    assert results.count(True) == 200


def test_disabled_plugin_is_never_loaded_and_its_route_is_404(plugins_dir, start, c_echo_so):
    plugins_dir.add("echo", ECHO_SO, library_name="libecho.so", **SWIFT_ECHO_MANIFEST)
    plugins_dir.add("echo-c", c_echo_so, library_name="libecho_c.so")
    server = start(plugins_dir, config="""
        plugins:
          echo:
            enabled: false
    """)
    states = server.plugins()
    assert states["echo"]["state"] == "disabled"
    assert states["echo"]["sha256"] is None and states["echo"]["loaded_at"] is None
    response = post_echo(server, "echo", b"x", "text/plain")
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "plugin echo is disabled"
    assert "echo ready" not in server.log()  # its init never ran
    assert post_echo(server, "echo-c", b"still here", "text/plain").content == b"still here"
    # Looking at a disabled plugin measures nothing, and creates no series for it.
    assert server.client.get("/v1/plugins/echo").json()["metrics"] is None
    assert 'plugin="echo"' not in server.client.get("/metrics").text


def test_bad_plugins_are_refused_with_reasons_while_echo_keeps_serving(plugins_dir, start, c_echo_so, variants, tmp_path):
    plugins_dir.add("echo-c", c_echo_so, library_name="libecho_c.so")

    plugins_dir.add("malformed", None, manifest="name: [unclosed\nversion: 1\n")
    plugins_dir.add("badkeys", None, manifest="name: badkeys\nversion: 1.0.0\nabi: one\nlibrary: lib.so\ncolour: blue\n")
    plugins_dir.add("missing-lib", None)
    plugins_dir.add("wrong-abi-manifest", variants["ok"], abi=2)
    plugins_dir.add("wrong-abi-symbol", variants["entry_v2"])
    plugins_dir.add("wrong-abi-descriptor", variants["descriptor_v2"])
    plugins_dir.add("hash-mismatch", variants["ok"], sha256="0" * 64)
    world = plugins_dir.add("world-writable", variants["ok"])
    os.chmod(world / "libworld_writable.so", 0o666)
    plugins_dir.add("escape", None, library="../echo-c/libecho_c.so")
    link = plugins_dir.add("symlinked", None, library="lib.so")
    os.symlink(variants["ok"], link / "lib.so")
    outside = tmp_path / "outside"
    outside.mkdir()
    compile_c_plugin(VARIANT_C, outside / "lib.so", 'PLUGIN_NAME="dir-escape"')
    dir_escape = plugins_dir.add("dir-escape", None, library="sub/lib.so")
    os.symlink(outside, dir_escape / "sub")
    plugins_dir.add("init-fails", variants["fail_init"])
    plugins_dir.add("misnamed", variants["misnamed"])
    plugins_dir.add("old-toolchain", ECHO_SO, toolchain="swift-5.9.2")
    pinned = plugins_dir.add("variant", variants["ok"], sha256=hashlib.sha256(variants["ok"].read_bytes()).hexdigest())
    assert pinned.exists()
    # The manifest names the library, pins its hash and holds its config: it was read through a
    # link and whatever its mode, unlike the library.
    linked_manifest = plugins_dir.add("manifest-linked", variants["ok"])
    (tmp_path / "elsewhere.yaml").write_text((linked_manifest / "plugin.yaml").read_text())
    (linked_manifest / "plugin.yaml").unlink()
    os.symlink(tmp_path / "elsewhere.yaml", linked_manifest / "plugin.yaml")
    os.chmod(plugins_dir.add("manifest-writable", variants["ok"]) / "plugin.yaml", 0o666)
    # A sub-directory on the library's path that anyone may write: the library could be swapped in it.
    open_sub = plugins_dir.add("open-subdir", None, library="sub/lib.so")
    (open_sub / "sub").mkdir()
    shutil.copyfile(variants["ok"], open_sub / "sub" / "lib.so")
    os.chmod(open_sub / "sub", 0o777)
    plugins_dir.add("dot-library", None, library=".")
    plugins_dir.add("null", None, "name: null\nversion: 1.0.0\nabi: 1\nlibrary: lib.so\n")
    plugins_dir.add("two-lines", None, 'name: "two\\nlines"\nversion: 1.0.0\nabi: 1\nlibrary: lib.so\n')

    server = start(plugins_dir)
    states = server.plugins()
    expected = {
        "malformed": "not valid YAML",
        "badkeys": "key 'abi': must be an integer",
        "missing-lib": "library libmissing_lib.so not found",
        "wrong-abi-manifest": "manifest declares abi 2; this host speaks ABI 1",
        "wrong-abi-symbol": "exports gatehouse_plugin_entry_v2 (ABI 2)",
        "wrong-abi-descriptor": "descriptor declares ABI 2",
        "hash-mismatch": "sha256 mismatch",
        "world-writable": "group- or world-writable (mode 666)",
        "escape": "must stay inside the plugin directory",
        "symlinked": "is a symbolic link",
        "dir-escape": "outside the plugin directory",
        "init-fails": "init failed: refusing to start: missing setting 'token'",
        "misnamed": 'library calls itself "someone-else"',
        "old-toolchain": "built with swift-5.9.2 but this host runs swift-6.3.1",
        "manifest-linked": "plugin.yaml is a symbolic link; it must be a regular file",
        "manifest-writable": "plugin.yaml is group- or world-writable (mode 666)",
        "open-subdir": "open-subdir/sub is group- or world-writable (mode 777)",
        "dot-library": "library . is a directory, not a library file",
        "null": "key 'name': is required (null is YAML's null: put it in quotes",
        "two-lines": 'must match [a-z0-9][a-z0-9_-]* and be at most 64 characters (got "two lines")',
    }
    for name, reason in expected.items():
        assert states[name]["state"] == "failed", (name, states[name])
        assert reason in states[name]["error"], (name, states[name]["error"])
        assert "\n" not in states[name]["error"]
        assert post_echo(server, name, b"x", "text/plain").status_code == 404
    assert "key 'colour': unknown key" in states["badkeys"]["error"]
    assert "plugin.yaml" in states["badkeys"]["error"]
    # Every refusal is also a log line with its reason.
    refusals = {line["plugin"]: line["reason"] for line in server.log_lines() if line.get("msg") == "plugin refused"}
    for name, reason in expected.items():
        assert reason in refusals[name], (name, refusals.get(name))

    assert states["variant"]["state"] == "loaded"  # pinned with the right hash
    assert states["echo-c"]["state"] == "loaded"
    # A version whose init failed leaves no custom metric behind, shown as a live value.
    assert "probe_level" not in server.client.get("/metrics").text
    assert not (server.client.get("/v1/plugins/init-fails").json()["metrics"] or {}).get("custom")
    assert post_echo(server, "echo-c", b"alive", "text/plain").content == b"alive"


def _rss_mib(pid: int) -> float:
    return next(int(l.split()[1]) for l in open(f"/proc/{pid}/status") if l.startswith("VmRSS:")) / 1024


def _flood_result(server) -> tuple[int, int, int]:
    """(bytes written, the failing write's status, respond_finish's status) from the flood's log line."""
    stopped = wait_for_log(server, lambda l: l.get("msg", "").startswith("flood stopped"), timeout=60)
    return tuple(map(int, re.search(r"after (\d+) bytes with status (-?\d+), finish (-?\d+)", stopped["msg"]).groups()))


def test_a_plugin_thread_streaming_faster_than_its_client_waits_for_it(plugins_dir, start, variants):
    plugins_dir.add("variant", variants["ok"])
    server = start(plugins_dir)
    # 64 MiB, four times what may wait for the client: the plugin's thread waits for room.
    with server.client.stream("GET", "/v1/plugins/variant/flood?mib=64") as response:
        assert response.status_code == 200
        received = sum(len(piece) for piece in response.iter_bytes())  # fails on a body cut short
    assert received == 64 << 20
    assert _flood_result(server) == (64 << 20, 0, 0)
    assert not any("client too slow" in l.get("msg", "") for l in server.log_lines())


def test_a_plugin_stream_to_a_client_that_does_not_read_is_cut_off_not_buffered(plugins_dir, start, variants):
    plugins_dir.add("variant", variants["ok"])
    server = start(plugins_dir, config="plugins: {variant: {timeout: 2s}}\n")
    rss_before = _rss_mib(server.process.pid)
    sock = socket.create_connection(("127.0.0.1", server.port))
    # Shrinks what the kernel holds for this client, so the gateway's own buffering is what is tested.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.sendall(b"GET /v1/plugins/variant/flood HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        assert sock.recv(64).startswith(b"HTTP/1.1 200")  # the head; the body is then left unread
        written, status, finished = _flood_result(server)
        # The plugin waited while 16 MiB (and what the sockets hold) waited for the client; once
        # the client had taken nothing for the plugin's timeout, its write failed (GH_ERR_STATE,
        # as when a client leaves), long before its 256 MiB. Finishing the exchange still worked.
        assert status == 2 and written < 64 << 20 and finished == 0, (written, status, finished)
        warning = wait_for_log(server, lambda l: l.get("msg", "").startswith("client too slow for the plugin's streamed answer"))
        assert warning["level"] == "warning" and warning["plugin"] == "variant", warning
        assert warning["reason"] == "the client took nothing for 2 s", warning
        assert _rss_mib(server.process.pid) - rss_before < 120, "the stream was held in memory"
        # The connection is closed without the chunked body's end, so the client can tell it is cut short.
        sock.settimeout(10)
        received = b""
        while chunk := sock.recv(1 << 20):
            received += chunk
        assert not received.endswith(b"0\r\n\r\n")
    finally:
        sock.close()
    assert server.client.get("/v1/plugins/variant/hello").text == "hello"  # the plugin keeps serving


def test_a_plugin_streaming_on_the_hosts_thread_is_cut_off_past_16_mib(plugins_dir, start, variants):
    # Inside handle the plugin runs on a thread the host needs, which must not wait: past 16 MiB
    # ahead of the client the client is cut off rather than the host blocked or memory grown.
    plugins_dir.add("variant", variants["ok"])
    server = start(plugins_dir)
    with pytest.raises(httpx.RemoteProtocolError):  # the body ends without its last chunk
        with server.client.stream("GET", "/v1/plugins/variant/flood-inline?mib=40") as response:
            assert response.status_code == 200
            for _ in response.iter_bytes():
                pass
    written, status, finished = _flood_result(server)
    assert status == 2 and 16 << 20 <= written < 17 << 20 and finished == 0, (written, status, finished)
    warning = wait_for_log(server, lambda l: l.get("msg", "").startswith("client too slow"))
    assert warning["reason"] == "written more than 16 MiB ahead of the client from a host thread, which cannot wait"
    assert server.client.get("/v1/plugins/variant/hello").text == "hello"


def test_one_write_larger_than_the_buffer_is_taken_when_nothing_waits(plugins_dir, start, variants):
    plugins_dir.add("variant", variants["ok"])
    server = start(plugins_dir)
    response = server.client.get("/v1/plugins/variant/flood-one?mib=20")
    assert response.status_code == 200 and response.content == b"y" * (20 << 20)
    line = wait_for_log(server, lambda l: l.get("msg", "").startswith("one write of"))
    assert line["msg"] == f"one write of {20 << 20} bytes: status 0, finish 0"


def test_a_made_up_or_neighbouring_handle_answers_no_other_request(plugins_dir, start, variants):
    plugins_dir.add("variant", variants["ok"])
    server = start(plugins_dir, config="plugins: {variant: {timeout: 3s}}\n")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(httpx.get, f"{server.base}/v1/plugins/variant/never", timeout=30)  # open until its timeout
        time.sleep(0.5)
        own = int(server.client.get("/v1/plugins/variant/handle").text)
        # With counters, the waiting request's handle was own - 1; a small integer was another's.
        for guess in (own - 2, own - 1, own + 1, own + 2, 1, 2, 3):
            assert server.client.get(f"/v1/plugins/variant/answer?{guess}").text == "2", guess  # GH_ERR_STATE
        answered = waiting.result()
    assert answered.status_code == 504 and answered.json()["error"]["code"] == "plugin_timeout", answered.text


def test_c_plugin_answers_from_another_thread_streams_and_cannot_complete_twice(plugins_dir, start, variants):
    plugins_dir.add("variant", variants["ok"])
    server = start(plugins_dir, config="""
        server:
          shutdown_timeout: 1s
        upstream:
          timeout: 1s
        plugins:
          variant:
            config: {greeting: hi, nested: {a: 1}}
    """)
    with server.client.stream("GET", "/v1/plugins/variant/stream") as response:
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/plain"
        chunks = list(response.iter_text())
    assert "".join(chunks) == "alpha\nbeta\ngamma\n"

    double = server.client.get("/v1/plugins/variant/double")
    assert double.text == "first"
    assert "second respond returned 2" in server.log()  # GH_ERR_STATE, not a crash

    assert server.client.get("/v1/plugins/variant/config").json() == {"greeting": "hi", "nested": {"a": 1}}

    never = server.client.get("/v1/plugins/variant/never")
    assert never.status_code == 504
    assert never.json()["error"]["code"] == "plugin_timeout"

    hello = server.client.get("/v1/plugins/variant/hello", headers={"x-request-id": "trace-me-42"})
    assert hello.text == "hello"
    line = next(l for l in server.log_lines() if l.get("msg") == "hello from variant")
    assert line["request_id"] == "trace-me-42" and line["plugin"] == "variant" and line["route"] == "/hello"

    # The never-completed exchange must not hold shutdown hostage past the drain deadline.
    started = time.monotonic()
    assert server.stop() == 0
    assert time.monotonic() - started < 10
    assert any("unfinished requests at the drain deadline" in l.get("msg", "") for l in server.log_lines())


def test_plugin_api_misuse_is_refused_without_harm(plugins_dir, start, variants):
    plugins_dir.add("variant", variants["ok"])
    server = start(plugins_dir)
    # Views with a NULL pointer and a length aborted the gateway; each call is now refused
    # (GH_ERR_INVALID_ARGUMENT = 1; a NULL metric for the declaration), and the log line dropped.
    assert server.client.get("/v1/plugins/variant/null-views").text == "body 1 header 1 start 1 metric-refused 1"
    # Every refused middleware spec says why (two of the three refusals were silent).
    assert server.client.get("/v1/plugins/variant/bad-middleware").text == "neither 1 tiny 1 null 1"
    refused = [l["msg"] for l in server.log_lines() if l.get("msg", "").startswith("middleware refused: ") and l.get("plugin") == "variant"]
    assert sorted(refused) == ["middleware refused: on_request and on_response are both NULL",
                               "middleware refused: struct_size 8 is smaller than this host's gh_middleware_spec (56 bytes)",
                               "middleware refused: the spec is NULL"], refused
    assert server.process.poll() is None
    assert wait_for_log(server, lambda l: l.get("msg", "").startswith("plugin log call refused"))["plugin"] == "variant"
    # A body with 204 or 304 went out after the head, raw: read by the client as the next
    # response (a smuggled one here); with 1xx no final answer ever came. Whole and streamed.
    with httpx.Client(base_url=server.base, timeout=10) as one_connection:
        for query in ("s=204", "s=304", "s=204&w"):
            answer = one_connection.get(f"/v1/plugins/variant/status?{query}")
            assert answer.status_code == int(query[2:5]) and answer.content == b"", (query, answer.content)
            after = one_connection.get("/v1/plugins/variant/hello")
            assert after.status_code == 200 and after.text == "hello" and "x-smuggled" not in after.headers, query
        for query in ("s=103", "s=100&w"):
            interim = one_connection.get(f"/v1/plugins/variant/status?{query}")
            assert interim.status_code == 500 and interim.json()["error"]["code"] == "plugin_invalid_status", interim.text
            assert "interim HTTP status" in interim.json()["error"]["message"]
        # The plugin's content-length (3) is dropped: the body comes whole.
        whole = one_connection.get("/v1/plugins/variant/status?s=200")
        assert whole.content.startswith(b"HTTP/1.1 200 OK") and whole.content.endswith(b"EVIL!")
    # Each drop is logged naming the plugin (a middleware's answer has no route to tell it by).
    dropped = [l for l in server.log_lines() if l.get("msg") == "plugin sent an invalid or reserved response header; dropped"]
    assert dropped and all(l.get("plugin") == "variant" and l["header"] == "content-length" for l in dropped), dropped


def test_a_plugin_request_never_answered_does_not_hold_shutdown_past_its_timeout(plugins_dir, start, variants):
    # The wait for the plugin ignored cancellation, so the process stayed up until the plugin's
    # own timeout (upstream.timeout, 60 s here), whatever shutdown_timeout said.
    plugins_dir.add("variant", variants["ok"])
    server = start(plugins_dir, config="server: {shutdown_timeout: 1s}\nupstream: {timeout: 60s}\n")
    answers = []
    asking = threading.Thread(target=lambda: answers.append(httpx.get(server.base + "/v1/plugins/variant/never", timeout=90)), daemon=True)
    asking.start()
    deadline = time.monotonic() + 10
    while server.client.get("/v1/plugins/variant").json()["metrics"]["in_flight"] != 1:
        assert time.monotonic() < deadline, "the request never reached the plugin"
        time.sleep(0.05)
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(30)
    assert time.monotonic() - started < 10
    assert any(l.get("msg") == "shutdown complete" for l in server.log_lines())
    # Told the gateway is stopping (the connection used to close unanswered), not that the plugin timed out.
    asking.join(10)
    assert answers and answers[0].status_code == 503, answers and answers[0].text
    assert answers[0].json()["error"]["code"] == "server_shutting_down"


def test_a_plugin_whose_shutdown_blocks_does_not_hold_the_exit(plugins_dir, start, variants, tmp_path):
    # The plugins' shutdown calls, after the HTTP drain, were awaited without a limit (a plugin
    # sleeping 120 s kept the process up 120 s, whatever shutdown_timeout said), and a second
    # signal then did nothing. Then, with the calls on Dispatch's global queue, more blocked
    # plugins than cores held up the others' calls and their timeouts, a second a plugin.
    plugins_dir.add("slow-shutdown", variants["slow_shutdown"])
    for n in range(1, 6):
        plugins_dir.add(f"slow-{n}", compile_c_plugin(VARIANT_C, tmp_path / f"slow{n}.so", "SLOW_SHUTDOWN=120", f'PLUGIN_NAME="slow-{n}"'))
    plugins_dir.add("variant", variants["ok"])
    server = start(plugins_dir, config="server: {shutdown_timeout: 2s}\n")
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(30)
    assert time.monotonic() - started < 8
    lines = server.log_lines()
    at = lambda line: datetime.datetime.fromisoformat(line["ts"].replace("Z", "+00:00")).timestamp()
    began = at(next(l for l in lines if l.get("msg") == "requests drained; shutting plugins down"))
    stuck = [l for l in lines if l.get("msg") == "plugin's shutdown did not return in time; exiting without waiting for it"]
    assert sorted(l["plugin"] for l in stuck) == ["slow-1", "slow-2", "slow-3", "slow-4", "slow-5", "slow-shutdown"], server.log()
    assert all(at(l) - began < 3 for l in stuck), [(l["plugin"], at(l) - began) for l in stuck]  # 2 s left of the budget
    # The others still get theirs, at once.
    [quick] = [l for l in lines if l.get("msg") == "plugin shut down" and l.get("plugin") == "variant"]
    assert at(quick) - began < 1, at(quick) - began
    assert lines[-1]["msg"] == "shutdown complete", lines[-1]
    # With time to spare, a second signal stops at once, as during the drain.
    patient = start(plugins_dir, config="server: {shutdown_timeout: 60s}\n")
    patient.process.send_signal(signal.SIGTERM)
    wait_for_log(patient, lambda l: l.get("msg") == "requests drained; shutting plugins down")
    time.sleep(0.5)
    started = time.monotonic()
    patient.process.send_signal(signal.SIGTERM)
    patient.process.wait(30)
    assert time.monotonic() - started < 5
    assert any(l.get("msg") == "second signal: stopping now, without waiting for plugins to finish" for l in patient.log_lines()), patient.log()


def test_a_slow_init_is_named_while_start_up_waits_for_it(plugins_dir, start, tmp_path):
    # Start-up waits for every init (native code cannot be stopped); one that hung left a
    # gateway that never listened, and not a line saying which plugin it waited for.
    slow = compile_c_plugin(VARIANT_C, tmp_path / "slow.so", "SLOW_INIT=6", 'PLUGIN_NAME="slow-init"')
    plugins_dir.add("slow-init", slow)
    server = start(plugins_dir)
    lines = server.log_lines()
    warned = [i for i, l in enumerate(lines) if l.get("msg") == "plugin init has not returned after 5 s; start-up waits for it"]
    loaded = [i for i, l in enumerate(lines) if l.get("msg") == "plugin loaded" and l.get("plugin") == "slow-init"]
    assert warned and loaded and warned[0] < loaded[0], server.log()
    assert lines[warned[0]]["plugin"] == "slow-init"


def start_without_waiting(tmp_path, plugins_dir, config: str, private_root: Path):
    """A gateway process, not waited for (its plugins are still loading), with its private
    library copies under private_root; returns (process, log path)."""
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    number = port.getsockname()[1]
    port.close()
    config_path = tmp_path / f"startup-{number}.yaml"
    config_path.write_text(config)
    log_path = tmp_path / f"startup-{number}.log"
    env = {**os.environ, "TMPDIR": str(private_root)}
    with open(log_path, "w") as log:
        process = subprocess.Popen([GATEHOUSE, "serve", "--config", config_path, "--plugins-dir", plugins_dir.path, "--port", str(number)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
    return process, log_path


def wait_for_line(log_path: Path, predicate, timeout: float = 10) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [json.loads(l) for l in log_path.read_text().splitlines() if l.startswith("{")]
        if any(predicate(l) for l in lines):
            return lines
        time.sleep(0.05)
    raise AssertionError(f"no such line in:\n{log_path.read_text()}")


def test_a_signal_while_plugins_load_shuts_the_loaded_ones_down(plugins_dir, variants, tmp_path):
    # A SIGTERM during start-up ended the process by the default action: the plugins already
    # initialised got no shutdown and the private copies of their libraries stayed in TMPDIR.
    plugins_dir.add("a-first", compile_c_plugin(VARIANT_C, tmp_path / "a.so", 'PLUGIN_NAME="a-first"'))
    plugins_dir.add("b-slow", compile_c_plugin(VARIANT_C, tmp_path / "b.so", "SLOW_INIT=2", 'PLUGIN_NAME="b-slow"'))
    plugins_dir.add("c-after", compile_c_plugin(VARIANT_C, tmp_path / "c.so", 'PLUGIN_NAME="c-after"'))
    private_root = tmp_path / "private"
    private_root.mkdir()
    process, log_path = start_without_waiting(tmp_path, plugins_dir, "", private_root)
    try:
        wait_for_line(log_path, lambda l: l.get("msg") == "plugin loaded" and l.get("plugin") == "a-first")
        time.sleep(0.3)  # b-slow's init is running
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0, log_path.read_text()
    finally:
        process.kill()
    lines = [json.loads(l) for l in log_path.read_text().splitlines() if l.startswith("{")]
    messages = [(l.get("msg"), l.get("plugin")) for l in lines]
    assert ("signal during start-up: stopping once the plugin being initialised returns", None) in messages, messages
    # The plugin being initialised finishes; the next is not loaded; both loaded ones shut down.
    assert ("plugin loaded", "b-slow") in messages and ("plugin loaded", "c-after") not in messages, messages
    assert ("start-up stopped by a signal: plugin not loaded", "c-after") in messages, messages
    assert {p for m, p in messages if m == "plugin shut down"} == {"a-first", "b-slow"}, messages
    assert ("listening", None) not in messages, messages
    assert lines[-1]["msg"] == "shutdown complete" and lines[-1].get("during") == "start-up", lines[-1]
    assert list(private_root.iterdir()) == [], list(private_root.iterdir())


def test_a_hung_init_does_not_outlast_the_shutdown_timeout_after_a_signal(plugins_dir, tmp_path):
    # Native code cannot be interrupted: start-up waits for an init, but a signal gives it only
    # server.shutdown_timeout (and a second signal none) before the process exits anyway.
    plugins_dir.add("hung", compile_c_plugin(VARIANT_C, tmp_path / "hung.so", "SLOW_INIT=120", 'PLUGIN_NAME="hung"'))
    for second_signal in (False, True):
        private_root = tmp_path / f"private-{second_signal}"
        private_root.mkdir()
        config = "server: {shutdown_timeout: %s}\n" % ("60s" if second_signal else "1s")
        process, log_path = start_without_waiting(tmp_path, plugins_dir, config, private_root)
        try:
            # Its private copy is made just before its init is called.
            deadline = time.monotonic() + 10
            while not list(private_root.glob("*/*hung.so")) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert list(private_root.glob("*/*hung.so")), log_path.read_text()
            time.sleep(0.3)
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            if second_signal:
                wait_for_line(log_path, lambda l: l.get("msg", "").startswith("signal during start-up"))
                process.send_signal(signal.SIGINT)
            assert process.wait(15) == 1, log_path.read_text()
            assert time.monotonic() - started < 5
        finally:
            process.kill()
        log = log_path.read_text()
        expected = ("second signal during start-up: exiting now, without shutting plugins down" if second_signal else
                    "a plugin's init did not return within server.shutdown_timeout of the signal; exiting without shutting plugins down")
        assert expected in log, log
        assert list(private_root.iterdir()) == [], list(private_root.iterdir())


def test_plugins_cli_validate_and_list(plugins_dir, c_echo_so, variants):
    good = plugins_dir.add("echo-c", c_echo_so, library_name="libecho_c.so")
    swift = plugins_dir.add("echo", ECHO_SO, library_name="libecho.so", **SWIFT_ECHO_MANIFEST)
    bad = plugins_dir.add("hash-mismatch", variants["ok"], sha256="f" * 64)

    ok = subprocess.run([GATEHOUSE, "plugins", "validate", good], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("ok: echo-c 1.0.0, ABI 1.2, C")
    ok_swift = subprocess.run([GATEHOUSE, "plugins", "validate", swift / "plugin.yaml"], capture_output=True, text=True)
    assert ok_swift.returncode == 0 and "swift-6.3.1" in ok_swift.stdout, ok_swift.stderr
    # From inside the plugin's directory: "." was taken as its name, and the manifest's refused.
    for inside in (".", "plugin.yaml", "./plugin.yaml"):
        here = subprocess.run([GATEHOUSE, "plugins", "validate", inside], capture_output=True, text=True, cwd=good)
        assert here.returncode == 0 and here.stdout.startswith("ok: echo-c 1.0.0"), (inside, here.stderr)

    refused = subprocess.run([GATEHOUSE, "plugins", "validate", bad], capture_output=True, text=True)
    assert refused.returncode != 0
    assert "sha256 mismatch" in refused.stderr

    listing = subprocess.run([GATEHOUSE, "plugins", "list", "--plugins-dir", plugins_dir.path],
                             capture_output=True, text=True, cwd=plugins_dir.path)
    assert listing.returncode == 0, listing.stderr
    rows = {line.split("\t")[0]: line.split("\t") for line in listing.stdout.splitlines()}
    assert rows["echo"][2] == "loaded" and rows["echo-c"][2] == "loaded"
    assert rows["hash-mismatch"][2] == "failed" and "sha256 mismatch" in rows["hash-mismatch"][3]


def test_repository_plugins_dir_validates_as_installed_by_make():
    """`make test` runs `make plugins` first: the shipped plugins.d must validate as a user gets it."""
    names = sorted(p.parent.name for p in (ROOT / "plugins.d").glob("*/plugin.yaml"))
    assert names == ["echo", "echo-c"]
    for name in names:
        result = subprocess.run([GATEHOUSE, "plugins", "validate", ROOT / "plugins.d" / name], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"ok: {name} 1.0.0, ABI 1")
