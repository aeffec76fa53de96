#!/usr/bin/env bash
# Debian tools the LAN, interop and durability tiers need (ip, tc, unshare, node, npm, strace).
# Installs only what is missing.
set -euo pipefail
missing=()
command -v ip >/dev/null || missing+=(iproute2)
command -v tc >/dev/null || missing+=(iproute2)
command -v unshare >/dev/null || missing+=(util-linux)
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
command -v strace >/dev/null || missing+=(strace)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "system-deps: please install: ${missing[*]} (needs root)" >&2; exit 1
  fi
  echo "system-deps: installing ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
