# Shared by the scripts that compare two bulwark builds on the cached-hit path
# (compare-builds.sh, callgrind-hit.sh): sourced, not run.

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# Writes the origin: every GET answers a 2 KiB body, public for an hour, with an ETag.
# Run it as: python3 FILE PORT
write_hit_origin() {
    cat > "$1" <<'PY'
import http.server, sys
BODY = b"x" * 2048
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(BODY)))
        self.send_header("Cache-Control", "public, max-age=3600")
        self.send_header("ETag", '"v1"')
        self.end_headers()
        self.wfile.write(BODY)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
PY
}

# Writes a config: one in-process pool in front of the origin, one catch-all route.
# write_hit_config FILE PORT ADMIN_PORT ORIGIN_PORT
write_hit_config() {
    cat > "$1" <<TOML
[server]
listen = "127.0.0.1:$2"
admin_listen = "127.0.0.1:$3"
drain_delay = "0s"
[[origins]]
name = "origin"
url = "http://127.0.0.1:$4"
[[pools]]
name = "pdp"
l1_max_bytes = "64MiB"
[[routes]]
name = "all"
path_prefix = "/"
pool = "pdp"
origin = "origin"
TOML
}
