#!/usr/bin/env bash
# Load test: Switchyard against the same mock backends reached directly, through nginx, and
# through a bare Pingora pass-through, in one run. Loopback only, bounded in time, every
# process it starts is stopped on exit.
#
#   benches/load.sh                      # defaults: 8 s per run, 32 connections, ~1 KiB bodies
#   DURATION=4 benches/load.sh           # shorter
#   TARGETS="direct switchyard" benches/load.sh
#
# Each target is measured twice per mode: saturated (wrk, as many requests as it can take;
# on a 2-CPU machine that is CPU-bound, so its latencies are mostly queueing) and at a fixed
# rate well below that (h2load --rps, RATE requests/s over RATE_CONNS connections for
# RATE_SECONDS), where latency is the proxy's own cost. "p99 added" is reported for both.
# The fixed rate defaults to one connection, one request every 2 ms: h2load paces its
# connections in step, so with many of them requests arrive in bursts that queue.
#
# Knobs (environment): DURATION (s, 8), WARMUP (s, 1), CONNS (32), WRK_THREADS (2),
# RATE (requests/s, 500), RATE_CONNS (1), RATE_SECONDS (5),
# PROXY_THREADS (2), BODY_BYTES (1024), CHUNKS (8, SSE chunks per streamed answer),
# TARGETS ("direct switchyard nginx bare bare-policy"; add "switchyard-quiet" for Switchyard
# with its per-request access log turned off, like nginx's; bare-policy is the bare
# pass-through plus only Switchyard's body read, metadata extraction and round_robin
# decision, `switchyard bare --config`), REPEATS (1: with more, the saturated runs of every
# target are repeated, the order of the targets reversed on every other round, and each
# row reports the median of its rounds, with every round's ratios listed; the fixed-rate
# runs are made in the first round only), SY_LOG (RUST_LOG for the Switchyard
# row, default "info" = as shipped), PROFILE (the cargo profile built and run: "dist", as
# the Docker image ships it, whole-program LTO; "release" for what the tests run),
# NO_BUILD (1 = skip `cargo build` and use the binary already in target/$PROFILE),
# PIN (1 = the proxy under test alone on CPU 0, the mocks, wrk and h2load on the other
# CPUs, as a gateway on cores of its own would run; PROXY_THREADS then defaults to 1.
# Needs 2 CPUs or more. The default, 0, lets everything share every CPU).
#
# Needs wrk, h2load and nginx (installed with apt-get when missing), curl, ss, awk.
# Exits non-zero if Switchyard answered anything but 2xx or wrk saw socket errors on it.

set -euo pipefail

DURATION=${DURATION:-8}
WARMUP=${WARMUP:-1}
CONNS=${CONNS:-32}
WRK_THREADS=${WRK_THREADS:-2}
PIN=${PIN:-0}
if [[ $PIN == 1 ]]; then PROXY_THREADS=${PROXY_THREADS:-1}; else PROXY_THREADS=${PROXY_THREADS:-2}; fi
BODY_BYTES=${BODY_BYTES:-1024}
CHUNKS=${CHUNKS:-8}
RATE=${RATE:-500}
RATE_CONNS=${RATE_CONNS:-1}
RATE_SECONDS=${RATE_SECONDS:-5}
TARGETS=${TARGETS:-"direct switchyard nginx bare bare-policy"}
REPEATS=${REPEATS:-1}
SY_LOG=${SY_LOG:-info}
MOCKS=3

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PROFILE=${PROFILE:-dist}
BIN="$ROOT/target/$PROFILE/switchyard"
TMP=$(mktemp -d /tmp/switchyard-load.XXXXXX)

# --- processes --------------------------------------------------------------------------

# With PIN=1: the command prefix for the proxy under test (CPU 0) and for the rest.
PROXY_PIN=() REST_PIN=()
if [[ $PIN == 1 ]]; then
    (($(nproc) >= 2)) || { echo "load.sh: PIN=1 needs 2 CPUs or more" >&2; exit 1; }
    PROXY_PIN=(taskset -c 0)
    REST_PIN=(taskset -c "1-$(($(nproc) - 1))")
fi

