#!/usr/bin/env bash
# `make bench`: installs nginx and haproxy (the reference proxies), wrk (a second load
# generator) and valgrind (instruction counts) if missing, builds the release binaries, runs every
# benchmark (zeroscale-bench run) and leaves the markdown in bench/out/results.md and
# the JSON in bench/out/results.json. Extra arguments go to `zeroscale-bench run`
# (e.g. bench/run.sh --rounds 1 --skip cold-start). See BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing+=(nginx)
command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
command -v wrk >/dev/null || missing+=(wrk)
command -v valgrind >/dev/null || missing+=(valgrind)
if [ ${#missing[@]} -gt 0 ]; then
  echo "bench: installing ${missing[*]} (reference proxies, cross-check load generator, instruction counts)" >&2
  # The package would start a system nginx on port 80; the bench runs its own. A
  # policy-rc.d that refuses service starts is the Debian way to say so; ours is
  # removed again unless one was there before.
  own_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    own_policy=1
  fi
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  if [ "$own_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi

echo "bench: building release binaries" >&2
cargo build --release --quiet --bin zeroscale --bin zeroscale-bench

mkdir -p bench/out
target/release/zeroscale-bench run --out bench/out/results.json "$@" | tee bench/out/results.md
