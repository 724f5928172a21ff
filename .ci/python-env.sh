#!/usr/bin/env bash
# Creates or updates <repo>/.venv with the Python clients and the Kubernetes manifest validators
# (cli/tests/python/k8s_manifests.py) pinned in cli/tests/python/requirements.txt,
# for cli/tests (python_clients). Idempotent: safe to run again; a no-op when nothing changed.
#
#   PYTHON=python3.12 .ci/python-env.sh    # base interpreter (default: python3)
#
# Writes .venv/.llm-warden-requirements.txt last, as the test does: the test rebuilds a venv
# whose stamp is missing or differs from requirements.txt. Holds the same lock as the test
# (.venv/.lock, a directory) so it cannot race a test that is building the venv.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
req="$root/cli/tests/python/requirements.txt"
stamp="$venv/.llm-warden-requirements.txt"
python="${PYTHON:-python3}"

if [[ -x "$venv/bin/python" && -f "$stamp" ]] && cmp -s "$req" "$stamp"; then
    echo "python-env: $venv is up to date"
    exit 0
fi

mkdir -p "$venv"
lock="$venv/.lock"
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
    echo "python-env: $lock is held by another process" >&2
    exit 1
}
trap 'rm -rf "$lock"' EXIT

"$python" -m venv "$venv"
"$venv/bin/python" -m pip install --disable-pip-version-check -q -r "$req"
cp "$req" "$stamp"
echo "python-env: $venv ready ($("$venv/bin/python" -m pip freeze --disable-pip-version-check | grep -Ei '^(ollama|openai)==' | paste -sd' '))"
