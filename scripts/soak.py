#!/usr/bin/env python3
"""Soak (not a test, not in CI): mixed good and bad traffic against two running gateways, one per
backend (ollama: the router path; openai: the chat pass-through), both in front of the stand-in
upstream. Prints how each kind of exchange ended and each gateway's resident memory before and
after; exits 1 if any exchange ended otherwise than expected or a gateway stopped answering.

Usage: scripts/soak.py [SECONDS] [--build-dir .build/debug]   (the venv's python: .venv/bin/python)
Each kind: a whole answer, a stream, a stream the client aborts, a slow answer the client
abandons, a request cut off, malformed JSON, a 100 KB header, three pipelined requests, a body
with both Content-Length and Transfer-Encoding, and a connection opened and closed idle.
"""
import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "Tests/integration"))
from fake_llm import FakeLLM  # noqa: E402

EXPECTED = {"json_ok", "stream_ok", "aborted", "slow_aborted", "partial", "malformed_400", "bigheader_431",
            "pipelined_ok", "badframing_400", "idle_close"}
stats = {}


def count(outcome):
    stats[outcome] = stats.get(outcome, 0) + 1


def req(body):
    """A chat request's bytes: `body` as JSON with its Content-Length."""
    data = json.dumps(body).encode()
    return b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)


