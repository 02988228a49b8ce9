"""A stand-in LLM upstream that speaks Ollama's real wire format (NDJSON on /api/chat) and
OpenAI's (SSE on /v1/chat/completions), recording every request it receives.

The assistant "model" is deterministic: it answers "Echo: <last user text>", one token per word.
Special model names change behaviour:
  slow-*        stream one token every 0.2 s (a whole answer: 0.2 s per token before it)
  stall         stream two tokens, then send nothing for 30 s
  hang          never answer (for timeouts)
  missing       404 like Ollama/OpenAI for an unknown model
  broken        500 with an error body
  tools         answer with a tool call to get_time({"timezone": "UTC"}) until a tool result is present
  tools-with-ids  the same, the calls carrying ids (Ollama since 0.12; without them before)
  tools-no-args   (Ollama) the same, the call's arguments null, as Go writes an arguments map
                  that was never made (a call without arguments)
  tools-text-args (Ollama) the same, the call's arguments as JSON text, as an OpenAI-minded
                  server in Ollama's format might send them
  split         (OpenAI SSE) send every event in 5-byte pieces, each its own HTTP chunk
  truncated     (streams) end the HTTP body cleanly but early: Ollama without its "done": true
                line, OpenAI without `data: [DONE]`
  silent        (streams) a 200 stream whose body ends without a single event
  plain-json    (OpenAI) ignore "stream": true and answer one application/json completion
  invalid       500 the way llama-cpp-python reports a request validation error
  denied        401: the upstream refuses the gateway's credentials
  moved         301 with a Location (AsyncHTTPClient followed it, resending a POST as a GET)
  busy          429 with Retry-After: 7: the upstream is rate limiting
  no-quota      429 as OpenAI answers an account out of credit (code insufficient_quota)
  too-long      400 as OpenAI answers a prompt past the context (code context_length_exceeded,
                param messages; Ollama's plain {"error": …} on its routes)
  overloaded    503, as Ollama answers past OLLAMA_MAX_QUEUE (no Retry-After)
  garbage       200 with a body that is not JSON
  error-200     (whole answers) an error object sent with a 200, as some servers and proxies do;
                its message counts the calls, so a replayed one shows, and quotes the key sent
  key-as-code   400 whose error `code` is the key the gateway sent (an upstream quoting it back)
  cut-short     (whole answers) a 200 whose body ends where the connection closes (no length),
                cut off after 60 bytes
  drip          (whole answers) the head at once, then the body a byte every 0.3 s (3 s in all)
  huge          a whole answer past 64 MiB; streamed, one token, then a line that runs on past 64 MiB
  few-vectors   (Ollama /api/embed) one vector fewer than the inputs
  crash         (streams) two tokens, then the backend's own mid-stream error
  ponder        (whole and streamed) think for 5 s before the first byte of the answer, watching the
                connection as Ollama does (a long prompt, or a wait in its queue); if the caller hangs
                up meanwhile, stop, recorded in `abandoned`
  ponder-streaming  (streams) send the stream's head at once, then ponder as above before the first
                event (llama.cpp's and vLLM's servers send the head, then queue or read the prompt)
  thinker       (Ollama) a reasoning model: "Let me think." in `message.thinking` (streamed a
                word per line, before the answer) unless the request has "think": false
Ollama replies carry per-token `logprobs` when the request asks (`"logprobs": true`, `top_logprobs`).
The OpenAI routes are also served under Google's base, /v1beta/openai (chat at
/v1beta/openai/chat/completions), as Gemini's OpenAI-compatible endpoint serves them.
Run standalone: python fake_llm.py --port P (it serves both APIs on the one port)
"""
import argparse
import contextlib
import json
import select
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GOOGLE_BASE = "/v1beta/openai"


def ollama_logprobs(body, tokens):
    """Ollama's `logprobs` (since 0.12.11) for `tokens` when the request asked: each token's
    logprob (-0.25 per word position), its bytes, and `top_logprobs` alternatives ("<alt>")."""
    if not body.get("logprobs"):
        return None
    def entry(token, logprob):
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}
    top = body.get("top_logprobs") or 0
    return [{**entry(t, -0.25 * i), "top_logprobs": [entry(t, -0.25 * i), entry("<alt>", -3.0)][:top]}
            for i, t in enumerate(tokens)]


