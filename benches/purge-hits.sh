#!/usr/bin/env bash
# L1 hits around bulk tag purges: p99 and requests/s of a cached hit (wrk on one core,
# the server pinned to the other), first with no purge, then right after one purge of
# 10,000 tags, then while such purges are sent back to back, then while 10,000 purges
# of one tag each are sent. L1 holds ENTRIES tagged entries (the purges cover half).
# With OLD_BINARY, both builds are measured in the same run, one after the other.
#
#   benches/purge-hits.sh [OLD_BINARY]
#   ENTRIES=20000 DURATION=8s benches/purge-hits.sh /tmp/bulwark-old
set -euo pipefail

OLD=${1:-}
ENTRIES=${ENTRIES:-20000}
DURATION=${DURATION:-8s}
CONNECTIONS=${CONNECTIONS:-64}
SERVER_CPU=${SERVER_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
HERE=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=benches/common.sh
source "$HERE/benches/common.sh"
WORK=$(mktemp -d /tmp/bulwark-purge-hits.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

need_wrk
(cd "$HERE" && cargo build --release --quiet)
NEW="$HERE/target/release/bulwark"

# Every GET: 2 KiB, public for an hour, tagged "t<N> all" for /p/<N> ("hot" otherwise).
cat > "$WORK/origin.py" <<'PY'
import http.server, sys
BODY = b"x" * 2048
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def do_GET(self):
        tags = "t" + self.path[3:] + " all" if self.path.startswith("/p/") else "hot"
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.send_header("Cache-Control", "public, max-age=3600")
        self.send_header("Surrogate-Key", tags)
        self.end_headers()
        self.wfile.write(BODY)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
PY

# python3 client.py warm PORT ENTRIES | once ADMIN_PORT | bulk ADMIN_PORT SECONDS | single ADMIN_PORT COUNT
cat > "$WORK/client.py" <<'PY'
import http.client, json, sys, time
mode, port = sys.argv[1], int(sys.argv[2])
conn = http.client.HTTPConnection("127.0.0.1", port)
def purge(tags):
    conn.request("POST", "/admin/purge", json.dumps({"tags": tags}))
    r = conn.getresponse(); r.read()
    assert r.status == 200, r.status
if mode == "warm":
    for n in range(int(sys.argv[3])):
        conn.request("GET", "/p/%d" % n); conn.getresponse().read()
elif mode == "once":
    purge(["t%d" % n for n in range(5000)] + ["unused-%d" % n for n in range(5000)])
elif mode == "bulk":
    end, sent = time.time() + float(sys.argv[3]), 0
    while time.time() < end:
        purge(["t%d" % n for n in range(sent % 2 * 5000, sent % 2 * 5000 + 5000)] + ["unused-%d-%d" % (sent, n) for n in range(5000)])
        sent += 1
    print(sent)
else:
    for n in range(int(sys.argv[3])):
        purge(["t%d" % (n % 10000)])
    print(n + 1)
PY

ORIGIN_PORT=$(free_port)
python3 "$WORK/origin.py" "$ORIGIN_PORT" & PIDS+=($!)
seconds=${DURATION%s}

load() { taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNECTIONS" -d"$DURATION" --latency "http://127.0.0.1:$1/hot"; }
report() { # NAME PHASE WRK_OUTPUT [PURGES]
    local rps p99
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$3")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$3" | to_ms)
    printf '%-5s %-28s %10s req/s  p99 %8s ms  %s\n' "$1" "$2" "$rps" "$p99" "${4:-}"
}

measure() { # NAME BINARY
    local port admin pid out purges
    port=$(free_port); admin=$(free_port)
    write_hit_config "$WORK/$1.toml" "$port" "$admin" "$ORIGIN_PORT"
    sed -i 's/^l1_max_bytes = .*/l1_max_bytes = "512MiB"/' "$WORK/$1.toml"
    taskset -c "$SERVER_CPU" "$2" serve --config "$WORK/$1.toml" 2>"$WORK/$1.log" & pid=$!; PIDS+=("$pid")
    wait_port "$port"
    python3 "$WORK/client.py" warm "$port" "$ENTRIES"
    curl -fsS -o /dev/null "http://127.0.0.1:$port/hot"
    report "$1" "no purge" "$(load "$port")"
    python3 "$WORK/client.py" once "$admin"
    report "$1" "after a 10,000-tag purge" "$(load "$port")"
    python3 "$WORK/client.py" warm "$port" "$ENTRIES"
    python3 "$WORK/client.py" bulk "$admin" "$seconds" > "$WORK/bulk.count" &
    out=$(load "$port"); wait $!
    report "$1" "10,000-tag purges meanwhile" "$out" "($(cat "$WORK/bulk.count") purges of 10,000 tags)"
    python3 "$WORK/client.py" warm "$port" "$ENTRIES"
    python3 "$WORK/client.py" single "$admin" 10000 > "$WORK/single.count" &
    out=$(load "$port"); wait $!
    report "$1" "one-tag purges meanwhile" "$out" "($(cat "$WORK/single.count") one-tag purges, not all within the run)"
    kill "$pid"; wait "$pid" 2>/dev/null || true
}

[ -n "$OLD" ] && measure old "$OLD"
measure new "$NEW"
