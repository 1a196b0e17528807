#!/usr/bin/env bash
# Streamed fills, side by side in one run.
#
# 1. Coalesced waiters on a cold 4 MiB object that the origin sends at 2 MB/s (its head
#    at once): CLIENTS clients released together, for a new key each round, through
#    bulwark and through nginx (proxy_cache with proxy_cache_lock on). Prints each
#    round's median and p90 time to the first body byte and to the last byte, the
#    origin requests each proxy made, and the medians over the rounds.
# 2. Memory: a 40 MiB object over max_object_bytes (8 MiB; stream_window 16 MiB), sent
#    at full speed, to LARGE_CLIENTS clients reading at full speed, through a freshly
#    started bulwark: its resident set before, its peak (VmHWM) after, and the origin
#    requests.
# 3. Across replicas: two bulwarks sharing a pool's Redis (a private redis-server), half
#    the clients on each, for a cold key: a storable 4 MiB at 2 MB/s, and a 12 MiB one
#    over max_object_bytes at 6 MB/s. Prints the first-body-byte and last-byte times of
#    each replica's clients and the origin requests.
#
#   benches/compare-stream.sh                 # 5 rounds, 100 clients
#   ROUNDS=9 CLIENTS=200 benches/compare-stream.sh
set -euo pipefail

ROUNDS=${ROUNDS:-5}
CLIENTS=${CLIENTS:-100}
LARGE_CLIENTS=${LARGE_CLIENTS:-20}
HERE=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/bulwark-stream.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT
# shellcheck source=benches/common.sh
. "$HERE/benches/common.sh"

need_nginx
STREAM=$(build_bench_client stream)
BULWARK="$HERE/target/release/bulwark"

OP=$(free_port); BP=$(free_port); BA=$(free_port); LP=$(free_port); LA=$(free_port); NP=$(free_port)

# The origin: GET /SIZE/RATE/anything answers SIZE bytes, public for an hour, its head at
# once and its body paced at RATE bytes a second (0: as fast as it goes). Counts the
# requests for each path in COUNTS.
cat > "$WORK/origin.py" <<'PY'
import asyncio, sys, collections
counts = collections.Counter()
PIECE = b"x" * 65536
async def handle(reader, writer):
    loop = asyncio.get_running_loop()
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            path = head.split(b" ")[1].decode()
            _, size, rate, *_ = path.split("/")
            size, rate = int(size), int(rate)
            counts[path] += 1
            with open(sys.argv[2], "w") as f:
                f.write("".join(f"{p} {n}\n" for p, n in counts.items()))
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nCache-Control: public, max-age=3600\r\n\r\n".encode())
            await writer.drain()
            start, sent = loop.time(), 0
            while sent < size:
                n = min(len(PIECE), size - sent)
                writer.write(PIECE[:n])
                sent += n
                await writer.drain()
                if rate:
                    delay = start + sent / rate - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()
asyncio.run(main())
PY
python3 "$WORK/origin.py" "$OP" "$WORK/counts" & PIDS+=($!)

mkdir -p "$WORK/nginx/cache"
cat > "$WORK/nginx/nginx.conf" <<CONF
worker_processes 1;
daemon off;
master_process off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    proxy_cache_path $WORK/nginx/cache levels=1:2 keys_zone=pdp:64m max_size=1g inactive=1h use_temp_path=off;
    upstream origin { server 127.0.0.1:$OP; keepalive 16; }
    server {
        listen 127.0.0.1:$NP;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache pdp;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 30s;
            proxy_cache_lock_age 30s;
            proxy_read_timeout 30s;
        }
    }
}
CONF
"$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" & PIDS+=($!)

write_hit_config "$WORK/bulwark.toml" "$BP" "$BA" "$OP"
"$BULWARK" serve --config "$WORK/bulwark.toml" 2>"$WORK/bulwark.log" & PIDS+=($!)
for port in "$OP" "$BP" "$NP"; do wait_port "$port"; done

SIZE=$((4 << 20)); RATE=2000000
origin_requests() { awk -v p="$1" '$1 == p {print $2}' "$WORK/counts" 2>/dev/null || true; }
field() { echo "$1" | awk -v k="$2" '{for (i = 1; i < NF; i++) if ($i == k) print $(i + 1)}'; }

