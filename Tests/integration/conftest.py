"""Integration-test harness: starts the real gatehouse binary against real plugin libraries."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import textwrap
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD_DIR = ROOT / os.environ.get("GATEHOUSE_BUILD_DIR", ".build/debug")
GATEHOUSE = BUILD_DIR / "gatehouse"
ECHO_SO = BUILD_DIR / "libEchoPlugin.so"
SERVICES_SO = BUILD_DIR / "libServicesTestPlugin.so"
PLUGINS_SRC = Path(__file__).resolve().parent / "plugins"
ABI_INCLUDE = ROOT / "Sources/PluginABI/include"
EXPORTS_MAP = ROOT / "Plugins/plugin-exports.map"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compile_c_plugin(source: Path, output: Path, *defines: str, export_list: bool = True) -> Path:
    """Compiles a C plugin with the system C compiler, exactly as a plugin author would."""
    cmd = ["cc", "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-pthread", f"-I{ABI_INCLUDE}",
           *([f"-Wl,--version-script={EXPORTS_MAP}"] if export_list else []),
           *[f"-D{d}" for d in defines], "-o", str(output), str(source)]
    subprocess.run(cmd, check=True)
    return output


class PluginsDir:
    """A temporary plugins.d with helpers to drop plugins into it."""

    def __init__(self, path: Path):
        self.path = path
        path.mkdir(mode=0o755, exist_ok=True)

    def add(self, name: str, source: Path | None, manifest: str | None = None, *, library_name: str | None = None,
            **fields) -> Path:
        """Creates plugins.d/<name> with a copy of `source` and a manifest (written from `fields` unless given)."""
        directory = self.path / name
        directory.mkdir(mode=0o755, exist_ok=True)
        library_name = library_name or f"lib{name.replace('-', '_')}.so"
        if source is not None:
            shutil.copyfile(source, directory / library_name)
            os.chmod(directory / library_name, 0o755)
        if manifest is None:
            values = {"name": name, "version": "1.0.0", "abi": 1, "library": library_name}
            values.update(fields)
            manifest = "".join(f"{k}: {v}\n" for k, v in values.items() if v is not None)
        (directory / "plugin.yaml").write_text(textwrap.dedent(manifest))
        return directory


class Gatehouse:
    """A running gatehouse process with its log captured to a file."""

    def __init__(self, tmp: Path, plugins: Path, config: str = "", env: dict | None = None, extra_args=(), host="127.0.0.1",
                 preexec_fn=None):
        self.port = free_port()
        self.base = f"http://{host}:{self.port}"
        self.log_path = tmp / f"gatehouse-{self.port}.log"
        config_path = tmp / f"gatehouse-{self.port}.yaml"
        config_path.write_text(textwrap.dedent(config))
        full_env = {k: v for k, v in os.environ.items()
                    if k not in ("API_KEY", "PORT", "OLLAMA_HOST", "RATE_LIMIT_RPS", "DEBUG", "TIMEOUT")}
        full_env.update(env or {})
        self.args = [str(GATEHOUSE), "serve", "--config", str(config_path), "--plugins-dir", str(plugins),
                     "--port", str(self.port), *extra_args]
        self.log_file = open(self.log_path, "w")
        self.process = subprocess.Popen(self.args, stdout=self.log_file, stderr=subprocess.STDOUT, env=full_env, cwd=tmp,
                                        preexec_fn=preexec_fn)
        self.client = httpx.Client(base_url=self.base, timeout=30)
        self.wait_ready()

    def wait_ready(self, timeout: float = 30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gatehouse exited with {self.process.returncode}:\n{self.log()}")
            try:
                if self.client.get("/health/live").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"gatehouse did not become ready:\n{self.log()}")

    def log(self) -> str:
        if not self.log_file.closed:
            self.log_file.flush()
        return self.log_path.read_text()

    def log_lines(self) -> list[dict]:
        """The JSON log lines written so far (non-JSON lines are skipped)."""
        lines = []
        for raw in self.log().splitlines():
            try:
                lines.append(json.loads(raw))
            except json.JSONDecodeError:
                pass
        return lines

    def plugins(self) -> dict:
        response = self.client.get("/v1/plugins")
        assert response.status_code == 200, response.text
        return {p["name"]: p for p in response.json()["data"]}

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.client.close()
        self.log_file.close()
        return self.process.returncode


@pytest.fixture(scope="session")
def built():
    assert GATEHOUSE.exists(), f"{GATEHOUSE} missing: run `make build` first"
    assert ECHO_SO.exists(), f"{ECHO_SO} missing: run `make build` first"


@pytest.fixture(scope="session")
def c_echo_so(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cplugins") / "libecho_c.so"
    return compile_c_plugin(ROOT / "Plugins/EchoC/echo_c.c", out)


@pytest.fixture(scope="session")
def services_c_so(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cplugins") / "libservices_c.so"
    return compile_c_plugin(PLUGINS_SRC / "services_c.c", out)


@pytest.fixture
def plugins_dir(tmp_path) -> PluginsDir:
    return PluginsDir(tmp_path / "plugins.d")


@pytest.fixture
def start(tmp_path, built):
    """start(plugins_dir, config_yaml="", env=None, extra_args=(), host="127.0.0.1", preexec_fn=None) -> Gatehouse (reached at
    host; preexec_fn runs in the child before exec); stopped after the test."""
    servers = []

    def _start(plugins: PluginsDir, config: str = "", env: dict | None = None, extra_args=(), host="127.0.0.1",
               preexec_fn=None) -> Gatehouse:
        server = Gatehouse(tmp_path, plugins.path, config, env, extra_args, host, preexec_fn)
        servers.append(server)
        return server

    yield _start
    for server in servers:
        server.stop()


@pytest.fixture
def fake_llm():
    from fake_llm import FakeLLM
    fake = FakeLLM().start()
    yield fake
    fake.stop()


@pytest.fixture
def gateway(start, plugins_dir, fake_llm):
    """gateway(backend="ollama", extra_config="", env=None) -> Gatehouse in front of the fake LLM."""

    def _gateway(backend: str = "ollama", extra_config: str = "", env: dict | None = None, extra_args=()) -> Gatehouse:
        config = f"upstream: {{backend: {backend}, url: \"{fake_llm.url}\", timeout: 5s}}\n" + textwrap.dedent(extra_config)
        return start(plugins_dir, config=config, env=env, extra_args=extra_args)

    return _gateway


def metric_value(text: str, name: str, **labels) -> float:
    """The value of the sample `name{labels}` in Prometheus text; KeyError if absent."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = re.match(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})? (\S+)$', line)
        if not match or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(3) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(4))
    raise KeyError(f"{name}{labels} not in /metrics")


