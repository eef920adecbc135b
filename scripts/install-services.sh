#!/usr/bin/env bash
# Installs the services the tests start for themselves (on free ports, in temporary
# directories): redis-server for the Redis job store, haproxy for the scale-out topology.
# Debian's packages; nothing here starts or relies on a system service.
set -euo pipefail

declare -A package_of=([redis-server]=redis-server [haproxy]=haproxy)
missing=()
for program in "${!package_of[@]}"; do
    command -v "$program" >/dev/null 2>&1 || missing+=("${package_of[$program]}")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
else
    echo "error: install ${missing[*]} (apt-get install ${missing[*]}); the job-store tests need them" >&2
    exit 1
fi
echo "installing ${missing[*]} for the tests (apt-get)"
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
