# Shared by the bench scripts (compare-builds.sh, compare-miss.sh, callgrind-hit.sh,
# burst.sh, memory-burst.sh): sourced, not run.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
# Installs Debian package $2 when command $1 is missing.
need_package() { command -v "$1" >/dev/null 2>&1 || { apt-get install -y "$2" >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y "$2" >/dev/null; }; }; }
# Installs wrk when missing.
need_wrk() { need_package wrk wrk; }
# Installs nginx when missing (without letting the package start its service: benches run
# their own nginx on private ports) and sets NGINX to it.
need_nginx() {
    if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
        local deny=""
        if [ ! -e /usr/sbin/policy-rc.d ]; then
            printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && deny=1
        fi
        need_package nginx nginx-light
        [ -n "$deny" ] && rm -f /usr/sbin/policy-rc.d
    fi
    NGINX=$(command -v nginx || echo /usr/sbin/nginx)
}
# A wrk latency ("850.00us", "1.20ms", "2.00s") on stdin, in milliseconds.
to_ms() { awk '{v=$1; if (v ~ /us$/) {sub(/us$/,"",v); print v/1000} else if (v ~ /ms$/) {sub(/ms$/,"",v); print v} else {sub(/s$/,"",v); print v*1000}}'; }
# utime + stime of a process and its threads, in clock ticks.
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# The median of the numbers on stdin, one per line.
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
# Waits until something accepts on PORT (without asking for any key).
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; echo "nothing listens on $1" >&2; return 1; }

# Builds this tree's release binary and the bench client benches/NAME.rs; prints the
# client's path.
build_bench_client() {
    (cd "$HERE" && cargo build --release --quiet && cargo bench --quiet --bench "$1" --no-run 2>/dev/null) || return 1
    (cd "$HERE" && cargo bench --bench "$1" --no-run --message-format=json 2>/dev/null) | python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == sys.argv[1] and m.get("executable"):
        print(m["executable"])' "$1"
}

# Builds this tree's release binary and the burst client (benches/burst.rs); sets BURST
# to the client's path. Run it as: "$BURST" ADDR CLIENTS KEYS RUN
build_burst_client() { BURST=$(build_bench_client burst); }

# Writes the origin: every GET answers a 2 KiB body, public for an hour, with an ETag.
# Run it as: python3 FILE PORT
write_hit_origin() {
    cat > "$1" <<'PY'
import http.server, sys
BODY = b"x" * 2048
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # One write per answer, sent at once: headers and body apart would wait out the
    # client's delayed ACK (40 ms) on every keep-alive request.
    wbufsize = -1
    disable_nagle_algorithm = True
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(BODY)))
        # /miss/...: an answer never to be stored (the miss path).
        miss = self.path.startswith("/miss/")
        self.send_header("Cache-Control", "no-store" if miss else "public, max-age=3600")
        self.send_header("ETag", '"v1"')
        self.end_headers()
        self.wfile.write(BODY)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
PY
}

# Writes a config: one in-process pool in front of the origin, one catch-all route.
# add_side_keys FILE old|new: adds $OLD_ROUTE_KEYS or $NEW_ROUTE_KEYS (TOML lines) to the
# route of a config written by write_hit_config (its last table), and $OLD_SERVER_KEYS or
# $NEW_SERVER_KEYS to its [server] table, so that one build can be compared under two configs.
add_side_keys() {
    local side=${2^^} route_keys server_keys
    route_keys=${side}_ROUTE_KEYS server_keys=${side}_SERVER_KEYS
    [ -z "${!route_keys:-}" ] || printf '%s\n' "${!route_keys}" >> "$1"
    if [ -n "${!server_keys:-}" ]; then
        printf '%s\n' "${!server_keys}" > "$1.server"
        sed -i "/^\[server\]\$/r $1.server" "$1"
    fi
}

# write_hit_config FILE PORT ADMIN_PORT ORIGIN_PORT [ORIGIN_KEYS]: ORIGIN_KEYS (TOML lines,
# say an `endpoints` list) stand instead of `url = "http://127.0.0.1:ORIGIN_PORT"`;
# POOL_KEYS (TOML lines, say a `redis_url`) are added to the pool.
# write_hit_config FILE PORT ADMIN_PORT ORIGIN_PORT [ORIGIN_KEYS [POOL_KEYS]]
write_hit_config() {
    local origin="url = \"http://127.0.0.1:$4\""
    [ -z "${5:-}" ] || origin=$5
    cat > "$1" <<TOML
[server]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$3"
drain_delay = "0s"
[[origins]]
name = "origin"
$origin
[[pools]]
name = "pdp"
l1_max_bytes = "64MiB"
${6:-}
[[routes]]
name = "all"
path_prefix = "/"
pool = "pdp"
origin = "origin"
TOML
}