def wait_for_log(server, predicate, timeout: float = 5) -> dict:
    """The first JSON log line of `server` matching `predicate`, polled for (log lines written on
    an event loop reach the file at the end of its round); fails with the log after `timeout`."""
    deadline = time.monotonic() + timeout
    while not (found := [line for line in server.log_lines() if predicate(line)]):
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)
    return found[0]


def raw_exchange(port: int, payload: bytes, until: bytes | None, timeout: float = 10, half_close: bool = False) -> tuple[bytes, bool]:
    """Sends raw bytes on one connection (then shuts down its sending side when `half_close`)
    and reads until `until` has been seen, or until the server closes the connection when
    `until` is None. Returns what was read and whether the server closed the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(payload)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while until is None or until not in received:
            chunk = sock.recv(65536)
            if not chunk:
                return received, True
            received += chunk
        return received, False


class ResponseReader:
    """Reads HTTP/1.1 responses with Content-Length bodies (and interim heads) off a socket,
    keeping bytes that arrive early for the next read."""

    def __init__(self, sock: socket.socket):
        self.sock, self.buffer = sock, b""

    def _fill(self):
        chunk = self.sock.recv(65536)
        assert chunk, f"connection closed after {self.buffer!r}"
        self.buffer += chunk

    def head(self) -> bytes:
        while b"\r\n\r\n" not in self.buffer:
            self._fill()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        return head + b"\r\n\r\n"

    def response(self) -> bytes:
        head = self.head()
        length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
        while len(self.buffer) < length:
            self._fill()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return head + body


def stream_events(server, model, headers=None, text="a b c"):
    """The data payloads of a streamed chat completion asking `model` for `text` (status 200 asserted)."""
    response = server.client.post(
        "/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": text}], "stream": True},
        headers=headers or {})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    return [line[6:] for line in response.text.split("\n\n") if line.startswith("data: ")]


def streamed_text(events):
    """The content the chunks among `events` carry, joined; fails on an error event among them
    (pass the events before an expected one)."""
    parsed = [json.loads(e) for e in events]
    errors = [e for e in parsed if "error" in e]
    assert not errors, errors
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in parsed if e.get("choices"))