# pid -> signal that stops it promptly (Pingora treats SIGTERM as a graceful shutdown that
# waits for its grace period; SIGINT is its fast shutdown).
declare -A STOP_SIGNAL=()

start() { # start NAME SIGNAL CMD...: run CMD in the background, log to $TMP/NAME.log
    local name=$1 sig=$2
    shift 2
    "$@" >"$TMP/$name.log" 2>&1 &
    STOP_SIGNAL[$!]=$sig
    LAST_PID=$!
}

stop() { # stop PID: signal it, wait up to 3 s, then SIGKILL
    local pid=$1 i
    [[ -n ${STOP_SIGNAL[$pid]:-} ]] || return 0
    kill "-${STOP_SIGNAL[$pid]}" "$pid" 2>/dev/null || true
    for ((i = 0; i < 30; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset "STOP_SIGNAL[$pid]"
}

cleanup() {
    local pid
    for pid in "${!STOP_SIGNAL[@]}"; do
        stop "$pid"
    done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

die() {
    echo "load.sh: $*" >&2
    exit 1
}

# --- set-up -----------------------------------------------------------------------------

need_pkg() { # need_pkg COMMAND PACKAGE: install PACKAGE unless COMMAND exists
    command -v "$1" >/dev/null 2>&1 && return 0
    "$ROOT/tests/apt-install.sh" "$2" || die "could not install $2 (for $1)"
    command -v "$1" >/dev/null 2>&1 || die "$1 is still missing after installing $2"
}

declare -A TAKEN=()
free_port() { # set PORT to a TCP port no socket uses (listening or connected) and not handed out yet
    local port i
    for ((i = 0; i < 200; i++)); do
        port=$((20000 + RANDOM % 30000))
        [[ -n ${TAKEN[$port]:-} ]] && continue
        if ! ss -Htan "sport = :$port" | grep -q .; then
            TAKEN[$port]=1
            PORT=$port
            return 0
        fi
    done
    die "no free port found"
}

wait_ready() { # wait_ready URL NAME: until URL answers (any HTTP status), at most 10 s
    local i
    for ((i = 0; i < 100; i++)); do
        if curl -s -o /dev/null --max-time 1 "$1"; then return 0; fi
        sleep 0.1
    done
    die "$2 did not come up on $1; its log:
$(tail -n 20 "$TMP/$2.log" 2>/dev/null)"
}

# --- request bodies and the wrk script --------------------------------------------------

# ~BODY_BYTES of JSON: one user message of English-like filler.
filler() {
    local text="hello, please summarise the following notes about load balancing for inference servers. "
    while ((${#text} < $1)); do text+="$text"; done
    printf '%s' "${text:0:$1}"
}
CONTENT=$(filler $((BODY_BYTES > 80 ? BODY_BYTES - 80 : 16)))
PLAIN_BODY="{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"$CONTENT\"}]}"
STREAM_BODY="{\"model\":\"m\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"$CONTENT\"}]}"

write_wrk_script() { # write_wrk_script FILE BODY
    # done() prints one machine-readable line; latencies are in microseconds.
    cat >"$1" <<EOF
wrk.method = "POST"
wrk.path = "/v1/chat/completions"
wrk.headers["Content-Type"] = "application/json"
wrk.body = [[$2]]
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d %d %d %d\n",
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.status, e.connect, e.read, e.write, e.timeout))
end
EOF
}

# --- measurement ------------------------------------------------------------------------

active_opens() { # TCP connect() calls made by this host so far
    awk '$1 == "Tcp:" { if (!h) { for (i = 1; i <= NF; i++) if ($i == "ActiveOpens") c = i; h = 1 } else print $c }' /proc/net/snmp
}

cpu_ticks() { # user+system CPU ticks (1/100 s) used so far by the processes under test
    local total=0 pid t
    for pid in $UNDER_TEST; do
        t=$(awk '{ print $14 + $15 }' "/proc/$pid/stat" 2>/dev/null) || t=0
        total=$((total + t))
    done
    echo "$total"
}

upstream_filter() { # ss filter: connections to any mock port
    local f="" p
    for p in "${MOCK_PORTS[@]}"; do f+="${f:+ or }dport = :$p"; done
    printf '( %s )' "$f"
}

# Results, keyed "target/mode".
declare -A RPS=() P50=() P99=() NON2XX=() SOCKERR=() UPEST=() UPNEW=() CPU=()
# The fixed-rate runs: requests answered, their p50 and p99 (ms), and failures.
declare -A R_DONE=() R_P50=() R_P99=() R_FAIL=()
# Saturated req/s and CPU per request of every round, keyed "target/mode#round".
declare -A ROUND_RPS=() ROUND_CPU=()
ROUND=1
# Pids of the process under test (the proxy, or mock 0 for the direct row), for CPU/request.
UNDER_TEST=""
ROWS=()

measure() { # measure TARGET MODE PORT
    local target=$1 mode=$2 port=$3 url script out opens_before opens_after sampler
    local cpu_before cpu_after line reqs dur_us p50_us p99_us e_status e_conn e_read e_write e_timeout
    url="http://127.0.0.1:$port"
    script="$TMP/$mode.lua"
    [[ $WARMUP -gt 0 ]] && "${REST_PIN[@]}" wrk -t"$WRK_THREADS" -c"$CONNS" -d"${WARMUP}s" -s "$script" "$url" >/dev/null 2>&1

    # Upstream connections held open mid-run (ss), sampled in the background.
    (sleep "$(awk -v d="$DURATION" 'BEGIN { print d / 2 }')"
        ss -Htn state established "$(upstream_filter)" | wc -l >"$TMP/upest") &
    sampler=$!
    opens_before=$(active_opens)
    cpu_before=$(cpu_ticks)
    out=$("${REST_PIN[@]}" wrk -t"$WRK_THREADS" -c"$CONNS" -d"${DURATION}s" --latency -s "$script" "$url" 2>&1) ||
        die "wrk failed against $target ($mode):
$out"
    opens_after=$(active_opens)
    cpu_after=$(cpu_ticks)
    wait "$sampler" || true
    printf '%s\n' "$out" >"$TMP/wrk-$target-$mode.txt"

    line=$(grep '^RESULT ' <<<"$out") || die "no RESULT line from wrk against $target ($mode):
$out"
    read -r _ reqs dur_us p50_us p99_us e_status e_conn e_read e_write e_timeout <<<"$line"
    local key="$target/$mode"
    RPS[$key]=$(awk -v r="$reqs" -v d="$dur_us" 'BEGIN { printf "%.0f", r / (d / 1e6) }')
    P50[$key]=$(awk -v v="$p50_us" 'BEGIN { printf "%.2f", v / 1000 }')
    P99[$key]=$(awk -v v="$p99_us" 'BEGIN { printf "%.2f", v / 1000 }')
    # Failures add up over the rounds.
    NON2XX[$key]=$((${NON2XX[$key]:-0} + e_status))
    SOCKERR[$key]=$((${SOCKERR[$key]:-0} + e_conn + e_read + e_write + e_timeout))
    UPEST[$key]=$(cat "$TMP/upest" 2>/dev/null || echo "?")
    # wrk itself opens CONNS connections; the rest were opened by the proxy to the mocks.
    UPNEW[$key]=$((opens_after - opens_before - CONNS))
    CPU[$key]=$(awk -v t=$((cpu_after - cpu_before)) -v r="$reqs" 'BEGIN { printf "%.0f", r ? t * 1e4 / r : 0 }')
    ROUND_RPS["$key#$ROUND"]=${RPS[$key]}
    ROUND_CPU["$key#$ROUND"]=${CPU[$key]}
    if ((ROUND == 1)); then
        ROWS+=("$key")
        measure_at_rate "$key" "$url" "$mode"
    fi
}

measure_at_rate() { # measure_at_rate KEY URL MODE: latency at RATE requests/s (h2load --rps)
    local key=$1 url=$2 mode=$3 log="$TMP/rate-${1/\//-}.tsv" per_conn stats
    per_conn=$(awk -v r="$RATE" -v c="$RATE_CONNS" 'BEGIN { v = r / c; printf "%d", v < 1 ? 1 : v }')
    rm -f "$log"
    "${REST_PIN[@]}" h2load --h1 -c "$RATE_CONNS" --rps "$per_conn" -D "$RATE_SECONDS" -d "$TMP/$mode.json" \
        -H 'content-type: application/json' --log-file "$log" "$url/v1/chat/completions" \
        >"$TMP/h2load-${1/\//-}.txt" 2>&1 || die "h2load failed against $key:
$(tail -n 5 "$TMP/h2load-${1/\//-}.txt")"
    # Columns: start (µs since the epoch), status, µs to the end of the response.
    stats=$(awk -F'\t' '$2 >= 200 && $2 < 300 { print $3 } $2 < 200 || $2 >= 300 { bad++ }
        END { print "BAD", bad + 0 }' "$log" | sort -n | awk '
        $1 == "BAD" { bad = $2; next } { v[++n] = $1 }
        END {
            if (!n) { print 0, 0, 0, bad; exit }
            i50 = int(n * 0.50); if (i50 < 1) i50 = 1
            i99 = int(n * 0.99); if (i99 < 1) i99 = 1
            printf "%d %.2f %.2f %d\n", n, v[i50] / 1000, v[i99] / 1000, bad
        }')
    read -r R_DONE[$key] R_P50[$key] R_P99[$key] R_FAIL[$key] <<<"$stats"
}

check_target() { # check_target NAME PORT: one plain and one streamed request must succeed
    local name=$1 port=$2 body
    body=$(curl -sS --max-time 5 -f -H 'content-type: application/json' \
        -d "$PLAIN_BODY" "http://127.0.0.1:$port/v1/chat/completions") ||
        die "$name: a plain request failed; log:
$(tail -n 20 "$TMP/$name.log" 2>/dev/null)"
    grep -q '"chat.completion"' <<<"$body" || die "$name: unexpected plain answer: $body"
    body=$(curl -sS -N --max-time 5 -f -H 'content-type: application/json' \
        -d "$STREAM_BODY" "http://127.0.0.1:$port/v1/chat/completions") ||
        die "$name: a streamed request failed"
    grep -q '^data: \[DONE\]' <<<"$body" || die "$name: the stream did not end with [DONE]: $body"
}

run_target() { # run_target NAME PORT PID: both modes, then stop PID (if any)
    local name=$1 port=$2 pid=${3:-}
    # The process under test, with its children (nginx's workers).
    local main=${pid:-${MOCK_PIDS[0]}}
    UNDER_TEST="$main $(ps -o pid= --ppid "$main" | xargs || true)"
    check_target "$name" "$port"
    measure "$name" plain "$port"
    measure "$name" stream "$port"
    [[ -n $pid ]] && stop "$pid"
    return 0
}

# --- main -------------------------------------------------------------------------------

need_pkg wrk wrk
need_pkg h2load nghttp2-client
if [[ $PIN == 1 ]]; then need_pkg taskset util-linux; fi
for t in $TARGETS; do
    case $t in
    direct | switchyard | switchyard-quiet | bare | bare-policy) ;;
    nginx) need_pkg nginx nginx-light ;;
    *) die "unknown target \`$t\` (direct switchyard switchyard-quiet nginx bare bare-policy)" ;;
    esac
done

if [[ ${NO_BUILD:-0} == 1 ]]; then
    [[ -x $BIN ]] || die "NO_BUILD=1 but $BIN does not exist"
    echo "using the existing $BIN (NO_BUILD=1)" >&2
else
    echo "building the binary (profile $PROFILE)..." >&2
    (cd "$ROOT" && cargo build --profile "$PROFILE" --quiet --bin switchyard) ||
        die "cargo build --profile $PROFILE failed"
fi

write_wrk_script "$TMP/plain.lua" "$PLAIN_BODY"
write_wrk_script "$TMP/stream.lua" "$STREAM_BODY"
printf '%s' "$PLAIN_BODY" >"$TMP/plain.json"
printf '%s' "$STREAM_BODY" >"$TMP/stream.json"

LOADAVG_AT_START=$(cut -d' ' -f1-3 /proc/loadavg)
MOCK_PORTS=()
MOCK_PIDS=()
for ((i = 0; i < MOCKS; i++)); do
    free_port
    MOCK_PORTS+=("$PORT")
    start "mock$i" TERM "${REST_PIN[@]}" "$BIN" mock --port "${MOCK_PORTS[$i]}" --name "m$i" --chunks "$CHUNKS"
    MOCK_PIDS+=("$LAST_PID")
done
for ((i = 0; i < MOCKS; i++)); do
    wait_ready "http://127.0.0.1:${MOCK_PORTS[$i]}/health" "mock$i"
done

start_switchyard() { # start_switchyard NAME RUST_LOG: prints "PORT PID"
    local name=$1 level=$2 port cfg p
    free_port
    port=$PORT
    # The config gets a directory of its own: Switchyard watches the config's directory for
    # reloads, and its own log written next to it would wake the watcher on every request.
    mkdir -p "$TMP/conf-$name"
    cfg="$TMP/conf-$name/switchyard.yaml"
    write_config "$cfg" "$port"
    RUST_LOG=$level start "$name" INT "${PROXY_PIN[@]}" "$BIN" run --config "$cfg"
    wait_ready "http://127.0.0.1:$port/health" "$name"
    SY_PORT=$port
}

write_config() { # write_config FILE PORT: round_robin over the mocks, listening on PORT
    local p
    {
        printf 'listen:\n  - addr: "127.0.0.1:%s"\n' "$2"
        printf 'policies_dir: "%s/policies"\n' "$ROOT"
        printf 'routes:\n  - policy: round_robin\n'
        printf 'backends:\n'
        for ((p = 0; p < MOCKS; p++)); do
            printf '  - { name: m%s, url: "http://127.0.0.1:%s", models: [m] }\n' "$p" "${MOCK_PORTS[$p]}"
        done
        printf 'proxy: { threads: %s, grace_period_seconds: 0 }\n' "$PROXY_THREADS"
    } >"$1"
}

echo "running: targets [$TARGETS], ${DURATION}s per run after ${WARMUP}s warm-up, $REPEATS round(s)..." >&2
for ((ROUND = 1; ROUND <= REPEATS; ROUND++)); do
    order=$TARGETS
    if ((ROUND % 2 == 0)); then order=$(tr ' ' '\n' <<<"$TARGETS" | tac | xargs); fi
    for t in $order; do
        case $t in
        direct)
            # wrk spreads its connections over the mocks itself: one third each would need three
            # wrk processes, so the direct row drives mock 0 only. Every mock is the same binary;
            # this is the upper bound a proxy over them can approach.
            run_target direct "${MOCK_PORTS[0]}"
            ;;
        switchyard)
            start_switchyard switchyard "$SY_LOG"
            run_target switchyard "$SY_PORT" "$LAST_PID"
            ;;
        switchyard-quiet)
            start_switchyard switchyard-quiet "warn,switchyard::access=off"
            run_target switchyard-quiet "$SY_PORT" "$LAST_PID"
            ;;
        nginx)
            free_port
            port=$PORT
            mkdir -p "$TMP/nginx"
            upstreams=""
            for p in "${MOCK_PORTS[@]}"; do upstreams+="        server 127.0.0.1:$p;"$'\n'; done
            awk -v prefix="$TMP/nginx" -v listen="127.0.0.1:$port" -v workers="$PROXY_THREADS" \
                -v ups="${upstreams%$'\n'}" '
                { gsub(/@PREFIX@/, prefix); gsub(/@LISTEN@/, listen); gsub(/@WORKERS@/, workers) }
                /@UPSTREAMS@/ { print ups; next }
                { print }' "$ROOT/benches/nginx.conf.tmpl" >"$TMP/nginx/nginx.conf"
            nginx -t -q -c "$TMP/nginx/nginx.conf" -p "$TMP/nginx" >"$TMP/nginx.log" 2>&1 ||
                die "nginx rejects the generated config: $(cat "$TMP/nginx.log")"
            start nginx TERM "${PROXY_PIN[@]}" nginx -c "$TMP/nginx/nginx.conf" -p "$TMP/nginx"
            pid=$LAST_PID
            wait_ready "http://127.0.0.1:$port/health" nginx
            run_target nginx "$port" "$pid"
            ;;
        bare)
            free_port
            port=$PORT
            ups=()
            for p in "${MOCK_PORTS[@]}"; do ups+=(--upstream "127.0.0.1:$p"); done
            start bare INT "${PROXY_PIN[@]}" "$BIN" bare --listen "127.0.0.1:$port" "${ups[@]}" --threads "$PROXY_THREADS"
            pid=$LAST_PID
            wait_ready "http://127.0.0.1:$port/health" bare
            run_target bare "$port" "$pid"
            ;;
        bare-policy)
            free_port
            port=$PORT
            mkdir -p "$TMP/conf-bare-policy"
            write_config "$TMP/conf-bare-policy/switchyard.yaml" "$port"
            start bare-policy INT "${PROXY_PIN[@]}" "$BIN" bare --listen "127.0.0.1:$port" \
                --config "$TMP/conf-bare-policy/switchyard.yaml" --threads "$PROXY_THREADS"
            pid=$LAST_PID
            wait_ready "http://127.0.0.1:$port/health" bare-policy
            run_target bare-policy "$port" "$pid"
            ;;
        esac
    done
