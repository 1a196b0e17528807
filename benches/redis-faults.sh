#!/usr/bin/env bash
# Pool isolation under Redis faults: two pools, each with its own redis-server, both
# under load (wrk, random keys over 3,000 pages), through the phases: healthy, pool A's
# pub/sub connections killed (CLIENT KILL TYPE pubsub), its Redis killed (kill -9),
# restarted empty, and stalled (SIGSTOP). Prints requests/s, p99, failed responses, hit
# ratio and origin requests per pool per phase.
#
#   benches/redis-faults.sh               # 10 s per phase, L1 holding the working set
#   PHASE=8s benches/redis-faults.sh
#   L1=1MiB benches/redis-faults.sh       # L1 too small: L2 serves much of the load
set -euo pipefail

PHASE=${PHASE:-10s}
L1=${L1:-64MiB}
HERE=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/bulwark-faults.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -CONT "$pid" 2>/dev/null || true; kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

command -v wrk >/dev/null || apt-get install -y wrk >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y wrk >/dev/null; }
command -v redis-server >/dev/null || apt-get install -y redis-server >/dev/null 2>&1
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
(cd "$HERE" && cargo build --release --quiet)

ORIGIN_PORT=$(free_port); PORT=$(free_port); ADMIN=$(free_port); RA=$(free_port); RB=$(free_port)
start_redis() { redis-server --port "$1" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 & echo $!; }
RA_PID=$(start_redis "$RA"); PIDS+=("$RA_PID")
RB_PID=$(start_redis "$RB"); PIDS+=("$RB_PID")

# The origin: nginx answering every path with a 2 KiB body, cacheable for 10 minutes.
command -v nginx >/dev/null || apt-get install -y nginx-light >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y nginx-light >/dev/null; }
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
mkdir -p "$WORK/nginx"
PAD=$(head -c 2000 /dev/zero | tr '\0' x)
cat > "$WORK/nginx/nginx.conf" <<CONF
worker_processes 1;
daemon off;
master_process off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    server {
        listen 127.0.0.1:$ORIGIN_PORT;
        location / { add_header Cache-Control "max-age=600"; return 200 "\$uri $PAD"; }
    }
}
CONF
"$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" & PIDS+=($!)

cat > "$WORK/bulwark.toml" <<TOML
[server]
listen = "127.0.0.1:$PORT"
admin_listen = "127.0.0.1:$ADMIN"
drain_delay = "0s"
[[origins]]
name = "origin"
url = "http://127.0.0.1:$ORIGIN_PORT"
[[pools]]
name = "a"
l1_max_bytes = "$L1"
redis_url = "redis://127.0.0.1:$RA/0"
redis_timeout = "50ms"
[[pools]]
name = "b"
l1_max_bytes = "$L1"
redis_url = "redis://127.0.0.1:$RB/0"
redis_timeout = "50ms"
[[routes]]
name = "a"
path_prefix = "/a/"
pool = "a"
origin = "origin"
[[routes]]
name = "b"
path_prefix = "/b/"
pool = "b"
origin = "origin"
TOML
"$HERE/target/release/bulwark" serve --config "$WORK/bulwark.toml" 2>"$WORK/bulwark.log" & PIDS+=($!)
for _ in $(seq 100); do curl -fsS -o /dev/null "http://127.0.0.1:$ADMIN/healthz" 2>/dev/null && break; sleep 0.1; done

# Random keys over 3000 pages (about 6 MiB).
cat > "$WORK/random.lua" <<'LUA'
local prefix
function init(args) prefix = args[1]; math.randomseed(os.time() + #prefix) end
function request() return wrk.format("GET", prefix .. math.random(1, 3000), { Host = "shop.example" }) end
LUA

# "hits total origin_requests" of a pool (and its route, of the same name) so far, from /metrics.
counts() {
    curl -fsS "http://127.0.0.1:$ADMIN/metrics" | awk -v pool="$1" '
        /^bulwark_requests_total/ && index($0, "pool=\"" pool "\"") {
            total += $NF
            if ($0 ~ /cache="(hit_l1|hit_l2|collapsed|revalidated|stale_while_revalidate|stale_if_error)"/) hits += $NF
        }
        /^bulwark_origin_requests_total/ && index($0, "route=\"" pool "\"") { origin += $NF }
        END { printf "%d %d %d\n", hits, total, origin }'
}

# One phase: both pools loaded at once, BEFORE (a command) run as it starts; prints
# "pool rps p99_ms failed hit_ratio origin_requests" for a, then b.
phase() {
    read -r a_hits0 a_total0 a_origin0 <<<"$(counts a)"; read -r b_hits0 b_total0 b_origin0 <<<"$(counts b)"
    wrk -t1 -c16 -d"$PHASE" --latency -s "$WORK/random.lua" "http://127.0.0.1:$PORT" -- /a/ > "$WORK/a.out" &
    local a=$!
    [ -z "${1:-}" ] || eval "$1"
    wrk -t1 -c16 -d"$PHASE" --latency -s "$WORK/random.lua" "http://127.0.0.1:$PORT" -- /b/ > "$WORK/b.out"
    wait $a
    read -r a_hits1 a_total1 a_origin1 <<<"$(counts a)"; read -r b_hits1 b_total1 b_origin1 <<<"$(counts b)"
    local a_ratio b_ratio
    a_ratio=$(awk -v h=$((a_hits1 - a_hits0)) -v t=$((a_total1 - a_total0)) 'BEGIN{printf "%.1f%%", t ? 100*h/t : 0}')
    b_ratio=$(awk -v h=$((b_hits1 - b_hits0)) -v t=$((b_total1 - b_total0)) 'BEGIN{printf "%.1f%%", t ? 100*h/t : 0}')
    for pool in a b; do
        ratio=$a_ratio; origin=$((a_origin1 - a_origin0))
        [ "$pool" = b ] && { ratio=$b_ratio; origin=$((b_origin1 - b_origin0)); }
        awk -v ratio="$ratio" -v origin="$origin" '/^Requests\/sec/ {rps=$2}
             $1 == "99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000}; p99=v}
             /Non-2xx/ {bad=$NF} /Socket errors/ {bad+=0}
             END {printf "%s %.0f %.2f %d %s %d\n", pool, rps, p99, bad+0, ratio, origin}' pool="$pool" "$WORK/$pool.out"
    done
}

printf '%-28s %-5s %12s %10s %8s %10s %8s\n' phase pool "requests/s" "p99 ms" failed "hit ratio" origin
report() { while read -r pool rps p99 bad ratio origin; do printf '%-28s %-5s %12s %10s %8s %10s %8s\n' "$1" "$pool" "$rps" "$p99" "$bad" "$ratio" "$origin"; done; }
phase | report "warm-up"
phase | report "healthy"
phase "redis-cli -p $RA CLIENT KILL TYPE pubsub >/dev/null" | report "pool a pub/sub killed"
phase "kill -9 $RA_PID" | report "pool a Redis killed"
RA_PID=$(start_redis "$RA"); PIDS+=("$RA_PID")
phase | report "pool a Redis restarted empty"
phase "kill -STOP $RA_PID" | report "pool a Redis stalled"
kill -CONT "$RA_PID"
echo
curl -fsS "http://127.0.0.1:$ADMIN/metrics" | grep -E '^bulwark_redis_(errors_total|breaker_open)' | grep -v ' 0$' || true
