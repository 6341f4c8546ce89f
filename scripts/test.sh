#!/usr/bin/env bash
# The test command (the README's second set-up command runs this after scripts/setup-host.sh).
# Lint, build, build the offline Debian guest image with klab itself, then run every test
# including the real QEMU/TCG end-to-end ones (KLAB_E2E=1).
set -euo pipefail
cd "$(dirname "$0")/.."

export KLAB_DATA_DIR="${KLAB_DATA_DIR:-/var/lib/klab-test}"
export KLAB_E2E="${KLAB_E2E:-1}"
export KLAB_ACCEL="${KLAB_ACCEL:-qemu}"
mkdir -p "$KLAB_DATA_DIR" && chmod 0755 "$KLAB_DATA_DIR"

echo "== fmt + clippy"
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings

echo "== build"
cargo build --locked --bins

if [ "$KLAB_E2E" = 1 ]; then
  echo "== test guest image (klab image build debian-12 --with-containerd)"
  ./target/debug/klab image build debian-12 --with-containerd
fi

echo "== tests"
cargo test --locked --all-targets -- --test-threads=2
