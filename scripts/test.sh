#!/usr/bin/env bash
# The test command (the README's second set-up command runs this after scripts/setup-host.sh).
# Lint, build, build the offline Debian guest image with klab itself, then run every test,
# including the ignored ones (`--include-ignored`): the real QEMU/TCG end-to-end tests, the
# qemu:///system tests and the real image build. A test that cannot run fails; none is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

export KLAB_DATA_DIR="${KLAB_DATA_DIR:-/var/lib/klab-test}"
export KLAB_ACCEL="${KLAB_ACCEL:-qemu}"
mkdir -p "$KLAB_DATA_DIR" && chmod 0755 "$KLAB_DATA_DIR"

echo "== fmt + clippy"
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings

echo "== build"
cargo build --locked --bins

echo "== test guest image (klab image build debian-12 --with-containerd)"
./target/debug/klab image build debian-12 --with-containerd

echo "== tests"
cargo test --locked --all-targets -- --test-threads=2
# The ignored ones boot real guests under TCG: one at a time, so two labs never share the 2 cores.
echo "== tests marked #[ignore = \"needs …\"] (real QEMU guests, qemu:///system, the real image build)"
cargo test --locked --all-targets -- --ignored --test-threads=1
