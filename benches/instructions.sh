#!/usr/bin/env bash
# Instructions per request and per policy decision, counted by callgrind: repeatable to
# ~1% even on a busy machine, where wall-clock benchmarks are not. Loopback only, bounded
# in count and time, every process it starts is stopped on exit.
#
#   benches/instructions.sh                # proxy (plain and stream) and decisions
#   PARTS=proxy benches/instructions.sh    # or PARTS=decide
#   REQUESTS=1000 benches/instructions.sh
#   KEEP=/tmp/cg benches/instructions.sh   # keep the callgrind files there (callgrind_annotate)
#   CG_OPTS=--dump-instr=yes KEEP=/tmp/cg benches/instructions.sh  # more callgrind options
#   PROFILE=release benches/instructions.sh  # the proxy part's cargo profile (default dist,
#                                            # as the Docker image ships it)
#
# proxy: Switchyard (round_robin, access log on, as shipped), the bare Pingora
# pass-through (`switchyard bare`) of the same binary, and that pass-through with only the
# three parts the throughput target names (`switchyard bare --config`: Switchyard's body
# read, metadata extraction and round_robin decision), each under callgrind in front of
# three native mocks; h2load sends WARMUP requests, the counters are zeroed, then REQUESTS
# requests (8 connections, ~1 KiB chat body) are counted over every thread of the proxy.
# Instructions are user-space only: system calls (the same for both, see
# benches/load.sh for CPU time) are not in them.
# decide: benches/policy.rs's decisions under callgrind, counting only inside
# `policy::decide` during criterion's timed loop.
#
# Needs valgrind and h2load (nghttp2-client), installed with apt-get when missing.

set -euo pipefail

PARTS=${PARTS:-"proxy decide"}
REQUESTS=${REQUESTS:-2000}
WARMUP=${WARMUP:-400}
PROFILE=${PROFILE:-dist}
MOCKS=3

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TMP=$(mktemp -d /tmp/switchyard-instr.XXXXXX)
PIDS=()

cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -INT "$pid" 2>/dev/null || true; done
    sleep 0.5
    for pid in "${PIDS[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    if [[ -n ${KEEP:-} ]]; then mkdir -p "$KEEP" && cp "$TMP"/cg-* "$KEEP"/ 2>/dev/null; fi
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

die() {
    echo "instructions.sh: $*" >&2
    exit 1
}

need_pkg() { # need_pkg COMMAND PACKAGE: install PACKAGE unless COMMAND exists
    command -v "$1" >/dev/null 2>&1 && return 0
    "$ROOT/tests/apt-install.sh" "$2" || die "could not install $2 (for $1)"
    command -v "$1" >/dev/null 2>&1 || die "$1 is still missing after installing $2"
}

need_pkg valgrind valgrind
need_pkg callgrind_control valgrind

port() { # a TCP port no socket uses, listening or connected
    local p i
    for ((i = 0; i < 200; i++)); do
        p=$((20000 + RANDOM % 30000))
        ss -Htan "sport = :$p" | grep -q . || { echo "$p"; return 0; }
    done
    die "no free port found"
}

wait_ready() { # wait_ready URL: until it answers, at most 120 s (callgrind starts slowly)
    local i
    for ((i = 0; i < 600; i++)); do
        curl -s -o /dev/null --max-time 2 "$1" && return 0
        sleep 0.2
    done
    die "$1 did not come up"
}

# Instructions in a callgrind dump (the part after the counters were zeroed).
dump_total() {
    local f total=0 t
    for f in "$1".*; do
        t=$(awk '/^(summary|totals):/ { print $2; exit }' "$f")
        total=$((total + ${t:-0}))
    done
    echo "$total"
}

