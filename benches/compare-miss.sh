#!/usr/bin/env bash
# The miss path, side by side in one run: every request is a distinct URL whose answer
# is `no-store`, so each one goes to the origin.
#
#   bulwark-1  bulwark with the origin as one `url`
#   bulwark-4  bulwark with the same origin on four `endpoints` (four ports of it),
#              balanced, each with its own pool
#   nginx      nginx proxy_pass with proxy_cache and a keep-alive upstream pool
#
# Each proxy is pinned to one core (SERVER_CPU); wrk and the origin (nginx answering
# 2 KiB from memory, one worker) share the other (LOAD_CPU). Rounds alternate between
# the three; prints each round and the medians of requests/s, p99 and proxy CPU time per
# request, with the ratios bulwark-1/nginx and bulwark-4/bulwark-1.
#
#   benches/compare-miss.sh                    # 9 rounds of 10 s
#   ROUNDS=11 DURATION=15s benches/compare-miss.sh
set -euo pipefail

ROUNDS=${ROUNDS:-9}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
SERVER_CPU=${SERVER_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
HERE=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/bulwark-miss.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT
# shellcheck source=benches/common.sh
. "$HERE/benches/common.sh"

need_wrk
need_nginx

(cd "$HERE" && cargo build --release --quiet)
BULWARK="$HERE/target/release/bulwark"

O1=$(free_port); O2=$(free_port); O3=$(free_port); O4=$(free_port)
B1=$(free_port); B1A=$(free_port); B4=$(free_port); B4A=$(free_port); NP=$(free_port)

# The origin: one nginx worker on four ports, 2 KiB, never to be stored.
mkdir -p "$WORK/origin" "$WORK/proxy/cache"
cat > "$WORK/origin/nginx.conf" <<CONF
worker_processes 1;
daemon off;
master_process off;
pid $WORK/origin/nginx.pid;
error_log $WORK/origin/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$O1; listen 127.0.0.1:$O2; listen 127.0.0.1:$O3; listen 127.0.0.1:$O4;
        location / {
            add_header Cache-Control no-store;
            return 200 "$(head -c 2048 /dev/zero | tr '\0' x)";
        }
    }
}
CONF
taskset -c "$LOAD_CPU" "$NGINX" -p "$WORK/origin" -c "$WORK/origin/nginx.conf" & PIDS+=($!)

cat > "$WORK/proxy/nginx.conf" <<CONF
worker_processes 1;
daemon off;
master_process off;
pid $WORK/proxy/nginx.pid;
error_log $WORK/proxy/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    proxy_cache_path $WORK/proxy/cache levels=1:2 keys_zone=pdp:64m max_size=1g inactive=1h use_temp_path=off;
    upstream origin { server 127.0.0.1:$O1; keepalive 64; }
    server {
        listen 127.0.0.1:$NP;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache pdp;
            proxy_cache_lock on;
        }
    }
}
CONF
taskset -c "$SERVER_CPU" "$NGINX" -p "$WORK/proxy" -c "$WORK/proxy/nginx.conf" & NGINX_PID=$!; PIDS+=($NGINX_PID)

write_hit_config "$WORK/one.toml" "$B1" "$B1A" "$O1"
write_hit_config "$WORK/four.toml" "$B4" "$B4A" "$O1" \
    "endpoints = [\"http://127.0.0.1:$O1\", \"http://127.0.0.1:$O2\", \"http://127.0.0.1:$O3\", \"http://127.0.0.1:$O4\"]"
taskset -c "$SERVER_CPU" "$BULWARK" serve --config "$WORK/one.toml" 2>"$WORK/one.log" & ONE_PID=$!; PIDS+=($ONE_PID)
taskset -c "$SERVER_CPU" "$BULWARK" serve --config "$WORK/four.toml" 2>"$WORK/four.log" & FOUR_PID=$!; PIDS+=($FOUR_PID)
for port in "$O1" "$O4" "$B1" "$B4" "$NP"; do wait_port "$port"; done
for port in "$B1" "$B4" "$NP"; do
    curl -fsS -o /dev/null "http://127.0.0.1:$port/warm" || { echo "no answer on $port" >&2; exit 1; }
done
curl -fsS -D - -o /dev/null "http://127.0.0.1:$B1/check" | grep -qi 'cache-status: bulwark; fwd=miss' \
    || { echo "bulwark is not answering misses:"; curl -sS -D - -o /dev/null "http://127.0.0.1:$B1/check"; exit 1; } >&2

# Every request a new path: nothing is coalesced or stored.
cat > "$WORK/distinct.lua" <<'LUA'
local n = 0
request = function()
    n = n + 1
    return wrk.format("GET", "/miss/" .. n)
end
LUA

# One wrk run: prints "rps p99_ms cpu_us_per_request" (the proxy's CPU).
measure() {
    local port=$1 pid=$2 before after out requests rps p99
    before=$(cpu_ticks "$pid")
    out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency -s "$WORK/distinct.lua" "http://127.0.0.1:$port/")
    after=$(cpu_ticks "$pid")
    requests=$(echo "$out" | awk '/requests in/ {print $1}')
    rps=$(echo "$out" | awk '/^Requests\/sec/ {print $2}')
    p99=$(echo "$out" | awk '$1 == "99%" {print $2}' | to_ms)
    if echo "$out" | grep -q 'Non-2xx'; then echo "errors on port $port: $(echo "$out" | grep 'Non-2xx')" >&2; fi
    local tick_us=$((1000000 / $(getconf CLK_TCK)))
    echo "$rps $p99 $(awk -v t=$((after - before)) -v n="$requests" -v us="$tick_us" 'BEGIN {printf "%.2f", t * us / n}')"
}

echo "miss path: distinct URLs answered no-store (2 KiB), $CONNECTIONS connections; proxies on CPU $SERVER_CPU, wrk and origin on CPU $LOAD_CPU"
echo "$ROUNDS alternating rounds of $DURATION each (rps p99_ms cpu_us/req)"
: > "$WORK/one.results"; : > "$WORK/four.results"; : > "$WORK/nginx.results"
for round in $(seq "$ROUNDS"); do
    measure "$B1" "$ONE_PID" >> "$WORK/one.results"
    measure "$NP" "$NGINX_PID" >> "$WORK/nginx.results"
    measure "$B4" "$FOUR_PID" >> "$WORK/four.results"
    echo "round $round: bulwark-1 $(tail -1 "$WORK/one.results")   nginx $(tail -1 "$WORK/nginx.results")   bulwark-4 $(tail -1 "$WORK/four.results")"
done

col() { awk -v c="$1" '{print $c}' "$2" | median; }
echo
printf '%-10s %14s %10s %16s\n' "server" "requests/s" "p99 ms" "CPU us/request"
for name in one nginx four; do
    label=$name; [ "$name" = one ] && label=bulwark-1; [ "$name" = four ] && label=bulwark-4
    printf '%-10s %14.0f %10.2f %16.2f\n' "$label" "$(col 1 "$WORK/$name.results")" "$(col 2 "$WORK/$name.results")" "$(col 3 "$WORK/$name.results")"
done
ratio() { awk -v a="$(col "$1" "$WORK/$2.results")" -v b="$(col "$1" "$WORK/$3.results")" 'BEGIN {printf "%.2f", a / b}'; }
printf '%-10s %14s %10s %16s\n' "b-1/nginx" "$(ratio 1 one nginx)" "$(ratio 2 one nginx)" "$(ratio 3 one nginx)"
printf '%-10s %14s %10s %16s\n' "b-4/b-1" "$(ratio 1 four one)" "$(ratio 2 four one)" "$(ratio 3 four one)"
