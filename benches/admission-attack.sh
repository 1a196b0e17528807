#!/usr/bin/env bash
# A cache-buster against a buyer, with and without admission (benches/attack.rs is the
# client and the origin). One attacker at RATE requests/s asks /products/1?x=<random>
# with a random address on the left of its X-Forwarded-For; a buyer reads 200 hot
# pages (public for 2 s, so some of its requests miss). The origin takes DELAY_MS per
# request, CAPACITY at a time. One bulwark (server pinned to one core), its pool on a
# private redis-server. Scenarios, one after another, each RUN seconds:
#
#   none         no admission, no query_params: every attack request is a miss
#   query        query_params = [] on the route (the attacker's x= is not in the key)
#   admission    per_client = "20/s" (lease_block 10, the default)
#   block1       per_client = "20/s", lease_block = 1 (one Redis call per charge)
#   charged      per_client = "100000/s": every attack request charged and admitted,
#                for the cost of a charged miss against `none`
#
# For each: what reached the origin from the attacker (per second), the buyer's hit
# ratio and p50/p99, bulwark's CPU per request, and Redis's CPU and EVALSHA calls.
#
#   benches/admission-attack.sh
#   RATE=2000 RUN=20 SCENARIOS="none admission" benches/admission-attack.sh
set -euo pipefail

RATE=${RATE:-2000}
RUN=${RUN:-15}
DELAY_MS=${DELAY_MS:-20}
CAPACITY=${CAPACITY:-16}
SERVER_CPU=${SERVER_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
SCENARIOS=${SCENARIOS:-none query admission block1 charged}
HERE=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=benches/common.sh
source "$HERE/benches/common.sh"
WORK=$(mktemp -d /tmp/bulwark-attack.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

command -v redis-server >/dev/null 2>&1 || need_package redis-server redis-server
ATTACK=$(build_bench_client attack)
BULWARK="$HERE/target/release/bulwark"
TICK=$(getconf CLK_TCK)

ORIGIN_PORT=$(free_port)
taskset -c "$LOAD_CPU" "$ATTACK" origin "$ORIGIN_PORT" "$DELAY_MS" "$CAPACITY" & PIDS+=($!)
REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 & REDIS_PID=$!; PIDS+=($REDIS_PID)
wait_port "$ORIGIN_PORT"
wait_port "$REDIS_PORT"

route_keys() {
    case $1 in
        none) ;;
        query) echo 'query_params = []' ;;
        admission) echo 'admission = { per_client = "20/s" }' ;;
        block1) echo 'admission = { per_client = "20/s", lease_block = 1 }' ;;
        charged) echo 'admission = { per_client = "100000/s" }' ;;
        *) echo "unknown scenario $1" >&2; return 1 ;;
    esac
}

evalsha() { redis-cli -p "$REDIS_PORT" info commandstats | awk -F'[:,=]' '/^cmdstat_evalsha/ {print $3; found=1} END {if (!found) print 0}'; }

printf '%-10s %s\n' scenario figures
for scenario in $SCENARIOS; do
    port=$(free_port); admin=$(free_port)
    write_hit_config "$WORK/$scenario.toml" "$port" "$admin" "$ORIGIN_PORT" "url = \"http://127.0.0.1:$ORIGIN_PORT\"
max_concurrency = 64" "redis_url = \"redis://127.0.0.1:$REDIS_PORT\""
    # The buyer and the attacker come through a trusted proxy (this host).
    sed -i 's|^drain_delay = "0s"|drain_delay = "0s"\ntrusted_proxies = ["127.0.0.1/32"]|' "$WORK/$scenario.toml"
    route_keys "$scenario" >> "$WORK/$scenario.toml"
    redis-cli -p "$REDIS_PORT" flushall >/dev/null
    taskset -c "$SERVER_CPU" "$BULWARK" serve --config "$WORK/$scenario.toml" 2>"$WORK/$scenario.log" & pid=$!; PIDS+=($pid)
    wait_port "$port"
    redis-cli -p "$REDIS_PORT" config resetstat >/dev/null
    cpu_before=$(cpu_ticks "$pid"); redis_before=$(cpu_ticks "$REDIS_PID")
    figures=$(taskset -c "$LOAD_CPU" "$ATTACK" load "127.0.0.1:$port" "$ORIGIN_PORT" "$RATE" "$RUN")
    cpu_after=$(cpu_ticks "$pid"); redis_after=$(cpu_ticks "$REDIS_PID")
    calls=$(evalsha)
    requests=$(awk '{for (i = 1; i <= NF; i++) {split($i, kv, "="); v[kv[1]] = kv[2]}} END {print v["attacker_sent"] + v["buyer_requests"]}' <<<"$figures")
    seconds=$(awk '{for (i = 1; i <= NF; i++) {split($i, kv, "="); v[kv[1]] = kv[2]}} END {print v["seconds"]}' <<<"$figures")
    extra=$(awk -v b=$((cpu_after - cpu_before)) -v r=$((redis_after - redis_before)) -v n="$requests" -v s="$seconds" -v c="$calls" -v hz="$TICK" \
        'BEGIN {printf "bulwark_cpu_us_per_request=%.1f redis_cpu_percent=%.1f redis_evalsha_per_s=%.0f", b / hz / n * 1e6, r / hz / s * 100, c / s}')
    printf '%-10s %s %s\n' "$scenario" "$figures" "$extra"
    kill "$pid"; wait "$pid" 2>/dev/null || true
done
