#!/usr/bin/env bash
# Installs the services the tests start for themselves (on free ports, in temporary
# directories): redis-server for the Redis job store, haproxy for the scale-out topology.
# Debian's packages; nothing here starts or relies on a system service.
set -euo pipefail

command -v redis-server >/dev/null 2>&1 && command -v haproxy >/dev/null 2>&1 && exit 0

if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
else
    echo "error: the tests need redis-server and haproxy: apt-get install redis-server haproxy" >&2
    exit 1
fi
echo "installing redis-server and haproxy for the tests (apt-get)"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends redis-server haproxy >/dev/null
