#!/usr/bin/env bash
# Set up a fresh machine for corral: system packages (as root), uv, and the workspace venv.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the drivers and tests use:
#   nftables libnftables1  net + lb drivers (libnftables via its Python binding)
#   iproute2               ip netns for tests
#   tini                   init (pid 1) of each sandbox's pid namespace (fs driver)
#   libseccomp2            seccomp filters compiled by the launch path
#   bubblewrap             the sandbox benchmark's reference
#   gcc                    builds corral_lb._relay (the lb proxy's L4 relay, C) at install time;
#                          its sanitizer runtimes (libasan, libubsan) come with it
#   make pkg-config libzmq3-dev libjansson-dev   the reference driver in C (examples/driver-c)
#   nodejs npm             the lb policy example in JavaScript (examples/policy-js)
#   util-linux             setpriv, unshare for the tests
#   systemd                systemd-analyze verifies the unit `corral host install` writes
#   default-jdk-headless   Java inside a filtered app (tests of the seccomp allow-list; the
#                          source launcher they use needs the JDK's compiler; ~70 MB)
#   pebble                 Let's Encrypt's ACME test server and its DNS (pebble-challtestsrv):
#                          the lb tests of automatic HTTPS order certificates from it
#   openssh-server openssh-client git   git push and the remote CLI: the tests run a real
#                          sshd on a loopback port, real ssh and git clients
#   etcd-server etcd-client   the ledger on etcd: the tests and benchmarks start their own
#                          members (loopback, or one per test host of the multi-host harness)
#   Benchmarks install their own peers (haproxy, wrk, nginx-light) when run.
APT_PACKAGES=(nftables libnftables1 iproute2 tini libseccomp2 bubblewrap gcc make pkg-config
              libzmq3-dev libjansson-dev util-linux procps curl systemd default-jdk-headless
              pebble openssh-server openssh-client git etcd-server etcd-client)

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# node and npm: the image ships them; Debian's otherwise
if [ "$(id -u)" = 0 ] && ! command -v npm >/dev/null && command -v apt-get >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi

if ! command -v uv >/dev/null; then
  echo "setup: installing uv"
  python3 -m pip install -q "uv==0.13.9"
fi
uv sync --frozen -q 2>/dev/null || uv sync -q
if command -v npm >/dev/null && [ ! -d examples/policy-js/node_modules/zeromq ]; then
  (cd examples/policy-js && npm ci --no-audit --no-fund --loglevel=error)
fi
# corral-ssh (git push, the remote CLI) runs as the unprivileged SSH account with this
# venv's interpreter: every directory above it must let others through (an interpreter under
# a 0700 /root, as pyenv's and uv's are, would otherwise refuse the account)
if [ "$(id -u)" = 0 ]; then
  dir=$(dirname "$(readlink -f .venv/bin/python)")
  while [ "$dir" != / ]; do
    [ -n "$(find "$dir" -maxdepth 0 -perm -o+x)" ] || chmod o+x "$dir"
    dir=$(dirname "$dir")
  done
fi
echo "setup: ready (.venv/bin/corral)"
