#!/usr/bin/env bash
# Compares llm-warden with nginx (proxy_pass, proxy_buffering off) in front of the same
# simulated Ollama, using benches/loadgen (target/release/loadgen) with --direct/--proxy/--proxy-pid.
# Needs nginx on PATH (apt-get install -y nginx). Extra arguments go to loadgen for both
# runs, e.g.: benches/compare.sh --rounds 3 --duration 3 --scenarios version,chat,stream
# BIN=path/to/llm-warden compares another build (e.g. an older one) the same way.
# BASE=path/to/older/llm-warden also runs that build beside this one, in front of the same
# simulator, and adds a run alternating the two (BASE in the "direct" rows): before/after.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-target/release/llm-warden}
LG=${LG:-target/release/loadgen}
[ -x "$BIN" ] && [ -x "$LG" ] || { echo "run: cargo build --release (builds target/release/llm-warden and target/release/loadgen)" >&2; exit 1; }
NGINX=${NGINX:-$(command -v nginx || echo /usr/sbin/nginx)}
[ -x "$NGINX" ] || { echo "nginx not found (apt-get install -y nginx)" >&2; exit 1; }

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
SIM=$(port); WARDEN=$(port); ADMIN=$(port); NGX=$(port)
TMP=$(mktemp -d); chmod 755 "$TMP"
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
if [ -n "${DEBUG:-}" ]; then trap "cp -r $TMP /tmp/compare-debug; cleanup" EXIT; fi

RUST_LOG=warn "$BIN" simulate ollama --listen 127.0.0.1:$SIM --token-delay 0ms --load-latency 0ms 2>"$TMP/sim.log" &
SIM_PID=$!; PIDS+=($SIM_PID)

cat >"$TMP/warden.toml" <<TOML
[admin]
listen = "127.0.0.1:$ADMIN"
# chat-32k asks num_ctx 40960; the default cap (32768) would compact it.
[buffers.context]
max = 65536
[[providers]]
kind = "ollama"
listen = "127.0.0.1:$WARDEN"
upstream = "http://127.0.0.1:$SIM"
TOML
RUST_LOG=warn "$BIN" serve --config "$TMP/warden.toml" 2>"$TMP/warden.log" &
WARDEN_PID=$!; PIDS+=($WARDEN_PID)
if [ -n "${BASE:-}" ]; then
    OLD=$(port); OLD_ADMIN=$(port)
    sed -e "s/127.0.0.1:$WARDEN\"/127.0.0.1:$OLD\"/" -e "s/127.0.0.1:$ADMIN\"/127.0.0.1:$OLD_ADMIN\"/" \
        "$TMP/warden.toml" >"$TMP/base.toml"
    RUST_LOG=warn "$BASE" serve --config "$TMP/base.toml" 2>"$TMP/base.log" &
    OLD_PID=$!; PIDS+=($OLD_PID)
fi

# One worker process, like llm-warden's one process; keep-alive both ways, no buffering.
mkdir -p "$TMP/nginx"
cat >"$TMP/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $TMP/nginx.pid;
error_log $TMP/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $TMP/nginx;
    proxy_temp_path $TMP/nginx;
    fastcgi_temp_path $TMP/nginx;
    uwsgi_temp_path $TMP/nginx;
    scgi_temp_path $TMP/nginx;
    upstream sim { server 127.0.0.1:$SIM; keepalive 128; }
    server {
        listen 127.0.0.1:$NGX;
        keepalive_requests 1000000;
        location / {
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            # Ollama (and its simulator) answer 403 to a Host that is not local.
            proxy_set_header Host 127.0.0.1:$SIM;
            proxy_buffering off;
            proxy_request_buffering off;
        }
    }
}
NGINX
"$NGINX" -c "$TMP/nginx.conf" -p "$TMP/nginx" &
NGX_PID=$!; PIDS+=($NGX_PID)

for url in http://127.0.0.1:$SIM http://127.0.0.1:$WARDEN http://127.0.0.1:$NGX ${OLD:+http://127.0.0.1:$OLD}; do
    for _ in $(seq 100); do curl -fs "$url/api/version" >/dev/null && break; sleep 0.1; done
done
# The nginx worker is a child of the master; CPU is the worker's.
NGX_WORKER=$(pgrep -P "$NGX_PID" | head -1)

