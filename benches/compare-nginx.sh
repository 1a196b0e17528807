#!/usr/bin/env bash
# Compares bulwark with nginx proxy_cache in front of the same origin, on this machine,
# in one run.
#
# Throughput: each server pinned to one core (wrk on another), a 2 KiB cached response,
# 64 connections. Prints requests/s, p99 latency and server CPU time per request for
# both, and their ratios. Rounds alternate between the two servers; medians are reported.
#
# Spike: SPIKE_CLIENTS concurrent clients over SPIKE_KEYS cold keys, origin latency
# 200 ms, against one instance and against three (bulwark: three processes sharing one
# Redis; nginx: three instances with proxy_cache_lock on, each with its own cache, as
# nginx cannot share one). Prints origin requests per unique key.
#
#   benches/compare-nginx.sh                 # both; throughput: 3 rounds of 10 s
#   MODE=spike benches/compare-nginx.sh      # or MODE=throughput
#   ROUNDS=5 DURATION=20s benches/compare-nginx.sh
set -euo pipefail

MODE=${MODE:-all}
SPIKE_CLIENTS=${SPIKE_CLIENTS:-500}
SPIKE_KEYS=${SPIKE_KEYS:-50}
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10s}
CONNECTIONS=${CONNECTIONS:-64}
SERVER_CPU=${SERVER_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
HERE=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/bulwark-bench.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

need() { command -v "$1" >/dev/null 2>&1; }
if ! need redis-server; then
    apt-get install -y redis-server >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y redis-server >/dev/null; }
fi
if ! need nginx || ! need wrk; then
    echo "installing nginx and wrk..." >&2
    apt-get install -y nginx-light wrk >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y nginx-light wrk >/dev/null; }
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 100); do curl -fsS -o /dev/null "$1" 2>/dev/null && return 0; sleep 0.1; done; echo "no answer from $1" >&2; return 1; }
# utime + stime of a process and its threads, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

(cd "$HERE" && cargo build --release --quiet)
BULWARK="$HERE/target/release/bulwark"

ORIGIN_PORT=$(free_port); BULWARK_PORT=$(free_port); ADMIN_PORT=$(free_port); NGINX_PORT=$(free_port)

# The origin: 2 KiB bodies, cacheable for an hour. Only the warm-up reaches it in the
# throughput runs. Paths under /spike/ take 200 ms and are counted; /__count tells.
cat > "$WORK/origin.py" <<'PY'
import http.server, sys, threading, time
BODY = b"x" * 2048
COUNT = 0
LOCK = threading.Lock()
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        global COUNT
        if self.path == "/__count":
            body = str(COUNT).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)
            return
        if self.path.startswith("/spike/"):
            with LOCK:
                COUNT += 1
            time.sleep(0.2)
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(BODY)))
        self.send_header("Cache-Control", "public, max-age=3600")
        self.end_headers()
        self.wfile.write(BODY)
    def log_message(self, *args):
        pass
class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 1024
    daemon_threads = True
Server(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
PY
python3 "$WORK/origin.py" "$ORIGIN_PORT" & PIDS+=($!)

cat > "$WORK/bulwark.toml" <<TOML
[server]
listen = "127.0.0.1:$BULWARK_PORT"
admin_listen = "127.0.0.1:$ADMIN_PORT"
drain_delay = "0s"
[[origins]]
name = "origin"
url = "http://127.0.0.1:$ORIGIN_PORT"
[[pools]]
name = "pdp"
l1_max_bytes = "64MiB"
[[routes]]
name = "all"
path_prefix = "/"
pool = "pdp"
origin = "origin"
TOML
taskset -c "$SERVER_CPU" "$BULWARK" serve --config "$WORK/bulwark.toml" 2>"$WORK/bulwark.log" & BULWARK_PID=$!; PIDS+=($BULWARK_PID)
# The same with the JSON access log on (every request logged), to measure its cost.
LOGGED_PORT=$(free_port); LOGGED_ADMIN=$(free_port)
sed -e "s/^listen = .*/listen = \"127.0.0.1:$LOGGED_PORT\"/" -e "s/^admin_listen = .*/admin_listen = \"127.0.0.1:$LOGGED_ADMIN\"/" \
    -e 's/^drain_delay = "0s"/drain_delay = "0s"\naccess_log = "json"/' "$WORK/bulwark.toml" > "$WORK/bulwark-logged.toml"
taskset -c "$SERVER_CPU" "$BULWARK" serve --config "$WORK/bulwark-logged.toml" >/dev/null 2>>"$WORK/bulwark.log" & LOGGED_PID=$!; PIDS+=($LOGGED_PID)

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
    keepalive_requests 1000000;
    proxy_cache_path $WORK/nginx/cache levels=1:2 keys_zone=pdp:64m max_size=1g inactive=1h use_temp_path=off;
    upstream origin { server 127.0.0.1:$ORIGIN_PORT; keepalive 64; }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache pdp;
            proxy_cache_lock on;
            proxy_cache_valid 200 1h;
            add_header Cache-Status \$upstream_cache_status;
        }
    }
}
CONF
# master_process off: one process does all the work, so its CPU time is the server's.
taskset -c "$SERVER_CPU" "$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" & NGINX_PID=$!; PIDS+=($NGINX_PID)

