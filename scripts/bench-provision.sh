#!/usr/bin/env bash
# Provisioning overhead benchmark: what klab itself adds on top of the commands' own run time on the
# guests (SSH round trips, uploads, probes, journal writes, waits between commands), target ≤ 10 %.
#
# Builds labs/e2e-kubernetes.toml (one control plane, one worker, isolated networks, TCG) with the
# VMs first, serves the STAND-IN Kubernetes repository (scripts/standin-repo.sh) on the host's
# address of the lab's `outside` network, then times `klab up`'s provisioning and prints klab's own
# measurement: per phase, the phase's wall time minus the longest time one node spent in the phase's
# commands (each command's time less one SSH round trip of `true` on that session). RUNS=N repeats
# the provisioning N times on fresh VMs.
#
# Needs root, libvirtd, the image from `klab image build debian-12 --with-containerd`, dpkg-deb,
# apt-ftparchive, gpg and python3.
set -euo pipefail
cd "$(dirname "$0")/.."

export KLAB_DATA_DIR="${KLAB_DATA_DIR:-/var/lib/klab-test}"
export KLAB_ACCEL=qemu
LAB=labs/e2e-kubernetes.toml
NAME=e2ek8s
BIND=10.232.1.1
PORT=18089
RUNS="${RUNS:-1}"
KLAB="${KLAB:-./target/release/klab}"
[ -x "$KLAB" ] || cargo build --release --locked --bins

repo=$(mktemp -d)
server=
cleanup() {
  [ -z "$server" ] || kill "$server" 2>/dev/null || true
  "$KLAB" down "$NAME" >/dev/null 2>&1 || true
  rm -rf "$repo"
}
trap cleanup EXIT
bash scripts/standin-repo.sh "$repo/core:/stable:" >/dev/null

for i in $(seq 1 "$RUNS"); do
  "$KLAB" down "$NAME" >/dev/null 2>&1 || true
  "$KLAB" up "$LAB" --no-kubernetes >/dev/null
  if [ -z "$server" ]; then
    (cd "$repo" && exec python3 -m http.server --bind "$BIND" "$PORT") >/dev/null 2>&1 &
    server=$!
    sleep 1
  fi
  start=$(date +%s.%N)
  "$KLAB" up "$LAB" --output json > "$repo/up.json"
  end=$(date +%s.%N)
  python3 - "$repo/up.json" "$start" "$end" "$i" <<'PY'
import json, sys
o = json.load(open(sys.argv[1]))["kubernetes"]
ov = o["overhead"]
wall = float(sys.argv[3]) - float(sys.argv[2])
print(f"run {sys.argv[4]}: provisioning {o['seconds']:.1f} s (klab up {wall:.1f} s), "
      f"phases {ov['phases_seconds']:.1f} s, {ov['commands']} commands, "
      f"klab's own share {ov['seconds']:.1f} s = {100 * ov['share']:.1f} % (target <= 10 %)")
for p in o["phases"]:
    if p["ran"] or p["already"]:
        print(f"  {p['phase']:<20} {p['seconds']:6.1f} s  {', '.join(p['ran'] + p['already'])}")
PY
  if [ "$i" -lt "$RUNS" ]; then "$KLAB" down "$NAME" >/dev/null; fi
done
