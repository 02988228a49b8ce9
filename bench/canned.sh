# The benchmark's canned upstream (sourced by bench/run.sh and bench/ab.sh): its answers, a small
# chat completion and the same answer as an SSE stream (a chunk per word, a final chunk, then
# [DONE]), and the nginx that serves them.
# shellcheck shell=bash
COMPLETION='{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"bench","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":9,"total_tokens":18}}'
SSE=""
for word in Hello! How can I help you today?; do
    SSE+="data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"bench\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\"$word \"},\"finish_reason\":null}]}\n\n"
done
SSE+="data: {\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\"model\":\"bench\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n"
SSE+="data: [DONE]\n\n"

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
