#!/usr/bin/env bash
# A/B of two Gatehouse builds (not a test): both served side by side in front of the same canned
# upstream, measured in alternating wrk rounds, so machine drift hits both alike. Prints each
# round's req/s and B/A over all rounds and as the median of the rounds' pairs.
# Usage: bench/ab.sh A_BINARY B_BINARY
#   BENCH_MODE=json (default) or sse; BENCH_CONC=16 (connections); BENCH_ROUNDS=8; BENCH_SECONDS=3 (per round).
# The binary started second has read a few % lower whichever it was (docs/PERFORMANCE.md, tenth
# and fourteenth rounds): run it again with the two swapped before believing a small difference.
set -euo pipefail
cd "$(dirname "$0")/.."

[[ $# -eq 2 && -x $1 && -x $2 ]] || { echo "usage: bench/ab.sh A_BINARY B_BINARY (two executable gatehouse builds)"; exit 1; }
A=$1 B=$2
MODE=${BENCH_MODE:-json} CONC=${BENCH_CONC:-16} ROUNDS=${BENCH_ROUNDS:-8} SECONDS_PER_ROUND=${BENCH_SECONDS:-3}
THREADS=$((CONC < 2 ? 1 : 2))  # wrk needs a connection per thread
case $MODE in json | sse) ;; *) echo "bench: BENCH_MODE must be json or sse, not '$MODE'"; exit 1 ;; esac
command -v nginx >/dev/null && command -v wrk >/dev/null || scripts/install-deps.sh bench

UPSTREAM_PORT=19401 A_PORT=19411 B_PORT=19412
source bench/canned.sh
bench_workspace gatehouse-ab
if [[ $MODE == sse ]]; then
    CANNED=$SSE TYPE=text/event-stream CHUNKED="ssi on; ssi_types text/event-stream;"
    BODY='{"model":"bench","messages":[{"role":"user","content":"Hello"}],"stream":true}'
else
    CANNED=$COMPLETION TYPE=application/json CHUNKED=""
    BODY='{"model":"bench","messages":[{"role":"user","content":"Hello"}]}'
fi
canned_upstream_conf "$WORK/upstream.conf" "
    server { listen 127.0.0.1:$UPSTREAM_PORT; location / { default_type $TYPE; $CHUNKED return 200 '$CANNED'; } }"
nginx -c "$WORK/upstream.conf"
: >"$WORK/empty.yaml"
printf 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nwrk.body = %s\n' "'$BODY'" >"$WORK/post.lua"

for side in A B; do
    port=${side}_PORT binary=${!side}
    GATEHOUSE_BACKEND=openai OLLAMA_HOST="http://127.0.0.1:$UPSTREAM_PORT" RATE_LIMIT_RPS=0 GATEHOUSE_CACHE_ENABLED=false \
        "$binary" serve --port "${!port}" --plugins-dir "$WORK" --config "$WORK/empty.yaml" >>"$WORK/$side.log" 2>&1 &
    pids+=($!)
done
for port in $A_PORT $B_PORT; do
    for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 0.1; done
    curl -sf "http://127.0.0.1:$port/health" >/dev/null || { echo "bench: a gatehouse did not start"; cat "$WORK"/*.log; exit 1; }
    wrk -t"$THREADS" -c"$CONC" -d1s -s "$WORK/post.lua" "http://127.0.0.1:$port/v1/chat/completions" >/dev/null  # warm-up
done

rate() { wrk -t"$THREADS" -c"$CONC" -d"${SECONDS_PER_ROUND}s" -s "$WORK/post.lua" "http://127.0.0.1:$1/v1/chat/completions" | awk '/^Requests\/sec/ {print $2}'; }
a_rates=() b_rates=()
for round in $(seq 1 "$ROUNDS"); do
    # Each round alternates which side goes first.
    if ((round % 2)); then a_rates+=("$(rate $A_PORT)") b_rates+=("$(rate $B_PORT)"); else b_rates+=("$(rate $B_PORT)") a_rates+=("$(rate $A_PORT)"); fi
done
echo "A/B, $MODE at c=$CONC, $ROUNDS rounds of $SECONDS_PER_ROUND s: A=$A B=$B"
awk -v a="${a_rates[*]}" -v b="${b_rates[*]}" 'BEGIN {
    n = split(a, x, " "); split(b, y, " ")
    for (i = 1; i <= n; i++) { sa += x[i]; sb += y[i]; r[i] = y[i] / x[i]; la = la sprintf(" %.0f", x[i]); lb = lb sprintf(" %.0f", y[i]) }
    for (i = 1; i <= n; i++) for (j = i + 1; j <= n; j++) if (r[j] < r[i]) { t = r[i]; r[i] = r[j]; r[j] = t }
    median = n % 2 ? r[(n + 1) / 2] : (r[n / 2] + r[n / 2 + 1]) / 2
    printf "A req/s:%s\nB req/s:%s\nB/A = %.3f over all rounds; %.3f the median of the rounds\x27 pairs\n", la, lb, sb / sa, median }'
