#!/usr/bin/env bash
# Benchmark (not a test) of the router path, the one every Ollama request takes (NDJSON and
# /api/chat translated to OpenAI's shapes, through Hummingbird and AsyncHTTPClient), against the
# chat pass-through that bench/run.sh measures, on the same canned answer: req/s, p50 and p99 at
# c = 1, 16 and 64, whole and streamed, and the ratio router/pass-through measured in this run.
# Usage: bench/router.sh [SECONDS]   (per target and point, default 12, split into BENCH_ROUNDS=4
#   alternating rounds; needs a release build: GATEHOUSE_BIN=... or make bench's .build/release)
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${1:-12}
ROUNDS=${BENCH_ROUNDS:-4}
ROUND_SECONDS=$(( DURATION / ROUNDS > 0 ? DURATION / ROUNDS : 1 ))
GATEHOUSE=${GATEHOUSE_BIN:-.build/release/gatehouse}
[[ -x $GATEHOUSE ]] || { echo "bench: $GATEHOUSE missing; build release first (make bench does)"; exit 1; }
command -v nginx >/dev/null && command -v wrk >/dev/null || scripts/install-deps.sh bench

# bench/run.sh's answer ($COMPLETION, $SSE) and the same answer as Ollama sends it
# ($OLLAMA_REPLY, $NDJSON).
source bench/canned.sh
bench_workspace gatehouse-router-bench
# Streams come chunked, as both servers send them (SSI makes nginx treat the body as generated).
canned_upstream_conf "$WORK/upstream.conf" "
    server { listen 127.0.0.1:19301; location / { default_type application/json; return 200 '$OLLAMA_REPLY'; } }
    server { listen 127.0.0.1:19302; location / { default_type application/x-ndjson; ssi on; ssi_types application/x-ndjson; return 200 '$NDJSON'; } }
    server { listen 127.0.0.1:19303; location / { default_type application/json; return 200 '$COMPLETION'; } }
    server { listen 127.0.0.1:19304; location / { default_type text/event-stream; ssi on; ssi_types text/event-stream; return 200 '$SSE'; } }"
nginx -c "$WORK/upstream.conf"
: >"$WORK/empty.yaml"

# One Gatehouse per upstream: $1 its port, $2 the backend, $3 the upstream's port.
start_gatehouse() {
    GATEHOUSE_BACKEND=$2 OLLAMA_HOST="http://127.0.0.1:$3" RATE_LIMIT_RPS=0 GATEHOUSE_CACHE_ENABLED=false LOG_FILE="$WORK/access-$1.log" \
        "$GATEHOUSE" serve --port "$1" --plugins-dir "$WORK" --config "$WORK/empty.yaml" >>"$WORK/gatehouse.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 1 100); do
        curl -sf "http://127.0.0.1:$1/health" >/dev/null && return
        sleep 0.1
    done
    echo "bench: gatehouse did not start"; cat "$WORK/gatehouse.log"; exit 1
}
start_gatehouse 19311 ollama 19301
start_gatehouse 19312 ollama 19302
start_gatehouse 19313 openai 19303
start_gatehouse 19314 openai 19304

cat >"$WORK/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = os.getenv("BENCH_BODY")
done = function(summary, latency, requests)
    io.write(string.format("RESULT %d %.6f %.3f %.3f %d\n", summary.requests, summary.duration / 1e6,
        latency:percentile(50) / 1000, latency:percentile(99) / 1000, summary.errors.status + summary.errors.connect
        + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
LUA

# $1 = port, $2 = connections -> "requests seconds p50 p99 errors"
run() {
    wrk -t $(( $2 < 2 ? 1 : 2 )) -c "$2" -d "${ROUND_SECONDS}s" --latency -s "$WORK/post.lua" "http://127.0.0.1:$1/v1/chat/completions" \
        | awk '/^RESULT/ {print $2, $3, $4, $5, $6}'
}

# Rounds of one target folded into "req/s p50 p99 errors" (p50 and p99 of the median round).
summarize() {
    sort -n -k3 | awk '{ n++; req += $1; sec += $2; p50[n] = $3; p99[n] = $4; err += $5 }
        END { m = int((n + 1) / 2); printf "%.1f %.3f %.3f %d\n", (sec > 0 ? req / sec : 0), p50[m], p99[m], err }'
}

printf "Gatehouse router benchmark: %s, %s cores, %s rounds of %s s per target and point\n" \
    "$(date -u +%Y-%m-%dT%H:%MZ)" "$(nproc)" "$ROUNDS" "$ROUND_SECONDS"
printf "%-6s %-4s %-12s %10s %9s %9s %7s\n" mode conc target "req/s" "p50 ms" "p99 ms" errors
for stream in false true; do
    mode=$([[ $stream == true ]] && echo stream || echo json)
    router_port=$([[ $stream == true ]] && echo 19312 || echo 19311)
    pass_port=$([[ $stream == true ]] && echo 19314 || echo 19313)
    export BENCH_BODY="{\"model\":\"bench\",\"stream\":$stream,\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}]}"
    for conc in 1 16 64; do
        : >"$WORK/router" && : >"$WORK/pass"
        for round in $(seq 1 "$ROUNDS"); do
            # The two take turns to go first.
            if (( round % 2 )); then run "$router_port" "$conc" >>"$WORK/router"; run "$pass_port" "$conc" >>"$WORK/pass"
            else run "$pass_port" "$conc" >>"$WORK/pass"; run "$router_port" "$conc" >>"$WORK/router"; fi
        done
        read -r router_rate router_p50 router_p99 router_errors < <(summarize <"$WORK/router")
        read -r pass_rate pass_p50 pass_p99 pass_errors < <(summarize <"$WORK/pass")
        printf "%-6s %-4s %-12s %10s %9s %9s %7s\n" "$mode" "$conc" router "$router_rate" "$router_p50" "$router_p99" "$router_errors"
        printf "%-6s %-4s %-12s %10s %9s %9s %7s\n" "$mode" "$conc" pass-through "$pass_rate" "$pass_p50" "$pass_p99" "$pass_errors"
        awk -v a="$router_rate" -v b="$pass_rate" -v m="$mode" -v c="$conc" 'BEGIN { printf "%-6s %-4s router/pass-through req/s: %.3f\n", m, c, (b > 0 ? a / b : 0) }'
    done
done
