#!/usr/bin/env bash
# Benchmark (not a test): the same tiny upstream measured directly, through nginx proxy_pass and
# through Gatehouse, with wrk at several concurrencies, non-stream and stream. Prints req/s, p50,
# p99 and Gatehouse/nginx ratios measured in this one run, then whether the issue's target
# (>= 0.70 of nginx's req/s at every point, <= 0.15 ms added p50 at c=1) was met, or where not.
# Usage: bench/run.sh [SECONDS]   (per target and point, default 12; needs a release build: make bench does it)
#   BENCH_MODES="json sse" (default) or one of them; NGINX_WORKERS=auto (default) or a number;
#   BENCH_ROUNDS=6 (default): the SECONDS are split into that many alternating rounds;
#   NOISY_SPREAD=1.5 (default): a point whose direct rounds differ by more than this factor is flagged;
#   BENCH_SSE_FRAMING=chunked (default: the stream comes chunked, as every LLM server streams) or
#   length (the stream comes with a Content-Length, as rounds before 2026-12-05 measured it);
#   BENCH_LAYOUT=free (default; the kernel places every process), one-cpu (all on CPU 0) or split
#   (the proxies on CPU 0, wrk and the upstream on CPU 1): fixed layouts take the scheduler's
#   placement out of the comparison, which decides the c=1 figures (docs/PERFORMANCE.md, eighth round).
# Also prints each target's CPU time per request (user+system µs): for the upstream when
# measured directly, for nginx's workers, for Gatehouse.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${1:-12}
GATEHOUSE=${GATEHOUSE_BIN:-.build/release/gatehouse}
UPSTREAM_JSON_PORT=19101
UPSTREAM_SSE_PORT=19102
NGINX_PORT=19103
GATEHOUSE_PORT=19104
LAYOUT=${BENCH_LAYOUT:-free}
SSE_FRAMING=${BENCH_SSE_FRAMING:-chunked}
case $SSE_FRAMING in
    # SSI makes nginx treat the canned body as generated, so it sends it chunked (no length known).
    chunked) SSE_CHUNKED="ssi on; ssi_types text/event-stream;" ;;
    length) SSE_CHUNKED="" ;;
    *) echo "bench: BENCH_SSE_FRAMING must be chunked or length, not '$SSE_FRAMING'"; exit 1 ;;
esac
case $LAYOUT in
    free) PROXY_CPUS="" PEER_CPUS="" ;;
    one-cpu) PROXY_CPUS=0 PEER_CPUS=0 ;;
    split)
        PROXY_CPUS=0 PEER_CPUS=1
        [[ $(nproc) -ge 2 ]] || { echo "bench: BENCH_LAYOUT=split needs two CPUs; this machine has $(nproc)"; exit 1; }
        ;;
    *) echo "bench: BENCH_LAYOUT must be free, one-cpu or split, not '$LAYOUT'"; exit 1 ;;
esac
[[ -x $GATEHOUSE ]] || { echo "bench: $GATEHOUSE missing; run make bench (builds release)"; exit 1; }
command -v nginx >/dev/null && command -v wrk >/dev/null || scripts/install-deps.sh bench

# The canned answers ($COMPLETION, $SSE) and the work directory, shared with bench/ab.sh.
source bench/canned.sh
bench_workspace gatehouse-bench

# Pins every thread of the given processes to the CPUs in $1 (nothing in the free layout).
pin() {
    local cpus=$1 pid
    shift
    [[ -n $cpus ]] || return 0
    for pid in "$@"; do taskset -a -p -c "$cpus" "$pid" >/dev/null; done
}

# The stream is chunked by default, as llama.cpp's, vLLM's, Ollama's and OpenAI's streams are
# (their length is not known until the model stops): with a Content-Length, nginx passed the
# length on and sent no chunk framing, while Gatehouse frames every stream in chunks (it must be
# able to end one with an error event), so the two proxies did not send the same bytes.
# The canned upstreams run in their own nginx process, so both proxies pay the same hop to
# another process (an earlier version served them from the proxy's own worker, which spared
# nginx every cross-process wake-up that Gatehouse paid). Both proxies run as shipped: nginx
# with Debian's defaults (one worker per core, access log on), Gatehouse with one event loop
# per core and its access log on; both logs go to files on the same disk.
canned_upstream_conf "$WORK/upstream.conf" "
    server {
        listen 127.0.0.1:$UPSTREAM_JSON_PORT;
        location / { default_type application/json; return 200 '$COMPLETION'; }
    }
    server {
        listen 127.0.0.1:$UPSTREAM_SSE_PORT;
        location / { default_type text/event-stream; $SSE_CHUNKED return 200 '$SSE'; }
    }"