URL_PATH=/products/1
wait_http "http://127.0.0.1:$BULWARK_PORT$URL_PATH"
wait_http "http://127.0.0.1:$LOGGED_PORT$URL_PATH"
wait_http "http://127.0.0.1:$NGINX_PORT$URL_PATH"
# Warm: both now hold the entry.
for _ in 1 2 3; do for p in "$BULWARK_PORT" "$LOGGED_PORT" "$NGINX_PORT"; do curl -fsS -o /dev/null "http://127.0.0.1:$p$URL_PATH"; done; done
curl -fsS -D - -o /dev/null "http://127.0.0.1:$BULWARK_PORT$URL_PATH" | grep -qi 'cache-status: bulwark; hit' || { echo "bulwark is not serving hits" >&2; exit 1; }
curl -fsS -D - -o /dev/null "http://127.0.0.1:$NGINX_PORT$URL_PATH" | grep -qi 'cache-status: HIT' || { echo "nginx is not serving hits" >&2; exit 1; }

if [ "$MODE" = all ] || [ "$MODE" = throughput ]; then
# One wrk run against a server: prints "rps p99_ms cpu_us_per_request".
measure() {
    local port=$1 pid=$2 before after out requests rps p99
    before=$(cpu_ticks "$pid")
    out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency "http://127.0.0.1:$port$URL_PATH")
    after=$(cpu_ticks "$pid")
    requests=$(echo "$out" | awk '/requests in/ {print $1}')
    rps=$(echo "$out" | awk '/^Requests\/sec/ {print $2}')
    p99=$(echo "$out" | awk '$1 == "99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000}; print v}')
    local tick_us=$((1000000 / $(getconf CLK_TCK)))
    echo "$rps $p99 $(awk -v t=$((after - before)) -v n="$requests" -v us="$tick_us" 'BEGIN {printf "%.2f", t * us / n}')"
}

median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }

echo "bulwark vs nginx proxy_cache: 2 KiB cached response, $CONNECTIONS connections, server on CPU $SERVER_CPU, wrk on CPU $LOAD_CPU"
echo "$ROUNDS alternating rounds of $DURATION each"
: > "$WORK/bulwark.results"; : > "$WORK/nginx.results"; : > "$WORK/logged.results"
for round in $(seq "$ROUNDS"); do
    measure "$BULWARK_PORT" "$BULWARK_PID" >> "$WORK/bulwark.results"
    measure "$NGINX_PORT" "$NGINX_PID" >> "$WORK/nginx.results"
    measure "$LOGGED_PORT" "$LOGGED_PID" >> "$WORK/logged.results"
    echo "round $round: bulwark $(tail -1 "$WORK/bulwark.results")   nginx $(tail -1 "$WORK/nginx.results")   bulwark+log $(tail -1 "$WORK/logged.results")   (rps p99_ms cpu_us/req)"
done

col() { awk -v c="$1" '{print $c}' "$2" | median; }
B_RPS=$(col 1 "$WORK/bulwark.results"); N_RPS=$(col 1 "$WORK/nginx.results")
B_P99=$(col 2 "$WORK/bulwark.results"); N_P99=$(col 2 "$WORK/nginx.results")
B_CPU=$(col 3 "$WORK/bulwark.results"); N_CPU=$(col 3 "$WORK/nginx.results")
echo
printf '%-10s %14s %10s %16s\n' "server" "requests/s" "p99 ms" "CPU us/request"
printf '%-10s %14.0f %10.2f %16.2f\n' bulwark "$B_RPS" "$B_P99" "$B_CPU"
printf '%-10s %14.0f %10.2f %16.2f\n' nginx "$N_RPS" "$N_P99" "$N_CPU"
printf '%-10s %14.2f %10.2f %16.2f\n' "ratio b/n" "$(awk -v a="$B_RPS" -v b="$N_RPS" 'BEGIN{print a/b}')" \
    "$(awk -v a="$B_P99" -v b="$N_P99" 'BEGIN{print a/b}')" "$(awk -v a="$B_CPU" -v b="$N_CPU" 'BEGIN{print a/b}')"
