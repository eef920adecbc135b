#!/usr/bin/env bash
# Installs the programs the tests start for themselves (on free ports, in temporary
# directories): redis-server for the Redis job store, haproxy for the scale-out topology,
# chromium and chromium-driver for the web page's browser tests. Debian's packages;
# nothing here starts or relies on a system service.
set -euo pipefail

programs=(redis-server haproxy chromium chromedriver)
packages=(redis-server haproxy chromium chromium-driver)
missing=()
for i in "${!programs[@]}"; do
    command -v "${programs[$i]}" >/dev/null 2>&1 || missing+=("${packages[$i]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
else
    echo "error: the tests need ${missing[*]}: apt-get install ${missing[*]}" >&2
    exit 1
fi
echo "installing ${missing[*]} for the tests (apt-get; chromium is about 100 MB)"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