proxy_part() {
    need_pkg h2load nghttp2-client
    local bin="$TMP/switchyard" mode target i p pp vp out body
    (cd "$ROOT" && cargo build --profile "$PROFILE" --quiet --bin switchyard) || die "cargo build failed"
    cp "$ROOT/target/$PROFILE/switchyard" "$bin"
    local ports=()
    for ((i = 0; i < MOCKS; i++)); do
        p=$(port)
        ports+=("$p")
        "$bin" mock --port "$p" --name "m$i" --chunks 8 >"$TMP/mock$i.log" 2>&1 &
        disown
        PIDS+=($!)
    done
    for p in "${ports[@]}"; do wait_ready "http://127.0.0.1:$p/health"; done
    local content
    content=$(printf 'hello, please summarise the following notes about load balancing for inference servers. %.0s' {1..12} | head -c 944)
    echo
    printf "%-11s %-7s %12s\n" target mode instr/request
    declare -A PER=()
    for mode in plain stream; do
        if [[ $mode == stream ]]; then body="{\"model\":\"m\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"$content\"}]}"; else
            body="{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"$content\"}]}"; fi
        printf '%s' "$body" >"$TMP/body.json"
        for target in switchyard bare-policy bare; do
            pp=$(port)
            out="$TMP/cg-$target-$mode"
            if [[ $target != bare ]]; then
                mkdir -p "$TMP/conf"
                {
                    printf 'listen:\n  - addr: "127.0.0.1:%s"\n' "$pp"
                    printf 'policies_dir: "%s/policies"\nroutes:\n  - policy: round_robin\nbackends:\n' "$ROOT"
                    for ((i = 0; i < MOCKS; i++)); do
                        printf '  - { name: m%s, url: "http://127.0.0.1:%s", models: [m] }\n' "$i" "${ports[$i]}"
                    done
                    printf 'proxy: { threads: 2, grace_period_seconds: 0 }\n'
                } >"$TMP/conf/sy.yaml"
            fi
            if [[ $target == switchyard ]]; then
                RUST_LOG=info valgrind --tool=callgrind ${CG_OPTS:-} --callgrind-out-file="$out" \
                    "$bin" run --config "$TMP/conf/sy.yaml" >"$TMP/$target.log" 2>&1 &
            elif [[ $target == bare-policy ]]; then
                valgrind --tool=callgrind ${CG_OPTS:-} --callgrind-out-file="$out" \
                    "$bin" bare --listen "127.0.0.1:$pp" --config "$TMP/conf/sy.yaml" --threads 2 >"$TMP/$target.log" 2>&1 &
            else
                local ups=()
                for p in "${ports[@]}"; do ups+=(--upstream "127.0.0.1:$p"); done
                valgrind --tool=callgrind ${CG_OPTS:-} --callgrind-out-file="$out" \
                    "$bin" bare --listen "127.0.0.1:$pp" "${ups[@]}" --threads 2 >"$TMP/$target.log" 2>&1 &
            fi
            vp=$!
            PIDS+=("$vp")
            wait_ready "http://127.0.0.1:$pp/health"
            local h2=(h2load --h1 -c 8 -m 1 -d "$TMP/body.json" -H content-type:application/json
                "http://127.0.0.1:$pp/v1/chat/completions")
            timeout 600 "${h2[@]}" -n "$WARMUP" >/dev/null 2>&1 || die "warm-up failed against $target"
            callgrind_control -z "$vp" >/dev/null 2>&1
            timeout 600 "${h2[@]}" -n "$REQUESTS" >"$TMP/h2-$target-$mode.txt" 2>&1 || die "h2load failed against $target"
            grep -q " $REQUESTS succeeded" "$TMP/h2-$target-$mode.txt" || die "$target ($mode): not every request succeeded"
            callgrind_control -d "$vp" >/dev/null 2>&1
            sleep 1
            kill -INT "$vp" 2>/dev/null || true
            wait "$vp" 2>/dev/null || true
            PER[$target/$mode]=$(($(dump_total "$out") / REQUESTS))
            printf "%-11s %-7s %12s\n" "$target" "$mode" "${PER[$target/$mode]}"
        done
    done
    for mode in plain stream; do
        for target in switchyard bare-policy; do
            awk -v s="${PER[$target/$mode]}" -v b="${PER[bare/$mode]}" -v m="$mode" -v t="$target" \
                'BEGIN { printf "%-7s %s/bare %.2f (+%d instructions per request)\n", m, t, s / b, s - b }'
        done
    done
}

decide_part() {
    local exe out f iter calls
    exe=$(cd "$ROOT" && cargo bench --bench policy --no-run 2>&1 | sed -n 's/.*Executable .* (\(.*\))$/\1/p' | tail -1)
    [[ -n $exe ]] || die "could not build benches/policy.rs"
    exe="$ROOT/$exe"
    echo
    printf "%-32s %12s\n" decision instr/decision
    for f in round_robin/32 least_inflight/32 round_robin/3 least_inflight/3; do
        out="$TMP/cg-decide"
        rm -f "$out"
        (cd "$ROOT" && timeout 900 valgrind --tool=callgrind --compress-strings=no --callgrind-out-file="$out" \
            --toggle-collect='switchyard::policy::decide' "$exe" --bench --profile-time 2 "decide/$f" \
            >/dev/null 2>"$TMP/decide.err") || die "callgrind of decide/$f failed: $(tail -3 "$TMP/decide.err")"
        # Instructions inside the timed loop, over the calls made in it (each benchmark's
        # set-up makes one call per benchmark outside the loop).
        iter=$(callgrind_annotate --inclusive=yes "$out" 2>/dev/null |
            awk '!found && /criterion::bencher::Bencher<M>::iter \[/ { gsub(",", "", $1); print $1; found = 1 }')
        calls=$(grep -A1 '^cfn=switchyard::policy::vm::PolicyVm::route$' "$out" |
            awk -F'[= ]' '/^calls=/ { s += $2 } END { print s }')
        awk -v i="$iter" -v c="$calls" -v f="$f" 'BEGIN { printf "%-32s %12.0f\n", "decide/" f, i / (c - 4) }'
    done
}

for part in $PARTS; do
    case $part in
    proxy) proxy_part ;;
    decide) decide_part ;;
    *) die "unknown part \`$part\` (proxy decide)" ;;
    esac
done
