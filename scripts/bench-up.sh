#!/usr/bin/env bash
# Bring-up benchmark: `klab up` versus a hand-written parallel virsh baseline, same image, same
# 3-node lab (labs/e2e-isolated.toml: isolated networks only), same rendered domains and seeds.
#
#   baseline = create overlays + seeds, net-create both networks, `virsh create` every domain at
#              once, poll the serial logs until cloud-init reports "finished" on every node.
#   klab     = `klab up` from nothing: pool, networks, overlays, seeds, domains, then pinned SSH,
#              `cloud-init status --wait` and address/route verification on every node.
#
# Prints both times and the ratio klab/baseline (target ≤ 1.05). Needs root, libvirtd and the image
# from `klab image build debian-12`. RUNS=N repeats each side N times, alternating.
set -euo pipefail
cd "$(dirname "$0")/.."

export KLAB_DATA_DIR="${KLAB_DATA_DIR:-/var/lib/klab-test}"
export KLAB_ACCEL=qemu
LAB=labs/e2e-isolated.toml
NAME=e2e
RUNS="${RUNS:-1}"
URI=qemu:///system
KLAB="${KLAB:-./target/release/klab}"
[ -x "$KLAB" ] || cargo build --release --locked --bins
v() { virsh -q -c "$URI" "$@"; }
now() { date +%s.%N; }

render_dir=$(mktemp -d)
trap 'rm -rf "$render_dir"' EXIT

baseline_clean() {
  for d in $(v list --all --name | grep "^klab-$NAME-" || true); do v destroy "$d" >/dev/null 2>&1 || true; v undefine "$d" >/dev/null 2>&1 || true; done
  for n in $(v net-list --all --name | grep "^klab-$NAME-" || true); do v net-destroy "$n" >/dev/null 2>&1 || true; v net-undefine "$n" >/dev/null 2>&1 || true; done
  rm -rf "$KLAB_DATA_DIR/pools/$NAME-baseline"
}

run_klab() {
  "$KLAB" down "$NAME" >/dev/null 2>&1 || true
  local t0 t1
  t0=$(now)
  "$KLAB" up "$LAB" >/dev/null 2>&1
  t1=$(now)
  "$KLAB" down "$NAME" --keep-state >/dev/null 2>&1
  echo "$t1 - $t0" | bc
}

run_baseline() {
  baseline_clean
  local pooldir="$KLAB_DATA_DIR/pools/$NAME"
  mkdir -p "$pooldir"; chmod 0755 "$pooldir"
  local t0 t1
  t0=$(now)
  for x in "$render_dir"/networks/*.xml; do v net-create "$x" >/dev/null; done
  local logs=()
  for nd in "$render_dir"/nodes/*/; do
    (
      n=$(basename "$nd")
      backing=$(grep -o "<path>[^<]*</path>" "$nd/overlay.xml" | tail -1 | sed 's/<[^>]*>//g')
      qemu-img create -q -f qcow2 -F qcow2 -b "$backing" -o compat=1.1 "$pooldir/$n.qcow2" 4G
      rm -f "$pooldir/$n-seed.img"
      mkfs.vfat -n CIDATA -C "$pooldir/$n-seed.img" 1024 >/dev/null
      mcopy -i "$pooldir/$n-seed.img" "$nd/cloud-init/meta-data" "$nd/cloud-init/user-data" "$nd/cloud-init/network-config" ::
      v create "$nd/domain.xml" >/dev/null
    ) &
    logs+=("$(grep -o "log file='[^']*'" "$nd/domain.xml" | sed "s/log file='//; s/'//")")
  done
  wait
  local deadline=$(( $(date +%s) + 900 ))
  while :; do
    local done_all=1
    for l in "${logs[@]}"; do grep -qs "Cloud-init v\..*finished at" "$l" || done_all=0; done
    [ "$done_all" = 1 ] && break
    [ "$(date +%s)" -lt "$deadline" ] || { echo "baseline timed out" >&2; exit 1; }
    sleep 0.5
  done
  t1=$(now)
  baseline_clean
  rm -rf "$pooldir"
  echo "$t1 - $t0" | bc
}

# Render exactly the domains and seeds `klab up` will use (the lab's generated keys, the locally
# built image with its kernel) for the baseline.
"$KLAB" down "$NAME" >/dev/null 2>&1 || true
"$KLAB" render "$LAB" --out "$render_dir" --from-state >/dev/null
mkdir -p "$KLAB_DATA_DIR/console"

k_total=0; b_total=0
for i in $(seq 1 "$RUNS"); do
  b=$(run_baseline); echo "run $i: baseline ${b}s"
  k=$(run_klab);     echo "run $i: klab     ${k}s"
  b_total=$(echo "$b_total + $b" | bc); k_total=$(echo "$k_total + $k" | bc)
done
"$KLAB" down "$NAME" >/dev/null 2>&1 || true
k_avg=$(echo "scale=2; $k_total / $RUNS" | bc); b_avg=$(echo "scale=2; $b_total / $RUNS" | bc)
ratio=$(echo "scale=3; $k_total / $b_total" | bc)
echo "klab up: ${k_avg}s  baseline: ${b_avg}s  ratio klab/baseline: ${ratio} (target <= 1.05)"
