#!/usr/bin/env bash
# Installs Debian's Chromium for cli/tests/it/dashboard.rs when it is missing (the test runs this
# itself on a machine without it; .ci/run does it first). Prints the browser's path.
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
    if [[ "$(id -u)" != 0 ]] && command -v sudo >/dev/null 2>&1; then
        sudo apt-get update -q >&2 && sudo apt-get install -y -q chromium >&2
    else
        apt-get update -q >&2 && apt-get install -y -q chromium >&2
    fi
fi
command -v chromium