async def one(port):
    """One exchange of a random kind on a new connection, counted by how it ended."""
    kind = random.choice(["json", "stream", "abort_stream", "partial", "malformed", "bigheader", "slow_abort", "pipelined", "badframing", "idle_close"])
    try:
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    except Exception as e:
        count("connect_fail"); return
    try:
        msg = {"model": "m", "messages": [{"role": "user", "content": "hello " + str(random.random())}]}
        if kind == "json":
            w.write(req(msg)); await w.drain()
            data = await asyncio.wait_for(r.read(65536), 10)
            count("json_ok" if b" 200 " in data[:20] else "json_bad:" + data[:12].decode(errors="replace"))
        elif kind == "stream":
            w.write(req({**msg, "stream": True})); await w.drain()
            data = b""
            while b"[DONE]" not in data:
                chunk = await asyncio.wait_for(r.read(65536), 10)
                if not chunk: break
                data += chunk
            count("stream_ok" if b"[DONE]" in data and b" 200 " in data[:20] else "stream_bad")
        elif kind == "abort_stream":
            w.write(req({**msg, "model": "slow-x", "stream": True})); await w.drain()
            await asyncio.wait_for(r.read(100), 10)
            w.transport.abort(); count("aborted"); return
        elif kind == "slow_abort":
            w.write(req({**msg, "model": "slow-x"})); await w.drain()
            await asyncio.sleep(random.random() * 0.3)
            w.transport.abort(); count("slow_aborted"); return
        elif kind == "partial":
            full = req(msg)
            w.write(full[: random.randint(1, len(full) - 1)]); await w.drain()
            await asyncio.sleep(random.random() * 0.2)
            count("partial")
        elif kind == "malformed":
            w.write(req({"model": "m"}) if random.random() < 0.5 else b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 5\r\n\r\n{bad}")
            await w.drain()
            data = await asyncio.wait_for(r.read(65536), 10)
            count("malformed_400" if b" 400 " in data[:20] else "malformed_other:" + data[:12].decode(errors="replace"))
        elif kind == "bigheader":
            w.write(b"GET /health HTTP/1.1\r\nX-Big: " + b"a" * 100000 + b"\r\n\r\n"); await w.drain()
            data = await asyncio.wait_for(r.read(65536), 10)
            count("bigheader_431" if b" 431 " in data[:20] else "bigheader_other:" + data[:12].decode(errors="replace"))
        elif kind == "pipelined":
            w.write(req(msg) + req({**msg, "stream": True}) + req(msg)); await w.drain()
            data = b""
            deadline = time.monotonic() + 10
            while data.count(b"HTTP/1.1 200") < 3 or b"[DONE]" not in data:
                chunk = await asyncio.wait_for(r.read(65536), 10)
                if not chunk or time.monotonic() > deadline: break
                data += chunk
            count("pipelined_ok" if data.count(b"HTTP/1.1 200") == 3 else "pipelined_bad")
        elif kind == "badframing":
            w.write(b"POST /v1/chat/completions HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"); await w.drain()
            data = await asyncio.wait_for(r.read(65536), 10)
            count("badframing_400" if b" 400 " in data[:20] else "badframing_other:" + data[:12].decode(errors="replace"))
        elif kind == "idle_close":
            await asyncio.sleep(random.random() * 0.1); count("idle_close")
    except Exception as e:
        count(kind + "_exc:" + type(e).__name__)
    finally:
        try:
            w.close()
        except Exception:
            pass

async def worker(end, ports):
    while time.monotonic() < end:
        await one(random.choice(ports))


# The response cache may hold 64 MiB (its default max_bytes), the pools and buffers some more.
MAX_RSS_GROWTH_KB = 128 * 1024


def answers_health(port) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def rss_kb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def start_gateway(binary, backend, upstream, port, directory):
    (directory / "plugins.d").mkdir(parents=True)
    (directory / "gatehouse.yaml").write_text(f'upstream: {{backend: {backend}, url: "{upstream}"}}\nserver: {{port: {port}}}\n')
    env = {**os.environ, "RATE_LIMIT_RPS": "0"}
    process = subprocess.Popen([binary, "serve", "--config", "gatehouse.yaml", "--plugins-dir", "plugins.d"], cwd=directory, env=env,
                               stdout=open(directory / "gatehouse.log", "w"), stderr=subprocess.STDOUT)
    for _ in range(100):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return process
        except Exception:
            time.sleep(0.1)
    sys.exit(f"soak: the {backend} gateway did not start; see {directory / 'gatehouse.log'}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("seconds", nargs="?", type=float, default=60)
    parser.add_argument("--build-dir", default=".build/debug")
    args = parser.parse_args()
    binary = str(ROOT / args.build_dir / "gatehouse")
    fake = FakeLLM()
    # Answers the gateway abandons (their clients left) are expected here: no traceback for each.
    fake.server.handle_error = lambda request, address: None
    fake.start()
    ports = [18656, 18657]
    with tempfile.TemporaryDirectory(prefix="gatehouse-soak-") as work:
        gateways = [start_gateway(binary, backend, fake.url, port, Path(work) / backend) for backend, port in zip(["ollama", "openai"], ports)]
        before = [rss_kb(g.pid) for g in gateways]
        end = time.monotonic() + args.seconds

        async def run():
            await asyncio.gather(*[worker(end, ports) for _ in range(40)])
        asyncio.run(run())
        after = [rss_kb(g.pid) for g in gateways]
        # Alive means still answering, not only a process.
        alive = [g.poll() is None and answers_health(port) for g, port in zip(gateways, ports)]
        for gateway in gateways:
            gateway.terminate()
            gateway.wait(timeout=40)
        for backend, gateway, up in zip(["ollama", "openai"], gateways, alive):
            if not up:  # its log goes with the directory: show how it ended
                tail = (Path(work) / backend / "gatehouse.log").read_text(errors="replace").splitlines()[-200:]
                print(f"the {backend} gateway exited with {gateway.returncode}; the end of its log:", *tail, sep="\n")
    fake.stop()
    for outcome in sorted(stats):
        print(f"{outcome:24} {stats[outcome]}")
    for backend, b, a, up in zip(["ollama", "openai"], before, after, alive):
        print(f"{backend} gateway: RSS {b // 1024} MB before, {a // 1024} MB after; {'running' if up else 'GONE'}")
    unexpected = set(stats) - EXPECTED
    # The response cache (64 MiB by default) and the pools fill as the soak runs; past that,
    # growth is a leak.
    grown = [backend for backend, b, a in zip(["ollama", "openai"], before, after) if a - b > MAX_RSS_GROWTH_KB]
    if unexpected or not all(alive) or grown:
        if unexpected:
            print(f"soak: unexpected outcomes: {sorted(unexpected)}")
        if not all(alive):
            print("soak: a gateway stopped answering")
        if grown:
            print(f"soak: RSS grew by more than {MAX_RSS_GROWTH_KB // 1024} MB: {grown}")
        sys.exit(1)


if __name__ == "__main__":
    main()
