#!/usr/bin/env bash
# Run with: scripts/gpu-pressure.sh   (on a machine with an NVIDIA GPU; builds nothing:
# it uses target/release/llm-warden, or $BIN)
#
# Shows llm-warden reading GPU memory through NVML and its memory-pressure response: starts
# the simulated Ollama and the proxy (NVML on, sampling every 500 ms, warning 0.55, critical
# 0.88), loads a model, then holds ~60% and then ~92% of the GPU's memory with another
# process (python3 with torch, where present) and prints /status (`system`, the pressure
# events, the models) at each step. Everything it prints is also saved under $OUT.
set -uo pipefail
BIN=${BIN:-target/release/llm-warden}
OUT=${OUT:-/tmp/gpu-pressure}
mkdir -p "$OUT"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done; }
trap cleanup EXIT

nvidia-smi --query-gpu=index,name,memory.total,memory.used,memory.free --format=csv 2>&1 | tee "$OUT/nvidia-smi.txt"

"$BIN" simulate ollama --listen 127.0.0.1:21434 >"$OUT/sim.log" 2>&1 &
pids+=($!)
cat >"$OUT/llm-warden.toml" <<EOF
[admin]
listen = "127.0.0.1:21400"
[[providers]]
name = "ollama"
kind = "ollama"
listen = "127.0.0.1:21435"
upstream = "http://127.0.0.1:21434"
[memory_pressure]
sample_interval = "500ms"
warning = 0.55
critical = 0.88
gpu = true
[compaction]
cache_dir = "$OUT/cache"
EOF
"$BIN" serve --config "$OUT/llm-warden.toml" >"$OUT/serve.log" 2>&1 &
pids+=($!)
for _ in $(seq 50); do curl -sf 127.0.0.1:21400/healthz >/dev/null && break; sleep 0.1; done

status() {
  curl -s 127.0.0.1:21400/status | python3 -c '
import json, sys
s = json.load(sys.stdin)
print(json.dumps({"system": s["system"], "pressure_events": s["pressure_events"],
                  "models": [{k: m.get(k) for k in ("model", "status", "memory")} for m in s["models"]]}, indent=1))'
}

# Two idle models, so that critical has something to unload.
curl -s -X POST 127.0.0.1:21400/models/ollama/llama3.2/load >/dev/null
curl -s -X POST 127.0.0.1:21400/models/ollama/qwen2.5:7b/load >/dev/null
echo "== at rest"; status | tee "$OUT/status-rest.json"

# Holds `fraction` of the GPU's total memory for `seconds`.
hold() {
  python3 - "$1" "$2" <<'PY'
import sys, time
try:
    import torch
except ImportError:
    print("no torch here: cannot hold GPU memory"); sys.exit(0)
frac, secs = float(sys.argv[1]), float(sys.argv[2])
free, total = torch.cuda.mem_get_info()
want = int(total * frac) - (total - free)
block = torch.empty(max(want, 0), dtype=torch.uint8, device="cuda") if want > 0 else None
print(f"holding {want / 2**20:.0f} MiB (target {frac:.0%} of {total / 2**20:.0f} MiB)", flush=True)
time.sleep(secs)
PY
}

hold 0.60 8 & holder=$!; sleep 4
echo "== holding ~60%"; status | tee "$OUT/status-60.json"; wait "$holder"
hold 0.92 8 & holder=$!; sleep 4
echo "== holding ~92%"; status | tee "$OUT/status-92.json"; wait "$holder"
sleep 2
echo "== released"; status | tee "$OUT/status-after.json"
grep -i "gpu\|nvidia\|pressure" "$OUT/serve.log" | tail -20
