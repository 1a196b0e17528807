#!/usr/bin/env bash
# Compares two bulwark binaries on the cached-hit path, side by side in one run: each
# server pinned to one core with wrk on the other, rounds alternating between them,
# medians and ratios printed (requests/s, p99, server CPU per request). For checking a
# change against the build before it.
#
#   benches/compare-builds.sh OLD_BINARY [NEW_BINARY]   # NEW: this tree's release build
#   ROUNDS=5 DURATION=10s benches/compare-builds.sh /tmp/bulwark-old
#
# The same binary can be compared with itself under two configs: OLD_ROUTE_KEYS and
# NEW_ROUTE_KEYS (TOML lines) are added to each side's route, OLD_SERVER_KEYS and
# NEW_SERVER_KEYS to its [server] table, say
#   NEW_ROUTE_KEYS='admission = { per_client = "20/s" }' \
#   NEW_SERVER_KEYS='trusted_proxies = ["10.0.0.0/8"]' benches/compare-builds.sh B B
#
# Requests look like a browser's (query in another order, Accept-Encoding,
# Accept-Language, cookies), so key building and request preparation are measured too.
set -euo pipefail

OLD=${1:?usage: compare-builds.sh OLD_BINARY [NEW_BINARY]}
NEW=${2:-}
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-8s}
CONNECTIONS=${CONNECTIONS:-64}
SERVER_CPU=${SERVER_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
HERE=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=benches/common.sh
source "$HERE/benches/common.sh"
WORK=$(mktemp -d /tmp/bulwark-ab.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

need_wrk
if [ -z "$NEW" ]; then
    (cd "$HERE" && cargo build --release --quiet)
    NEW="$HERE/target/release/bulwark"
fi

wait_http() { for _ in $(seq 100); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done; echo "no answer from $1" >&2; return 1; }

ORIGIN_PORT=$(free_port)
write_hit_origin "$WORK/origin.py"
python3 "$WORK/origin.py" "$ORIGIN_PORT" & PIDS+=($!)

declare -A PORT PID
for name in old new; do
    PORT[$name]=$(free_port)
    admin=$(free_port)
    write_hit_config "$WORK/$name.toml" "${PORT[$name]}" "$admin" "$ORIGIN_PORT"
    add_side_keys "$WORK/$name.toml" "$name"
    binary=$OLD; [ "$name" = new ] && binary=$NEW
    taskset -c "$SERVER_CPU" "$binary" serve --config "$WORK/$name.toml" 2>"$WORK/$name.log" & PID[$name]=$!; PIDS+=(${PID[$name]})
done
TARGET="/products/123?size=m&color=red"
HEADERS=(-H "Accept-Encoding: gzip, deflate, br, zstd" -H "Accept-Language: en-GB,en;q=0.9" -H "Cookie: session=abc; cart=7"
    -H "User-Agent: Mozilla/5.0 (X11; Linux x86_64) bench" -H "Accept: text/html,application/xhtml+xml;q=0.9,*/*;q=0.8")
for name in old new; do
    wait_http "http://127.0.0.1:${PORT[$name]}$TARGET"
done

TICK=$(getconf CLK_TCK)
for round in $(seq "$ROUNDS"); do
    for name in old new; do
        before=$(cpu_ticks "${PID[$name]}")
        out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency "${HEADERS[@]}" "http://127.0.0.1:${PORT[$name]}$TARGET")
        after=$(cpu_ticks "${PID[$name]}")
        rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
        total=$(awk '/requests in/ {print $1}' <<<"$out")
        p99=$(awk '$1 == "99%" {print $2}' <<<"$out" | to_ms)
        cpu=$(awk -v t=$((after - before)) -v n="$total" -v hz="$TICK" 'BEGIN {printf "%.2f", t / hz / n * 1e6}')
        echo "$rps" >> "$WORK/$name.rps"; echo "$p99" >> "$WORK/$name.p99"; echo "$cpu" >> "$WORK/$name.cpu"
        echo "round $round $name: $rps req/s, p99 $p99 ms, $cpu us CPU/request" >&2
    done
done
printf '%-8s %12s %10s %14s\n' build "requests/s" "p99 ms" "CPU us/req"
for name in old new; do
    printf '%-8s %12s %10s %14s\n' "$name" "$(median < "$WORK/$name.rps")" "$(median < "$WORK/$name.p99")" "$(median < "$WORK/$name.cpu")"
done
for metric in rps p99 cpu; do
    o=$(median < "$WORK/old.$metric"); n=$(median < "$WORK/new.$metric")
    # The spread: new/old of each round (the builds ran back to back in it).
    spread=$(paste "$WORK/old.$metric" "$WORK/new.$metric" | awk '{print $2 / $1}' | sort -g | awk '{a[NR]=$1} END {printf "%.3f..%.3f", a[1], a[NR]}')
    awk -v o="$o" -v n="$n" -v m="$metric" -v s="$spread" 'BEGIN {printf "ratio new/old %-4s %.3f (per round %s)\n", m, n / o, s}'
done
