#!/usr/bin/env bash
# Installs the programs the tests start for themselves (on free ports, in temporary
# directories): redis-server for the Redis job store, haproxy for the scale-out topology,
# chromium and chromium-driver for the web page's browser tests, qemu-user to run the int8
# model on an emulated CPU without VNNI. Debian's packages; nothing here starts or relies
# on a system service.
set -euo pipefail

if command -v redis-server >/dev/null 2>&1 && command -v haproxy >/dev/null 2>&1 \
    && command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1 \
    && command -v qemu-x86_64 >/dev/null 2>&1; then
    exit 0
fi

if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
else
    echo "error: the tests need redis-server, haproxy, chromium and qemu-user:" \
        "apt-get install redis-server haproxy chromium chromium-driver qemu-user" >&2
    exit 1
fi
echo "installing redis-server, haproxy, chromium, chromium-driver and qemu-user for the tests (apt-get)"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends \
    redis-server haproxy chromium chromium-driver qemu-user >/dev/null
