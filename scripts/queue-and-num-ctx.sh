#!/usr/bin/env bash
# Issue 17's two bugs, measured from outside with a built binary (the proxy and a simulated
# Ollama as separate processes, real sockets):
#
# 1. A request waiting for a model slot starts when the model in its way goes idle.
#    max_models_loaded = 2, both loaded, a 1 s chat to each, 50 ms later an embed for a third
#    model (0.5 s load). Prints the embed's wall time for each queue policy and poll
#    interval: about 1.45 s (the chats' end plus the load) whatever the poll interval.
# 2. num_ctx normalization right after the proxy's own load. The simulated Ollama loads at
#    512 tokens; a chat without options (the proxy loads the model), then at once two chats
#    with options.num_ctx = 2048. Prints what the proxy forwarded (x-llm-warden-num-ctx)
#    and the context Ollama runs afterwards (/api/ps): 512 means no reload.
#
# Usage: scripts/queue-and-num-ctx.sh [BIN]   (default target/release/llm-warden)
# SIM_BIN=path runs the simulator from another build (e.g. this one's, behind an older proxy).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/llm-warden}
SIM_BIN=${SIM_BIN:-$BIN}
[ -x "$BIN" ] && [ -x "$SIM_BIN" ] || { echo "$BIN not found: cargo build --release" >&2; exit 1; }

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
TMP=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT

wait_up() { for _ in $(seq 100); do curl -sf "$1" >/dev/null && return 0; sleep 0.05; done; echo "$1 did not come up" >&2; exit 1; }

# start_pair TOML_EXTRA SIM_ARGS...: a simulator on $SIM and the proxy in front of it (the
# caller picks SIM and PROXY first, with new_ports, and names them in TOML_EXTRA).
new_ports() { SIM=$(port); PROXY=$(port); ADMIN=$(port); }
start_pair() {
    local extra=$1; shift
    RUST_LOG=warn "$SIM_BIN" simulate ollama --listen "127.0.0.1:$SIM" "$@" 2>>"$TMP/sim.log" &
    PIDS+=($!)
    cat >"$TMP/warden.toml" <<TOML
[admin]
listen = "127.0.0.1:$ADMIN"
$extra
TOML
    RUST_LOG=warn "$BIN" serve --config "$TMP/warden.toml" 2>>"$TMP/warden.log" &
    PIDS+=($!)
    wait_up "http://127.0.0.1:$SIM/api/version"
    wait_up "http://127.0.0.1:$ADMIN/healthz"
}

stop_pair() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; PIDS=(); }

provider() {
    printf '[[providers]]\nkind = "ollama"\nlisten = "127.0.0.1:%s"\nupstream = "http://127.0.0.1:%s"\n%s\n' "$PROXY" "$SIM" "$1"
}

echo "1. an embed queued behind two busy models (1 s chats, 0.5 s load)"
for policy in grouped fifo; do
    for poll in 5s 20s; do
        new_ports
        start_pair "[queue]
policy = \"$policy\"
$(provider "poll_interval = \"$poll\"
max_models_loaded = 2")" --token-delay 125ms --reply-tokens 8 --load-latency 500ms
        for m in llama3.2 qwen2.5:7b; do
            curl -s -X POST "http://127.0.0.1:$ADMIN/models/ollama/$m/load" | grep -q "\"status\":\"ready\"" || { echo "cannot load $m" >&2; cat "$TMP/warden.toml" "$TMP/warden.log" >&2; exit 1; }
        done
        for m in llama3.2 qwen2.5:7b; do
            curl -s "http://127.0.0.1:$PROXY/api/chat" \
                -d "{\"model\":\"$m\",\"stream\":false,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}" >/dev/null &
        done
        sleep 0.05
        t=$(curl -s -o /dev/null -w '%{time_total}' "http://127.0.0.1:$PROXY/api/embed" \
            -d '{"model":"nomic-embed-text","input":"hi"}')
        wait_bg=$(jobs -p | grep -v -e "${PIDS[0]}" -e "${PIDS[1]}" || true)
        [ -n "$wait_bg" ] && wait $wait_bg 2>/dev/null || true
        printf '   policy=%-8s poll_interval=%-4s embed took %ss\n' "$policy" "$poll" "$t"
        stop_pair
    done
done

echo "2. num_ctx right after the proxy's own load (the model loads at 512)"
new_ports
start_pair "$(provider 'poll_interval = "1h"')" --ctx-size 512 --token-delay 0ms
curl -s "http://127.0.0.1:$PROXY/api/chat" \
    -d '{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"hi"}]}' >/dev/null
for i in 1 2; do
    h=$(curl -s -D - -o /dev/null "http://127.0.0.1:$PROXY/api/chat" \
        -d '{"model":"llama3.2","stream":false,"options":{"num_ctx":2048},"messages":[{"role":"user","content":"hi"}]}' |
        tr -d '\r' | awk -F': ' 'tolower($1)=="x-llm-warden-num-ctx"{print $2}')
    echo "   chat $i with num_ctx 2048: forwarded as ${h:-sent (no rewrite)}"
done
ctx=$(curl -s "http://127.0.0.1:$SIM/api/ps" | python3 -c 'import json,sys; print([m.get("context_length") for m in json.load(sys.stdin)["models"]])')
echo "   Ollama now runs llama3.2 with context_length $ctx (512: never reloaded)"
stop_pair
