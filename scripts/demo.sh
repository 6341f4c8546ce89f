#!/usr/bin/env bash
# The main job on the embedded default lab, offline: build klab, build the Debian guest image from
# Debian packages (no cloud image download needed), write the default lab file and bring it up.
# Run scripts/setup-host.sh first (as root).
set -euo pipefail
cd "$(dirname "$0")/.."

export KLAB_ACCEL="${KLAB_ACCEL:-qemu}"   # TCG works everywhere; use auto/kvm on bare metal
cargo build --release --locked --bins
KLAB=./target/release/klab

$KLAB image build debian-12
workdir="${KLAB_DEMO_DIR:-$HOME/klab-demo}"
mkdir -p "$workdir"
$KLAB init --force "$workdir/lab.toml"
$KLAB up "$workdir/lab.toml"
$KLAB status -f "$workdir/lab.toml"
cat <<MSG

The lab is up. Try:
  $KLAB ssh node1 -- ip -br addr
  $KLAB ssh-config local >> ~/.ssh/config && ssh node1
Remove it with:
  $KLAB down local
MSG
