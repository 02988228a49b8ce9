# The benchmarks' canned upstream and work directory (sourced by bench/run.sh, bench/ab.sh and
# bench/router.sh): one small answer as OpenAI sends it (a chat completion, and an SSE stream of
# a chunk per word, a final chunk, then [DONE]) and as Ollama sends it (a /api/chat reply, and
# an NDJSON stream of a line per word and a last line with the counts); the nginx that serves
# them; and the temporary directory, cleaned up with the processes in it on exit.
# shellcheck shell=bash
COMPLETION='{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":9,"total_tokens":18}}'
OLLAMA_REPLY='{"model":"bench","created_at":"2026-12-07T10:00:00Z","message":{"role":"assistant","content":"Hello! How can I help you today?"},"done":true,"done_reason":"stop","prompt_eval_count":9,"eval_count":9}'
SSE="" NDJSON=""
for word in Hello! How can I help you today?; do
    SSE+="data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"bench\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"$word \"},\"finish_reason\":null}]}\n\n"
    NDJSON+="{\"model\":\"bench\",\"created_at\":\"2026-12-07T10:00:00Z\",\"message\":{\"role\":\"assistant\",\"content\":\"$word \"},\"done\":false}\n"
done
SSE+="data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"bench\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n"
SSE+="data: [DONE]\n\n"
NDJSON+='{"model":"bench","created_at":"2026-12-07T10:00:01Z","message":{"role":"assistant","content":""},"done":true,"done_reason":"stop","prompt_eval_count":9,"eval_count":9}\n'

# Makes the run's work directory, $WORK (its name starting with $1), and arranges that on exit
# the processes in $pids and those whose pid files are in $WORK (the nginx instances) are
# stopped and $WORK removed.
bench_workspace() {
    WORK=$(mktemp -d "/tmp/$1-XXXXXX")
    pids=()
    trap bench_cleanup EXIT
}

bench_cleanup() {
    local pid pidfile
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pidfile in "$WORK"/*.pid; do
        [[ -f $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
    done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}

# Writes to $1 the config of the nginx serving canned answers: one worker, its pid and logs in
# $WORK, and the `server` blocks given in $2.
canned_upstream_conf() {
    cat >"$1" <<NGINX
worker_processes 1;
pid $WORK/upstream.pid;
error_log $WORK/upstream-error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK;
    keepalive_requests 1000000;
$2
}
NGINX
}
