#!/usr/bin/env bash
# Instructions per cached hit, counted by callgrind: the same figure for the same binary
# and requests whatever else the machine is doing, so two builds can be compared on a
# noisy machine where wall-clock CPU per request wanders by 10% or more.
#
#   benches/callgrind-hit.sh OLD_BINARY [NEW_BINARY]   # NEW: this tree's release build
#   REQUESTS=5000 benches/callgrind-hit.sh /tmp/bulwark-old
#   MODE=miss benches/callgrind-hit.sh /tmp/bulwark-old   # the miss path instead
#
# Each server runs under callgrind with instrumentation off while it starts and fills
# its cache; it is switched on for exactly REQUESTS keep-alive GETs of one stored URL
# (browser-like headers, as in compare-builds.sh) and off again, so the count is the
# hit path alone: accept loop, parsing, routing, key, L1 lookup, response, record.
# With MODE=miss every request is a new path the origin answers `no-store`, so the count
# is the miss path: lookup, coalescing, the origin request and its answer streamed back.
set -euo pipefail
# OLD_/NEW_ROUTE_KEYS and OLD_/NEW_SERVER_KEYS add config lines to one side, as in
# compare-builds.sh, to count what a route key costs with one binary; POOL_KEYS (TOML
# lines, say a `redis_url`) are added to both sides' pool.
# COLLECT (a callgrind function pattern) counts only what runs inside the functions it
# matches: the server's own once-a-second work (the dashboard's sampler) is counted too
# otherwise, a few per cent per request at callgrind's speed, which hides small changes;
#   COLLECT='bulwark::connections::Connections::serve*' benches/callgrind-hit.sh OLD NEW
# counts the client connections' work alone (hyper's parsing and writing included).
# KEEP=1 keeps the callgrind files (their directory is printed) for callgrind_annotate.

OLD=${1:?usage: callgrind-hit.sh OLD_BINARY [NEW_BINARY]}
NEW=${2:-}
REQUESTS=${REQUESTS:-5000}
MODE=${MODE:-hit}
HERE=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=benches/common.sh
source "$HERE/benches/common.sh"
WORK=$(mktemp -d /tmp/bulwark-callgrind.XXXXXX)
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

command -v valgrind >/dev/null 2>&1 || { apt-get install -y valgrind >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y valgrind >/dev/null; }; }
if [ -z "$NEW" ]; then
    (cd "$HERE" && cargo build --release --quiet)
    NEW="$HERE/target/release/bulwark"
fi


ORIGIN_PORT=$(free_port)
write_hit_origin "$WORK/origin.py"
python3 "$WORK/origin.py" "$ORIGIN_PORT" & PIDS+=($!)

# Sends N keep-alive GETs on one connection and reads each answer whole.
cat > "$WORK/client.py" <<'PY'
import http.client, sys
port, n, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
headers = {"Host": "shop.example", "Accept-Encoding": "gzip, deflate, br, zstd", "Accept-Language": "en-GB,en;q=0.9",
           "Cookie": "session=abc; cart=7", "User-Agent": "Mozilla/5.0 (X11; Linux x86_64) bench",
           "Accept": "text/html,application/xhtml+xml;q=0.9,*/*;q=0.8"}
conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
for i in range(n):
    path = f"/miss/{mode}/{i}?size=m&color=red" if mode != "hit" else "/products/123?size=m&color=red"
    conn.request("GET", path, headers=headers)
    res = conn.getresponse()
    res.read()
    if res.status != 200:
        sys.exit(f"status {res.status}")
PY

count() {
    local name=$1 binary=$2 port admin
    port=$(free_port); admin=$(free_port)
    write_hit_config "$WORK/$name.toml" "$port" "$admin" "$ORIGIN_PORT" "" "${POOL_KEYS:-}"
    add_side_keys "$WORK/$name.toml" "$name"
    local collect=()
    [ -z "${COLLECT:-}" ] || collect=(--toggle-collect="$COLLECT")
    valgrind --tool=callgrind --instr-atstart=no "${collect[@]}" --callgrind-out-file="$WORK/$name.out" \
        "$binary" serve --config "$WORK/$name.toml" 2>"$WORK/$name.log" &
    local pid=$!
    PIDS+=("$pid")
    for _ in $(seq 300); do python3 "$WORK/client.py" "$port" 10 warm 2>/dev/null && break; sleep 0.2; done
    python3 "$WORK/client.py" "$port" 100 "${MODE/miss/warm}"
    callgrind_control -i on "$pid" >/dev/null
    python3 "$WORK/client.py" "$port" "$REQUESTS" "$MODE"
    callgrind_control -i off "$pid" >/dev/null
    kill -INT "$pid"; wait "$pid" 2>/dev/null || true
    local total
    total=$(awk '/^totals:/ {print $2}' "$WORK"/"$name".out* | awk '{s += $1} END {print s}')
    awk -v t="$total" -v n="$REQUESTS" -v name="$name" 'BEGIN {printf "%-4s %14d instructions, %10.0f per request\n", name, t, t / n}'
    echo "$total" > "$WORK/$name.total"
}

count old "$OLD"
count new "$NEW"
[ -z "${KEEP:-}" ] || echo "callgrind files in $WORK"
awk -v o="$(cat "$WORK/old.total")" -v n="$(cat "$WORK/new.total")" 'BEGIN {printf "ratio new/old instructions per request %.4f\n", n / o}'
