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
# Guests left running by an aborted earlier run would share them too (and a TCG guest is slow
# enough alone): the test labs are the tests' own names, so they are removed first; anything else
# running is shown, never touched.
echo "== host before the real tests"
KLAB=./target/debug/klab
for lab in e2e e2eha e2ek8s crash; do "$KLAB" down "$lab" >/dev/null; done
"$KLAB" down e2ecp --all-copies >/dev/null
show_host() {
  echo "load: $(cut -d' ' -f1-3 /proc/loadavg), qemu processes: $(pgrep -c -f qemu-system || true)"
  virsh -c qemu:///system list --all || true
}
show_host
# libvirt probes QEMU's capabilities when its cache is stale (a probe that touches a hanging /dev/kvm
# is slow): let that happen once here, timed, rather than inside the first test's define.
t0=$(date +%s)
virsh -c qemu:///system domcapabilities --virttype qemu >/dev/null
echo "libvirt domain capabilities: $(( $(date +%s) - t0 )) s"
# A loaded host can take minutes for one libvirt call (defines under libvirtd's QEMU re-probes
# were seen at 50-270 s): the real tests give each call 15 min instead of the default 5.
export KLAB_LIBVIRT_TIMEOUT="${KLAB_LIBVIRT_TIMEOUT:-900}"
echo "== tests marked #[ignore = \"needs …\"] (real QEMU guests, qemu:///system, the real image build)"
if ! cargo test --locked --all-targets -- --ignored --test-threads=1; then
  echo "== host after the failed real tests"
  show_host
  exit 1
fi
