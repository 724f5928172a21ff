#!/usr/bin/env bash
# Checks deploy/envoy/envoy.yaml as shipped with the real Envoy (installed by .ci/envoy-env.sh):
#
#   1. each address the tests rewrite occurs exactly once outside comments (a plain string
#      replacement then changes exactly that setting; see the file's header);
#   2. `envoy --mode validate` accepts the file as shipped;
#   3. it accepts the loopback rewrite the integration test uses (listener 127.0.0.1:$LISTEN_PORT,
#      EPP 127.0.0.1:$EPP_PORT, admin 127.0.0.1:$ADMIN_PORT; defaults 18080, 19002, 19901).
#
# Exits non-zero on the first failure, with Envoy's own message. Offline, about a second.
#
#   scripts/envoy-validate.sh            # or: LISTEN_PORT=28080 scripts/envoy-validate.sh
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
config="$root/deploy/envoy/envoy.yaml"
listen_port="${LISTEN_PORT:-18080}"
epp_port="${EPP_PORT:-19002}"
admin_port="${ADMIN_PORT:-19901}"

envoy="$(bash "$root/.ci/envoy-env.sh" | sed -n 's/^ENVOY=//p' | tail -n1)"
[[ -x "$envoy" ]] || {
    echo "envoy-validate: .ci/envoy-env.sh gave no binary" >&2
    exit 1
}

fail=0
for key in 'address: 0.0.0.0' 'port_value: 8080' '127.0.0.1 # EPP' 'port_value: 9002' 'port_value: 9901'; do
    n="$(grep -v '^[[:space:]]*#' "$config" | grep -cF -- "$key" || true)"
    if [[ "$n" != 1 ]]; then
        echo "envoy-validate: '$key' occurs $n times outside comments in $config (want 1)" >&2
        fail=1
    fi
done
[[ "$fail" == 0 ]] || exit 1

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

validate() {
    if ! "$envoy" --mode validate -c "$1" --log-level warn >"$tmp/out" 2>&1; then
        cat "$tmp/out" >&2
        echo "envoy-validate: FAILED: $2" >&2
        exit 1
    fi
    echo "envoy-validate: OK: $2"
}

validate "$config" "deploy/envoy/envoy.yaml as shipped"

sed -e "s/address: 0.0.0.0/address: 127.0.0.1/" \
    -e "s/port_value: 8080/port_value: $listen_port/" \
    -e "s/port_value: 9002/port_value: $epp_port/" \
    -e "s/port_value: 9901/port_value: $admin_port/" \
    "$config" >"$tmp/envoy.yaml"
# The rewrite must have changed exactly the four settings (4 lines outside comments).
changed="$(diff <(grep -v '^[[:space:]]*#' "$config") <(grep -v '^[[:space:]]*#' "$tmp/envoy.yaml") | grep -c '^>' || true)"
if [[ "$changed" != 4 ]]; then
    echo "envoy-validate: the rewrite changed $changed lines outside comments (want 4)" >&2
    exit 1
fi
validate "$tmp/envoy.yaml" "loopback rewrite (listener 127.0.0.1:$listen_port, EPP 127.0.0.1:$epp_port, admin 127.0.0.1:$admin_port)"
