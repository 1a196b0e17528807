#!/usr/bin/env bash
# Peak memory under a cache-busting burst of large objects: CLIENTS clients at once, each
# asking for its own storable 7 MiB URL (no Redis). Samples bulwark's RSS from /proc every
# 20 ms during the burst and prints the peak against the documented bound:
# 1.2 x (l1_max_bytes + max_inflight_body_bytes + 64 MiB), with the defaults 256 MiB each.
#
#   benches/memory-burst.sh
#   BULWARK=/path/to/other/bulwark CLIENTS=256 benches/memory-burst.sh
set -euo pipefail

CLIENTS=${CLIENTS:-256}
OBJECT_MIB=${OBJECT_MIB:-7}
HERE=$(cd "$(dirname "$0")/.." && pwd)
WORK=$(mktemp -d /tmp/bulwark-memory.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)"


# shellcheck source=benches/common.sh
source "$HERE/benches/common.sh"
build_burst_client
BULWARK=${BULWARK:-$HERE/target/release/bulwark}

ORIGIN_PORT=$(free_port); PORT=$(free_port); ADMIN=$(free_port)
cat > "$WORK/origin.py" <<'PY'
import http.server, sys
BODY = b"o" * (int(sys.argv[2]) << 20)
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
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
python3 "$WORK/origin.py" "$ORIGIN_PORT" "$OBJECT_MIB" & PIDS+=($!)
cat > "$WORK/bulwark.toml" <<TOML
[server]
listen = "127.0.0.1:$PORT"
admin_listen = "127.0.0.1:$ADMIN"
drain_delay = "0s"
[[origins]]
name = "origin"
url = "http://127.0.0.1:$ORIGIN_PORT"
[[pools]]
name = "pdp"
[[routes]]
name = "all"
path_prefix = "/"
pool = "pdp"
origin = "origin"
TOML
"$BULWARK" serve --config "$WORK/bulwark.toml" >/dev/null 2>"$WORK/bulwark.log" & BULWARK_PID=$!; PIDS+=($BULWARK_PID)
wait_port "$ORIGIN_PORT"; wait_port "$PORT"
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
BEFORE=$(rss_kib "$BULWARK_PID")
( peak=0; while kill -0 "$BULWARK_PID" 2>/dev/null; do r=$(rss_kib "$BULWARK_PID" 2>/dev/null || echo 0); [ "$r" -gt "$peak" ] && { peak=$r; echo "$peak" > "$WORK/peak"; }; sleep 0.02; done ) & SAMPLER=$!; PIDS+=($SAMPLER)
read -r p50 p99 max failed <<<"$("$BURST" "127.0.0.1:$PORT" "$CLIENTS" "$CLIENTS" mem)"
sleep 0.5
kill "$SAMPLER" 2>/dev/null || true
PEAK=$(cat "$WORK/peak")
BOUND=$(( (256 + 256 + 64) * 1024 * 12 / 10 ))
echo "memory burst: $CLIENTS clients at once, each its own storable ${OBJECT_MIB} MiB URL, no Redis"
echo "latency p50 ${p50} ms, p99 ${p99} ms, max ${max} ms; failures ${failed}"
echo "RSS before $((BEFORE / 1024)) MiB, peak $((PEAK / 1024)) MiB; bound 1.2 x (256 + 256 + 64) MiB = $((BOUND / 1024)) MiB: $([ "$PEAK" -le "$BOUND" ] && echo within || echo EXCEEDED)"
