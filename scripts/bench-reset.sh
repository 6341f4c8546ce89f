#!/usr/bin/env bash
# Reset benchmark: `klab reset` of a lab versus bringing the same lab up fresh (target reset / up
# ≤ 0.2 under TCG). Uses a copy (`--copy bench`) of labs/e2e-copies.toml: one node, isolated
# networks. RUNS=N repeats it. Needs root, libvirtd and the image from `klab image build debian-12`.
set -euo pipefail
cd "$(dirname "$0")/.."

export KLAB_DATA_DIR="${KLAB_DATA_DIR:-/var/lib/klab-test}"
export KLAB_ACCEL=qemu
LAB=labs/e2e-copies.toml
RUNS="${RUNS:-1}"
KLAB="${KLAB:-./target/release/klab}"
[ -x "$KLAB" ] || cargo build --release --locked --bins
trap '"$KLAB" down e2ecp --copy bench >/dev/null 2>&1 || true' EXIT
now() { date +%s.%N; }

for i in $(seq 1 "$RUNS"); do
  "$KLAB" down e2ecp --copy bench >/dev/null 2>&1 || true
  t0=$(now)
  "$KLAB" up "$LAB" --copy bench >/dev/null
  t1=$(now)
  "$KLAB" snapshot save e2ecp initial --copy bench >/dev/null
  "$KLAB" ssh e2ecp-bench/vm -- 'echo changed > /home/klab/marker' >/dev/null
  t2=$(now)
  "$KLAB" reset e2ecp --copy bench >/dev/null
  t3=$(now)
  echo "run $i: up $(echo "$t1 - $t0" | bc) s, reset $(echo "$t3 - $t2" | bc) s, reset / up = $(echo "scale=3; ($t3 - $t2) / ($t1 - $t0)" | bc) (target <= 0.2)"
done