echo "1. $CLIENTS clients at once on a cold $((SIZE >> 20)) MiB object sent at $RATE B/s (ms: first body byte p50/p90, last byte p50/p90; origin requests)"
: > "$WORK/bulwark.results"; : > "$WORK/nginx.results"
for round in $(seq "$ROUNDS"); do
    line="round $round:"
    for name in bulwark nginx; do
        port=$BP; [ "$name" = nginx ] && port=$NP
        path="/$SIZE/$RATE/$name-$round"
        out=$("$STREAM" "127.0.0.1:$port" "$path" "$CLIENTS")
        echo "$out" >> "$WORK/$name.results"
        line="$line  $name $(field "$out" first_body_byte_p50_ms)/$(field "$out" first_body_byte_p90_ms) $(field "$out" last_byte_p50_ms)/$(field "$out" last_byte_p90_ms) origin=$(origin_requests "$path") failures=$(field "$out" failures)"
    done
    echo "$line"
done
col() { field "$(cat "$2")" "$1" | median; }
echo
printf '%-8s %22s %22s %22s %22s\n' server "first byte p50 ms" "first byte p90 ms" "last byte p50 ms" "last byte p90 ms"
for name in bulwark nginx; do
    printf '%-8s %22.1f %22.1f %22.1f %22.1f\n' "$name" "$(col first_body_byte_p50_ms "$WORK/$name.results")" "$(col first_body_byte_p90_ms "$WORK/$name.results")" \
        "$(col last_byte_p50_ms "$WORK/$name.results")" "$(col last_byte_p90_ms "$WORK/$name.results")"
done

echo
LARGE=$((40 << 20))
echo "2. $LARGE_CLIENTS clients on a $((LARGE >> 20)) MiB object over max_object_bytes, sent at full speed (a fresh bulwark)"
write_hit_config "$WORK/large.toml" "$LP" "$LA" "$OP"
"$BULWARK" serve --config "$WORK/large.toml" 2>"$WORK/large.log" & LARGE_PID=$!; PIDS+=($LARGE_PID)
wait_port "$LP"
curl -fsS -o /dev/null "http://127.0.0.1:$LP/1024/0/warm"
rss_kib() { awk -v k="$2" '$1 == k":" {print $2}' "/proc/$1/status"; }
before=$(rss_kib "$LARGE_PID" VmRSS)
out=$("$STREAM" "127.0.0.1:$LP" "/$LARGE/0/large" "$LARGE_CLIENTS")
peak=$(rss_kib "$LARGE_PID" VmHWM)
echo "$out"
echo "origin requests: $(origin_requests "/$LARGE/0/large")"
echo "resident before: $((before / 1024)) MiB, peak: $((peak / 1024)) MiB, growth: $(((peak - before) / 1024)) MiB (object $((LARGE >> 20)) MiB, stream_window 16 MiB)"

echo
echo "3. Across replicas: $((CLIENTS / 2)) clients on each of two replicas sharing a Redis, one cold key"
command -v redis-server >/dev/null 2>&1 || need_package redis-server redis-server
RP=$(free_port)
redis-server --port "$RP" --bind 127.0.0.1 --save '' --appendonly no --daemonize no >"$WORK/redis.log" 2>&1 & PIDS+=($!)
wait_port "$RP"
for name in r1 r2; do
    port=$(free_port); admin=$(free_port)
    write_hit_config "$WORK/$name.toml" "$port" "$admin" "$OP" "url = \"http://127.0.0.1:$OP\"
timeout = \"30s\"" "redis_url = \"redis://127.0.0.1:$RP/0\"
redis_timeout = \"500ms\""
    "$BULWARK" serve --config "$WORK/$name.toml" 2>"$WORK/$name.log" & PIDS+=($!)
    eval "${name}_PORT=$port; ${name}_ADMIN=$admin"
done
wait_port "$r1_PORT"; wait_port "$r2_PORT"
# Leases are taken only while the pool's subscription is up.
for admin in "$r1_ADMIN" "$r2_ADMIN"; do
    for _ in $(seq 100); do curl -fsS "http://127.0.0.1:$admin/metrics" | grep -q '^bulwark_redis_events_subscribed{[^}]*} 1' && break; sleep 0.1; done
done
for case in "$((4 << 20))/2000000/replicas-stored" "$((12 << 20))/6000000/replicas-large"; do
    "$STREAM" "127.0.0.1:$r1_PORT" "/$case" "$((CLIENTS / 2))" > "$WORK/r1.out" &
    first=$!
    sleep 0.05
    "$STREAM" "127.0.0.1:$r2_PORT" "/$case" "$((CLIENTS / 2))" > "$WORK/r2.out"
    wait "$first"
    for name in r1 r2; do
        out=$(cat "$WORK/$name.out")
        echo "/$case replica $name: first body byte p50/p90 $(field "$out" first_body_byte_p50_ms)/$(field "$out" first_body_byte_p90_ms) ms, last byte p50 $(field "$out" last_byte_p50_ms) ms, failures $(field "$out" failures)"
    done
    echo "/$case origin requests: $(origin_requests "/$case")"
done