echo "== llm-warden (pid $WARDEN_PID) vs direct =="
"$LG" --direct http://127.0.0.1:$SIM --direct-pid $SIM_PID \
      --proxy http://127.0.0.1:$WARDEN --proxy-pid $WARDEN_PID "$@" 2>/dev/null | tee "$TMP/warden.out"
echo
echo "== nginx (worker pid $NGX_WORKER) vs direct =="
"$LG" --direct http://127.0.0.1:$SIM --direct-pid $SIM_PID \
      --proxy http://127.0.0.1:$NGX --proxy-pid "$NGX_WORKER" "$@" 2>"$TMP/nginx-loadgen.err" | tee "$TMP/nginx.out"; grep -m3 warning "$TMP/nginx-loadgen.err" >&2 || true; tail -3 "$TMP/nginx/error.log" >&2 || true
echo
echo "== llm-warden vs nginx, alternating in one run (nginx in the \"direct\" rows) =="
# The ratios below come from this run: each round runs nginx, then llm-warden, back to back,
# so slow drift of the machine (which the two runs above, one after the other, do see) falls
# on both alike.
"$LG" --direct http://127.0.0.1:$NGX --direct-pid "$NGX_WORKER" \
      --proxy http://127.0.0.1:$WARDEN --proxy-pid $WARDEN_PID "$@" 2>/dev/null | tee "$TMP/head.out"
echo
echo "== llm-warden / nginx (from the alternating run: req/s, p50, p99, cpu µs per request) =="
# The first table only (the streams table below it has rows of the same names). In the
# alternating run the "direct" row is nginx: its CPU is in the "sim µs" column (the
# --direct-pid process), llm-warden's in the proxy row's "cpu µs".
main_table() { sed -n '/^medians over/,/^$/p' "$1"; }
main_table "$TMP/head.out" | awk '
    function num(s) { v = s; if (s ~ /ms$/) { sub(/ms$/, "", v); return v * 1000 } if (s ~ /µs$/) { sub(/µs$/, "", v); return v } if (s ~ /s$/) { sub(/s$/, "", v); return v * 1e6 } sub(/\*$/, "", v); return v + 0 }
    BEGIN { printf "%-20s %10s %10s %10s %10s %10s %10s\n", "scenario", "req/s", "p50", "p99", "cpu µs", "warden µs", "nginx µs" }
    /^[a-z0-9-]+ c=/ { name = $1 "_" $2; n_rps = $4; n_p50 = num($5); n_p99 = num($7); n_cpu = num($11); next }
    /^ +proxy / { w_rps = $2; w_p50 = num($3); w_p99 = num($5); w_cpu = num($8)
        printf "%-20s %9.2fx %9.2fx %9.2fx %9.2fx %10.1f %10.1f\n", name, w_rps / n_rps, w_p50 / n_p50, w_p99 / n_p99, (n_cpu > 0 ? w_cpu / n_cpu : 0), w_cpu, n_cpu }'

if [ -n "${BASE:-}" ]; then
    echo
    echo "== this build vs BASE ($BASE), alternating in one run (BASE in the \"direct\" rows) =="
    "$LG" --direct http://127.0.0.1:$OLD --direct-pid $OLD_PID \
          --proxy http://127.0.0.1:$WARDEN --proxy-pid $WARDEN_PID "$@" 2>/dev/null | tee "$TMP/base.out"
    echo
    echo "== this build / BASE (req/s, p50, p99, cpu µs per request) =="
    main_table "$TMP/base.out" | awk '
    function num(s) { v = s; if (s ~ /ms$/) { sub(/ms$/, "", v); return v * 1000 } if (s ~ /µs$/) { sub(/µs$/, "", v); return v } if (s ~ /s$/) { sub(/s$/, "", v); return v * 1e6 } sub(/\*$/, "", v); return v + 0 }
    BEGIN { printf "%-20s %10s %10s %10s %10s %10s %10s\n", "scenario", "req/s", "p50", "p99", "cpu µs", "new µs", "base µs" }
    /^[a-z0-9-]+ c=/ { name = $1 "_" $2; n_rps = $4; n_p50 = num($5); n_p99 = num($7); n_cpu = num($11); next }
    /^ +proxy / { w_rps = $2; w_p50 = num($3); w_p99 = num($5); w_cpu = num($8)
        printf "%-20s %9.2fx %9.2fx %9.2fx %9.2fx %10.1f %10.1f\n", name, w_rps / n_rps, w_p50 / n_p50, w_p99 / n_p99, (n_cpu > 0 ? w_cpu / n_cpu : 0), w_cpu, n_cpu }'
fi