def last_user_text(messages):
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            if isinstance(content, list):
                return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            return content or ""
    return ""


def prompt_tokens(messages):
    return sum(len(str(m.get("content") or "").split()) for m in messages) or 1


class FakeLLM:
    def __init__(self, port=0):
        self.requests = []  # (method, path, headers dict lower-case, parsed json or None)
        self.peers = []  # the client port of each request, to tell reused connections apart
        self.abandoned = []  # the path of each answer whose reader hung up before its end
        self.lock = threading.Lock()
        handler = self._handler()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self):
        self.thread.start()
        return self

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def calls(self, path):
        with self.lock:
            return [r for r in self.requests if r[1] == path]

    def answer(self, model, messages):
        if model.startswith("tools") and not any(m.get("role") == "tool" for m in messages):
            return None
        if model.startswith("tools"):
            tool_result = next(m for m in reversed(messages) if m.get("role") == "tool")
            return f"The tool said: {tool_result.get('content')}"
        return "Echo: " + last_user_text(messages)

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _quoted_key(self) -> str:
                """The key received, quoted back as some servers and proxies do in their errors ("" without one)."""
                authorization = self.headers.get("Authorization", "")
                return f" (key {authorization[7:]})" if authorization else ""

            def _json_body(self):
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    return json.loads(raw) if raw else None
                except json.JSONDecodeError:
                    return None

            def _record(self, body):
                with fake.lock:
                    fake.requests.append((self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                    fake.peers.append(self.client_address[1])
                # The OpenAI routes are served under Google's base too, as Gemini's
                # OpenAI-compatible endpoint has them (recorded as they were asked for).
                if self.path.startswith(GOOGLE_BASE + "/"):
                    self.path = "/v1" + self.path[len(GOOGLE_BASE):]

            def _send(self, status, obj, content_type="application/json", headers=()):
                data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("content-type", content_type)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _start_chunked(self, content_type):
                if self.head_sent:  # ponder-streaming sent it before pondering
                    return
                self.head_sent = True
                self.send_response(200)
                self.send_header("content-type", content_type)
                self.send_header("transfer-encoding", "chunked")
                self.end_headers()

            def _chunk(self, data: bytes):
                try:
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    with fake.lock:
                        fake.abandoned.append(self.path)  # the gateway hung up mid-stream
                    raise

            def _ponder(self) -> bool:
                """Waits 5 s as a model does before its first byte; False (and recorded in `abandoned`)
                when the caller hangs up meanwhile, which a real server notices (Ollama's handler
                context ends) and stops for."""
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:
                    readable, _, _ = select.select([self.connection], [], [], 0.05)
                    try:
                        gone = readable and self.connection.recv(1, socket.MSG_PEEK) == b""
                    except ConnectionResetError:
                        gone = True
                    if gone:
                        with fake.lock:
                            fake.abandoned.append(self.path)
                        self.close_connection = True
                        return False
                return True

            def _end_chunked(self):
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()

            def do_GET(self):
                self._record(None)
                if self.path == "/api/version":
                    self._send(200, {"version": "0.12.0"})
                elif self.path == "/api/tags":
                    self._send(200, {"models": [
                        {"name": "llama3.2:1b", "model": "llama3.2:1b", "modified_at": "2026-01-02T03:04:05.123456789Z", "size": 1},
                        {"name": "qwen3:0.6b", "model": "qwen3:0.6b", "modified_at": "2026-02-03T04:05:06Z", "size": 2},
                        {"name": "hf.co/org/repo:Q4_K_M", "model": "hf.co/org/repo:Q4_K_M", "modified_at": "2026-02-03T04:05:06Z", "size": 3},
                        {"name": "nomic-embed-text:latest", "model": "nomic-embed-text:latest", "modified_at": "2026-02-03T04:05:06Z", "size": 4}]})
                elif self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [
                        {"id": "smollm2", "object": "model", "created": 1700000000, "owned_by": "llamacpp"}]})
                else:
                    self._send(404, {"error": "not found"})

            def do_POST(self):
                body = self._json_body()
                self._record(body)
                if body is None:
                    return self._send(400, {"error": "invalid JSON"})
                model = body.get("model", "")
                self.head_sent = False
                if self.path == "/api/chat" and any(not isinstance(m.get("content") or "", str) for m in body.get("messages") or []):
                    # Ollama's messages carry text only (images apart): content parts are refused.
                    return self._send(400, {"error": "json: cannot unmarshal array into Go struct field ChatRequest.messages.content of type string"})
                if model == "ponder" and not self._ponder():
                    return
                if model == "ponder-streaming" and body.get("stream", self.path in ("/api/chat", "/api/generate")):
                    self._start_chunked("application/x-ndjson" if self.path.startswith("/api/") else "text/event-stream")
                    if not self._ponder():
                        return
                if model == "hang":
                    time.sleep(30)
                    return
                if model == "missing":
                    return self._send(404, {"error": f'model "{model}" not found, try pulling it first'})
                if model == "broken":
                    return self._send(500, {"error": "llama runner process has terminated"})
                if model == "invalid":
                    # llama-cpp-python's route handler turns every exception, pydantic's too, into a 500.
                    message = ("[{'type': 'less_than_equal', 'loc': ('body', 'top_p'), 'msg': 'Input should be less than "
                               "or equal to 1', 'input': 7, 'ctx': {'le': 1.0}}]")
                    return self._send(500, {"error": {"message": message, "type": "internal_server_error", "param": None, "code": None}})
                if model == "key-as-code":
                    # An upstream's own error code that quotes the key it was sent (contrived, but passed on).
                    key = self.headers.get("Authorization", "")[7:]
                    return self._send(400, {"error": {"message": "bad request", "type": "invalid_request_error", "code": key or None}})
                if model == "denied":
                    return self._send(401, {"error": {"message": "Incorrect API key provided" + self._quoted_key(), "type": "invalid_request_error"}})
                if model == "moved":
                    # As a proxy in front of a server does when it moved, or for http -> https.
                    return self._send(301, b"<html>Moved Permanently</html>", content_type="text/html",
                                      # Back to this server: a redirect followed would show up here as a GET.
                                      headers=[("Location", f"http://{self.headers['Host']}{self.path}")])
                if model == "busy":
                    return self._send(429, {"error": {"message": "Rate limit reached for requests", "type": "requests"}},
                                      headers=[("Retry-After", "7")])
                if model == "no-quota":
                    return self._send(429, {"error": {
                        "message": "You exceeded your current quota, please check your plan and billing details.",
                        "type": "insufficient_quota", "param": None, "code": "insufficient_quota"}})
                if model == "too-long":
                    message = "This model's maximum context length is 8 tokens. However, your messages resulted in 9 tokens."
                    if self.path.startswith("/api/"):
                        return self._send(400, {"error": message})
                    return self._send(400, {"error": {
                        "message": message, "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}})
                if model == "overloaded":
                    return self._send(503, {"error": "server busy, please try again.  maximum pending requests exceeded"})
                if model == "garbage":
                    return self._send(200, b"<html>upstream proxy error</html>")
                if model == "error-200" and not body.get("stream"):
                    calls = sum(1 for r in fake.requests if isinstance(r[3], dict) and r[3].get("model") == model)
                    return self._send(200, {"error": {"message": f"overloaded (call {calls})" + self._quoted_key(), "type": "server_error"}})
                if model == "cut-short" and not body.get("stream"):
                    whole = json.dumps({"id": "chatcmpl-fake", "object": "chat.completion", "created": 1700000000, "model": model,
                                        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Echo: x"},
                                                     "finish_reason": "stop"}]}).encode()
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("connection", "close")
                    self.end_headers()
                    self.wfile.write(whole[:60])
                    self.close_connection = True
                    return
                if model == "drip" and not body.get("stream"):
                    # A whole answer whose head comes at once and whose body comes a byte every
                    # 0.3 s: never silent for long, but 3 s in all.
                    reply = json.dumps({"error": "x" * 8}).encode()
                    self.send_response(200)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(reply)))
                    self.end_headers()
                    with contextlib.suppress(OSError):
                        for byte in reply:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(0.3)
                    return
                if model == "huge" and not body.get("stream"):
                    # A whole answer past the 64 MiB the gateway reads for one answer; it stops reading.
                    try:
                        return self._send(200, {"padding": "x" * (64 * 1024 * 1024 + 1024)})
                    except (BrokenPipeError, ConnectionResetError):
                        return
                if model == "huge" and body.get("stream", self.path == "/api/chat"):
                    # One token, then a line that never ends: past the 64 MiB the gateway holds for one line.
                    ollama = self.path == "/api/chat"
                    self._start_chunked("application/x-ndjson" if ollama else "text/event-stream")
                    first = {"model": model, "message": {"role": "assistant", "content": "Echo:"}, "done": False} if ollama else {
                        "id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000, "model": model,
                        "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Echo:"}, "finish_reason": None}]}
                    try:
                        self._chunk(json.dumps(first).encode() + b"\n" if ollama else b"data: " + json.dumps(first).encode() + b"\n\n")
                        self._chunk(b'{"model": "huge", "message": {"content": "' if ollama else b'data: {"choices": [{"delta": {"content": "')
                        for _ in range(65):
                            self._chunk(b"x" * (1024 * 1024))
                        self._end_chunked()
                    except (BrokenPipeError, ConnectionResetError):
                        pass
                    return
                if model == "silent" and body.get("stream", self.path == "/api/chat"):
                    self._start_chunked("application/x-ndjson" if self.path == "/api/chat" else "text/event-stream")
                    return self._end_chunked()
                if model == "plain-json" and self.path == "/v1/chat/completions":
                    body = {**body, "stream": False}
                if self.path == "/api/chat":
                    return self._ollama_chat(body)
                if self.path in ("/api/generate", "/v1/completions"):
                    return self._text_completion(body)
                if self.path == "/v1/chat/completions":
                    return self._openai_chat(body)
                if self.path == "/api/embed":
                    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
                    if model == "few-vectors":
                        inputs = inputs[:-1]
                    return self._send(200, {"model": model, "embeddings": [[0.1, 0.2, float(len(t))][:body.get("dimensions")] for t in inputs],
                                            "prompt_eval_count": sum(len(t.split()) for t in inputs)})
                if self.path == "/v1/embeddings":
                    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
                    return self._send(200, {"object": "list", "model": model, "data": [
                        {"object": "embedding", "index": i, "embedding": [0.5, float(len(t))]} for i, t in enumerate(inputs)],
                        "usage": {"prompt_tokens": 3, "total_tokens": 3}})
                self._send(404, {"error": "not found"})

            def _tokens(self, body):
                text = fake.answer(body.get("model", ""), body.get("messages", []))
                # As the real servers read it: Ollama only options.num_predict (top-level max_tokens is
                # ignored), OpenAI-compatible ones max_completion_tokens or the older max_tokens.
                if self.path.startswith("/api/"):
                    limit = (body.get("options") or {}).get("num_predict")
                else:
                    limit = body.get("max_completion_tokens") or body.get("max_tokens")
                words = text.split(" ") if text is not None else []
                truncated = limit is not None and len(words) > limit
                if truncated:
                    words = words[:limit]
                return text, [w if i == 0 else " " + w for i, w in enumerate(words)], truncated

            def _text_completion(self, body):
                """Ollama's /api/generate (NDJSON stream by default) or OpenAI's /v1/completions (SSE
                when asked): "Echo: <prompt>", a token per word."""
                ollama = self.path == "/api/generate"
                model, prompt = body["model"], body.get("prompt") or ""
                prompt = " ".join(prompt) if isinstance(prompt, list) else prompt
                words = ("Echo: " + prompt + body.get("suffix", "")).split(" ")
                limit = (body.get("options") or {}).get("num_predict") if ollama else body.get("max_tokens")
                finish = "length" if limit is not None and len(words) > limit else "stop"
                tokens = [w if i == 0 else " " + w for i, w in enumerate(words[:limit] if limit else words)]
                counts = len(prompt.split()) or 1, len(tokens)
                if not body.get("stream", ollama):
                    if ollama:
                        reply = {"model": model, "created_at": "2026-11-23T10:00:00Z", "response": "".join(tokens), "done": True,
                                 "done_reason": finish, "prompt_eval_count": counts[0], "eval_count": counts[1]}
                        if ollama_logprobs(body, tokens):
                            reply["logprobs"] = ollama_logprobs(body, tokens)
                        return self._send(200, reply)
                    return self._send(200, {"id": "cmpl-fake", "object": "text_completion", "created": 1700000000, "model": model,
                                            "choices": [{"text": "".join(tokens), "index": 0, "logprobs": None, "finish_reason": finish}],
                                            "usage": {"prompt_tokens": counts[0], "completion_tokens": counts[1], "total_tokens": sum(counts)}})
                self._start_chunked("application/x-ndjson" if ollama else "text/event-stream")
                base = {"id": "cmpl-fake", "object": "text_completion", "created": 1700000000, "model": model}
                for index, token in enumerate(tokens):
                    if ollama:
                        line = {"model": model, "response": token, "done": False}
                        if ollama_logprobs(body, tokens):
                            line["logprobs"] = ollama_logprobs(body, tokens)[index:index + 1]
                        self._chunk(json.dumps(line).encode() + b"\n")
                    else:
                        chunk = {**base, "choices": [{"text": token, "index": 0, "finish_reason": None}]}
                        if (body.get("stream_options") or {}).get("continuous_usage_stats"):
                            # vLLM's running totals on every chunk (then the usual usage chunk).
                            chunk["usage"] = {"prompt_tokens": counts[0], "completion_tokens": index + 1, "total_tokens": counts[0] + index + 1}
                        self._chunk(b"data: " + json.dumps(chunk).encode() + b"\n\n")
                if ollama:
                    self._chunk(json.dumps({"model": model, "response": "", "done": True, "done_reason": finish,
                                            "prompt_eval_count": counts[0], "eval_count": counts[1]}).encode() + b"\n")
                else:
                    self._chunk(b"data: " + json.dumps({**base, "choices": [{"text": "", "index": 0, "finish_reason": finish}]}).encode() + b"\n\n")
                    if (body.get("stream_options") or {}).get("include_usage"):
                        usage = {"prompt_tokens": counts[0], "completion_tokens": counts[1], "total_tokens": sum(counts)}
                        self._chunk(b"data: " + json.dumps({**base, "choices": [], "usage": usage}).encode() + b"\n\n")
                    self._chunk(b"data: [DONE]\n\n")
                self._end_chunked()

            def _ollama_chat(self, body):
                model = body["model"]
                text, tokens, truncated = self._tokens(body)
                prompt = prompt_tokens(body["messages"])
                done_reason = "length" if truncated else "stop"
                tool_calls = [{"function": {"name": "get_time", "arguments": {"timezone": "UTC"}}}] if text is None else None
                if tool_calls and model == "tools-with-ids":
                    tool_calls[0]["id"] = "call_ollama_7"
                if tool_calls and model == "tools-no-args":
                    tool_calls[0]["function"]["arguments"] = None
                if tool_calls and model == "tools-text-args":
                    tool_calls[0]["function"]["arguments"] = '{"timezone": "UTC"}'
                thinking = ["Let", " me", " think."] if model == "thinker" and body.get("think") is not False else []
                if not body.get("stream", True):
                    if model.startswith("slow"):
                        time.sleep(0.2 * len(tokens))
                    message = {"role": "assistant", "content": "".join(tokens)}
                    if thinking:
                        message["thinking"] = "".join(thinking)
                    if tool_calls:
                        message["tool_calls"] = tool_calls
                    reply = {"model": model, "created_at": "2026-11-23T10:00:00Z", "message": message,
                             "done": True, "done_reason": done_reason, "total_duration": 1000,
                             "prompt_eval_count": prompt, "eval_count": len(tokens)}
                    if ollama_logprobs(body, tokens):
                        reply["logprobs"] = ollama_logprobs(body, tokens)
                    return self._send(200, reply)
                self._start_chunked("application/x-ndjson")
                for thought in thinking:
                    self._chunk(json.dumps({"model": model, "created_at": "2026-11-23T10:00:00Z", "done": False,
                                            "message": {"role": "assistant", "content": "", "thinking": thought}}).encode() + b"\n")
                for index, token in enumerate(tokens):
                    if model.startswith("slow"):
                        time.sleep(0.2)
                    if model == "stall" and index == 2:
                        time.sleep(30)
                        return
                    if model == "crash" and index == 2:
                        self._chunk(json.dumps({"error": "model runner crashed" + self._quoted_key()}).encode() + b"\n")
                        return self._end_chunked()
                    line = {"model": model, "created_at": "2026-11-23T10:00:00Z",
                            "message": {"role": "assistant", "content": token}, "done": False}
                    if ollama_logprobs(body, tokens):
                        line["logprobs"] = ollama_logprobs(body, tokens)[index:index + 1]
                    self._chunk(json.dumps(line).encode() + b"\n")
                if tool_calls:
                    self._chunk(json.dumps({"model": model, "message": {"role": "assistant", "content": "", "tool_calls": tool_calls},
                                            "done": False}).encode() + b"\n")
                final = {"model": model, "created_at": "2026-11-23T10:00:01Z", "message": {"role": "assistant", "content": ""},
                         "done": True, "done_reason": done_reason, "prompt_eval_count": prompt, "eval_count": len(tokens)}
                if model != "truncated":
                    self._chunk(json.dumps(final).encode() + b"\n")
                self._end_chunked()

            def _openai_chat(self, body):
                model = body["model"]
                text, tokens, truncated = self._tokens(body)
                prompt = prompt_tokens(body["messages"])
                finish = "tool_calls" if text is None else ("length" if truncated else "stop")
                usage = {"prompt_tokens": prompt, "completion_tokens": len(tokens), "total_tokens": prompt + len(tokens)}
                tool_calls = [{"id": "call_1", "type": "function",
                               "function": {"name": "get_time", "arguments": '{"timezone": "UTC"}'}}] if text is None else None
                if not body.get("stream"):
                    if model.startswith("slow"):
                        time.sleep(0.2 * len(tokens))
                    message = {"role": "assistant", "content": "".join(tokens) if text is not None else None}
                    if tool_calls:
                        message["tool_calls"] = tool_calls
                    return self._send(200, {"id": "chatcmpl-fake", "object": "chat.completion", "created": 1700000000,
                                            "model": model, "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                                            "usage": usage})
                self._start_chunked("text/event-stream")

                def event(obj):
                    data = b"data: " + json.dumps(obj).encode() + b"\n\n"
                    if model != "split":
                        return self._chunk(data)
                    for start in range(0, len(data), 5):
                        self._chunk(data[start:start + 5])

                base = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1700000000, "model": model}
                if (body.get("stream_options") or {}).get("include_usage"):
                    base["usage"] = None  # as OpenAI's API does: every chunk says it has none, until the last
                event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
                for index, token in enumerate(tokens):
                    if model.startswith("slow"):
                        time.sleep(0.2)
                    if model == "stall" and index == 2:
                        time.sleep(30)
                        return
                    if model == "crash" and index == 2:
                        event({"error": {"message": "model runner crashed" + self._quoted_key(), "type": "server_error"}})
                        return self._end_chunked()
                    event({**base, "choices": [{"index": 0, "delta": {"content": token}, "finish_reason": None}]})
                if tool_calls:
                    event({**base, "choices": [{"index": 0, "delta": {"tool_calls": [{**tool_calls[0], "index": 0}]}, "finish_reason": None}]})
                event({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
                # llama.cpp's server ("no-usage") never sends the usage chunk, even when asked.
                if (body.get("stream_options") or {}).get("include_usage") and model != "no-usage":
                    event({**base, "choices": [], "usage": usage})
                if model != "truncated":
                    self._chunk(b"data: [DONE]\n\n")
                self._end_chunked()

        return Handler


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=11434)
    args = parser.parse_args()
    fake = FakeLLM(args.port)
    print(f"fake LLM on {fake.url}", flush=True)
    fake.server.serve_forever()