L_RPS=$(col 1 "$WORK/logged.results"); L_P99=$(col 2 "$WORK/logged.results"); L_CPU=$(col 3 "$WORK/logged.results")
printf '%-10s %14.0f %10.2f %16.2f   (bulwark with access_log = "json", every request)\n' "b+log" "$L_RPS" "$L_P99" "$L_CPU"
printf '%-10s %14.2f %10.2f %16.2f\n' "ratio l/b" "$(awk -v a="$L_RPS" -v b="$B_RPS" 'BEGIN{print a/b}')" \
    "$(awk -v a="$L_P99" -v b="$B_P99" 'BEGIN{print a/b}')" "$(awk -v a="$L_CPU" -v b="$B_CPU" 'BEGIN{print a/b}')"
fi

if [ "$MODE" = all ] || [ "$MODE" = spike ]; then
# The spike client: all requests at once from SPIKE_CLIENTS threads, spread round-robin
# over the instances; prints failures (non-200 or wrong body).
cat > "$WORK/spike.py" <<'PY'
import sys, threading, urllib.request
run, clients, keys = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
bases = sys.argv[4:]
failures = []
barrier = threading.Barrier(clients)
def one(i):
    url = f"{bases[i % len(bases)]}/spike/{run}/{i % keys}"
    barrier.wait()
    # Replicas behind a load balancer all see the public host; it is part of the key.
    req = urllib.request.Request(url, headers={"Host": "shop.example"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            if r.status != 200 or len(r.read()) != 2048:
                failures.append(url)
    except Exception as e:
        failures.append(f"{url}: {e}")
threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
for t in threads: t.start()
for t in threads: t.join()
print(len(failures))
PY
origin_count() { curl -fsS "http://127.0.0.1:$ORIGIN_PORT/__count"; }
# Runs one spike against the given base URLs; prints "origin_requests_per_key failures".
spike() {
    local run=$1; shift
    local before after failed
    before=$(origin_count)
    failed=$(python3 "$WORK/spike.py" "$run" "$SPIKE_CLIENTS" "$SPIKE_KEYS" "$@")
    after=$(origin_count)
    echo "$(awk -v a="$after" -v b="$before" -v k="$SPIKE_KEYS" 'BEGIN{printf "%.2f", (a-b)/k}') $failed"
}

REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no >/dev/null 2>&1 & PIDS+=($!)
for _ in $(seq 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
B_URLS=(); N_URLS=()
for i in 1 2 3; do
    P=$(free_port); A=$(free_port); NP=$(free_port)
    sed -e "s/^listen = .*/listen = \"127.0.0.1:$P\"/" -e "s/^admin_listen = .*/admin_listen = \"127.0.0.1:$A\"/" \
        -e "s|^l1_max_bytes = .*|l1_max_bytes = \"64MiB\"\nredis_url = \"redis://127.0.0.1:$REDIS_PORT/0\"|" \
        "$WORK/bulwark.toml" > "$WORK/bulwark$i.toml"
    "$BULWARK" serve --config "$WORK/bulwark$i.toml" 2>>"$WORK/bulwark.log" & PIDS+=($!)
    mkdir -p "$WORK/nginx$i/cache"
    sed -e "s|$WORK/nginx/|$WORK/nginx$i/|g" -e "s|listen 127.0.0.1:$NGINX_PORT;|listen 127.0.0.1:$NP;|" -e "s|keys_zone=pdp|keys_zone=pdp$i|" -e "s|proxy_cache pdp;|proxy_cache pdp$i;|" \
        "$WORK/nginx/nginx.conf" > "$WORK/nginx$i/nginx.conf"
    "$NGINX" -p "$WORK/nginx$i" -c "$WORK/nginx$i/nginx.conf" & PIDS+=($!)
    B_URLS+=("http://127.0.0.1:$P"); N_URLS+=("http://127.0.0.1:$NP")
done
for u in "${B_URLS[@]}" "${N_URLS[@]}"; do wait_http "$u/warm"; done
sleep 0.5   # the replicas' Redis event subscriptions come up

echo
echo "spike: $SPIKE_CLIENTS concurrent clients over $SPIKE_KEYS cold keys, origin latency 200 ms"
printf '%-32s %24s %10s\n' "setup" "origin requests per key" "failures"
read -r per fail <<<"$(spike b1 "${B_URLS[0]}")"; printf '%-32s %24s %10s\n' "bulwark, 1 instance" "$per" "$fail"
read -r per fail <<<"$(spike n1 "${N_URLS[0]}")"; printf '%-32s %24s %10s\n' "nginx proxy_cache_lock, 1" "$per" "$fail"
read -r per fail <<<"$(spike b3 "${B_URLS[@]}")"; printf '%-32s %24s %10s\n' "bulwark, 3 instances + Redis" "$per" "$fail"
read -r per fail <<<"$(spike n3 "${N_URLS[@]}")"; printf '%-32s %24s %10s\n' "nginx proxy_cache_lock, 3" "$per" "$fail"
fi
