#!/usr/bin/env bash
# The burst a new pod (or the sale's opening minute) gets: CLIENTS clients connecting at
# once to a freshly started server, over KEYS cold keys, origin latency 200 ms. Each run
# starts bulwark and nginx (proxy_cache_lock on) afresh, then bursts each once; the
# latency of a client runs from the release to the last byte of its answer, so SYNs
# dropped by a full accept queue (retried by the client after 1 s) show in the p99.
# Servers on CPU SERVER_CPU, the burst client on LOAD_CPU; runs alternate which server
# goes first.
#
#   benches/burst.sh                          # 500 and 2,000 clients, 3 runs each
#   CLIENTS="500" RUNS=5 benches/burst.sh
#   BULWARK=/path/to/other/bulwark benches/burst.sh   # another build
set -euo pipefail

CLIENTS=${CLIENTS:-500 2000}
KEYS=${KEYS:-50}
RUNS=${RUNS:-3}
SERVER_CPU=${SERVER_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
HERE=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/bulwark-burst.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

need() { command -v "$1" >/dev/null 2>&1; }
if ! need nginx; then
    echo "installing nginx..." >&2
    apt-get install -y nginx-light >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y nginx-light >/dev/null; }
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
# 2,000 clients and as many server sockets need the descriptors.
ulimit -n "$(ulimit -Hn)"

# Stops a server this shell started and waits until it has exited.
stop() { kill "$1" 2>/dev/null || true; wait "$1" 2>/dev/null || true; }

# shellcheck source=benches/common.sh
source "$HERE/benches/common.sh"
build_burst_client
BULWARK=${BULWARK:-$HERE/target/release/bulwark}

ORIGIN_PORT=$(free_port)
# The origin: 2 KiB bodies, cacheable for an hour, 200 ms per answer.
cat > "$WORK/origin.py" <<'PY'
import http.server, sys, time
BODY = b"x" * 2048
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
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
wait_port "$ORIGIN_PORT"

# Starts a fresh bulwark on PORT; sets SERVER_PID.
start_bulwark() {
    local port=$1 admin
    admin=$(free_port)
    cat > "$WORK/bulwark.toml" <<TOML
[server]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:$admin"
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
    taskset -c "$SERVER_CPU" "$BULWARK" serve --config "$WORK/bulwark.toml" >/dev/null 2>>"$WORK/bulwark.log" &
    SERVER_PID=$!
}

# Starts a fresh nginx on PORT (one worker, as bulwark gets one core); sets SERVER_PID.
start_nginx() {
    local port=$1
    rm -rf "$WORK/nginx"; mkdir -p "$WORK/nginx/cache"
    cat > "$WORK/nginx/nginx.conf" <<CONF
worker_processes 1;
worker_rlimit_nofile 16384;
daemon off;
master_process off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    proxy_cache_path $WORK/nginx/cache levels=1:2 keys_zone=pdp:64m max_size=1g inactive=1h use_temp_path=off;
    upstream origin { server 127.0.0.1:$ORIGIN_PORT; keepalive 64; }
    server {
        listen 127.0.0.1:$port;
        location / {
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache pdp;
            proxy_cache_lock on;
            proxy_cache_valid 200 1h;
        }
    }
}
CONF
    taskset -c "$SERVER_CPU" "$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" >/dev/null 2>>"$WORK/nginx.log" &
    SERVER_PID=$!
}

# One burst at a freshly started SERVER (bulwark or nginx); writes "p50 p99 max
# failures" to $WORK/burst.out. Runs in this shell, so the server is its child.
burst() {
    local server=$1 clients=$2 run=$3 port
    port=$(free_port)
    "start_$server" "$port"
    PIDS+=("$SERVER_PID")
    wait_port "$port"
    sleep 0.2
    taskset -c "$LOAD_CPU" "$BURST" "127.0.0.1:$port" "$clients" "$KEYS" "$run" > "$WORK/burst.out"
    stop "$SERVER_PID"
}


echo "burst: clients connecting at once to a freshly started server, $KEYS cold keys, origin latency 200 ms"
echo "server on CPU $SERVER_CPU, client on CPU $LOAD_CPU; somaxconn $(cat /proc/sys/net/core/somaxconn), tcp_max_syn_backlog $(cat /proc/sys/net/ipv4/tcp_max_syn_backlog)"
printf '%-8s %-4s %-8s %8s %8s %8s %9s\n' clients run server p50_ms p99_ms max_ms failures
for clients in $CLIENTS; do
    : > "$WORK/b.p99"; : > "$WORK/n.p99"
    for run in $(seq "$RUNS"); do
        order="bulwark nginx"; [ $((run % 2)) -eq 0 ] && order="nginx bulwark"
        for server in $order; do
            burst "$server" "$clients" "$server-$clients-$run"
            read -r p50 p99 max failed < "$WORK/burst.out"
            printf '%-8s %-4s %-8s %8s %8s %8s %9s\n' "$clients" "$run" "$server" "$p50" "$p99" "$max" "$failed"
            echo "$p99" >> "$WORK/${server:0:1}.p99"
        done
    done
    B=$(median < "$WORK/b.p99"); N=$(median < "$WORK/n.p99")
    printf '%-8s median p99: bulwark %s ms, nginx %s ms, ratio b/n %s; bulwark at or below nginx in %s of %s runs\n' "$clients" "$B" "$N" \
        "$(awk -v a="$B" -v b="$N" 'BEGIN{printf "%.2f", a/b}')" "$(paste "$WORK/b.p99" "$WORK/n.p99" | awk '$1 <= $2 {n++} END {print n+0}')" "$RUNS"
done