done

median() { # median VALUES...: the middle value (the mean of the two middle ones)
    printf '%s\n' "$@" | sort -n | awk '{ v[NR] = $1 } END { if (NR % 2) print v[(NR + 1) / 2]; else printf "%.0f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
if ((REPEATS > 1)); then
    for key in "${ROWS[@]}"; do
        rps=() cpu=()
        for ((ROUND = 1; ROUND <= REPEATS; ROUND++)); do
            rps+=("${ROUND_RPS[$key#$ROUND]}")
            cpu+=("${ROUND_CPU[$key#$ROUND]}")
        done
        RPS[$key]=$(median "${rps[@]}")
        CPU[$key]=$(median "${cpu[@]}")
    done
fi

# --- report -----------------------------------------------------------------------------

echo
echo "Switchyard load test — $(date -u +%Y-%m-%dT%H:%M:%SZ), $(nproc) CPU(s): $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
if [[ $PIN == 1 ]]; then
    echo "PIN=1: the proxy under test alone on CPU 0; wrk, h2load and the $MOCKS mocks on CPUs 1-$(($(nproc) - 1))."
    echo "      The direct row is mock 0 on those CPUs. Compare CPU per request between proxies."
else
    echo "NOTE: wrk, the proxy under test and the $MOCKS mocks all share these $(nproc) CPUs, so every"
    echo "      number is CPU-bound and relative; compare rows, not absolute values."
fi
echo "wrk -t$WRK_THREADS -c$CONNS -d${DURATION}s (+${WARMUP}s warm-up), POST /v1/chat/completions, ${#PLAIN_BODY}-byte body;"
echo "stream = \"stream\": true, $CHUNKS SSE chunks per answer; proxies run $PROXY_THREADS worker threads/processes;"
echo "switchyard: policy round_robin, RUST_LOG=$SY_LOG (per-request access log to a file); nginx: access_log off."
echo "direct = wrk against mock 0 alone. up_conns = established proxy->mock connections mid-run (ss);"
echo "up_connects = TCP connects during the run beyond wrk's own $CONNS (new upstream connections);"
echo "cpu_us/req = CPU time of the process under test (proxy incl. workers; mock 0 for direct) per request."
echo "Load average before the run: $LOADAVG_AT_START (anything well above 0 means other work shares the CPUs)."
echo
fmt="%-17s %-7s %9s %8s %8s %7s %8s %9s %12s %11s\n"
# shellcheck disable=SC2059 # the format is ours
printf "$fmt" target mode req/s p50_ms p99_ms non2xx sockerr up_conns up_connects cpu_us/req
for key in "${ROWS[@]}"; do
    # shellcheck disable=SC2059
    printf "$fmt" "${key%/*}" "${key#*/}" "${RPS[$key]}" "${P50[$key]}" "${P99[$key]}" \
        "${NON2XX[$key]}" "${SOCKERR[$key]}" "${UPEST[$key]}" "${UPNEW[$key]}" "${CPU[$key]}"
done

ratio() { # ratio A B: A/B of two req/s, or "-" when either is missing
    if [[ -n ${RPS[$1]:-} && -n ${RPS[$2]:-} && ${RPS[$2]} != 0 ]]; then
        awk -v a="${RPS[$1]}" -v b="${RPS[$2]}" 'BEGIN { printf "%.2f", a / b }'
    else
        echo "-"
    fi
}
added() { # added A B: p99 of A minus p99 of B, in ms
    if [[ -n ${P99[$1]:-} && -n ${P99[$2]:-} ]]; then
        awk -v a="${P99[$1]}" -v b="${P99[$2]}" 'BEGIN { printf "%+.2f", a - b }'
    else
        echo "-"
    fi
}

echo
printf "%-7s %18s %19s %17s %22s\n" mode "switchyard/nginx" "switchyard/direct" "switchyard/bare" "p99 added vs direct"
for mode in plain stream; do
    printf "%-7s %18s %19s %17s %19s ms\n" "$mode" \
        "$(ratio "switchyard/$mode" "nginx/$mode")" \
        "$(ratio "switchyard/$mode" "direct/$mode")" \
        "$(ratio "switchyard/$mode" "bare/$mode")" \
        "$(added "switchyard/$mode" "direct/$mode")"
done
if ((REPEATS > 1)); then
    echo "With $REPEATS rounds, req/s and cpu_us/req above are medians (p50/p99 are the last round's)."
    echo "Each round's ratios of req/s:"
    for pair in switchyard/bare bare-policy/bare; do
        [[ -n ${ROUND_RPS[${pair%/*}/plain#1]:-} && -n ${ROUND_RPS[${pair#*/}/plain#1]:-} ]] || continue
        for mode in plain stream; do
            line=""
            for ((ROUND = 1; ROUND <= REPEATS; ROUND++)); do
                line+=" $(awk -v a="${ROUND_RPS[${pair%/*}/$mode#$ROUND]}" -v b="${ROUND_RPS[${pair#*/}/$mode#$ROUND]}" 'BEGIN { printf "%.2f", a / b }')"
            done
            printf "  %-17s %-7s%s\n" "$pair" "$mode" "$line"
        done
    done
fi
if [[ -n ${RPS[bare-policy/plain]:-} ]]; then
    echo "The three parts the throughput target names (body read, metadata, Lua policy) alone,"
    echo "bare-policy/bare: plain $(ratio bare-policy/plain bare/plain), stream $(ratio bare-policy/stream bare/stream) (target >= 0.90)"
fi

rate_added() { # rate_added A B: fixed-rate p99 of A minus that of B, in ms
    if [[ -n ${R_P99[$1]:-} && -n ${R_P99[$2]:-} ]]; then
        awk -v a="${R_P99[$1]}" -v b="${R_P99[$2]}" 'BEGIN { printf "%+.2f", a - b }'
    else
        echo "-"
    fi
}

echo
echo "At a fixed $RATE requests/s (h2load --rps over $RATE_CONNS connection(s), ${RATE_SECONDS}s; not CPU-bound):"
rfmt="%-17s %-7s %9s %8s %8s %7s %14s\n"
# shellcheck disable=SC2059
printf "$rfmt" target mode answered p50_ms p99_ms failed "p99 added"
for key in "${ROWS[@]}"; do
    # shellcheck disable=SC2059
    printf "$rfmt" "${key%/*}" "${key#*/}" "${R_DONE[$key]}" "${R_P50[$key]}" "${R_P99[$key]}" \
        "${R_FAIL[$key]}" "$(rate_added "$key" "direct/${key#*/}") ms"
done

failed=0
for key in "${ROWS[@]}"; do
    bad=$((NON2XX[$key] + SOCKERR[$key] + ${R_FAIL[$key]:-0}))
    if ((bad > 0)); then
        echo "WARNING: $key: ${NON2XX[$key]} non-2xx responses, ${SOCKERR[$key]} socket errors (wrk output: see below)" >&2
        grep -E 'Socket errors|Non-2xx' "$TMP/wrk-${key%/*}-${key#*/}.txt" >&2 || true
        [[ $key == switchyard* ]] && failed=1
    fi
done
if ((failed)); then
    echo "FAIL: Switchyard answered errors under load; the last lines of its log:" >&2
    tail -n 20 "$TMP/switchyard.log" >&2 || true
    exit 1
fi