cat >"$WORK/nginx.conf" <<NGINX
worker_processes ${NGINX_WORKERS:-auto};
pid $WORK/nginx.pid;
error_log $WORK/nginx-error.log warn;
events { worker_connections 4096; }
http {
    access_log $WORK/nginx-access.log;
    client_body_temp_path $WORK;
    proxy_temp_path $WORK;
    keepalive_requests 1000000;
    upstream json_upstream { server 127.0.0.1:$UPSTREAM_JSON_PORT; keepalive 128; }
    upstream sse_upstream { server 127.0.0.1:$UPSTREAM_SSE_PORT; keepalive 128; }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location /json/ { proxy_pass http://json_upstream/; proxy_http_version 1.1; proxy_set_header Connection ""; }
        location /sse/ { proxy_pass http://sse_upstream/; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering off; }
    }
}
NGINX
nginx -c "$WORK/upstream.conf"
nginx -c "$WORK/nginx.conf"
: >"$WORK/empty.yaml"

cat >"$WORK/post.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = os.getenv("BENCH_BODY")
done = function(summary, latency, requests)
    io.write(string.format("RESULT %.1f %.3f %.3f %d %d\n", summary.requests / (summary.duration / 1e6),
        latency:percentile(50) / 1000, latency:percentile(99) / 1000, summary.errors.status + summary.errors.connect
        + summary.errors.read + summary.errors.write + summary.errors.timeout, summary.requests))
end
LUA

start_gatehouse() {  # $1 = upstream port
    [[ ${#pids[@]} -gt 0 ]] && { kill "${pids[-1]}"; wait "${pids[-1]}" 2>/dev/null || true; }
    GATEHOUSE_BACKEND=openai OLLAMA_HOST="http://127.0.0.1:$1" RATE_LIMIT_RPS=0 GATEHOUSE_CACHE_ENABLED=false \
        "$GATEHOUSE" serve --port "$GATEHOUSE_PORT" --plugins-dir "$WORK" --config "$WORK/empty.yaml" >>"$WORK/gatehouse.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 1 100); do
        if curl -sf "http://127.0.0.1:$GATEHOUSE_PORT/health" >/dev/null; then
            pin "$PROXY_CPUS" "${pids[-1]}"
            return
        fi
        sleep 0.1
    done
    echo "bench: gatehouse did not start"; cat "$WORK/gatehouse.log"; exit 1
}

# CPU time (user and system clock ticks) used so far by every thread of the given processes.
cpu_ticks() {
    local user=0 system=0 task fields
    for pid in "$@"; do
        for task in /proc/"$pid"/task/*/stat; do
            read -r -a fields <"$task" 2>/dev/null || continue
            user=$((user + fields[13])) system=$((system + fields[14]))
        done
    done
    echo "$user $system"
}

# $1 = url, $2 = connections, $3 = seconds, $4... = pids whose CPU is measured
#   -> "requests seconds p50 p99 errors user_ticks system_ticks"
run() {
    local url=$1 conc=$2 seconds=$3 threads=$(( $2 < 2 ? 1 : 2 ))
    shift 3
    local before after result
    before=$(cpu_ticks "$@")
    result=$(${PEER_CPUS:+taskset -c "$PEER_CPUS"} wrk -t "$threads" -c "$conc" -d "${seconds}s" --latency -s "$WORK/post.lua" "$url" | awk '/^RESULT/ {print $2, $3, $4, $5, $6}')
    after=$(cpu_ticks "$@")
    awk -v r="$result" -v b="$before" -v a="$after" 'BEGIN {
        split(r, f, " "); split(b, x, " "); split(a, y, " ")
        printf "%d %.6f %s %s %d %d %d\n", f[5], (f[1] > 0 ? f[5] / f[1] : 0), f[2], f[3], f[4], y[1] - x[1], y[2] - x[2] }'
}

# How the answer to a benchmark request at $1 is framed: chunked, length, or close.
framing() {
    curl -s -D - -o /dev/null -X POST -H "Content-Type: application/json" -d "$BENCH_BODY" "$1" | tr -d '\r' | awk '
        tolower($1) == "transfer-encoding:" && tolower($2) == "chunked" { print "chunked"; found = 1; exit }
        tolower($1) == "content-length:" { print "length"; found = 1; exit }
        END { if (!found) print "close" }'
}

# Folds one target's rounds (lines from run) into
#   "req/s p50 p99 errors cpu_user_us_per_request cpu_system_us_per_request min_round_req/s max_round_req/s":
# req/s and CPU over all rounds together, p50 and p99 the median round's.
summarize() {
    sort -n -k3 | awk -v hz="$(getconf CLK_TCK)" '
        { n++; req += $1; sec += $2; p50[n] = $3; p99[n] = $4; err += $5; u += $6; s += $7
          rate = $2 > 0 ? $1 / $2 : 0; if (n == 1 || rate < lo) lo = rate; if (rate > hi) hi = rate }
        END { m = int((n + 1) / 2); r = req > 0 ? req : 1
              printf "%.1f %.3f %.3f %d %.1f %.1f %.1f %.1f\n", (sec > 0 ? req / sec : 0), p50[m], p99[m], err,
                  u * 1e6 / hz / r, s * 1e6 / hz / r, lo, hi }'
}

# The proxy's own processes, whose CPU per request is reported: nginx's workers, Gatehouse.
nginx_workers=$(pgrep -P "$(cat "$WORK/nginx.pid")" | tr '\n' ' ')
upstream_workers=$(pgrep -P "$(cat "$WORK/upstream.pid")" | tr '\n' ' ')
# shellcheck disable=SC2086 # the pid lists are words
pin "$PROXY_CPUS" $nginx_workers
# shellcheck disable=SC2086
pin "$PEER_CPUS" $upstream_workers

# Each point is measured in ROUNDS rounds of direct, nginx and Gatehouse (the proxies taking turns
# to go first), each run DURATION/ROUNDS seconds: on a shared machine whose speed drifts from one
# second to the next, the targets then see the same stretches of time, instead of one coming
# always last; the printed spread of the rounds' ratios shows how much the machine moved.
ROUNDS=${BENCH_ROUNDS:-6}
ROUND_SECONDS=$(( DURATION / ROUNDS > 0 ? DURATION / ROUNDS : 1 ))

printf "Gatehouse benchmark: %s, %s cores, %s rounds of %s s per target and point, %s; nginx %s workers; layout %s; sse framing %s\n" \
    "$(date -u +%Y-%m-%dT%H:%MZ)" "$(nproc)" "$ROUNDS" "$ROUND_SECONDS" "$(uname -m)" "$(wc -w <<<"$nginx_workers")" "$LAYOUT" "$SSE_FRAMING"
printf "%-7s %-4s %-10s %10s %9s %9s %7s %16s %19s\n" mode conc target "req/s" "p50 ms" "p99 ms" errors "cpu µs/req u+s" "rounds req/s"
for mode in ${BENCH_MODES:-json sse}; do
    if [[ $mode == json ]]; then
        upstream=$UPSTREAM_JSON_PORT
        export BENCH_BODY='{"model":"bench","messages":[{"role":"user","content":"Hello"}]}'
    else
        upstream=$UPSTREAM_SSE_PORT
        export BENCH_BODY='{"model":"bench","messages":[{"role":"user","content":"Hello"}],"stream":true}'
    fi
    start_gatehouse "$upstream"
    # How each target frames its answer, so a difference in what they send is seen, not assumed.
    printf "%-7s framing: direct %s, nginx %s, gatehouse %s\n" "$mode" "$(framing "http://127.0.0.1:$upstream/v1/chat/completions")" \
        "$(framing "http://127.0.0.1:$NGINX_PORT/$mode/v1/chat/completions")" "$(framing "http://127.0.0.1:$GATEHOUSE_PORT/v1/chat/completions")"
    # Each target must give a real answer before it is timed: a fast refusal (a 429, a 502)
    # measured as throughput would make any ratio meaningless.
    for url in "http://127.0.0.1:$upstream" "http://127.0.0.1:$NGINX_PORT/$mode" "http://127.0.0.1:$GATEHOUSE_PORT"; do
        answer=$(curl -s -X POST -H "Content-Type: application/json" -d "$BENCH_BODY" "$url/v1/chat/completions")
        expected=$([[ $mode == json ]] && echo '"choices"' || echo 'data: [DONE]')
        if [[ $answer != *"$expected"* ]]; then
            echo "bench: $url/v1/chat/completions did not answer a $mode chat completion: ${answer:0:200}" >&2
            exit 1
        fi
    done
    for conc in 1 16 64; do
        : >"$WORK/direct.rounds"; : >"$WORK/nginx.rounds"; : >"$WORK/gatehouse.rounds"
        for round in $(seq 1 "$ROUNDS"); do
            # shellcheck disable=SC2086 # the pid lists are words
            run "http://127.0.0.1:$upstream/v1/chat/completions" "$conc" "$ROUND_SECONDS" $upstream_workers >>"$WORK/direct.rounds"
            # The two proxies take turns going first.
            for target in $( ((round % 2)) && echo nginx gatehouse || echo gatehouse nginx); do
                if [[ $target == nginx ]]; then
                    # shellcheck disable=SC2086
                    run "http://127.0.0.1:$NGINX_PORT/$mode/v1/chat/completions" "$conc" "$ROUND_SECONDS" $nginx_workers >>"$WORK/nginx.rounds"
                else
                    run "http://127.0.0.1:$GATEHOUSE_PORT/v1/chat/completions" "$conc" "$ROUND_SECONDS" "${pids[-1]}" >>"$WORK/gatehouse.rounds"
                fi
            done
        done
        read -r d_rps d_p50 d_p99 d_err d_u d_s d_lo d_hi < <(summarize <"$WORK/direct.rounds")
        read -r n_rps n_p50 n_p99 n_err n_u n_s n_lo n_hi < <(summarize <"$WORK/nginx.rounds")
        read -r g_rps g_p50 g_p99 g_err g_u g_s g_lo g_hi < <(summarize <"$WORK/gatehouse.rounds")
        printf "%-7s %-4s %-10s %10s %9s %9s %7s %16s %19s\n" "$mode" "$conc" direct "$d_rps" "$d_p50" "$d_p99" "$d_err" "$d_u+$d_s" "$d_lo-$d_hi"
        printf "%-7s %-4s %-10s %10s %9s %9s %7s %16s %19s\n" "$mode" "$conc" nginx "$n_rps" "$n_p50" "$n_p99" "$n_err" "$n_u+$n_s" "$n_lo-$n_hi"
        printf "%-7s %-4s %-10s %10s %9s %9s %7s %16s %19s\n" "$mode" "$conc" gatehouse "$g_rps" "$g_p50" "$g_p99" "$g_err" "$g_u+$g_s" "$g_lo-$g_hi"
        # Each round's ratio too, nginx and Gatehouse of the same round: the spread shows the noise.
        spread=$(paste -d' ' "$WORK/nginx.rounds" "$WORK/gatehouse.rounds" | awk '
            { rn = $2 > 0 ? $1 / $2 : 0; rg = $9 > 0 ? $8 / $9 : 0; q = rn > 0 ? rg / rn : 0
              if (NR == 1 || q < lo) lo = q; if (q > hi) hi = q }
            END { printf "%.2f-%.2f", lo, hi }')
        # The upstream alone should run at one speed in every round; when its rounds differ by
        # more than NOISY_SPREAD times, the machine's speed moved during the point: say so.
        awk -v g="$g_rps" -v n="$n_rps" -v gp="$g_p50" -v np="$n_p50" -v d="$d_p50" -v m="$mode" -v c="$conc" -v sp="$spread" \
            -v lo="$d_lo" -v hi="$d_hi" -v limit="${NOISY_SPREAD:-1.5}" 'BEGIN {
            printf "%-7s %-4s ratio      gatehouse/nginx req/s = %.3f (rounds %s); added p50 vs direct: nginx %.3f ms, gatehouse %.3f ms",
                m, c, g / n, sp, np - d, gp - d
            if (lo > 0 && hi / lo > limit) printf "; NOISY: the direct rounds spread %.1fx", hi / lo
            printf "\n" }'
        echo "$mode $conc $g_rps $n_rps $g_p50 $d_p50 $g_err $n_err" >>"$WORK/points"
    done
done
# The issue's target, point by point: Gatehouse at least 70% of nginx's req/s everywhere, and
# at most 0.15 ms added to the upstream's p50 at c=1; a point where either proxy had errors
# (wrk's non-2xx answers and socket errors) does not count as met.
awk -v target="target (>= 0.70 of nginx req/s at every point, <= 0.15 ms added p50 at c=1, no errors):" '
     { ratio = $4 > 0 ? $3 / $4 : 0; added = $5 - $6
       if ($7 > 0 || $8 > 0) missed = missed sprintf(" %s c=%s errors gatehouse %d nginx %d;", $1, $2, $7, $8)
       if (ratio < 0.70) missed = missed sprintf(" %s c=%s req/s %.3f;", $1, $2, ratio)
       if ($2 == 1 && added > 0.15) missed = missed sprintf(" %s c=1 added p50 %.3f ms;", $1, added) }
     END { print target, (missed == "" ? "met at every point" : "MISSED at" missed) }' "$WORK/points"
